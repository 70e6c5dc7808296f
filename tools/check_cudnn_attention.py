"""GPU check: the ``cudnn`` attention backend against the XLA reference (values and
gradients, key-padding mask, GQA). Run on an NVIDIA GPU: python tools/check_cudnn_attention.py"""
import jax
import jax.numpy as jnp
import numpy as np

from jaxdit.kernels import dispatch
from jaxdit.kernels.reference import xla_attention


def main():
    rng = np.random.default_rng(0)
    for (b, s, h, hkv, d) in [(2, 384, 8, 8, 64), (2, 300, 24, 8, 96), (1, 256, 6, 2, 72)]:
        q, k, v = (jnp.asarray(rng.normal(size=(b, s, n, d)), jnp.bfloat16)
                   for n in (h, hkv, hkv))
        mask = jnp.asarray(np.arange(s)[None] < np.array([[s - 37], [s]])[:b])
        def loss(fn):
            return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2)
        ref_fn = lambda q, k, v: xla_attention(q, k, v, mask)
        cud_fn = lambda q, k, v: dispatch.attention(q, k, v, mask, impl="cudnn")
        out_err = float(jnp.abs(cud_fn(q, k, v).astype(jnp.float32)
                                - ref_fn(q, k, v).astype(jnp.float32)).max())
        g_ref = jax.grad(loss(ref_fn), argnums=(0, 1, 2))(q, k, v)
        g_cud = jax.grad(loss(cud_fn), argnums=(0, 1, 2))(q, k, v)
        g_err = max(float(jnp.abs(a.astype(jnp.float32) - c.astype(jnp.float32)).max()
                          / (jnp.abs(a.astype(jnp.float32)).max() + 1e-6))
                    for a, c in zip(g_ref, g_cud))
        print(f"B={b} S={s} H={h} Hkv={hkv} D={d}: max |out diff| {out_err:.4f} (bf16), "
              f"max relative grad diff {g_err:.4f}")


if __name__ == "__main__":
    main()

"""Benchmarks of the Expert Race pieces, side by side in one run.

1. Sharded global top-k over the (B, L, E) router scores, batch split over ``--devices``
   devices: radix select (``psum`` of small histograms) vs all-gather + ``lax.top_k``.
   Reports wall time and what the collectives move, read from the compiled HLO: number of
   collective ops and the bytes of their results per device (an all-reduce of ``n`` bytes
   or an all-gather producing ``n`` bytes counts ``n``).
2. Expert compute on one device: grouped matmul (``ragged_dot`` over the selected pairs)
   vs the dense-masked oracle that runs every expert on every token.

On CPU the devices are fake (``--xla_force_host_platform_device_count``), so times show
compute only, not interconnect; the byte counts hold on any backend.

  python tools/bench_moe.py --batch 64 --tokens 256 --experts 32 --k 4 --width 256
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import time

if __name__ == "__main__" and "--help" not in sys.argv:
    n = next((a.split("=")[1] for a in sys.argv if a.startswith("--devices=")), "8")
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={n}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxdit.moe import experts, routing  # noqa: E402
from jaxdit.parallel.mesh import make_mesh  # noqa: E402

COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "reduce-scatter",
               "collective-permute")
DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1,
               "u8": 1, "s64": 8, "u64": 8, "f64": 8}
SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
OP = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")


def collective_bytes(hlo: str) -> tuple[int, int]:
    """``(ops, bytes)`` of the collectives in a compiled HLO module (per device)."""
    ops = total = 0
    for line in hlo.splitlines():
        match = OP.search(line)
        if not match:
            continue
        ops += 1
        for dtype, dims in SHAPE.findall(match.group(1)):
            size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            total += size * DTYPE_BYTES.get(dtype, 4)
    return ops, total


def timed(fn, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


def bench_topk(args):
    mesh = make_mesh({"data": args.devices}, jax.devices()[:args.devices])
    shape = (args.batch, args.tokens, args.experts)
    scores = jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float32)
    scores = jax.device_put(scores, NamedSharding(mesh, P("data")))
    print(f"\n== global top-k: scores {shape} = {np.prod(shape):,} f32, K = "
          f"{args.batch * args.tokens * args.k:,}, batch over {args.devices} devices ==")
    print(f"{'method':<22}{'ms':>10}{'collectives':>13}{'bytes/device':>16}{'vs radix':>10}")
    rows = {}
    for method, bits in (("radix", 4), ("radix", 8), ("radix", 1), ("gather", 4)):
        fn = jax.jit(functools.partial(routing.route, strategy="expert_race", k=args.k,
                                       batch_axes=("data",), bits=bits, method=method))
        with jax.set_mesh(mesh):
            hlo = fn.lower(scores).compile().as_text()
            ms = 1e3 * timed(fn, scores, iters=args.iters)
        name = f"{method}" + (f" ({bits}-bit digits)" if method == "radix" else " + lax.top_k")
        rows[name] = (ms, *collective_bytes(hlo))
    base = rows["radix (4-bit digits)"][2]
    for name, (ms, ops, nbytes) in rows.items():
        print(f"{name:<22}{ms:>10.2f}{ops:>13}{nbytes:>16,}{nbytes / base:>9.0f}x")


def bench_experts(args):
    b, l, e, d = args.batch, args.tokens, args.experts, args.width
    h = 4 * d // args.k
    key = jax.random.split(jax.random.PRNGKey(1), 6)
    x = jax.random.normal(key[0], (b, l, d), jnp.float32)
    s = jax.random.normal(key[1], (b, l, e), jnp.float32)
    mask, _ = routing.route(s, "expert_race", args.k)
    weight = jnp.where(mask, s, 0.0)
    params = {"w1": jax.random.normal(key[2], (e, d, h)) * 0.02, "b1": jnp.zeros((e, h)),
              "w2": jax.random.normal(key[3], (e, h, d)) * 0.02, "b2": jnp.zeros((e, d))}
    print(f"\n== expert compute, one device: {b * l:,} tokens, {e} experts of hidden {h}, "
          f"k={args.k} (fwd+bwd) ==")
    print(f"{'impl':<22}{'ms':>10}{'vs grouped':>12}")
    times = {}
    for impl in ("grouped", "dense"):
        def loss(p, x, mask, weight, impl=impl):
            y, _ = experts.expert_ffn(x, mask, weight, p, k=args.k, capacity_factor=1.0,
                                      impl=impl)
            return jnp.sum(y * y)
        fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
        times[impl] = 1e3 * timed(fn, params, x, mask, weight, iters=args.iters)
    for impl, ms in times.items():
        print(f"{impl:<22}{ms:>10.2f}{ms / times['grouped']:>11.2f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    if jax.device_count() < args.devices:
        sys.exit(f"Need {args.devices} devices, have {jax.device_count()}.")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} x {jax.device_count()}")
    bench_topk(args)
    bench_experts(args)


if __name__ == "__main__":
    main()

"""Turns the per-layer values sown by :class:`jaxdit.models.moe_mlp.MoEMlp` into train metrics."""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Timestep bins for "experts per token vs t" (Race-DiT Fig. 6); t = 1 is pure noise.
T_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _by_name(tree, per_layer_shapes: dict):
    """``{name: (layers, *shape)}`` from a sown collection: unrolled layers sow one value
    each (1-tuples), a scanned stack sows them stacked on a leading layer axis.
    ``per_layer_shapes[name]``: the shape of one layer's value (default scalar)."""
    out: dict[str, list] = {}
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))[0]
    for path, values in flat:
        name = path[-1].key
        shape = per_layer_shapes.get(name, ())
        for v in (values if isinstance(values, tuple) else [values]):
            out.setdefault(name, []).append(jnp.reshape(v, (-1,) + shape))
    return {name: jnp.concatenate(vs) for name, vs in out.items()}


def summarize(moe_metrics, t) -> dict:
    """Scalars ``moe/<name>`` averaged over layers, plus ``moe/experts_per_token_t<lo>-<hi>``:
    mean experts per token (over layers and tokens) of the samples whose ``t`` (B,) falls in
    each bin (NaN for a bin without samples in this batch)."""
    out = {}
    for name, stacked in _by_name(moe_metrics, {"experts_per_token": t.shape}).items():
        if name == "experts_per_token":
            per_sample = stacked.mean(axis=0)  # (B,)
            out["moe/experts_per_token"] = per_sample.mean()
            for lo, hi in zip(T_BINS[:-1], T_BINS[1:]):
                inside = (t >= lo) & ((t < hi) if hi < 1.0 else (t <= hi))
                n = jnp.sum(inside)
                out[f"moe/experts_per_token_t{lo:.2f}-{hi:.2f}"] = jnp.where(
                    n > 0, jnp.sum(jnp.where(inside, per_sample, 0.0)) / jnp.maximum(n, 1),
                    jnp.nan)
        else:
            out[f"moe/{name}"] = stacked.mean()
    return out

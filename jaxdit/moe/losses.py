"""Router regularisers and routing metrics, all reduced to E x E or E-sized statistics.

Everything here works on global ``(N, E)`` arrays under ``jit``: the contractions over the
token dimension (sharded over the batch axes) become local matmuls plus an all-reduce of an
``E x E`` (or ``E``) result; the logits themselves are never gathered.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def router_similarity_loss(logits, mask):
    """Race-DiT router similarity loss (its Fig. 4 motivation; Eq. 9-11 as re-implemented
    publicly, the paper body is not available).

    ``P = softmax(logits)`` (N, E); ``P' = P^T P`` is the expert-by-expert similarity of the
    routing distributions; ``M' = M^T M`` counts how often two experts are selected for the
    same token (diagonal: per-expert load). Weights, without gradient:
    ``W_ii = E * M'_ii / sum_j M'_jj`` and ``W_ij = (E^2 - E) * M'_ij / sum_{i!=j} M'_ij``;
    loss ``sum(W * P') / N``. Overloaded experts and frequently co-selected pairs are pushed
    apart, which balances load and diversifies expert combinations. Equals 1 for uniform P
    with uniform load and co-activation.
    """
    n, e = logits.shape
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    sim = jnp.einsum("ne,nf->ef", p, p)
    m = mask.astype(jnp.float32)
    co = jax.lax.stop_gradient(jnp.einsum("ne,nf->ef", m, m))
    eye = jnp.eye(e, dtype=bool)
    diag_total = jnp.maximum(jnp.sum(jnp.where(eye, co, 0.0)), 1.0)
    off_total = jnp.maximum(jnp.sum(jnp.where(eye, 0.0, co)), 1.0)
    w = jnp.where(eye, e * co / diag_total, (e * e - e) * co / off_total)
    return jnp.sum(w * sim) / n


def balance_loss(logits, mask):
    """Switch-Transformer load-balance loss ``E * sum_e f_e * p_e``: ``f_e`` the fraction of
    selected pairs on expert ``e``, ``p_e`` its mean softmax probability (1 when uniform)."""
    e = logits.shape[-1]
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).mean(axis=0)
    counts = jnp.sum(mask, axis=0).astype(jnp.float32)
    f = counts / jnp.maximum(counts.sum(), 1.0)
    return e * jnp.sum(jax.lax.stop_gradient(f) * p)


def max_violation(load):
    """MaxVio = max_e load_e / mean_e load_e - 1 (0 = perfectly balanced)."""
    load = load.astype(jnp.float32)
    return jnp.max(load) / jnp.maximum(jnp.mean(load), 1e-9) - 1.0


def combination_usage(coactivation, mass: float = 0.95):
    """Race-DiT's Comb (its Fig. 13): the share (in %) of all ``E(E-1)/2`` expert pairs
    needed to cover ``mass`` of the pair co-activations.

    ``coactivation`` is ``M^T M`` (E, E): off-diagonal entries count tokens routed to both
    experts. Pair counts are sorted in decreasing order and accumulated; a collapsed router
    that reuses a few pairs scores low, a diverse one high.
    """
    e = coactivation.shape[0]
    iu = jnp.triu_indices(e, k=1)
    pairs = -jnp.sort(-coactivation[iu].astype(jnp.float32))
    total = jnp.sum(pairs)
    cum = jnp.cumsum(pairs) / jnp.maximum(total, 1e-9)
    needed = jnp.sum(cum < mass) + 1
    return jnp.where(total > 0, 100.0 * needed / pairs.shape[0], 0.0)

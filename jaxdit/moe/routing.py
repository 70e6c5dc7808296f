"""Routing strategies of Race-DiT (its Table 6), behind one interface.

Every strategy is "top-K over some dimensions, independently for each slice of the others"
of the router scores ``S`` (B, L, E) (batch, tokens, experts):

=============  ===========  ==========  ==============
strategy        groups        race over   K per group
=============  ===========  ==========  ==============
token_choice    B*L           E           k
expert_choice   B*E           L           k*L/E
bl_choice       E             B*L         B*L*k/E
be_choice       L             B*E         B*k
le_choice       B             L*E         L*k
expert_race     1             B*L*E       B*L*k
=============  ===========  ==========  ==============

Each selects ``B*L*k`` (token, expert) pairs in total. Strategies that race over ``B`` depend
on the rest of the batch, which is sharded over devices: their top-K runs as a radix select
with ``psum`` inside ``shard_map`` (:mod:`jaxdit.moe.topk`); the others are local to a
sample. For the batch-dependent ones, the K-th value of each group is returned so a running
threshold can replace the batch race at inference (see :class:`jaxdit.models.moe_mlp.MoEMlp`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxdit.moe import topk

# strategy -> (group dims, race dims), dims named by "b", "l", "e".
STRATEGIES = {
    "token_choice": ("bl", "e"),
    "expert_choice": ("be", "l"),
    "bl_choice": ("e", "bl"),
    "be_choice": ("l", "be"),
    "le_choice": ("b", "le"),
    "expert_race": ("", "ble"),
}
GATINGS = ("identity", "softmax", "sigmoid")


def check_gating(kind: str) -> None:
    if kind not in GATINGS:
        raise ValueError(f"Unknown moe.gating {kind!r}; available: {GATINGS}.")


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown moe.routing {strategy!r}; available: {sorted(STRATEGIES)}.")


def batch_dependent(strategy: str) -> bool:
    """True when a token's experts depend on other samples of the batch."""
    check_strategy(strategy)
    return "b" in STRATEGIES[strategy][1]


def group_size(strategy: str, seq_len: int, num_experts: int) -> int:
    """Number of threshold groups ``G`` of a batch-dependent strategy (1 for the race)."""
    if not batch_dependent(strategy):
        raise ValueError(f"{strategy} is local to each sample and keeps no threshold.")
    return {"": 1, "e": num_experts, "l": seq_len}[STRATEGIES[strategy][0]]


def gate(logits, kind: str):
    """Gating function: the score used both to rank and to weight experts (fp32)."""
    check_gating(kind)
    logits = logits.astype(jnp.float32)
    if kind == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    if kind == "sigmoid":
        return jax.nn.sigmoid(logits)
    return logits


def num_selected(strategy: str, batch: int, seq_len: int, num_experts: int, k: int) -> int:
    """K per group (global batch ``batch``); raises if it is not a whole number."""
    check_strategy(strategy)
    num = {"token_choice": k, "expert_choice": k * seq_len, "bl_choice": batch * seq_len * k,
           "be_choice": batch * k, "le_choice": seq_len * k,
           "expert_race": batch * seq_len * k}[strategy]
    den = num_experts if strategy in ("expert_choice", "bl_choice") else 1
    if num % den:
        raise ValueError(f"moe.routing={strategy} selects {num}/{den} per group, not a whole "
                         f"number (batch {batch}, tokens {seq_len}, experts {num_experts}, "
                         f"k {k}).")
    if not 1 <= num // den <= _members(strategy, batch, seq_len, num_experts):
        raise ValueError(f"moe.k={k} selects {num // den} of "
                         f"{_members(strategy, batch, seq_len, num_experts)} per group.")
    return num // den


def _members(strategy, b, l, e):
    size = {"b": b, "l": l, "e": e}
    n = 1
    for d in STRATEGIES[strategy][1]:
        n *= size[d]
    return n


def _to_groups(scores, strategy):
    """(B, L, E) -> (G, M) in (group dims, race dims) order, plus the inverse function."""
    groups, race = STRATEGIES[strategy]
    order = [("b", 0), ("l", 1), ("e", 2)]
    axes = [i for d, i in order if d in groups] + [i for d, i in order if d in race]
    moved = jnp.transpose(scores, axes)
    g = 1
    for i in axes[:len(groups)]:
        g *= scores.shape[i]
    flat = moved.reshape(g, -1)
    inverse = [axes.index(i) for i in range(3)]

    def back(x):
        return jnp.transpose(x.reshape(moved.shape), inverse)

    return flat, back


def _route_local(scores, strategy, k_sel, axis_name, bits, method):
    flat, back = _to_groups(scores, strategy)
    mask, kth = topk.select(flat, k_sel, axis_name, method=method, bits=bits)
    return back(mask), kth


def route(scores, strategy: str, k: int, *, mesh=None, batch_axes=(), bits: int = 4,
          method: str = "radix"):
    """Top-K selection of (token, expert) pairs.

    Args:
      scores: ``(B, L, E)`` gated router scores (global array under ``jit``).
      k: average experts per token (``x`` in "x-in-y").
      mesh, batch_axes: when ``batch_axes`` is non-empty the batch dim is sharded over these
        mesh axes and batch-dependent strategies race across devices in ``shard_map``.
      bits, method: radix digit width; ``radix`` (default) or ``gather`` (reference that
        all-gathers the scores).
    Returns:
      ``(mask (B, L, E) bool, kth (G,) float32)``: exactly ``B*L*k`` pairs selected;
      ``kth`` is the K-th score of each group (meaningful for batch-dependent strategies).
    """
    topk.check_method(method)
    b, l, e = scores.shape
    k_sel = num_selected(strategy, b, l, e, k)
    sharded = bool(batch_axes) and batch_dependent(strategy)
    if not sharded:
        return _route_local(scores, strategy, k_sel, None, bits, method)
    names = tuple(batch_axes)

    def body(s):
        return _route_local(s, strategy, k_sel, names, bits, method)

    return jax.shard_map(body, mesh=mesh, in_specs=P(names),
                         out_specs=(P(names), P()))(scores)


def threshold_route(scores, strategy: str, threshold):
    """Batch-independent selection ``scores >= threshold`` for batch-dependent strategies
    (inference): ``threshold`` (G,) from :func:`group_size`, broadcast to (B, L, E)."""
    groups = STRATEGIES[strategy][0]
    if groups == "":
        tau = threshold.reshape(1, 1, 1)
    elif groups == "e":
        tau = threshold.reshape(1, 1, -1)
    elif groups == "l":
        tau = threshold.reshape(1, -1, 1)
    else:
        raise ValueError(f"{strategy} is not batch-dependent; use route().")
    return scores >= tau

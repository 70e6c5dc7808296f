"""The MoE block that replaces a transformer MLP (Race-DiT, its Fig. 2 and 12).

``MoEMlp(x)`` for ``x`` (B, L, d):

1. Router: ``Linear(d -> d) -> GELU`` trunk, then a gating head ``Linear(d -> E)`` giving the
   logits and (per-layer regularisation, PLR) a target head ``Linear(d -> p*p*C)`` whose
   prediction of the diffusion target is sown into the ``deep_pred`` collection; the loss
   compares it with the patchified target (:mod:`jaxdit.train.flow_objective`).
2. Gating (identity / softmax / sigmoid) then routing (:mod:`jaxdit.moe.routing`). Expert
   Race keeps the top ``B*L*k`` of all ``B*L*E`` scores across the (sharded) batch.
3. Experts as a grouped matmul over the selected pairs (:mod:`jaxdit.moe.experts`),
   weighted by their gate scores.

Training vs inference follows Flax's batch-norm idiom: when the ``moe_state`` collection is
mutable (training), batch-dependent strategies race over the batch and update a per-layer
running threshold (EMA of the batch's K-th score, bias-corrected, decay
``threshold_decay``); otherwise (validation, sampling with CFG's doubled batch) tokens pick
the experts whose score reaches that threshold, independently of the rest of the batch.

Regularisers (router similarity, balance) are sown already weighted into ``aux_loss``;
routing statistics into ``moe_metrics`` (see :func:`jaxdit.moe.metrics.summarize`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdit.models.layers import dense
from jaxdit.moe import experts, losses, routing, topk
from jaxdit.parallel.mesh import batch_mesh_axes

Dtype = Any
expert_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=-2,
                                               out_axis=-1, batch_axis=(0,))


def mesh_layout(batch: int, num_experts: int):
    """``(token_axes, expert_axis)`` of the mesh in context (empty without a mesh).

    Tokens are split over the mesh axes of the logical ``batch`` rule that have more than one
    device (when the batch divides over them); experts over ``expert`` when it divides E.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return (), None
    sizes = dict(mesh.shape)
    axes = batch_mesh_axes(sizes)
    token_axes = axes if batch % math.prod(sizes[a] for a in axes) == 0 else ()
    n_exp = sizes.get("expert", 1)
    expert_axis = "expert" if n_exp > 1 and num_experts % n_exp == 0 else None
    return token_axes, expert_axis


@dataclasses.dataclass(frozen=True)
class MoESpec:
    """MoE settings of every block (see :class:`MoEMlp`); ``hidden_split`` s gives experts of
    hidden ``mlp_ratio * d / s``; "x-in-y" is ``k=x`` of ``num_experts=y``."""
    num_experts: int
    k: int
    hidden_split: int = 1
    routing: str = "expert_race"
    gating: str = "identity"
    capacity_factor: float = 2.0
    eval_capacity_factor: float = 0.0
    threshold_decay: float = 0.95
    plr: bool = True
    similarity_weight: float = 0.0
    balance_weight: float = 0.0
    topk_bits: int = 4
    topk_method: str = "radix"
    expert_impl: str = "auto"



def moe_spec(moe_cfg) -> MoESpec | None:
    """:class:`MoESpec` from ``config.moe``, checked (None when ``num_experts == 0``: dense
    MLPs)."""
    if moe_cfg is None or not moe_cfg.num_experts:
        return None
    fields = {f.name for f in dataclasses.fields(MoESpec)}
    spec = MoESpec(**{k: v for k, v in moe_cfg.items() if k in fields})
    routing.check_strategy(spec.routing)
    routing.check_gating(spec.gating)
    if not 1 <= spec.k <= spec.num_experts:
        raise ValueError(f"moe.k={spec.k} must be in [1, moe.num_experts={spec.num_experts}].")
    experts.resolve_impl(spec.expert_impl)
    topk.check_method(spec.topk_method)
    topk.check_bits(spec.topk_bits)
    if not 0.0 <= spec.threshold_decay < 1.0:
        raise ValueError(f"moe.threshold_decay must be in [0, 1), got {spec.threshold_decay}.")
    return spec

class MoEMlp(nn.Module):
    """Mixture-of-experts MLP with the settings ``spec`` (see the module docstring), experts
    of hidden width ``hidden``. Output ``(B, L, d)``."""
    spec: MoESpec
    hidden: int
    target_dim: int = 0  # PLR target-head width (p*p*C); 0 disables PLR
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _expert_params(self, d):
        e, h, pd = self.spec.num_experts, self.hidden, self.param_dtype

        def param(name, init, shape, axes):
            return self.param(name, nn.with_logical_partitioning(init, axes), shape, pd)

        zeros = nn.initializers.zeros
        return {"w1": param("w1", expert_init, (e, d, h), ("expert", "embed", "mlp")),
                "b1": param("b1", zeros, (e, h), ("expert", "mlp")),
                "w2": param("w2", expert_init, (e, h, d), ("expert", "mlp", "embed")),
                "b2": param("b2", zeros, (e, d), ("expert", "embed"))}

    def _select(self, scores, training, token_axes):
        """Routing mask (B, L, E); updates the running threshold when training."""
        b, l, e = scores.shape
        if not routing.batch_dependent(self.spec.routing):
            mask, _ = routing.route(scores, self.spec.routing, self.spec.k, bits=self.spec.topk_bits,
                                    method=self.spec.topk_method)
            return mask
        g = routing.group_size(self.spec.routing, l, e)
        ema = self.variable("moe_state", "threshold_ema", jnp.zeros, (g,), jnp.float32)
        count = self.variable("moe_state", "updates", jnp.zeros, (), jnp.int32)
        if training:
            mask, kth = routing.route(scores, self.spec.routing, self.spec.k, mesh=None,
                                      batch_axes=token_axes, bits=self.spec.topk_bits,
                                      method=self.spec.topk_method)
            if not self.is_initializing():
                decay = self.spec.threshold_decay
                ema.value = decay * ema.value + (1.0 - decay) * jax.lax.stop_gradient(kth)
                count.value = count.value + 1
            self.sow("moe_metrics", "batch_threshold", jnp.mean(kth))
            return mask
        n = count.value.astype(jnp.float32)
        tau = jnp.where(n > 0, ema.value / (1.0 - self.spec.threshold_decay ** jnp.maximum(n, 1.0)),
                        0.0)
        return routing.threshold_route(scores, self.spec.routing, tau)

    @nn.compact
    def __call__(self, x):
        b, l, d = x.shape
        e = self.spec.num_experts
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        trunk = nn.gelu(dense(d, ("embed", "mlp"), name="router_fc", **kw)(x), approximate=True)
        logits = dense(e, ("mlp", None), name="gate_head", **kw)(trunk).astype(jnp.float32)
        if self.target_dim:
            pred = dense(self.target_dim, ("mlp", None), name="target_head", **kw)(trunk)
            self.sow("deep_pred", "pred", pred.astype(jnp.float32))
        scores = routing.gate(logits, self.spec.gating)
        training = self.is_mutable_collection("moe_state")
        token_axes, expert_axis = mesh_layout(b, e)
        mask = self._select(scores, training, token_axes)
        weight = jnp.where(mask, scores, 0.0)
        params = self._expert_params(d)
        cf = self.spec.capacity_factor if training else self.spec.eval_capacity_factor
        y, dropped = experts.expert_ffn(x, mask, weight, params, k=self.spec.k, capacity_factor=cf,
                                        token_axes=token_axes, expert_axis=expert_axis,
                                        impl=self.spec.expert_impl)
        self._sow_losses_and_metrics(logits, mask, dropped)
        return y

    def _sow_losses_and_metrics(self, logits, mask, dropped):
        if not (self.is_mutable_collection("aux_loss")
                or self.is_mutable_collection("moe_metrics")):
            return
        e = self.spec.num_experts
        flat_logits, flat_mask = logits.reshape(-1, e), mask.reshape(-1, e)
        if self.spec.similarity_weight:
            self.sow("aux_loss", "router_similarity", self.spec.similarity_weight
                     * losses.router_similarity_loss(flat_logits, flat_mask))
        if self.spec.balance_weight:
            self.sow("aux_loss", "balance", self.spec.balance_weight
                     * losses.balance_loss(flat_logits, flat_mask))
        m = flat_mask.astype(jnp.float32)
        selected = jnp.sum(m)
        self.sow("moe_metrics", "maxvio", losses.max_violation(jnp.sum(m, axis=0)))
        self.sow("moe_metrics", "comb", losses.combination_usage(m.T @ m))
        self.sow("moe_metrics", "dropped_frac", dropped / jnp.maximum(selected, 1.0))
        # Average number of experts per token of each sample, for the per-timestep plot.
        self.sow("moe_metrics", "experts_per_token", jnp.mean(mask.astype(jnp.float32), (1,))
                 .sum(-1))

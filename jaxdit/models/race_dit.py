"""Race-DiT: a class-conditional DiT (adaLN-Zero) whose MLPs are Expert-Race MoE blocks.

The backbone is DiT (Peebles & Xie): patch embedding + fixed 2D sin-cos positions,
``c = TimestepMLP(t) + LabelEmbedding(y)`` (a null class for classifier-free guidance),
blocks ``x += g1 * Attn(modulate(LN(x)))``, ``x += g2 * FFN(modulate(LN(x)))`` with the six
AdaLN vectors from a zero-initialised ``Linear(d -> 6d)`` per block, and the zero-init final
layer. With ``moe=None`` the FFN is the dense MLP (the paper's "Dense" baselines); otherwise
it is :class:`jaxdit.models.moe_mlp.MoEMlp` in every block (Race-DiT, its Fig. 2).

Condition: ``cond["label"]`` int (B,); label ``-1`` is the null class.
"""
from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdit.models.attention import SelfAttention
from jaxdit.models.family import Family, denoiser_example_inputs, transformer_kwargs
from jaxdit.models.base import Block, Denoiser
from jaxdit.models.layers import (AdaLNModulation, ConditionEmbedder, LayerNorm, Mlp, modulate,
                                  sincos_2d)
from jaxdit.models.stack import apply_stack
from jaxdit.models.moe_mlp import MoEMlp, MoESpec, moe_spec


class DiTBlock(Block):
    """adaLN-Zero DiT block; FFN dense or MoE. ``x`` (B, N, d), ``c`` (B, d)."""
    moe: MoESpec | None = None
    target_dim: int = 0

    def ffn(self):
        hidden = int(self.width * self.mlp_ratio)
        if self.moe is None:
            return Mlp(hidden, name="mlp", **self.kw)
        m = self.moe
        if hidden % m.hidden_split:
            raise ValueError(f"MLP hidden {hidden} is not divisible by moe.hidden_split="
                             f"{m.hidden_split}.")
        return MoEMlp(m, hidden // m.hidden_split, target_dim=self.target_dim if m.plr else 0,
                      name="moe", **self.kw)

    @nn.compact
    def __call__(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = AdaLNModulation(
            self.width, 6, name="adaln", **self.kw)(c)
        attn = SelfAttention(self.num_heads, self.head_dim, qk_norm=self.qk_norm,
                             impl=self.attn_impl, name="attn", **self.kw)
        x = x + gate1 * attn(modulate(LayerNorm(dtype=self.dtype)(x), shift1, scale1))
        x = x + gate2 * self.ffn()(modulate(LayerNorm(dtype=self.dtype)(x), shift2, scale2))
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))


class RaceDiT(Denoiser):
    """Class-conditional DiT / Race-DiT denoiser: ``(x (B,H,W,C), t (B,), cond) -> (B,H,W,C)``.

    Fields are :class:`Denoiser`'s (the text ones unused) plus ``num_classes`` and ``moe``.
    """
    num_classes: int = 0
    moe: MoESpec | None = None

    def image_positions(self, grid_h, grid_w):
        return sincos_2d(grid_h, grid_w, self.width)[None]

    @nn.compact
    def __call__(self, x, t, cond):
        tokens = self.embed_image(x)
        label = jnp.where(cond["label"] < 0, self.num_classes, cond["label"])
        c = ConditionEmbedder(self.width, num_classes=self.num_classes, name="cond_embed",
                              **self.kw)(t, label=label)
        target_dim = self.patch_size ** 2 * self.out_channels
        tokens = apply_stack(DiTBlock, self.depth, "block", tokens, c, scan=self.scan_layers,
                             remat=self.remat, moe=self.moe, target_dim=target_dim,
                             **self.block_options())
        return self.predict(tokens, c, x.shape)


EXPERT_PARAMS = ("w1", "b1", "w2", "b2")
# config.model fields this family reads beyond family.COMMON_FIELDS (and all of config.moe).
CONFIG_FIELDS = ("num_classes",)


def param_counts(params, moe: MoESpec | None) -> dict[str, int]:
    """Parameter counts as Race-DiT reports them (params may be ``ShapeDtypeStruct``s).

    ``total``: everything; ``blocks``: the transformer blocks (its Table 4 "Total Param."
    counts these: DiT-XL/2 is listed at 0.669B, i.e. without embedders and final layer);
    ``blocks_without_router``: its Table 5 convention; ``activated``: blocks with only ``k``
    of the ``E`` experts per MoE layer (Table 4 "Activate").
    """
    out = dict(total=0, blocks=0, router=0, experts=0)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [getattr(p, "key", str(p)) for p in path]
        n = int(np.prod(leaf.shape))
        out["total"] += n
        if not any(str(x).startswith("block_") for x in names):
            continue
        out["blocks"] += n
        if "moe" in names:
            out["experts" if names[-1] in EXPERT_PARAMS else "router"] += n
    active = out["experts"] * moe.k // moe.num_experts if moe else 0
    return dict(total=out["total"], blocks=out["blocks"],
                blocks_without_router=out["blocks"] - out["router"],
                activated=out["blocks"] - out["experts"] + active)


def build(model_cfg, out_channels: int, moe_cfg=None) -> RaceDiT:
    """Race-DiT from ``config.model`` and ``config.moe`` (dense when ``moe.num_experts=0``)."""
    m = model_cfg
    if m.num_classes < 1:
        raise ValueError("model.family='race_dit' is class-conditional: set model.num_classes.")
    return RaceDiT(num_classes=m.num_classes, moe=moe_spec(moe_cfg),
                   **transformer_kwargs(m, out_channels))


FAMILY = Family("race_dit", build, denoiser_example_inputs, own_fields=CONFIG_FIELDS,
                class_conditional=True, sections=("moe",))

"""D2iT: Dynamic Diffusion Transformer (Jia et al., CVPR 2025) on the DVAE latent.

Three parts in one model (:class:`D2iT`):

* ``frozen_vae``: the stage-1 :class:`jaxdit.models.dvae.DVAE` (frozen: the optimizer skips
  ``frozen_*`` parameters) giving the neighbour-copied latent ``(B, 2h, 2w, z)`` and the
  grain map ``(B, h, w)`` (1 = fine) of every image;
* ``grain_model``: the **Dynamic Grain Transformer** (:class:`GrainTransformer`);
* ``denoiser``: the **Dynamic Content Transformer** (:class:`DynamicContentTransformer`).

The paper's code is unreleased; the choices below follow ``docs/lumina_d2it_spec.md`` part 2
and are configurable:

* **Grain transformer**: a small class-conditional DiT on the region grid trained with
  cross-entropy. We make it a masked-token model (MaskGIT): input tokens are the grain map
  with a random, cosine-scheduled subset replaced by a mask token, the condition is
  ``label`` + the mask ratio (through the timestep embedder), the loss is the CE on the
  masked regions. Sampling unmasks iteratively (:mod:`jaxdit.diffusion.multigrain`), which
  gives spatially coherent maps (independent per-region draws from a noise-input
  classifier would not), and the fine ratio can be fixed exactly.
* **Content transformer**: DiT blocks (adaLN-Zero on timestep + class) over one token per
  region. Routing module: a fine region's token embeds its 2x2 fine latent cells, a
  coarse region's token its one coarse code (separate embedders), plus a learned grain
  embedding and a learned position embedding (initialised to the 2D sin-cos table). The
  trunk (``depth - refine_depth`` blocks) ends in a *rough* head predicting one value per
  region (the coarse-grain prediction, copied over the 2x2 block); the **RefineNet**
  (``refine_depth`` blocks, 2 as the paper's 10+2 for B) sees the trunk tokens plus an
  embedding of the fine regions' fine-grid input and predicts a *detail* correction that
  is added in fine regions only: "rough prediction of noise with detailed regions
  correction". A coarse region's output is therefore constant over its block, exactly
  like its multi-grained noise and its copied latent.
* Flow matching (the spine's convention) replaces DiT's DDPM with learned sigma; the
  dynamic grain loss is in :func:`jaxdit.diffusion.multigrain.dynamic_grain_loss`.

Shapes: ``x`` ``(B, H, W, C)`` fine-grid latents with ``H = 2h``; ``cond`` has ``label``
``(B,)`` int (-1 = null class) and ``grain`` ``(B, h, w)`` int.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdit.models.base import Denoiser
from jaxdit.models.dvae import DVAE, check_region, fine_mask, upsample2
from jaxdit.models.dvae import build as build_dvae
from jaxdit.models.family import Family, denoiser_example_inputs, dtypes, transformer_kwargs
from jaxdit.models.layers import (ConditionEmbedder, FinalLayer, PatchEmbed, dense, patchify,
                                  sincos_2d)
from jaxdit.models.race_dit import DiTBlock
from jaxdit.models.stack import apply_stack
from jaxdit.models.vae import latent_scale_param

Dtype = Any
MASK_TOKEN = 2  # grain-map tokens: 0 coarse, 1 fine, 2 masked
# config.model fields this family reads beyond family.COMMON_FIELDS.
CONFIG_FIELDS = ("num_classes", "refine_depth")


def _position_table(n: int, width: int, name: str, module: nn.Module):
    """Learned ``(1, n, width)`` position embedding initialised to the sin-cos table of
    the square ``sqrt(n) x sqrt(n)`` grid."""
    side = int(round(np.sqrt(n)))
    if side * side != n:
        raise ValueError(f"{n} tokens are not a square grid.")

    def init(key, shape, dtype):
        del key
        return jnp.asarray(sincos_2d(side, side, width), dtype).reshape(shape)

    table = module.param(name, nn.with_logical_partitioning(init, ("pos", "embed")), (n, width),
                         module.param_dtype)
    return table[None]


class GrainTransformer(nn.Module):
    """Masked grain-map model: tokens ``(B, N)`` in {0, 1, 2=mask}, ``mask_ratio`` (B,),
    ``label`` (B,) (-1 = null) -> logits ``(B, N, 2)`` (coarse, fine) in fp32."""
    depth: int = 8
    width: int = 256
    num_heads: int = 4
    num_classes: int = 0
    mlp_ratio: float = 4.0
    attn_impl: str = "xla"
    scan_layers: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, mask_ratio, label):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        embed = nn.Embed(3, self.width, name="token_embed", embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vocab", "embed")), **kw)
        x = embed(tokens) + _position_table(tokens.shape[1], self.width, "pos_embed",
                                            self).astype(self.dtype)
        label = jnp.where(label < 0, self.num_classes, label)
        c = ConditionEmbedder(self.width, num_classes=self.num_classes, name="cond_embed",
                              **kw)(mask_ratio, label=label if self.num_classes else None)
        opts = dict(width=self.width, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                    qk_norm=False, sandwich=False, attn_impl=self.attn_impl, **kw)
        x = apply_stack(DiTBlock, self.depth, "block", x, c, scan=self.scan_layers, **opts)
        return FinalLayer(2, name="head", **kw)(x, c).astype(jnp.float32)


class DynamicContentTransformer(Denoiser):
    """Multi-grained noise predictor: ``(x (B, H, W, C), t (B,), cond) -> (B, H, W, C)``
    fp32 (see the module docstring). ``patch_size`` must be 2 (one token per region)."""
    num_classes: int = 0
    refine_depth: int = 2

    def blocks(self, prefix: str, n: int, tokens, c):
        return apply_stack(DiTBlock, n, prefix, tokens, c, scan=self.scan_layers,
                           remat=self.remat, **self.block_options())

    @nn.compact
    def __call__(self, x, t, cond):
        if self.patch_size != 2:
            raise ValueError("D2iT's content transformer has one token per 2x2 region: "
                             f"model.patch_size must be 2, got {self.patch_size}.")
        if not 0 <= self.refine_depth <= self.depth:
            raise ValueError(f"model.refine_depth={self.refine_depth} must be in [0, "
                             f"model.depth={self.depth}].")
        b, hh, ww, ch = x.shape
        grain = cond["grain"].reshape(b, -1)
        is_fine = (grain == 1)[..., None]
        x = x.astype(self.dtype)
        # Routing module: per-grain embedders + grain embedding + learned positions.
        fine_tok = PatchEmbed(self.width, 2, name="fine_embed", **self.kw)(x)
        coarse_code = x.reshape(b, hh // 2, 2, ww // 2, 2, ch).mean(axis=(2, 4))
        coarse_tok = dense(self.width, ("patch", "embed"), name="coarse_embed",
                           **self.kw)(coarse_code.reshape(b, -1, ch))
        grain_embed = nn.Embed(2, self.width, name="grain_embed", embedding_init=(
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))),
            **self.kw)
        tokens = (jnp.where(is_fine, fine_tok, coarse_tok) + grain_embed(grain)
                  + _position_table(grain.shape[1], self.width, "pos_embed", self).astype(self.dtype))
        tokens = nn.with_logical_constraint(tokens, ("batch", "length", "act_embed"))
        label = jnp.where(cond["label"] < 0, self.num_classes, cond["label"])
        c = ConditionEmbedder(self.width, num_classes=self.num_classes, name="cond_embed",
                              **self.kw)(t, label=label)
        tokens = self.blocks("block", self.depth - self.refine_depth, tokens, c)
        rough = FinalLayer(ch, name="rough_head", **self.kw)(tokens, c)
        out = upsample2(rough.reshape(b, hh // 2, ww // 2, ch).astype(jnp.float32))
        if self.refine_depth:
            detail_in = dense(self.width, ("patch", "embed"), name="detail_embed",
                              **self.kw)(patchify(x, 2))
            r = tokens + jnp.where(is_fine, detail_in, 0).astype(self.dtype)
            r = self.blocks("refine", self.refine_depth, r, c)
            detail = self.predict(r, c, x.shape)  # "final" head, (B, H, W, C)
            out = out + fine_mask(cond["grain"]) * detail
        return out


class D2iT(nn.Module):
    """DVAE (frozen) + grain transformer + content transformer; ``__call__`` is the
    content denoiser so the spine's samplers, validation and CFG apply unchanged."""
    frozen_vae: DVAE
    grain_model: GrainTransformer
    denoiser: DynamicContentTransformer
    class_conditional: bool = True
    null_token_id: int = 1

    def setup(self):
        # 1 / std of the stage-1 latents (set when the DVAE weights are loaded); frozen.
        self.frozen_latent_scale = latent_scale_param(self)

    def encode(self, images):
        """``(x0 (B, H/f, W/f, z) scaled latents, grain (B, H/2f, W/2f))``, no gradient."""
        mean, grain = self.frozen_vae.encode(images)
        return jax.lax.stop_gradient(mean * self.frozen_latent_scale), grain

    def decode(self, x0):
        return self.frozen_vae.decode(x0 / self.frozen_latent_scale)

    def grain_logits(self, tokens, mask_ratio, label):
        return self.grain_model(tokens, mask_ratio, label)

    def __call__(self, x, t, cond):
        if self.is_initializing():  # create every part's parameters
            b, hh, ww, _ = x.shape
            f = self.frozen_vae.downsample
            images = jnp.zeros((b, hh * f, ww * f, 3), jnp.float32)
            self.frozen_vae(images, sample=False)
            tokens = jnp.zeros((b, (hh // 2) * (ww // 2)), jnp.int32)
            self.grain_model(tokens, jnp.zeros((b,)), cond["label"])
        return self.denoiser(x, t, cond)


def param_counts(params) -> dict[str, int]:
    """Parameters of each part (``params`` may hold ``ShapeDtypeStruct``s): ``denoiser``
    (content transformer), ``grain_model``, ``vae`` and ``total`` = the first two, the
    generator the paper's tables count."""
    def count(tree):
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    out = {"denoiser": count(params["denoiser"]), "grain_model": count(params["grain_model"]),
           "vae": count(params["frozen_vae"])}
    out["total"] = out["denoiser"] + out["grain_model"]
    return out


def build(config) -> D2iT:
    """Frozen DVAE + grain transformer + content transformer from ``config.model``,
    ``config.d2it`` and the DVAE's ``config.vae`` / ``config.dvae``."""
    m, d = config.model, config.d2it
    if m.num_classes < 1:
        raise ValueError("model.family='d2it' is class-conditional: set model.num_classes.")
    if config.latent.channels != config.vae.z_channels:
        raise ValueError(f"latent.channels={config.latent.channels} must equal the DVAE's "
                         f"vae.z_channels={config.vae.z_channels}.")
    content = DynamicContentTransformer(num_classes=m.num_classes, refine_depth=m.refine_depth,
                                        **transformer_kwargs(m, config.latent.channels))
    grain = GrainTransformer(depth=d.grain_depth, width=d.grain_width, num_heads=d.grain_heads,
                             num_classes=m.num_classes, attn_impl=m.attn_impl,
                             scan_layers=m.scan_layers, **dtypes(m))
    return D2iT(build_dvae(config), grain, content)


def example_inputs(config, batch: int = 1) -> tuple:
    """``(x (B, s, s, z), t (B,), {"label" (B,), "grain" (B, s/2, s/2)})`` zeros."""
    x, t, cond = denoiser_example_inputs(config, batch)
    s = x.shape[1]
    return x, t, {**cond, "grain": jnp.zeros((batch, s // 2, s // 2), jnp.int32)}


FAMILY = Family("d2it", build, example_inputs, own_fields=CONFIG_FIELDS, role="composite",
                class_conditional=True, sections=("d2it", "dvae"), latent_kinds=("dvae",),
                frozen_parts=True, check=check_region,
                min_depth=lambda model_cfg: int(model_cfg.refine_depth) + 1)


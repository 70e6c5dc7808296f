"""Base config and the small helpers experiment files use (big_vision style).

An experiment file defines ``get_config(arg)``; ``arg`` is ``"<size>[,key=value...]"``,
e.g. ``"tiny"``, ``"B,share=attention"``, ``"B,adaln=shared"``. ``key=value`` pairs override
fields of ``config.model``. Everything else is overridden on the command line with
``--config.section.field=value``.
"""
from __future__ import annotations

import ast

import ml_collections

from jaxdit.data.shapes import NUM_CLASSES
from jaxdit.models.registry import check_set_fields



# Paper setup used for parameter counts: CLIP/H text features (width 1024), an 8-channel
# f8 latent of 256x256 images (32x32x8), patch 2.
PAPER_TEXT_WIDTH = 1024
PAPER_LATENT = dict(kind="kl_vae", channels=8, downsample=8)


def parse_arg(arg: str | None) -> tuple[str, dict]:
    """``"B,share=full"`` -> ``("B", {"share": "full"})`` (values parsed as Python literals)."""
    parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
    if not parts:
        raise ValueError("Config argument missing: use path.py:<size>[,key=value...].")
    size, overrides = parts[0], {}
    for p in parts[1:]:
        if "=" not in p:
            raise ValueError(f"Bad config override {p!r}: expected key=value.")
        k, v = p.split("=", 1)
        try:
            overrides[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            overrides[k.strip()] = v.strip()
    return size, overrides


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict(dict(
        family="dit_air", depth=4, width=128, num_heads=4, patch_size=4, mlp_ratio=4.0,
        share="none", adaln="per_layer", qk_norm=True, sandwich=True, adaln_layer_offset=True,
        pos_embed_max_size=144, text_hidden_ratio=4.0, attn_impl="xla",
        # nn.scan over each block stack (params stacked on a leading "layers" axis): the
        # compiler sees one block, so compile time does not grow with depth. Scanned, "full"
        # remat (keep each block's input only) is also the fastest on CPU: the scan then
        # stores no per-layer activations (docs/performance.md).
        scan_layers=True, remat="full", dtype="float32", param_dtype="float32", num_classes=0,
        # PixArt-alpha / MMDiT: "dit_air" (the DiT-Air paper's variants) or "original" (as
        # published: diffusers PixArtTransformer2DModel / SD3Transformer2DModel weights);
        # PixArt-alpha's sin-cos position scaling and size micro-conditions (pixels per
        # latent cell, 0 = off).
        layout="dit_air", pos_base_size=0, pos_interpolation=1.0, size_conditioning=0,
        # Lumina-Image 2.0 only: KV heads (0 = num_heads), M-RoPE channels per axis.
        num_kv_heads=0, axes_dims=(0, 0, 0), num_refiner_layers=2, ffn_multiple_of=256))
    # Mixture of experts replacing the MLPs (Race-DiT); num_experts=0 keeps dense MLPs.
    # The paper does not give the PLR and router-similarity weights: ours are choices.
    c.moe = ml_collections.ConfigDict(dict(
        num_experts=0, k=1, hidden_split=1, routing="expert_race", gating="identity",
        capacity_factor=2.0, eval_capacity_factor=0.0, threshold_decay=0.95, plr=True,
        plr_weight=0.1, similarity_weight=0.01, balance_weight=0.0, topk_bits=4,
        topk_method="radix", expert_impl="auto"))
    c.text = ml_collections.ConfigDict(dict(
        kind="trainable", vocab_size=0, max_len=16, width=128, depth=2, num_heads=4,
        # The trainable encoder's words (space separated): "" = the shapes grammar, or on a
        # folder / TFDS source the vocab_max_words most frequent words of its training
        # captions, recorded here when the run starts.
        vocab="", vocab_max_words=10_000,
        # text.kind="pretrained": a local encoder folder (or "minilm"), which hidden states
        # to use (0 = embeddings, -1 = last; several are concatenated and projected) and the
        # projection width (0 = the encoder's width).
        path="", layers=(-1,), proj_width=0,
        # Width of precomputed text_pooled features when it differs from text.width (e.g.
        # SD3: pooled CLIP-L+G 2048 beside T5 tokens 4096); 0 = text.width.
        pooled_width=0))
    # latent.kind: "identity" (pixels), "kl_vae" (a trained KL-VAE run or a diffusers
    # AutoencoderKL folder in vae_workdir, held frozen in the model; latents are
    # (z - shift) * scale, scale 0 = 1 / their std on scale_images training images, shift
    # from a diffusers VAE's shift_factor, e.g. FLUX's) or "dvae" (D2iT's, config.d2it).
    c.latent = ml_collections.ConfigDict(dict(kind="identity", channels=3, downsample=1,
                                              vae_workdir="", scale=0.0, shift=0.0,
                                              scale_images=256))

    c.data = ml_collections.ConfigDict(dict(
        source="shapes", image_size=32, num_train=50_000, num_val=512, max_objects=3, seed=0,
        caption_dropout=0.1, folder="", val_folder="", strict=False, tfds_name="", tfds_data_dir="",
        tfds_train_split="train", tfds_val_split="test", tfds_label_key="label",
        tfds_caption_key="", extra_vocab="", system_prompt="", sample_system_prompt="",
        # Variable resolution (Lumina): images go to the nearest aspect-ratio bucket with at
        # most (image_size / patch)^2 patches and are packed as padded patch sequences
        # (in latent space: packed by jaxdit cache, data.source="cached").
        aspect_buckets=False, bucket_max_ratio=2.0, bucket_filter="",
        # data.source="cached": folders written by jaxdit cache (latents and
        # text features); the text/latent settings are then taken from the cache.
        cache_dir="", val_cache_dir=""))
    c.diffusion = ml_collections.ConfigDict(dict(
        t_sampling="logit_normal", t_mean=0.0, t_std=1.0, shift=1.0,
        # Lumina: shift = exp(mu), mu linear in the image token count through (256, 0.5) and
        # (4096, 1.15), replacing ``shift``; an auxiliary loss on latents average-pooled by
        # ``multires_pool`` (0 = off), weighted ``multires_weight``.
        resolution_shift=False, multires_pool=0, multires_weight=1.0))
    # DiT-Air's inference defaults: Heun SDE, 50 steps, CFG 7.5.
    c.sampler = ml_collections.ConfigDict(dict(
        method="heun", sde=True, num_steps=50, cfg_scale=7.5, shift=1.0, sde_strength=1.0,
        num_samples=16, seed=0, cfg_renorm=0.0, cfg_trunc=1.0))
    c.optim = ml_collections.ConfigDict(dict(
        name="adafactor", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
        clip_norm=1.0, schedule="constant", warmup_steps=0, final_lr_ratio=0.0,
        ema_decay=0.9999, ema_warmup=True, grad_accum=1,
        # A step whose loss, gradient norm or new state is NaN/Inf leaves params, EMA,
        # optimizer and model state unchanged (reported as skipped); the run stops after
        # train.max_consecutive_skips such steps in a row.
        skip_nonfinite=True))
    # preset: e.g. "v5p-128" sets fsdp over its 64 chips / (tensor x expert), data over slices.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1, sequence=1,
                                            preset=""))
    # train.objective="draft": reward fine-tuning through the last grad_steps of a
    # num_steps Euler sampler (jaxdit.train.draft); "flow" is the flow-matching loss.
    c.draft = ml_collections.ConfigDict(dict(
        num_steps=8, grad_steps=1, shift=1.0, reward="color", reward_area=0.1, reward_width=0.4))
    c.train = ml_collections.ConfigDict(dict(
        objective="flow",
        batch_size=32, steps=1000, log_every=50, eval_every=500, sample_every=0,
        ckpt_every=500, keep_checkpoints=3, async_checkpointing=True, val_batches=4,
        # Params-only checkpoint (e.g. converted diffusers weights, jaxdit convert)
        # to start a fresh run from; ignored when the workdir already has a checkpoint.
        init_params_from="", max_consecutive_skips=20,
        # A parameter norm above this multiple of its value at the start of the run is
        # reported (a warning, and param_norm_ratio in the metrics); 0 = off.
        param_norm_warn_ratio=10.0))
    c.eval = ml_collections.ConfigDict(dict(
        t_grid=(0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95)))
    return c


# Fields added after runs were already saved, with the value that reproduces those runs
# (what a config without the field meant), not today's default.
EARLIER_BEHAVIOUR = {"model": {"scan_layers": False}}  # unrolled blocks before 2026-12-03


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` plus every field of :func:`base_config` (and of the autoencoder sections
    it has) it lacks (recursively; present fields are kept): a config saved by an older jaxdit gains the fields added since, with
    the value of :data:`EARLIER_BEHAVIOUR` where it has one, else their defaults."""
    for section, fields in EARLIER_BEHAVIOUR.items():
        if section in config:
            for key, value in fields.items():
                if key not in config[section]:
                    config[section][key] = value

    def fill(cfg, defaults):
        for key, value in defaults.items():
            if key not in cfg:
                cfg[key] = value
            elif isinstance(value, ml_collections.ConfigDict) and isinstance(
                    cfg[key], ml_collections.ConfigDict):
                fill(cfg[key], value)
    fill(config, base_config())
    sections = autoencoder_sections(ml_collections.ConfigDict())
    for name in [s for s in sections if s in config]:  # only where the run has them
        fill(config[name], sections[name])
    return config


def apply_model_overrides(config, overrides: dict):
    """``config`` with the config argument's ``key=value`` pairs set in ``config.model``;
    unknown fields and fields the family does not read are refused."""
    for k, v in overrides.items():
        if k not in config.model:
            raise ValueError(f"Unknown model field {k!r} in config argument; "
                             f"valid: {sorted(config.model.keys())}.")
        config.model[k] = v
    check_set_fields(config.model.family, [f"model.{k}" for k in overrides])
    return config


# Paper-size models pick their attention kernel per platform: splash on TPU, cuDNN or the
# Pallas kernel on NVIDIA GPUs, XLA on CPU (jaxdit.kernels.dispatch).
PAPER_ATTENTION = "auto"


def paper_model(config, depth: int, width: int, heads: int, patch: int = 2):
    """Paper-size model with the paper's text width and 8-channel latent."""
    config.model.update(depth=depth, width=width, num_heads=heads, patch_size=patch)
    config.text.update(kind="precomputed", width=PAPER_TEXT_WIDTH, max_len=128)
    config.latent.update(PAPER_LATENT)
    config.data.image_size = 256
    config.model.update(dtype="bfloat16", remat="full", attn_impl=PAPER_ATTENTION)
    config.train.batch_size = 4096
    return config


def tiny_setup(config):
    """A few CPU minutes on the embedded data: pixel space 32x32, patch 4 (64 image tokens),
    a short run with a higher learning rate than the paper's 1e-4 for billion-image runs."""
    config.optim.update(lr=1e-3, warmup_steps=50)
    config.train.update(steps=600, eval_every=300, ckpt_every=300, log_every=50)
    # Unrolled, no remat: the setting the documented quick-start quality was measured with.
    # Side by side on DiT-Air tiny (2026-12-03, one seed each) scan + full remat reached the
    # same validation loss (0.1046 vs 0.1071) but alignment 0.10 vs 0.16 (128 samples);
    # until that is understood the tiny runs keep the measured setting.
    config.model.update(scan_layers=False, remat="none")
    return config


# DiT-Air scaling family (also used for its PixArt-alpha and MMDiT baselines):
# layers N, width 64 N, N heads of dim 64.
AIR_DEPTHS = {"S": 12, "B": 18, "L": 24, "XL": 30, "XXL": 38}


def air_family_config(family: str, arg: str | None):
    """Config for ``family`` in {dit_air, pixart, mmdit} at size ``tiny`` or S..XXL."""
    size, overrides = parse_arg(arg)
    config = base_config()
    config.model.family = family
    if size in AIR_DEPTHS:
        n = AIR_DEPTHS[size]
        paper_model(config, depth=n, width=64 * n, heads=n)
    elif size == "tiny":
        tiny_setup(config)
        # Measured on DiT-Air tiny (docs/quality.md): at 600 steps AdamW at 2e-3 reaches a
        # validation loss of 0.123 against 0.143 with the paper's AdaFactor at 1e-3 (0.129
        # with AdaFactor at 2e-3; 4e-3 lowers the loss but blanks a third of the samples);
        # 1000 steps (0.104) still train in under 5 minutes on 2 cores.
        config.optim.update(name="adamw", lr=2e-3)
        config.train.update(steps=1000, eval_every=500, ckpt_every=500)
    else:
        raise ValueError(f"Unknown size {size!r}; available: tiny, {', '.join(AIR_DEPTHS)}.")
    return apply_model_overrides(config, overrides)


# Race-DiT sizes (its Table 4; DiT B/L/XL plus a new M): (layers, width, heads).
RACE_SIZES = {"B": (12, 768, 12), "M": (16, 960, 16), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
IMAGENET_CLASSES = 1000


def parse_moe_variant(variant: str) -> dict:
    """``"dense"`` -> no experts; ``"4in32"`` -> 32 experts, k=4, hidden split 4 (the
    paper's convention: x-in-y activates as many parameters as the dense MLP)."""
    if variant == "dense":
        return dict(num_experts=0)
    x, sep, y = variant.partition("in")
    if not (sep and x.isdigit() and y.isdigit()):
        raise ValueError(f"Unknown MoE variant {variant!r}: use 'dense' or '<k>in<experts>'.")
    return dict(num_experts=int(y), k=int(x), hidden_split=int(x))


def race_config(arg: str | None):
    """Race-DiT / DiT config: ``"<size>-<variant>[,key=value...]"``, size in tiny/B/M/L/XL,
    variant ``dense`` or ``<k>in<E>``; keys override ``config.model`` or ``config.moe``."""
    name, overrides = parse_arg(arg)
    size, _, variant = name.partition("-")
    config = base_config()
    config.model.update(family="race_dit", qk_norm=False, sandwich=False)
    config.text.kind = "none"
    config.moe.update(parse_moe_variant(variant or "dense"))
    if size in RACE_SIZES:
        depth, width, heads = RACE_SIZES[size]
        config.model.update(depth=depth, width=width, num_heads=heads, patch_size=2,
                            num_classes=IMAGENET_CLASSES, dtype="bfloat16", remat="full",
                            attn_impl=PAPER_ATTENTION)
        config.latent.update(kind="kl_vae", channels=4, downsample=8)  # SD-VAE latents
        config.data.image_size = 256
        # DiT's ImageNet recipe (Race-DiT's own ablation recipe is not public).
        config.optim.update(name="adamw", lr=1e-4, ema_decay=0.9999)
        config.train.batch_size = 256
    elif size == "tiny":
        tiny_setup(config)
        config.model.update(num_classes=NUM_CLASSES)
        config.data.max_objects = 1  # one object per image: its class is the whole content
        config.data.caption_dropout = 0.1  # label dropout for CFG
    else:
        raise ValueError(f"Unknown size {size!r}; available: tiny, {', '.join(RACE_SIZES)}.")
    config.sampler.update(cfg_scale=4.0)  # Race-DiT's sample figures use CFG 4
    for k, v in overrides.items():
        section = "moe" if k in config.moe and k not in config.model else "model"
        if k not in config[section]:
            raise ValueError(f"Unknown field {k!r} in config argument; valid: model fields "
                             f"{sorted(config.model.keys())} or moe fields "
                             f"{sorted(config.moe.keys())}.")
        config[section][k] = v
    check_set_fields(config.model.family, [f"model.{k}" for k in overrides
                                           if k not in config.moe or k in config.model])
    return config


# Lumina-Image 2.0 Unified Next-DiT (official configs): width, layers, heads, KV heads and
# M-RoPE channels per axis (text index, row, column); head dim = sum(axes_dims).
LUMINA_SIZES = {
    "2B": (2304, 26, 24, 8, (32, 32, 32)),
    "3B": (2592, 30, 24, 8, (36, 36, 36)),
    "4B": (2880, 32, 24, 8, (40, 40, 40)),
    "7B": (3840, 32, 32, 8, (40, 40, 40)),
}
GEMMA_2B_WIDTH = 2304  # Gemma-2-2B hidden size, the official text features
FLUX_LATENT = dict(kind="kl_vae", channels=16, downsample=8)


def lumina_config(arg: str | None):
    """Lumina-Image 2.0 config: size tiny / 2B / 3B / 4B / 7B, ``key=value`` overrides of
    ``config.model``. Paper sizes use the official 1024-px fine-tune recipe (AdamW 2e-4,
    betas (0.9, 0.95), clip 2.0, logit-normal t with the resolution shift, the 4x
    average-pooled auxiliary loss) and its sampler (midpoint, shift 6, CFG 4 with
    renormalisation 1.0 and truncation 0.25)."""
    size, overrides = parse_arg(arg)
    config = base_config()
    config.model.update(family="lumina", qk_norm=True, sandwich=True, patch_size=2)
    config.data.update(system_prompt="base", sample_system_prompt="real")
    config.diffusion.update(resolution_shift=True)
    config.sampler.update(method="midpoint", sde=False, cfg_scale=4.0, shift=6.0,
                          cfg_renorm=1.0, cfg_trunc=0.25)
    if size in LUMINA_SIZES:
        width, depth, heads, kv_heads, axes = LUMINA_SIZES[size]
        config.model.update(width=width, depth=depth, num_heads=heads, num_kv_heads=kv_heads,
                            axes_dims=axes, dtype="bfloat16", remat="full",
                            attn_impl=PAPER_ATTENTION)
        config.text.update(kind="precomputed", width=GEMMA_2B_WIDTH, max_len=256)
        config.latent.update(FLUX_LATENT)
        config.data.update(image_size=1024, bucket_max_ratio=4.0, bucket_filter="official")
        config.diffusion.update(multires_pool=4)
        config.optim.update(name="adamw", lr=2e-4, b1=0.9, b2=0.95, eps=1e-15,
                            weight_decay=0.0, clip_norm=2.0, ema_decay=0.9999)
        config.train.batch_size = 512
        config.sampler.num_steps = 17  # the official 18-point time grid
    elif size == "tiny":
        tiny_setup(config)
        config.model.update(width=128, depth=4, num_heads=4, num_kv_heads=2,
                            axes_dims=(8, 12, 12), num_refiner_layers=1, patch_size=4)
        config.text.max_len = 40  # room for the system prompt before the caption
        config.sampler.update(num_steps=25, shift=1.0)
        # Lumina's shifts are calibrated for 256-4096 latent tokens (and shift 6 for 1024-px
        # sampling); at 64 pixel tokens they hurt (600 steps: val 0.171 with, 0.158 without).
        config.diffusion.resolution_shift = False
        # Exact captions: train and sample with Template B (high image-text alignment).
        config.data.update(system_prompt="real", sample_system_prompt="real")
    else:
        raise ValueError(f"Unknown size {size!r}; available: tiny, {', '.join(LUMINA_SIZES)}.")
    return apply_model_overrides(config, overrides)


# D2iT (its Tables 1-2 compare D2iT-L/XL with DiT-L/XL): DiT sizes (layers, width, heads);
# the last ``refine_depth`` layers are the RefineNet (its Table 4: 10 + 2 for B).
D2IT_SIZES = {"B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def autoencoder_sections(config):
    """``config.vae`` (trainable autoencoder: architecture and losses), ``config.dvae``
    (grain coding) and ``config.d2it`` (stage-2 settings), at the paper's 256-px values:
    DQ-VAE's encoder (ch 128, mults 1,1,2,2,4: f8 fine / f16 coarse) with a 4-channel
    KL latent, fine ratio 0.5 (DQ-VAE's)."""
    config.vae = ml_collections.ConfigDict(dict(
        z_channels=4, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn=True,
        l1_weight=1.0, l2_weight=1.0, kl_weight=1e-6,
        # LPIPS (VGG16, v0.1 heads): weight of the perceptual term and the params folder
        # written by tools/convert_lpips.py ("random": the random init, for tests only).
        lpips_weight=0.0, lpips_weights="",
        # PatchGAN discriminator (jaxdit.train.adversarial): generator weight (0: none),
        # cap of the adaptive weight, first step with the GAN terms, loss, width, depth.
        disc_weight=0.0, disc_weight_max=1e4, disc_start=0, disc_loss="hinge",
        disc_ndf=64, disc_layers=3,
        # progressive VAE: a kl_vae training workdir with fewer latent channels whose EMA
        # weights start this run, widened to z_channels (jaxdit.models.vae.widen_latent)
        widen_from="",
        # Stable Diffusion's 1x1 convs around the latent (set from a diffusers VAE folder)
        quant_conv=False))
    # threshold < 0: computed at startup from thresholds_file (tools/grain_thresholds.py)
    # or from threshold_images training images, for the fine_ratio.
    config.dvae = ml_collections.ConfigDict(dict(
        threshold=-1.0, fine_ratio=0.5, bins=32, sigma=0.01, thresholds_file="",
        threshold_images=2048))
    config.d2it = ml_collections.ConfigDict(dict(
        vae_workdir="",  # stage-1 training workdir whose DVAE (EMA weights) stage 2 uses
        scale_images=256,  # images whose latent std sets the latent scale
        grain_depth=8, grain_width=256, grain_heads=4, grain_weight=1.0,
        fine_weight=1.0, coarse_weight=1.0,
        grain_steps=8, grain_temperature=1.0, grain_choice_temperature=4.5,
        sample_fine_ratio=0.0, grain_cfg_scale=1.0))
    return config


def d2it_config(arg: str | None):
    """D2iT configs. ``<size>``: stage 2 (grain + content transformers) at tiny/B/L/XL;
    ``dvae-<size>``: stage 1 (the DVAE) at tiny or ``paper`` (256 px). ``key=value``
    overrides ``config.model`` (stage 2) or ``config.vae`` (stage 1)."""
    name, overrides = parse_arg(arg)
    config = autoencoder_sections(base_config())
    config.text.kind = "none"
    stage1 = name.startswith("dvae")
    size = name.partition("-")[2] if stage1 else name
    config.model.update(family="dvae" if stage1 else "d2it", qk_norm=False, sandwich=False,
                        patch_size=2)
    config.model.refine_depth = 2
    config.train.objective = "autoencoder" if stage1 else "d2it"
    config.sampler.update(method="heun", sde=False, num_steps=50, cfg_scale=4.0)
    if size in D2IT_SIZES or (stage1 and size == "paper"):
        config.data.image_size = 256
        config.latent.update(kind="dvae", channels=4, downsample=8)
        config.model.update(num_classes=IMAGENET_CLASSES, dtype="bfloat16", remat="full",
                            attn_impl=PAPER_ATTENTION)
        if size in D2IT_SIZES:
            depth, width, heads = D2IT_SIZES[size]
            config.model.update(depth=depth, width=width, num_heads=heads)
        config.optim.update(name="adamw", lr=1e-4, ema_decay=0.9999)
        config.train.batch_size = 256
        if stage1:  # DQ-VAE's loss: L1 + LPIPS + hinge PatchGAN, adaptive weight <= 0.75
            config.vae.update(lpips_weight=1.0, disc_weight=1.0, disc_weight_max=0.75,
                              disc_start=0, l2_weight=0.0)
    elif size == "tiny":
        tiny_setup(config)
        # 32-px shapes: f2 fine / f4 coarse -> 16x16x4 latent, 8x8 grain map (64 tokens).
        config.vae.update(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, kl_weight=1e-4)
        config.latent.update(kind="dvae", channels=4, downsample=2)
        config.model.update(num_classes=NUM_CLASSES, depth=4, width=128, num_heads=4)
        config.d2it.update(grain_depth=2, grain_width=64, grain_heads=2)
        config.data.max_objects = 1
        config.sampler.update(num_steps=25, cfg_scale=2.0)
        if stage1:
            config.optim.update(name="adamw", lr=1e-3, warmup_steps=50)
    else:
        raise ValueError(f"Unknown D2iT size {size!r}; available: tiny, "
                         f"{', '.join(D2IT_SIZES)}, dvae-tiny, dvae-paper.")
    if stage1:
        config.latent.update(kind="identity", channels=3, downsample=1)  # trains on pixels
        config.model.depth = 0
    section = config.vae if stage1 else config.model
    for k, v in overrides.items():
        if k not in section:
            raise ValueError(f"Unknown field {k!r} in config argument; valid: "
                             f"{sorted(section.keys())}.")
        section[k] = v
    if not stage1:
        check_set_fields(config.model.family, [f"model.{k}" for k in overrides])
    return config


def vae_config(arg: str | None):
    """KL-VAE (``model.family='kl_vae'``) configs: ``"<size>-<z>ch"``, size ``tiny`` (32-px
    shapes, f4) or ``f8`` (the LDM/SD layout at 256 px: ch 128, mults 1,2,4,4); ``z``
    latent channels. DiT-Air's progressive VAE: train ``-4ch``, then ``-8ch`` with
    ``--config.vae.widen_from=<the 4ch workdir>``. ``key=value`` overrides ``config.vae``."""
    name, overrides = parse_arg(arg)
    size, _, ch = name.partition("-")
    if not (ch.endswith("ch") and ch[:-2].isdigit()):
        raise ValueError(f"VAE config {name!r}: use '<size>-<z>ch', e.g. 'tiny-4ch'.")
    config = autoencoder_sections(base_config())
    config.text.kind = "none"
    config.model.family = "kl_vae"
    config.train.objective = "autoencoder"
    config.latent.update(kind="identity", channels=3, downsample=1)  # trains on pixels
    config.vae.update(z_channels=int(ch[:-2]), ch_mult=(1, 2, 4, 4))
    config.optim.update(name="adamw", b1=0.5, b2=0.9)  # DQ-VAE / taming's Adam betas
    if size == "tiny":
        tiny_setup(config)
        config.optim.update(lr=1e-3, warmup_steps=50)
        config.vae.update(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, kl_weight=1e-4)
    elif size == "f8":
        config.data.image_size = 256
        config.optim.lr = 4.5e-6 * 8 * 12  # taming's lr = n_gpu x batch x 4.5e-6
        config.train.batch_size = 96
        # LDM's autoencoder_kl_f8 loss: LPIPS 1.0, discriminator 0.5 from step 50001.
        config.vae.update(lpips_weight=1.0, disc_weight=0.5, disc_start=50001)
    else:
        raise ValueError(f"Unknown VAE size {size!r}; available: tiny, f8.")
    for k, v in overrides.items():
        if k not in config.vae:
            raise ValueError(f"Unknown field {k!r}; valid: {sorted(config.vae.keys())}.")
        config.vae[k] = v
    return config


def is_resolved(config) -> bool:
    """Whether ``config`` came out of :func:`jaxdit.train.resolve.resolve_config` (frozen)."""
    return isinstance(config, ml_collections.FrozenConfigDict)


def editable(config) -> ml_collections.ConfigDict:
    """A mutable deep copy of ``config`` (frozen or not), e.g. to derive a variant of a
    resolved run's config; a variant to train is resolved again."""
    if is_resolved(config):
        return ml_collections.ConfigDict(config)  # the tuples that were lists are lists
    return config.copy_and_resolve_references()

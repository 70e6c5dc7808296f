"""Base config and the small helpers experiment files use (big_vision style).

The presets (sizes, tiny recipes) live in ``experiments/<family>.py``; this module holds
what they share. An experiment file defines ``get_config(arg)``; ``arg`` is
``"<size>[,key=value...]"``, e.g. ``"tiny"``, ``"B,share=attention"``, ``"B,adaln=shared"``.
``key=value`` pairs override fields of ``config.model`` (or the sections the experiment
names). Everything else is overridden on the command line with
``--config.section.field=value``.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import types

import ml_collections

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
    it has) it lacks (recursively; present fields are kept): a config saved by an older
    jaxdit gains the fields added since, with the value of :data:`EARLIER_BEHAVIOUR` where
    it has one, else their defaults."""
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


def apply_overrides(config, overrides: dict, sections=("model",)):
    """``config`` with the config argument's ``key=value`` pairs set in the first of
    ``sections`` that has the field; unknown fields and model fields the family does not
    read are refused, naming the valid ones."""
    for k, v in overrides.items():
        section = next((name for name in sections if k in config[name]), None)
        if section is None:
            valid = " or ".join(f"{name} fields {sorted(config[name].keys())}"
                                for name in sections)
            label = f"{sections[0]} field" if len(sections) == 1 else "field"
            raise ValueError(f"Unknown {label} {k!r} in config argument; valid: {valid}.")
        config[section][k] = v
    check_set_fields(config.model.family, [f"model.{k}" for k in overrides
                                           if k in config.model and "model" in sections])
    return config


def load_experiment(path: str) -> types.ModuleType:
    """The experiment file at ``path`` as a module, as ``--config path:arg`` loads it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No experiment config file {path!r}.")
    name = "jaxdit_experiment_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def preset(name: str, arg: str | None, experiments_dir: str) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of ``experiments_dir/<name>.py``: what ``--config
    experiments/<name>.py:<arg>`` gives (tests and tools reach the presets this way)."""
    module = load_experiment(os.path.join(experiments_dir, f"{name}.py"))
    return module.get_config() if arg is None else module.get_config(arg)


def sibling_experiment(this_file: str, name: str) -> types.ModuleType:
    """Experiment ``name`` (e.g. ``"dit_air"``) from the folder of ``this_file``: how the
    PixArt and MMDiT configs reuse DiT-Air's sizes without a package import."""
    return load_experiment(os.path.join(os.path.dirname(os.path.abspath(this_file)),
                                        f"{name}.py"))


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


IMAGENET_CLASSES = 1000  # class-conditional paper configs (Race-DiT, D2iT)


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


def is_resolved(config) -> bool:
    """Whether ``config`` came out of :func:`jaxdit.train.resolve.resolve_config` (frozen)."""
    return isinstance(config, ml_collections.FrozenConfigDict)


def editable(config) -> ml_collections.ConfigDict:
    """A mutable deep copy of ``config`` (frozen or not), e.g. to derive a variant of a
    resolved run's config; a variant to train is resolved again."""
    if is_resolved(config):
        return ml_collections.ConfigDict(config)  # the tuples that were lists are lists
    return config.copy_and_resolve_references()

"""Lumina-Image 2.0 (Unified Next-DiT) configs.

Sizes 2B / 3B / 4B / 7B are the official ones (2B = 2,609,771,456 parameters); ``tiny``
trains in pixel space on the embedded shapes data in a few CPU minutes, with the system
prompt prepended to every caption.

  --config experiments/lumina.py:tiny
  --config experiments/lumina.py:2B
  --config experiments/lumina.py:2B,num_refiner_layers=0     # ablation without refiners
"""
from jaxdit import config_lib


def get_config(arg="tiny"):
    return lumina_config(arg)


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
    size, overrides = config_lib.parse_arg(arg)
    config = config_lib.base_config()
    config.model.update(family="lumina", qk_norm=True, sandwich=True, patch_size=2)
    config.data.update(system_prompt="base", sample_system_prompt="real")
    config.diffusion.update(resolution_shift=True)
    config.sampler.update(method="midpoint", sde=False, cfg_scale=4.0, shift=6.0,
                          cfg_renorm=1.0, cfg_trunc=0.25)
    if size in LUMINA_SIZES:
        width, depth, heads, kv_heads, axes = LUMINA_SIZES[size]
        config.model.update(width=width, depth=depth, num_heads=heads, num_kv_heads=kv_heads,
                            axes_dims=axes, dtype="bfloat16", remat="full",
                            attn_impl=config_lib.PAPER_ATTENTION)
        config.text.update(kind="precomputed", width=GEMMA_2B_WIDTH, max_len=256)
        config.latent.update(FLUX_LATENT)
        config.data.update(image_size=1024, bucket_max_ratio=4.0, bucket_filter="official")
        config.diffusion.update(multires_pool=4)
        config.optim.update(name="adamw", lr=2e-4, b1=0.9, b2=0.95, eps=1e-15,
                            weight_decay=0.0, clip_norm=2.0, ema_decay=0.9999)
        config.train.batch_size = 512
        config.sampler.num_steps = 17  # the official 18-point time grid
    elif size == "tiny":
        config_lib.tiny_setup(config)
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
    return config_lib.apply_overrides(config, overrides)

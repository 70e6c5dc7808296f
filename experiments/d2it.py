"""D2iT: Dynamic Diffusion Transformer, two stages.

Stage 1 trains the DVAE (two-grain KL autoencoder); stage 2 trains the grain and content
transformers on its frozen codes (class-conditional).

  --config experiments/d2it.py:dvae-tiny        --workdir runs/dvae    # stage 1, shapes
  --config experiments/d2it.py:tiny --config.d2it.vae_workdir=runs/dvae --workdir runs/d2it
  --config experiments/d2it.py:dvae-paper                              # DQ-VAE-size DVAE, 256 px
  --config experiments/d2it.py:XL               # D2iT-XL: 26 DiT + 2 RefineNet blocks
  --config experiments/d2it.py:B,refine_depth=4 # its Table 4 ablations
"""
from jaxdit import config_lib
from jaxdit.data.shapes import NUM_CLASSES


def get_config(arg="tiny"):
    return d2it_config(arg)


# D2iT (its Tables 1-2 compare D2iT-L/XL with DiT-L/XL): DiT sizes (layers, width, heads);
# the last ``refine_depth`` layers are the RefineNet (its Table 4: 10 + 2 for B).
D2IT_SIZES = {"B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def d2it_config(arg: str | None):
    """D2iT configs. ``<size>``: stage 2 (grain + content transformers) at tiny/B/L/XL;
    ``dvae-<size>``: stage 1 (the DVAE) at tiny or ``paper`` (256 px). ``key=value``
    overrides ``config.model`` (stage 2) or ``config.vae`` (stage 1)."""
    name, overrides = config_lib.parse_arg(arg)
    config = config_lib.autoencoder_sections(config_lib.base_config())
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
        config.model.update(num_classes=config_lib.IMAGENET_CLASSES, dtype="bfloat16", remat="full",
                            attn_impl=config_lib.PAPER_ATTENTION)
        if size in D2IT_SIZES:
            depth, width, heads = D2IT_SIZES[size]
            config.model.update(depth=depth, width=width, num_heads=heads)
        config.optim.update(name="adamw", lr=1e-4, ema_decay=0.9999)
        config.train.batch_size = 256
        if stage1:  # DQ-VAE's loss: L1 + LPIPS + hinge PatchGAN, adaptive weight <= 0.75
            config.vae.update(lpips_weight=1.0, disc_weight=1.0, disc_weight_max=0.75,
                              disc_start=0, l2_weight=0.0)
    elif size == "tiny":
        config_lib.tiny_setup(config)
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
    return config_lib.apply_overrides(config, overrides,
                                      sections=("vae",) if stage1 else ("model",))

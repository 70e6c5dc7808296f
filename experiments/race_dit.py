"""Race-DiT (Expert Race MoE) and its dense DiT baselines, class-conditional.

``<size>-<variant>``: size tiny / B / M / L / XL (its Table 4), variant ``dense`` or
``<k>in<E>`` (k experts per token on average out of E, expert hidden 4d/k). ``tiny`` trains
on the embedded shapes data (18 classes) in a few CPU minutes.

  --config experiments/race_dit.py:tiny-4in16
  --config experiments/race_dit.py:XL-4in32                       # RaceDiT-XL/2-4in32 (2.79B)
  --config experiments/race_dit.py:B-dense                        # DiT-B/2 baseline
  --config experiments/race_dit.py:B-2in8,routing=token_choice    # Table 6 ablations
"""
from jaxdit import config_lib
from jaxdit.data.shapes import NUM_CLASSES


def get_config(arg="tiny-4in16"):
    return race_config(arg)


# Race-DiT sizes (its Table 4; DiT B/L/XL plus a new M): (layers, width, heads).
RACE_SIZES = {"B": (12, 768, 12), "M": (16, 960, 16), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

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
    name, overrides = config_lib.parse_arg(arg)
    size, _, variant = name.partition("-")
    config = config_lib.base_config()
    config.model.update(family="race_dit", qk_norm=False, sandwich=False)
    config.text.kind = "none"
    config.moe.update(parse_moe_variant(variant or "dense"))
    if size in RACE_SIZES:
        depth, width, heads = RACE_SIZES[size]
        config.model.update(depth=depth, width=width, num_heads=heads, patch_size=2,
                            num_classes=config_lib.IMAGENET_CLASSES, dtype="bfloat16", remat="full",
                            attn_impl=config_lib.PAPER_ATTENTION)
        config.latent.update(kind="kl_vae", channels=4, downsample=8)  # SD-VAE latents
        config.data.image_size = 256
        # DiT's ImageNet recipe (Race-DiT's own ablation recipe is not public).
        config.optim.update(name="adamw", lr=1e-4, ema_decay=0.9999)
        config.train.batch_size = 256
    elif size == "tiny":
        config_lib.tiny_setup(config)
        config.model.update(num_classes=NUM_CLASSES)
        config.data.max_objects = 1  # one object per image: its class is the whole content
        config.data.caption_dropout = 0.1  # label dropout for CFG
    else:
        raise ValueError(f"Unknown size {size!r}; available: tiny, {', '.join(RACE_SIZES)}.")
    config.sampler.update(cfg_scale=4.0)  # Race-DiT's sample figures use CFG 4
    return config_lib.apply_overrides(config, overrides, sections=("model", "moe"))

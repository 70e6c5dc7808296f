"""Small shared test utilities: tiny configs and a deterministic batch."""
import os

import jax.numpy as jnp
import numpy as np

from jaxdit import config_lib

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "experiments")


def preset(name: str, arg: str | None = None):
    """``experiments/<name>.py:<arg>``, as the command line's ``--config`` gives it."""
    return config_lib.preset(name, arg, EXPERIMENTS)

VARIANTS = [
    ("dit_air", "tiny"), ("dit_air", "tiny,share=full"), ("dit_air", "tiny,share=attention"),
    ("pixart", "tiny"), ("mmdit", "tiny"), ("mmdit", "tiny,adaln=shared"), ("lumina", "tiny"),
]


def tiny_config(family="dit_air", arg="tiny", **train):
    if family == "race_dit":
        c = preset("race_dit", arg)
        # Dropless buffers, so 1-device and sharded runs route and compute identically.
        c.moe.update(capacity_factor=0.0, eval_capacity_factor=0.0, expert_impl="grouped")
    elif family in ("d2it", "dvae"):
        c = preset("d2it", arg)
    elif family == "kl_vae":
        c = preset("vae", arg)
    elif family == "lumina":
        c = preset("lumina", arg)
        c.model.update(num_kv_heads=2, axes_dims=(4, 6, 6), num_refiner_layers=1)
    else:
        c = preset(family, arg)
    c.model.update(depth=2, width=64, num_heads=4, pos_embed_max_size=16)
    if family in ("d2it", "dvae"):  # trunk of 1 block + a 1-block RefineNet; tiny DVAE
        c.model.refine_depth = 1
        c.vae.update(ch=16, ch_mult=(1, 2, 2), attn=False)
        c.d2it.update(grain_depth=1, grain_width=32, grain_heads=2)
        c.dvae.threshold_images = 64
    if family == "kl_vae":
        c.vae.update(ch=16, ch_mult=(1, 2))
    c.text.update(width=32, depth=1, num_heads=2, max_len=8)
    c.data.update(image_size=16, num_train=256, num_val=64)
    c.train.update(batch_size=8, steps=4, log_every=1, eval_every=0, ckpt_every=2,
                   val_batches=1, async_checkpointing=False)
    c.sampler.update(num_steps=2, num_samples=2)
    c.train.update(**train)
    return c


def fixed_batch(config, batch=8, seed=0):
    from jaxdit.data.pipeline import make_tokenizer  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(seed)
    s, n = config.data.image_size, config.text.max_len
    # ids past the model's vocabulary would embed as NaN
    vocab = config.text.vocab_size or make_tokenizer(config).vocab_size
    mask = np.arange(n)[None] < rng.integers(1, n + 1, size=(batch, 1))
    return {"image": jnp.asarray(rng.uniform(-1, 1, (batch, s, s, 3)), jnp.float32),
            "text_ids": jnp.asarray(rng.integers(3, vocab, (batch, n)) * mask, jnp.int32),
            "text_mask": jnp.asarray(mask),
            "label": jnp.asarray(rng.integers(0, 18, (batch,)), jnp.int32)}


def save_hf_folder(model, path):
    """A ``transformers`` model saved as a Hugging Face folder (config, safetensors) plus
    MiniLM's ``tokenizer.json`` (vocabulary 30,522): what ``text.kind=pretrained`` loads."""
    import shutil  # pylint: disable=import-outside-toplevel
    from jaxdit.models import pretrained_text  # pylint: disable=import-outside-toplevel
    model.save_pretrained(str(path), safe_serialization=True)
    shutil.copy(pretrained_text.text_encoder_dir("minilm") / "tokenizer.json", path)
    return str(path)

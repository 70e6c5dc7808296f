"""KL-VAE and DiT-Air's progressive VAE (section 5.2, Appendix D).

  --config experiments/vae.py:tiny-4ch --workdir runs/vae4                 # variant A
  --config experiments/vae.py:tiny-8ch --workdir runs/vae8                 # variant B
  --config experiments/vae.py:tiny-8ch --config.vae.widen_from=runs/vae4 \\
      --workdir runs/vae4to8                                               # variant C
  --config experiments/vae.py:f8-8ch                                       # SD-VAE layout, 256 px

``tools/progressive_vae.py`` trains all three and prints their reconstruction error and KL.
"""
from jaxdit import config_lib


def get_config(arg="tiny-4ch"):
    return vae_config(arg)


def vae_config(arg: str | None):
    """KL-VAE (``model.family='kl_vae'``) configs: ``"<size>-<z>ch"``, size ``tiny`` (32-px
    shapes, f4) or ``f8`` (the LDM/SD layout at 256 px: ch 128, mults 1,2,4,4); ``z``
    latent channels. DiT-Air's progressive VAE: train ``-4ch``, then ``-8ch`` with
    ``--config.vae.widen_from=<the 4ch workdir>``. ``key=value`` overrides ``config.vae``."""
    name, overrides = config_lib.parse_arg(arg)
    size, _, ch = name.partition("-")
    if not (ch.endswith("ch") and ch[:-2].isdigit()):
        raise ValueError(f"VAE config {name!r}: use '<size>-<z>ch', e.g. 'tiny-4ch'.")
    config = config_lib.autoencoder_sections(config_lib.base_config())
    config.text.kind = "none"
    config.model.family = "kl_vae"
    config.train.objective = "autoencoder"
    config.latent.update(kind="identity", channels=3, downsample=1)  # trains on pixels
    config.vae.update(z_channels=int(ch[:-2]), ch_mult=(1, 2, 4, 4))
    config.optim.update(name="adamw", b1=0.5, b2=0.9)  # DQ-VAE / taming's Adam betas
    if size == "tiny":
        config_lib.tiny_setup(config)
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
    return config_lib.apply_overrides(config, overrides, sections=("vae",))

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
    return config_lib.vae_config(arg)

"""DiT-Air / DiT-Air-Lite configs.

Sizes S/B/L/XL/XXL: 12/18/24/30/38 layers, width 64 * layers, heads = layers (head dim 64),
on the paper's setup (CLIP/H text features, 8-channel latent, patch 2). ``tiny`` trains in
pixel space on the embedded shapes data in a few CPU minutes.

  --config experiments/dit_air.py:tiny
  --config experiments/dit_air.py:B                    # DiT-Air/B (321M)
  --config experiments/dit_air.py:B,share=full         # DiT-Air/B-Lite, full sharing (49M)
  --config experiments/dit_air.py:B,share=attention    # DiT-Air/B-Lite, attention sharing (230M)
"""
from jaxdit import config_lib


def get_config(arg="tiny"):
    return config_lib.air_family_config("dit_air", arg)

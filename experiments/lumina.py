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
    return config_lib.lumina_config(arg)

"""MMDiT baseline configs (DiT-Air paper, Tables 1-2); sizes as experiments/dit_air.py.

  --config experiments/mmdit.py:B                  # per-layer AdaLN (902M)
  --config experiments/mmdit.py:B,adaln=shared     # AdaLN shared across layers (631M)
"""
from jaxdit import config_lib


def get_config(arg="tiny"):
    return config_lib.air_family_config("mmdit", arg)

"""MMDiT baseline configs (DiT-Air paper, Tables 1-2); sizes as experiments/dit_air.py.

  --config experiments/mmdit.py:B                  # per-layer AdaLN (902M)
  --config experiments/mmdit.py:B,adaln=shared     # AdaLN shared across layers (631M)
"""
from jaxdit import config_lib

_DIT_AIR = config_lib.sibling_experiment(__file__, "dit_air")


def get_config(arg="tiny"):
    return _DIT_AIR.air_family_config("mmdit", arg)

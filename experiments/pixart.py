"""PixArt-alpha baseline configs (DiT-Air paper, Table 1); sizes as experiments/dit_air.py."""
from jaxdit import config_lib

_DIT_AIR = config_lib.sibling_experiment(__file__, "dit_air")


def get_config(arg="tiny"):
    return _DIT_AIR.air_family_config("pixart", arg)

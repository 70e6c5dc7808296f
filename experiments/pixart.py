"""PixArt-alpha baseline configs (DiT-Air paper, Table 1); sizes as experiments/dit_air.py."""
from jaxdit import config_lib


def get_config(arg="tiny"):
    return config_lib.air_family_config("pixart", arg)

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


def get_config(arg="tiny-4in16"):
    return config_lib.race_config(arg)

"""D2iT: Dynamic Diffusion Transformer, two stages.

Stage 1 trains the DVAE (two-grain KL autoencoder); stage 2 trains the grain and content
transformers on its frozen codes (class-conditional).

  --config experiments/d2it.py:dvae-tiny        --workdir runs/dvae    # stage 1, shapes
  --config experiments/d2it.py:tiny --config.d2it.vae_workdir=runs/dvae --workdir runs/d2it
  --config experiments/d2it.py:dvae-paper                              # DQ-VAE-size DVAE, 256 px
  --config experiments/d2it.py:XL               # D2iT-XL: 26 DiT + 2 RefineNet blocks
  --config experiments/d2it.py:B,refine_depth=4 # its Table 4 ablations
"""
from jaxdit import config_lib


def get_config(arg="tiny"):
    return config_lib.d2it_config(arg)

"""jaxdit: a JAX/Flax, TPU-first training framework for diffusion transformers."""

__version__ = "0.1.0"

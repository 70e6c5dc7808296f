"""Autoencoders between pixels and the latent space the denoiser works in.

An autoencoder here is anything with ``encode(images) -> latents``, ``decode(latents) ->
images`` and ``latent_shape(image_shape)``; images are float in [-1, 1], ``(B, H, W, 3)``.
The tiny default trains in pixel space through :class:`IdentityAutoencoder`; a KL-VAE
(issue 7) drops in behind the same interface.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class IdentityAutoencoder:
    """Pixel space: latents are the images themselves."""
    channels: int = 3

    def encode(self, images):
        return images

    def decode(self, latents):
        return latents

    def latent_shape(self, image_shape):
        h, w, _ = image_shape
        return (h, w, self.channels)


def make_autoencoder(config):
    kind = config.get("kind", "identity")
    if kind == "identity":
        return IdentityAutoencoder(config.get("channels", 3))
    raise ValueError(f"Unknown autoencoder kind {kind!r}; available: 'identity'.")


@dataclasses.dataclass(frozen=True)
class PrecomputedLatents:
    """Batches already hold latents (``data.source=cached``): ``encode`` passes them
    through; ``decode`` and ``latent_shape`` are those of the autoencoder that made them."""
    base: object

    def encode(self, latents):
        return latents

    def decode(self, latents):
        return self.base.decode(latents)

    def latent_shape(self, image_shape):
        return self.base.latent_shape(image_shape)

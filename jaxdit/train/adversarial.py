"""The autoencoders' perceptual and adversarial terms (taming-transformers' VQGAN recipe, as
LDM's KL-VAE and D2iT's DQ-VAE train them): LPIPS, a PatchGAN discriminator, hinge or
non-saturating GAN losses and the adaptive generator weight.

The critics' weights sit beside the autoencoder's in the one params tree:
``params["discriminator"]`` (trained, with an optimizer state of its own through
``optax.multi_transform``: :func:`jaxdit.train.optimizers.make_optimizer`) and
``params["frozen_lpips"]`` (loaded from ``vae.lpips_weights``, never updated). Both are
checkpointed and resumed with the rest; :func:`autoencoder_params` strips them wherever a
trained autoencoder is used elsewhere (D2iT stage 2, a latent space, widening).

One compiled step trains generator and discriminator together: the scalar whose gradient
the train step takes is ``generator loss + discriminator loss``, with stop-gradients so
that the generator terms see the discriminator's weights as constants and the
discriminator sees reconstructions as constants.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdit.models.discriminator import NLayerDiscriminator
from jaxdit.models.lpips import LPIPS

DISC_KEY = "discriminator"
LPIPS_KEY = "frozen_lpips"
CRITIC_KEYS = (DISC_KEY, LPIPS_KEY)
DISC_LOSSES = ("hinge", "non_saturating")
# The layer whose gradient norms set the adaptive weight: the decoder's output conv.
LAST_LAYER = ("decoder", "conv_out", "kernel")


def uses_discriminator(vae_cfg) -> bool:
    return float(vae_cfg.disc_weight) > 0


def uses_lpips(vae_cfg) -> bool:
    return float(vae_cfg.lpips_weight) > 0


def make_discriminator(vae_cfg) -> NLayerDiscriminator:
    return NLayerDiscriminator(ndf=int(vae_cfg.disc_ndf), n_layers=int(vae_cfg.disc_layers))


def init_critics(rng, vae_cfg, images):
    """Boxed params of the critics the config uses: ``{"discriminator"?, "frozen_lpips"?}``
    (``images`` ``(B, H, W, 3)`` give the shapes)."""
    k_disc, k_lpips = jax.random.split(rng)
    out = {}
    if uses_discriminator(vae_cfg):
        out[DISC_KEY] = make_discriminator(vae_cfg).init(k_disc, images)["params"]
    if uses_lpips(vae_cfg):
        out[LPIPS_KEY] = LPIPS().init(k_lpips, images, images)["params"]
    return out


def autoencoder_params(params):
    """``params`` without the critics' entries: the autoencoder's own weights."""
    return {k: v for k, v in params.items() if k not in CRITIC_KEYS}


def discriminator_loss(kind: str, logits_real, logits_fake):
    """Hinge: ``(mean relu(1 - real) + mean relu(1 + fake)) / 2``; non-saturating:
    ``(mean softplus(-real) + mean softplus(fake)) / 2``."""
    if kind == "hinge":
        return 0.5 * (jax.nn.relu(1.0 - logits_real).mean() + jax.nn.relu(1.0 + logits_fake).mean())
    return 0.5 * (jax.nn.softplus(-logits_real).mean() + jax.nn.softplus(logits_fake).mean())


def generator_loss(kind: str, logits_fake):
    """Hinge: ``-mean fake``; non-saturating: ``mean softplus(-fake)``."""
    if kind == "hinge":
        return -logits_fake.mean()
    return jax.nn.softplus(-logits_fake).mean()


def adaptive_weight(grad_rec, grad_adv, weight: float, cap: float):
    """``weight * clip(|grad_rec| / (|grad_adv| + 1e-4), 0, cap)`` (no gradient): the
    ratio of the reconstruction and adversarial gradient norms at the last decoder layer,
    so neither term swamps the other (taming's ``calculate_adaptive_weight``; DQ-VAE caps
    the ratio at 0.75)."""
    ratio = jnp.linalg.norm(grad_rec) / (jnp.linalg.norm(grad_adv) + 1e-4)
    return jax.lax.stop_gradient(weight * jnp.clip(ratio, 0.0, cap))


def set_leaf(tree, path, value):
    """Copy of nested dict ``tree`` with ``tree[path[0]]...[path[-1]] = value``."""
    if not path:
        return value
    return {**tree, path[0]: set_leaf(tree[path[0]], path[1:], value)}


def get_leaf(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def reconstruct_with_last_layer(apply_fn, vae_params):
    """``(recon, out, last_layer_vjp)``: ``apply_fn(params) -> out`` (a dict with
    ``"recon"``) run once; ``last_layer_vjp(d_recon)`` maps a cotangent of the
    reconstruction to the gradient at :data:`LAST_LAYER` (backward through that layer
    only)."""
    def forward(kernel):
        out = apply_fn(set_leaf(vae_params, LAST_LAYER, kernel))
        return out["recon"], out
    recon, vjp, out = jax.vjp(forward, get_leaf(vae_params, LAST_LAYER), has_aux=True)
    return recon, out, lambda cot: vjp(jax.lax.stop_gradient(cot))[0]


def adversarial_terms(params, images, recon, d_rec, last_layer_vjp, step, vae_cfg):
    """``(loss, metrics)`` of the GAN part for one batch: generator term ``disc_on *
    adaptive weight * generator_loss`` plus discriminator term ``disc_on *
    discriminator_loss``; ``disc_on`` = ``step >= vae.disc_start``.

    ``d_rec``: the gradient of the reconstruction loss with respect to ``recon``; its
    image at the last layer is what the adaptive weight compares the adversarial one with."""
    kind = vae_cfg.disc_loss
    disc = make_discriminator(vae_cfg)
    frozen_disc = {"params": jax.lax.stop_gradient(params[DISC_KEY])}
    g_loss, g_vjp = jax.vjp(lambda r: generator_loss(kind, disc.apply(frozen_disc, r)), recon)
    d_adv = g_vjp(jnp.ones((), jnp.float32))[0]
    weight = adaptive_weight(last_layer_vjp(d_rec), last_layer_vjp(d_adv),
                             float(vae_cfg.disc_weight), float(vae_cfg.disc_weight_max))
    on = jnp.asarray(jnp.asarray(step) >= int(vae_cfg.disc_start), jnp.float32)
    logits_real = disc.apply({"params": params[DISC_KEY]}, images)
    logits_fake = disc.apply({"params": params[DISC_KEY]}, jax.lax.stop_gradient(recon))
    d_loss = discriminator_loss(kind, logits_real, logits_fake)
    loss = on * (weight * g_loss + d_loss)
    metrics = {"g_loss": g_loss, "d_loss": d_loss, "d_weight": weight, "disc_on": on,
               "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
    return loss, metrics

"""Train a KL-regularised autoencoder (Rombach et al. 2022) with diffax's trainer: `config.training.task="autoencoder"`.

The objective is LDM's `LPIPSWithDiscriminator` (taming-transformers / latent-diffusion,
ldm/modules/losses/contperceptual.py) with its learned output log-variance fixed at 0:

  L_G = rec + kl_weight * KL + disc_factor * lambda * disc_weight * (-mean D(x_hat))
  L_D = disc_factor * 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))     (hinge)

rec is the per-pixel error |x - x_hat| (or its square) plus perceptual_weight * LPIPS(x, x_hat)
(Zhang et al. 2018; diffax/models/lpips.py) added at every pixel as LDM adds it, summed over
pixels: sum |x - x_hat| + perceptual_weight * (H * W * C) * LPIPS per example. KL is the KL
divergence of the posterior to N(0, I) summed over latent elements; both are averaged over the
batch. disc_factor is 0 before config.autoencoder.disc_start; lambda is the adaptive weight of
Esser et al. 2021 (VQGAN, eq. 7): ||grad_{G_L} rec|| / (||grad_{G_L} L_GAN|| + 1e-4), clipped to
[0, 1e4] and not differentiated, G_L the decoder's last layer, rec including the perceptual term.
The perceptual term is there only when config.autoencoder.perceptual_weight > 0, from the VGG16
and lin weight files the user gives (lpips_vgg, lpips_lin; nothing downloads); the LPIPS network
is frozen: a constant of the step, in no optimizer, checkpoint or EMA.

Both networks live in one TrainState: params = {"net": autoencoder, "disc": discriminator}
and the gradient tree holds dL_G/d net and dL_D/d disc, so one Adam updates each network
with its own loss (Adam is per parameter) and EMA, sharding, Orbax resume and metrics are
the trainer's. Instead of samples the run writes a grid of held-out reconstructions and
exports the EMA autoencoder as a diffusers AutoencoderKL folder, <workdir>/autoencoder/,
with the scaling factor 1 / std of the latents (Rombach et al. 2022, sec. 4.3.2).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffax import data
from diffax.errors import UserError
from diffax.models import construct, layers
from diffax.models.autoencoder import AutoencoderKL, LatentScaling, kl_to_standard_normal, sample_posterior
from diffax.models.lpips import LPIPS, MIN_SIZE, load_lpips
from diffax.visualize import image_grid, save_png, to_uint8

EXPORT_DIR = "autoencoder"  # <workdir>/autoencoder: the diffusers folder a latent run points config.autoencoder.path at
RECON_LOSSES = ("l1", "l2")


class PatchDiscriminator(nnx.Module):
    """PatchGAN discriminator (Isola et al. 2017), as taming's NLayerDiscriminator (Esser et al. 2021).

    conv4x4/2 -> LeakyReLU(0.2) -> [conv4x4/2 -> BatchNorm -> LeakyReLU] x (layers - 1) ->
    conv4x4/1 -> BatchNorm -> LeakyReLU -> conv4x4/1 to one logit per patch; widths
    channels * min(2^n, 8). BatchNorm uses the batch's statistics (the discriminator is only
    ever run in training mode). The convs before a BatchNorm keep a bias (cancelled by the
    normalisation) and weights start xavier-uniform rather than taming's N(0, 0.02).
    """

    def __init__(self, in_channels: int, *, channels: int, num_layers: int, rngs: nnx.Rngs):
        pad = ((1, 1), (1, 1))
        convs, norms, width = [layers.Conv(in_channels, channels, 4, stride=2, padding=pad, rngs=rngs)], [], channels
        for n in range(1, num_layers + 1):
            out = channels * min(2**n, 8)
            stride = 2 if n < num_layers else 1
            convs.append(layers.Conv(width, out, 4, stride=stride, padding=pad, rngs=rngs))
            norms.append(_BatchNorm(out))
            width = out
        convs.append(layers.Conv(width, 1, 4, padding=pad, rngs=rngs))
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.leaky_relu(self.convs[0](x), 0.2)
        for conv, norm in zip(self.convs[1:-1], self.norms):
            h = jax.nn.leaky_relu(norm(conv(h)), 0.2)
        return self.convs[-1](h)


class _BatchNorm(nnx.Module):
    """BatchNorm2d in training mode (Ioffe & Szegedy 2015): batch statistics, biased variance, eps 1e-5, affine."""

    def __init__(self, channels: int):
        self.scale = nnx.Param(jnp.ones((channels,)))
        self.bias = nnx.Param(jnp.zeros((channels,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        mean = jnp.mean(x, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * self.scale[...] + self.bias[...]


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))) (Lim & Ye 2017; taming's hinge_d_loss)."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def adaptive_weight(rec_grad: jax.Array, gan_grad: jax.Array) -> jax.Array:
    """lambda = ||grad rec|| / (||grad L_GAN|| + 1e-4), clipped to [0, 1e4], not differentiated (Esser et al. 2021, eq. 7)."""
    weight = jnp.linalg.norm(rec_grad) / (jnp.linalg.norm(gan_grad) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(weight, 0.0, 1e4))


def reconstruction_loss(x: jax.Array, recon: jax.Array, kind: str) -> jax.Array:
    """Per-example |x - x_hat| (l1) or (x - x_hat)^2 (l2) summed over pixels."""
    if kind not in RECON_LOSSES:
        raise ValueError(f"config.autoencoder.recon_loss={kind!r}: use one of {', '.join(RECON_LOSSES)}.")
    err = jnp.abs(x - recon) if kind == "l1" else jnp.square(x - recon)
    return jnp.sum(err.reshape(err.shape[0], -1), axis=-1)


def perceptual_network(config: Any) -> LPIPS | None:
    """The frozen LPIPS of config.autoencoder.lpips_vgg / lpips_lin when perceptual_weight > 0, else None."""
    a = config.autoencoder
    weight = float(a.perceptual_weight)
    if weight < 0:
        raise UserError(f"config.autoencoder.perceptual_weight={weight}: use a weight >= 0 (LDM: 1.0; 0 = none).")
    if weight == 0:
        return None
    missing = [f"config.autoencoder.{f}" for f in ("lpips_vgg", "lpips_lin") if not str(a[f])]
    if missing:
        raise UserError(
            f"config.autoencoder.perceptual_weight={weight} needs the LPIPS weights, but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} empty: set lpips_vgg to torchvision's vgg16-397923af.pth and "
            "lpips_lin to the lpips package's weights/v0.1/vgg.pth (nothing downloads), or set perceptual_weight=0."
        )
    height, width, channels = data.data_shape(config)
    if channels not in (1, 3):
        raise UserError(f"config.data.channels={channels}: the perceptual (LPIPS) term compares RGB or grey "
                        "images; set config.autoencoder.perceptual_weight=0 for other data.")
    if min(height, width) < MIN_SIZE:
        raise UserError(f"config.data.image_size={config.data.image_size}: the perceptual (LPIPS) term needs "
                        f"images of at least {MIN_SIZE}x{MIN_SIZE}; set config.autoencoder.perceptual_weight=0.")
    return load_lpips(str(a.lpips_vgg), str(a.lpips_lin), vgg_what="config.autoencoder.lpips_vgg",
                      lin_what="config.autoencoder.lpips_lin")


def autoencoder_kwargs(config: Any) -> dict[str, Any]:
    """AutoencoderKL constructor arguments of config.autoencoder for the config's images."""
    a, channels = config.autoencoder, int(config.data.channels)
    return dict(
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(int(b) for b in a.block_out_channels),
        layers_per_block=int(a.layers_per_block),
        latent_channels=int(a.latent_channels),
        norm_num_groups=int(a.norm_groups),
        mid_attention=bool(a.mid_attention),
        use_quant_conv=bool(a.quant_conv),
        use_post_quant_conv=bool(a.quant_conv),
    )


@dataclasses.dataclass
class AutoencoderTraining:
    """The networks of an autoencoder run split into graph definitions and initial weights (the trainer's `Diffusion`)."""

    config: Any
    data_shape: tuple[int, ...]
    kwargs: dict[str, Any]
    net_graphdef: Any
    disc_graphdef: Any  # None without a discriminator
    params: Any  # {"net": autoencoder weights, "disc": discriminator weights or {}}
    num_classes: int = 0

    def autoencoder(self, params: Any) -> AutoencoderKL:
        return nnx.merge(self.net_graphdef, params["net"])

    def discriminator(self, params: Any) -> PatchDiscriminator:
        return nnx.merge(self.disc_graphdef, params["disc"])


def build(config: Any, seed: int | None = None) -> AutoencoderTraining:
    """Initialise config.autoencoder's AutoencoderKL (and discriminator when disc_weight > 0)."""
    seed = config.seed if seed is None else seed
    shape = tuple(data.data_shape(config))
    kwargs = autoencoder_kwargs(config)
    factor = 2 ** (len(kwargs["block_out_channels"]) - 1)
    if len(shape) != 3 or shape[0] % factor or shape[1] % factor:
        raise ValueError(
            f"config.data.image_size={config.data.image_size} is not divisible by the autoencoder's downsampling "
            f"factor {factor} (2 ** (len(config.autoencoder.block_out_channels) - 1)); change one of them."
        )
    rngs = nnx.Rngs(params=jax.random.fold_in(jax.random.key(seed), 1))
    a = config.autoencoder
    net = construct(lambda r: AutoencoderKL(**kwargs, rngs=r), rngs)
    net_graphdef, net_params = nnx.split(net, nnx.Param)
    disc_graphdef, disc_params = None, {}
    if float(a.disc_weight) > 0:
        disc = construct(
            lambda r: PatchDiscriminator(shape[-1], channels=int(a.disc_channels), num_layers=int(a.disc_layers), rngs=r),
            rngs,
        )
        disc_graphdef, disc_params = nnx.split(disc, nnx.Param)
    return AutoencoderTraining(config, shape, kwargs, net_graphdef, disc_graphdef,
                               {"net": net_params, "disc": disc_params})  # fmt: skip


def make_value_and_grad(task: AutoencoderTraining, config: Any) -> Callable:
    """value_and_grad(params, batch, key, step) -> ((L_G, aux), {"net": dL_G/dnet, "disc": dL_D/ddisc})."""
    a = config.autoencoder
    kind, kl_weight, disc_weight = str(a.recon_loss), float(a.kl_weight), float(a.disc_weight)
    reconstruction_loss(jnp.zeros((1, 1)), jnp.zeros((1, 1)), kind)  # an unknown name fails here, not in the jit
    disc_start = int(a.disc_start)
    perceptual, p_weight = perceptual_network(config), float(a.perceptual_weight)

    def rec_loss(x: jax.Array, recon: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """Batch mean of rec (LDM's nll, log-variance 0), and of LPIPS: LDM adds LPIPS to every pixel's error."""
        rec = reconstruction_loss(x, recon, kind)
        if perceptual is None:
            return jnp.mean(rec), None
        p = perceptual(x, recon)
        return jnp.mean(rec + p_weight * np.prod(x.shape[1:]) * p), jnp.mean(p)

    def value_and_grad(params: Any, batch: dict, key: jax.Array, step: jax.Array):
        x = batch["image"]
        disc_factor = jnp.where(step >= disc_start, 1.0, 0.0)

        def generator_loss(net_params):
            ae = task.autoencoder({"net": net_params})
            mean, logvar = ae.encode(x)
            z = sample_posterior(mean, logvar, key)
            if ae.post_quant_conv is not None:
                z = ae.post_quant_conv(z)
            feats = ae.decoder.features(z)
            last = ae.decoder.conv_out

            def out(kernel, h):
                return layers.conv2d(h, kernel, padding=last.padding) + last.bias[...]

            recon = out(last.kernel[...], feats)
            # rec and d rec / d x_hat once (one LPIPS forward and backward a step): rec_term has rec's
            # value and passes that gradient on to the decoder; the adaptive weight pulls it back to G_L.
            fixed = jax.lax.stop_gradient(recon)
            (rec, p_loss), rec_at_recon = jax.value_and_grad(lambda r: rec_loss(x, r), has_aux=True)(fixed)
            rec_term = rec + jnp.sum(rec_at_recon * (recon - fixed))
            kl = jnp.mean(kl_to_standard_normal(mean, logvar))
            loss = rec_term + kl_weight * kl
            aux = {"rec_loss": rec, "kl": kl, "rec_mse": jnp.mean(jnp.square(x - recon))}
            if p_loss is not None:
                aux["p_loss"] = p_loss
            if task.disc_graphdef is None:
                return loss, (aux, recon)
            disc = task.discriminator(params)
            g_loss = -jnp.mean(disc(recon))
            # lambda from gradients at the last layer only: the features before it are held fixed.
            h = jax.lax.stop_gradient(feats)
            k = jax.lax.stop_gradient(last.kernel[...])
            rec_grad = jax.vjp(lambda k: out(k, h), k)[1](rec_at_recon)[0]
            gan_grad = jax.grad(lambda k: -jnp.mean(disc(out(k, h))))(k)
            weight = adaptive_weight(rec_grad, gan_grad) * disc_weight
            aux.update(g_loss=g_loss, d_weight=weight)
            return loss + disc_factor * weight * g_loss, (aux, recon)

        (loss, (aux, recon)), net_grads = jax.value_and_grad(generator_loss, has_aux=True)(params["net"])
        disc_grads = {}
        if task.disc_graphdef is not None:
            fake = jax.lax.stop_gradient(recon)

            def discriminator_loss(disc_params):
                disc = task.discriminator({"disc": disc_params})
                return disc_factor * hinge_d_loss(disc(x), disc(fake))

            d_loss, disc_grads = jax.value_and_grad(discriminator_loss)(params["disc"])
            aux["d_loss"] = d_loss
        return (loss, aux), {"net": net_grads, "disc": disc_grads}

    return value_and_grad


def latent_scaling(mean: np.ndarray, logvar: np.ndarray, seed: int) -> LatentScaling:
    """scale = 1 / std of posterior samples z (Rombach et al. 2022, sec. 4.3.2: unit-variance latents), shift 0."""
    z = np.asarray(sample_posterior(jnp.asarray(mean), jnp.asarray(logvar), jax.random.key(seed)))
    return LatentScaling(scale=float(1.0 / max(z.std(), 1e-8)), shift=0.0)


class Reconstructions:
    """What an autoencoder run writes instead of samples: a grid of held-out images beside their
    reconstructions (the posterior mean decoded), their error as metrics, and the exported
    diffusers folder <workdir>/autoencoder/ of the EMA (or raw) weights."""

    def __init__(self, task: AutoencoderTraining, config: Any, workdir: str):
        from diffax.models.diffusers_vae import save_diffusers_autoencoder

        self.task, self.config, self.workdir = task, config, workdir
        self.metrics: dict[str, float] = {}  # the held-out error of the last grid, logged beside it
        self.save = save_diffusers_autoencoder
        held_out = config.copy_and_resolve_references()
        with held_out.unlocked():
            held_out.data.split = "test" if config.data.name == "digits" else config.data.split
            held_out.data.shuffle = False
            held_out.data.random_flip = False
            held_out.training.batch_size = int(config.sampling.num_samples)
        iterator = data.make_iterator(held_out, process_index=0, process_count=1)
        self.images = np.asarray(next(iterator)["image"])
        iterator.close()
        self.encode_decode = jax.jit(lambda p, x: task.autoencoder(p)(x))  # posterior mean, decoded

    def path(self, step: int) -> str:
        return os.path.join(self.workdir, "samples", f"step_{step:08d}.png")

    def __call__(self, step: int, state: Any) -> np.ndarray | None:
        """Write the grid of step `step` to `path(step)` and export the autoencoder; returns the grid
        (None on processes > 0), with the held-out error in `self.metrics`."""
        params = jax.device_get(state.ema if self.config.sampling.use_ema else state.params)
        recon, mean, logvar = (np.asarray(v) for v in self.encode_decode(params, self.images))
        mse = float(np.mean(np.square(self.images - recon)))
        psnr = float(10 * np.log10(4.0 / max(mse, 1e-12)))  # peak-to-peak 2 in [-1, 1]
        if jax.process_index() != 0:
            return None
        self.metrics = {"heldout_mse": mse, "heldout_psnr": psnr}
        pairs = np.stack([self.images, np.clip(recon, -1, 1)], axis=1).reshape(-1, *self.images.shape[1:])
        picture = image_grid(to_uint8(pairs), columns=2 * int(np.ceil(np.sqrt(len(self.images)))))
        os.makedirs(os.path.dirname(self.path(step)), exist_ok=True)
        save_png(picture, self.path(step), scale=max(1, 128 // self.images.shape[1]))
        scaling = latent_scaling(mean, logvar, self.config.seed)
        model = self.task.autoencoder(params)
        self.save(model, self.task.kwargs, scaling, os.path.join(self.workdir, EXPORT_DIR))
        return picture

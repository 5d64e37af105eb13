"""KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, sec. 3 and App. G), as diffusers' AutoencoderKL.

The layout is the one of diffusers' `AutoencoderKL` (Encoder / Decoder in
diffusers/models/autoencoders/vae.py), with the module names kept so that an imported
checkpoint maps one tensor to one parameter (diffax/models/diffusers_vae.py):

  encoder: conv_in -> down_blocks[i] (layers_per_block ResnetBlock2D, then a stride-2 conv
           except at the last level) -> mid_block (resnet, single-head attention, resnet)
           -> GroupNorm, SiLU, conv_out to 2 x latent_channels (mean | log-variance)
  quant_conv (1x1, optional), post_quant_conv (1x1, optional)
  decoder: conv_in -> mid_block -> up_blocks[i] (layers_per_block + 1 resnets, then nearest
           2x upsampling + conv except at the last level) -> GroupNorm, SiLU, conv_out

Every GroupNorm uses eps 1e-6 as diffusers' VAE. Images are NHWC in [-1, 1]. The latent a
diffusion model sees is `LatentScaling.to_latent(z) = (z - shift) * scale` (Rombach et al.
2022, sec. 4.3.2 and D.1; SD3 / Flux add the shift); its inverse is applied before decoding.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from diffax.models import layers

Array = jax.Array
EPS = 1e-6  # diffusers' VAE: resnet_eps and every GroupNorm


@dataclasses.dataclass(frozen=True)
class LatentScaling:
    """The one place where an autoencoder's latents are scaled for diffusion and back.

    to_latent(z) = (z - shift) * scale; from_latent(l) = l / scale + shift (diffusers'
    pipelines: SD 1.x / 2.x / SDXL have shift 0, SD3 and Flux a shift_factor).
    """

    scale: float = 1.0
    shift: float = 0.0

    def to_latent(self, z: Array) -> Array:
        return (z - self.shift) * self.scale

    def from_latent(self, latent: Array) -> Array:
        return latent / self.scale + self.shift


def sample_posterior(mean: Array, logvar: Array, key: Array) -> Array:
    """z ~ N(mean, exp(logvar)) by reparameterisation (Kingma & Welling 2014, eq. 10)."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def kl_to_standard_normal(mean: Array, logvar: Array) -> Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) per example, summed over latent elements (Kingma & Welling 2014, App. B).

    0.5 * sum(mean^2 + exp(logvar) - 1 - logvar), as diffusers' DiagonalGaussianDistribution.kl().
    """
    per = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(per.reshape(per.shape[0], -1), axis=-1)


class _MidBlock(nnx.Module):
    """diffusers' UNetMidBlock2D without time embedding: resnet, (attention), resnet."""

    def __init__(self, channels: int, *, groups: int, attention: bool, kw: dict, rngs: nnx.Rngs):
        res = lambda: layers.ResBlock(channels, channels, None, groups=groups, eps=EPS, rngs=rngs, **kw)
        self.resnets = nnx.List([res(), res()])
        attn = layers.AttentionBlock(
            channels, 1, groups=groups, eps=EPS, dtype=kw["dtype"], param_dtype=kw["param_dtype"], rngs=rngs
        )
        self.attentions = nnx.List([attn] if attention else [])

    def __call__(self, x: Array) -> Array:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class _Level(nnx.Module):
    """A DownEncoderBlock2D / UpDecoderBlock2D: resnets, then an optional resampler (a list of 0 or 1)."""

    def __init__(self, resnets: list, samplers: list, attr: str):
        self.resnets = nnx.List(resnets)
        setattr(self, attr, nnx.List(samplers))
        self.attr = attr

    def __call__(self, x: Array) -> Array:
        for res in self.resnets:
            x = res(x)
        for sampler in getattr(self, self.attr):
            x = sampler(x)
        return x


class Encoder(nnx.Module):
    """diffusers' Encoder with double_z: image [B, H, W, C] -> moments [B, H/f, W/f, 2 x latent_channels]."""

    def __init__(self, in_channels, latent_channels, block_out_channels, layers_per_block, *, groups,
                 mid_attention, kw, rngs):  # fmt: skip
        boc = list(block_out_channels)
        self.conv_in = layers.Conv(in_channels, boc[0], 3, rngs=rngs, **kw)
        blocks, cur = [], boc[0]
        for i, out in enumerate(boc):
            resnets = []
            for _ in range(layers_per_block):
                resnets.append(layers.ResBlock(cur, out, None, groups=groups, eps=EPS, rngs=rngs, **kw))
                cur = out
            down = [] if i == len(boc) - 1 else [layers.Downsample(out, padding=0, rngs=rngs, **kw)]
            blocks.append(_Level(resnets, down, "downsamplers"))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = _MidBlock(cur, groups=groups, attention=mid_attention, kw=kw, rngs=rngs)
        self.conv_norm_out = layers.GroupNorm(cur, groups, EPS, dtype=kw["dtype"], param_dtype=kw["param_dtype"])
        self.conv_out = layers.Conv(cur, 2 * latent_channels, 3, rngs=rngs, **kw)

    def __call__(self, x: Array) -> Array:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class Decoder(nnx.Module):
    """diffusers' Decoder (norm_type "group"): latent [B, h, w, latent_channels] -> image [B, h f, w f, C]."""

    def __init__(self, latent_channels, out_channels, block_out_channels, layers_per_block, *, groups,
                 mid_attention, kw, rngs):  # fmt: skip
        rev = list(reversed(block_out_channels))
        self.conv_in = layers.Conv(latent_channels, rev[0], 3, rngs=rngs, **kw)
        self.mid_block = _MidBlock(rev[0], groups=groups, attention=mid_attention, kw=kw, rngs=rngs)
        blocks, cur = [], rev[0]
        for i, out in enumerate(rev):
            resnets = []
            for _ in range(layers_per_block + 1):
                resnets.append(layers.ResBlock(cur, out, None, groups=groups, eps=EPS, rngs=rngs, **kw))
                cur = out
            up = [] if i == len(rev) - 1 else [layers.Upsample(out, rngs=rngs, **kw)]
            blocks.append(_Level(resnets, up, "upsamplers"))
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = layers.GroupNorm(cur, groups, EPS, dtype=kw["dtype"], param_dtype=kw["param_dtype"])
        self.conv_out = layers.Conv(cur, out_channels, 3, rngs=rngs, **kw)

    def features(self, z: Array) -> Array:
        """Everything before conv_out, the last layer (whose gradients set the GAN's adaptive weight)."""
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return jax.nn.silu(self.conv_norm_out(h))

    def __call__(self, z: Array) -> Array:
        return self.conv_out(self.features(z))


class AutoencoderKL(nnx.Module):
    """The KL autoencoder of latent diffusion (Rombach et al. 2022), module-for-module diffusers' AutoencoderKL.

    encode(x) -> (mean, logvar), logvar clipped to [-30, 20] as diffusers'
    DiagonalGaussianDistribution; decode(z) -> image. z is the raw (unscaled) latent; the
    diffusion model's latent is LatentScaling(scaling_factor, shift_factor).to_latent(z).
    The spatial downsampling factor is 2 ** (len(block_out_channels) - 1).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_channels: int = 3,
        block_out_channels: Sequence[int] = (64,),
        layers_per_block: int = 1,
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        mid_attention: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        for b in block_out_channels:
            if b % norm_num_groups:
                raise ValueError(
                    f"autoencoder norm_num_groups={norm_num_groups} does not divide block_out_channels {b}"
                )
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        arch = dict(groups=norm_num_groups, mid_attention=mid_attention, kw=kw, rngs=rngs)
        self.encoder = Encoder(in_channels, latent_channels, block_out_channels, layers_per_block, **arch)
        self.decoder = Decoder(latent_channels, out_channels, block_out_channels, layers_per_block, **arch)
        lc = latent_channels
        self.quant_conv = layers.Conv(2 * lc, 2 * lc, 1, rngs=rngs, **kw) if use_quant_conv else None
        self.post_quant_conv = layers.Conv(lc, lc, 1, rngs=rngs, **kw) if use_post_quant_conv else None
        self.latent_channels = lc
        self.downsampling = 2 ** (len(block_out_channels) - 1)

    def encode(self, x: Array) -> tuple[Array, Array]:
        """Image [B, H, W, C] in [-1, 1] -> (mean, logvar) of the posterior, each [B, H/f, W/f, latent_channels]."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: Array) -> Array:
        """Raw latent [B, h, w, latent_channels] -> image [B, h f, w f, C] (unclipped, as diffusers)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: Array, key: Array | None = None) -> tuple[Array, Array, Array]:
        """(reconstruction, mean, logvar): decode a posterior sample (the mean when key is None)."""
        mean, logvar = self.encode(x)
        z = mean if key is None else sample_posterior(mean, logvar, key)
        return self.decode(z), mean, logvar

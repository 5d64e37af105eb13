"""Latent diffusion wiring (Rombach et al. 2022): decode samples to pixels, and tie a run to its autoencoder.

A latent run has config.autoencoder.path (a diffusers AutoencoderKL folder) and trains on
`config.data.name="latents:DIR"`, or on images that the frozen autoencoder encodes in the train
loop (`make_encoder`; e.g. fine-tuning an imported Stable Diffusion pipeline on a folder).
Everything a user sees is decoded pixels: `make_decoder` is applied after the sampler in
inference.make_sample_fn, the one function behind training grids, `diffax sample` and `diffax
eval`. The run records the autoencoder's path and sha256 in <workdir>/autoencoder.json and refuses
to resume or evaluate with another one.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable

import jax
from flax import nnx

RECORD_NAME = "autoencoder.json"


def is_latent(config: Any) -> bool:
    return bool(config.autoencoder.path) and config.training.task == "diffusion"


def encodes_on_the_fly(config: Any) -> bool:
    """A latent run trained on images (not a latent cache): the frozen autoencoder encodes each batch
    in the train loop (`make_encoder`), as diffusers' train_text_to_image does for Stable Diffusion."""
    return is_latent(config) and not str(config.data.name).startswith("latents:")


def check_config(config: Any) -> None:
    """A latent run on images: their size must be a multiple of the autoencoder's downsampling factor."""
    model_data_shape(config)


def _autoencoder_config(path: str) -> dict:
    from diffax.models.diffusers import CONFIG_NAME
    from diffax.models.diffusers_vae import locate

    with open(os.path.join(locate(path), CONFIG_NAME), encoding="utf-8") as f:
        return json.load(f)


def model_data_shape(config: Any) -> tuple[int, ...]:
    """The shape the denoiser sees: data.data_shape, or for a latent run on images (encodes_on_the_fly)
    (image_size / f, image_size / f, latent_channels) with f the autoencoder's downsampling factor."""
    from diffax import data

    if not encodes_on_the_fly(config):
        return tuple(data.data_shape(config))
    vae = _autoencoder_config(str(config.autoencoder.path))
    factor = 2 ** (len(vae.get("block_out_channels", (64,))) - 1)
    size = int(config.data.image_size)
    if size % factor:
        raise ValueError(f"config.data.image_size={size} is not divisible by the autoencoder's downsampling factor "
                         f"{factor} ({config.autoencoder.path}): use a multiple of {factor}.")
    return (size // factor, size // factor, int(vae.get("latent_channels", 4)))


def make_encoder(config: Any, sharding: Any) -> Callable | None:
    """encode(batch, step) -> the batch with batch["image"] replaced by scaled latents, for runs that
    encode on the fly (None otherwise): z ~ q(z | x) of the frozen autoencoder (Rombach et al. 2022,
    sec. 3: the posterior sample, as diffusers' latent_dist.sample()), then LatentScaling.to_latent.
    The sample's key is fold_in(key(seed), step) folded once more, so a resumed run draws the same."""
    if not encodes_on_the_fly(config):
        return None
    from diffax.models.autoencoder import sample_posterior
    from diffax.training.encode_data import check_images

    graphdef, state, scaling = _load(os.path.abspath(str(config.autoencoder.path)))
    vae = nnx.merge(graphdef, state)
    check_images(config, in_channels=int(vae.encoder.conv_in.kernel.shape[2]), downsampling=vae.downsampling)
    seed = int(config.seed)

    @functools.partial(jax.jit, out_shardings=sharding)
    def encode(vae_state, images, step):
        mean, logvar = nnx.merge(graphdef, vae_state).encode(images)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), 0x5EED)
        return scaling.to_latent(sample_posterior(mean, logvar, key))

    def prepare(batch: dict, step: int) -> dict:
        return {**batch, "image": encode(state, batch["image"], step)}

    return prepare


def pixel_data_config(config: Any) -> Any:
    """The image data a latent cache was encoded from (its meta.json), for reference statistics; else `config`."""
    if not str(config.data.name).startswith("latents:"):
        return config
    from diffax.data.latents import read_meta

    images = read_meta(str(config.data.name).partition(":")[2])["data"]
    out = config.copy_and_resolve_references()
    with out.unlocked():
        out.data.update(images)
        out.data.random_flip = False
    return out


@functools.lru_cache(maxsize=2)
def _load(path: str) -> tuple[Any, Any, Any]:
    from diffax.models.diffusers_vae import load_diffusers_autoencoder

    model, scaling = load_diffusers_autoencoder(path)
    graphdef, state = nnx.split(model)
    return graphdef, state, scaling


def make_decoder(config: Any, out_sharding: Any) -> Callable | None:
    """latents -> images in [-1, 1]: decode(LatentScaling.from_latent(latent)); None in pixel space."""
    if not is_latent(config):
        return None
    graphdef, state, scaling = _load(os.path.abspath(str(config.autoencoder.path)))
    decode = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(scaling.from_latent(z)), out_shardings=out_sharding)
    return functools.partial(decode, state)


def record_autoencoder(workdir: str, config: Any) -> None:
    """Write <workdir>/autoencoder.json (path, sha256) for a new latent run, or check it on a resumed one."""
    check_config(config)
    if not is_latent(config):
        return
    record = _record(config)
    path = os.path.join(workdir, RECORD_NAME)
    if os.path.exists(path):
        check_autoencoder(workdir, config)
    elif jax.process_index() == 0:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)


def check_autoencoder(workdir: str, config: Any) -> None:
    """Refuse to use a run with another autoencoder than the one it was trained with (compared by sha256)."""
    path = os.path.join(workdir, RECORD_NAME)
    if not os.path.exists(path):
        if is_latent(config):
            raise ValueError(f"{workdir} has no {RECORD_NAME}: it is not a latent run, but config.autoencoder.path="
                             f"{config.autoencoder.path!r} is set.")  # fmt: skip
        return
    with open(path, encoding="utf-8") as f:
        trained = json.load(f)
    now = _record(config) if config.autoencoder.path else {"path": "", "sha256": ""}
    if now["sha256"] != trained["sha256"]:
        raise ValueError(
            f"{workdir} was trained on the latents of the autoencoder {trained['path']!r} (weights sha256 "
            f"{trained['sha256'][:12]}...), but config.autoencoder.path={config.autoencoder.path!r} "
            f"({now['sha256'][:12] or 'none'}): set config.autoencoder.path={trained['path']!r}."
        )


def _record(config: Any) -> dict[str, str]:
    from diffax.models.diffusers_vae import weights_sha256

    path = str(config.autoencoder.path)
    return {"path": os.path.abspath(path), "sha256": weights_sha256(path)}

"""Latent diffusion wiring (Rombach et al. 2022): decode samples to pixels, and tie a run to its autoencoder.

A latent run has config.autoencoder.path (a diffusers AutoencoderKL folder) and trains on
`config.data.name="latents:DIR"`. Everything a user sees is decoded pixels: `make_decoder`
is applied after the sampler in inference.make_sample_fn, the one function behind training
grids, `diffax sample` and `diffax eval`. The run records the autoencoder's path and sha256
in <workdir>/autoencoder.json and refuses to resume or evaluate with another one.
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


def check_config(config: Any) -> None:
    """A latent run trains on a latent cache; the autoencoder alone cannot encode images on the fly."""
    if is_latent(config) and not str(config.data.name).startswith("latents:"):
        raise ValueError(
            f"config.autoencoder.path={config.autoencoder.path!r} makes this a latent run, but config.data.name="
            f"{config.data.name!r} is not a latent cache: run `diffax encode-data --config C --output DIR` and train "
            "with --config.data.name=latents:DIR (or set config.autoencoder.path='' for pixel space)."
        )


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

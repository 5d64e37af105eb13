"""Latent caches: a data set encoded once by an autoencoder, read back as `config.data.name="latents:DIR"`.

A cache directory written by `diffax encode-data` (diffax/training/encode_data.py) holds

  meta.json                      the autoencoder (path, sha256 of its weights, scaling), the
                                 latent shape, the number of examples and shards, the data config
  shard-00000-of-00012.npz ...   "mean", "std" [n, h, w, c] float32 (the posterior of each image,
                                 stored whole as EDM2 does, Karras et al. 2024) and "label" [n] int32
  captions.jsonl                 text data sets: one JSON list of captions per example, in order
  text.json, text-null.npz,      with `encode-data --text_embeddings`: the frozen text encoder's identity
  text-00000-of-00012.npz ...    (folder, sha256 of weights and tokenizer) and dtype; the empty prompt's
                                 embedding once (the null condition of caption dropout); per shard the
                                 embedding of every caption of its examples: "hidden" [c, L, D], "mask"
                                 [c, L] uint8, "pooled" [c, P] (when the encoder has one) and "offsets"
                                 [n + 1] int64 (example j's captions are rows offsets[j]:offsets[j + 1])

Training draws each step's latent from the stored distribution, z = mean + std * eps, with eps
from the example's generator (seeded by config.seed and its position in the data stream, so the
draw is a function of seed and step), then scales it with the autoencoder's LatentScaling (the
one place scaling happens: diffax/models/autoencoder.py). Shards are Grain random-access records.
A text run with that frozen encoder reads the embedding of the caption chosen for the step instead of
its tokens ("text_hidden", "text_mask", "text_pooled" in the batch), so it needs no encoder to train.
"""
from __future__ import annotations

import functools
import json
import os
import zipfile
from typing import Any

import numpy as np

from diffax.data.sources import SOURCES, Source

META_NAME = "meta.json"
CAPTIONS_NAME = "captions.jsonl"
TEXT_META_NAME = "text.json"
TEXT_NULL_NAME = "text-null.npz"
TEXT_DTYPES = ("float16", "float32")
FORMAT = 1


def shard_path(cache_dir: str, index: int, count: int) -> str:
    return os.path.join(cache_dir, f"shard-{index:05d}-of-{count:05d}.npz")


def text_shard_path(cache_dir: str, index: int, count: int) -> str:
    return os.path.join(cache_dir, f"text-{index:05d}-of-{count:05d}.npz")


def read_text_meta(cache_dir: str) -> dict[str, Any] | None:
    """The cache's text.json (stored text embeddings), or None when it has none."""
    path = os.path.join(cache_dir, TEXT_META_NAME)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_text_encoder(cache_dir: str, identity: dict[str, Any], field: str = "config.text.encoder") -> dict:
    """Refuse the embeddings of `cache_dir` when another encoder than `identity` (folder, sha256 of its weights
    and tokenizer) made them; returns the cache's text.json."""
    from diffax.errors import UserError

    meta = read_text_meta(cache_dir)
    if meta is None:
        raise UserError(f"{cache_dir} holds no text embeddings ({TEXT_META_NAME}): encode it with "
                        "`diffax encode-data --text_embeddings=float16`.")
    made = meta["encoder"]
    for key in ("sha256", "tokenizer_sha256"):
        if made.get(key) != identity.get(key):
            raise UserError(
                f"The text embeddings of {cache_dir} were made by the encoder {made['path']!r} ({key} "
                f"{str(made.get(key))[:12]}...), but {field}={identity['path']!r} has {key} "
                f"{str(identity.get(key))[:12]}...: a model must train on its own encoder's embeddings. Set "
                f"{field} to {made['path']!r}, or encode the data again with `diffax encode-data "
                "--text_embeddings` into a new --output.")
    return meta


def read_null_embedding(cache_dir: str) -> dict[str, np.ndarray]:
    """The empty prompt's embedding stored once in the cache ({"hidden" [L, D], "mask" [L] int32, "pooled" [P]})."""
    with np.load(os.path.join(cache_dir, TEXT_NULL_NAME)) as f:
        out = {k: np.asarray(f[k]) for k in f.files}
    out["mask"] = out["mask"].astype(np.int32)
    return out


def load_text_shard(path: str, expected: int) -> dict[str, np.ndarray]:
    """A text shard's arrays, checked like `load_shard`."""
    fix = "delete it and rerun the same `diffax encode-data --text_embeddings` command: it encodes only what is missing."
    if not os.path.exists(path):
        raise FileNotFoundError(f"Text embedding shard {path} is missing: {fix}")
    try:
        with np.load(path) as f:
            arrays = {k: np.asarray(f[k]) for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"Text embedding shard {path} is corrupt ({type(e).__name__}: {e}): {fix}") from None
    offsets = arrays.get("offsets")
    if offsets is None or offsets.shape != (expected + 1,) or "hidden" not in arrays or \
            len(arrays["hidden"]) != offsets[-1]:
        raise ValueError(f"Text embedding shard {path} does not hold the captions of {expected} examples: {fix}")
    return arrays


def read_meta(cache_dir: str) -> dict[str, Any]:
    """The cache's meta.json; FileNotFoundError naming it when the directory is not a cache."""
    path = os.path.join(cache_dir, META_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: config.data.name='latents:{cache_dir}' must name a directory written by "
            f"`diffax encode-data --output {cache_dir}`."
        )
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}; this diffax reads format {FORMAT}. Re-encode it.")
    return meta


def latent_shape(cache_dir: str) -> tuple[int, int, int]:
    return tuple(int(v) for v in read_meta(cache_dir)["latent_shape"])


def load_shard(path: str, expected: int, latent: tuple[int, ...]) -> dict[str, np.ndarray]:
    """A shard's arrays, checked; a missing, truncated or corrupt file is one error naming it."""
    fix = "delete it and rerun the same `diffax encode-data` command: it encodes only the missing shards."
    if not os.path.exists(path):
        raise FileNotFoundError(f"Latent cache shard {path} is missing: {fix}")
    try:
        with np.load(path) as f:
            arrays = {k: np.asarray(f[k]) for k in ("mean", "std", "label")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"Latent cache shard {path} is corrupt ({type(e).__name__}: {e}): {fix}") from None
    shapes = (arrays["mean"].shape, arrays["std"].shape, arrays["label"].shape)
    if shapes != ((expected, *latent), (expected, *latent), (expected,)):
        raise ValueError(f"Latent cache shard {path} holds arrays of shapes {shapes}, not {expected} latents "
                         f"of shape {latent}: {fix}")  # fmt: skip
    return arrays


def check_autoencoder(meta: dict[str, Any], config: Any, cache_dir: str) -> None:
    """Refuse a cache encoded by another autoencoder than config.autoencoder.path (compared by sha256 of the weights)."""
    from diffax.models.diffusers_vae import weights_sha256

    recorded = meta["autoencoder"]
    path = str(config.autoencoder.path)
    if not path:
        raise ValueError(
            f"config.data.name='latents:{cache_dir}' needs config.autoencoder.path, the autoencoder that decodes "
            f"its latents: the cache was encoded with {recorded['path']!r}."
        )
    sha = weights_sha256(path)
    if sha != recorded["sha256"]:
        raise ValueError(
            f"The latent cache {cache_dir} was encoded by the autoencoder {recorded['path']!r} (weights sha256 "
            f"{recorded['sha256'][:12]}...), but config.autoencoder.path={path!r} has weights {sha[:12]}...: "
            "set config.autoencoder.path to the cache's autoencoder, or encode the data again with yours."
        )


@SOURCES.register("latents")
def latents_source(arg: str, config: Any) -> Source:
    """A latent cache: records are example indices, decode -> ([mean, std] stacked [2, h, w, c], label)."""
    cache_dir = arg
    meta = read_meta(cache_dir)
    check_autoencoder(meta, config, cache_dir)
    if config.data.random_flip:
        raise ValueError(
            f"config.data.random_flip=True cannot apply to latents:{cache_dir}: a flipped latent is not the latent "
            "of the flipped image. Set config.data.random_flip=False (flips are not encoded into caches)."
        )
    n, size, count = int(meta["num_examples"]), int(meta["shard_size"]), int(meta["num_shards"])
    shape = tuple(meta["latent_shape"])
    for i in range(count):  # every shard present before training starts
        if not os.path.exists(shard_path(cache_dir, i, count)):
            raise FileNotFoundError(
                f"Latent cache shard {shard_path(cache_dir, i, count)} is missing ({cache_dir} is incomplete): rerun "
                "the `diffax encode-data` command that wrote it; it encodes only the missing shards."
            )

    @functools.lru_cache(maxsize=4)
    def shard(i: int) -> dict[str, np.ndarray]:
        return load_shard(shard_path(cache_dir, i, count), min(size, n - i * size), shape)

    def decode(index: int) -> tuple[np.ndarray, int]:
        arrays = shard(index // size)
        j = index % size
        return np.stack([arrays["mean"][j], arrays["std"][j]]), int(arrays["label"][j])

    captions = read_captions(cache_dir, n)
    embeddings = None
    if read_text_meta(cache_dir) is not None:
        @functools.lru_cache(maxsize=4)
        def text_shard(i: int) -> dict[str, np.ndarray]:
            return load_text_shard(text_shard_path(cache_dir, i, count), min(size, n - i * size))

        def embeddings(index: int) -> dict[str, np.ndarray]:
            arrays = text_shard(index // size)
            j = index % size
            rows = slice(int(arrays["offsets"][j]), int(arrays["offsets"][j + 1]))
            return {k: v[rows] for k, v in arrays.items() if k != "offsets"}

    return Source(
        name=f"latents:{cache_dir}",
        kind="latent",
        records=range(n),
        decode=decode,
        num_classes=int(meta.get("num_classes", 0)),
        image_shape=shape,
        float_images=True,
        describe=lambda index: f"latents:{cache_dir} example {index}",
        latent_scaling=(float(meta["scaling"]["scale"]), float(meta["scaling"]["shift"])),
        captions=None if captions is None else captions.__getitem__,
        caption_embeddings=embeddings,
    )


def read_captions(cache_dir: str, n: int) -> list[tuple[str, ...]] | None:
    """The cache's captions.jsonl (one list per example), or None when the data set had no captions."""
    path = os.path.join(cache_dir, CAPTIONS_NAME)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        captions = [tuple(json.loads(line)) for line in f if line.strip()]
    if len(captions) != n:
        raise ValueError(f"{path} holds {len(captions)} caption lists for {n} examples: rerun `diffax encode-data` "
                         "into a new folder.")
    return captions


def sample_latent(stacked: np.ndarray, rng: np.random.Generator, scale: float, shift: float) -> np.ndarray:
    """One draw z = mean + std * eps of a cached posterior, scaled for diffusion by LatentScaling(scale, shift)."""
    from diffax.models.autoencoder import LatentScaling

    mean, std = stacked[0], stacked[1]
    z = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
    return np.asarray(LatentScaling(scale, shift).to_latent(z), np.float32)

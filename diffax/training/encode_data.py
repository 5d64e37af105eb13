"""`diffax encode-data --config C --output DIR`: encode a data set once with config.autoencoder.path.

Writes the latent cache that `config.data.name="latents:DIR"` trains on (format in
diffax/data/latents.py). The examples are cut into shards of `shard_size`; process p of P
encodes shards p, p + P, ... with its local devices (the batch split over them). Each shard is
written to a temporary file and renamed when complete, so after a kill the same command encodes
only the shards that are missing. Images go through the same decode / channel / resize steps as
training (no flips, no dequantisation).

With `text_embeddings` ("float16" or "float32") and a frozen pretrained config.text.encoder, every
caption's embedding is stored too (text.json, text-null.npz, text-*.npz; format in
diffax/data/latents.py), so a text run on the cache needs no encoder to train. float16 halves the
disk (a CLIP-L caption is 77 x 768 states: 118 KB instead of 236 KB) at a relative rounding error
of 2^-11, below that of the bfloat16 activations models run in on accelerators; float32 stores
exactly what the encoder returns, so training on the cache equals training with the encoder.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffax.data import latents, pipeline, sources
from diffax.errors import UserError


def check_images(config: Any, *, in_channels: int, downsampling: int) -> None:
    """The config's images must fit the autoencoder: channel count and a size divisible by its factor."""
    d = config.data
    if int(d.channels) != in_channels:
        raise ValueError(
            f"config.data.channels={d.channels} but the autoencoder {config.autoencoder.path!r} takes {in_channels}-"
            f"channel images: set config.data.channels={in_channels}."
        )
    if int(d.image_size) % downsampling:
        raise ValueError(
            f"config.data.image_size={d.image_size} is not divisible by the autoencoder's downsampling factor "
            f"{downsampling}: use a multiple of {downsampling}."
        )


def encode_data(config: Any, output: str, *, shard_size: int = 4096, batch_size: int = 256,
                progress: bool = True, text_embeddings: str = "") -> dict[str, Any]:  # fmt: skip
    """Encode config.data with config.autoencoder.path into the cache `output`; returns its meta.json contents.
    `text_embeddings` ("float16" | "float32"; "" = none) also stores each caption's embedding by the frozen
    config.text.encoder."""
    from diffax.models.diffusers_vae import load_diffusers_autoencoder, weights_sha256

    a, d = config.autoencoder, config.data
    identity = None
    if text_embeddings:  # refused before anything is encoded: a trainable encoder, an unknown dtype
        from diffax.training import text as text_lib

        if text_embeddings not in latents.TEXT_DTYPES:
            raise UserError(f"--text_embeddings={text_embeddings!r}: use one of {', '.join(latents.TEXT_DTYPES)} "
                            "(or leave it empty for no embeddings).")
        identity = text_lib.encoder_identity(config)
    if not a.path:
        raise ValueError("config.autoencoder.path is empty: name the diffusers AutoencoderKL folder to encode with.")
    if d.random_flip:
        raise ValueError("config.data.random_flip=True: flips are not encoded into latent caches; set it to False.")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"--shard_size={shard_size} and --batch_size={batch_size} must be positive.")
    model, scaling = load_diffusers_autoencoder(a.path)
    in_channels = model.encoder.conv_in.kernel.shape[2]
    check_images(config, in_channels=in_channels, downsampling=model.downsampling)
    source = sources.get_source(config)
    if source.kind != "image" or source.records is None:
        raise ValueError(f"config.data.name={d.name!r} is not a finite image data set; encode-data needs one.")

    n = len(source.records)
    count = max(1, math.ceil(n / shard_size))
    side = int(d.image_size) // model.downsampling
    meta = dict(
        format=latents.FORMAT,
        autoencoder=dict(path=os.path.abspath(a.path), sha256=weights_sha256(a.path)),
        scaling=dict(scale=scaling.scale, shift=scaling.shift),
        latent_shape=[side, side, model.latent_channels],
        num_examples=n,
        shard_size=int(shard_size),
        num_shards=count,
        num_classes=int(source.num_classes),
        data=dict(name=str(d.name), split=str(d.split), image_size=int(d.image_size), channels=int(d.channels),
                  resize=str(d.resize)),  # fmt: skip
    )
    _write_or_check_meta(output, meta)
    if source.captions is not None and jax.process_index() == 0:  # text data: the captions travel with the latents
        tmp = os.path.join(output, f".tmp-{latents.CAPTIONS_NAME}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(list(source.captions(r))) + "\n" for r in source.records)
        os.replace(tmp, os.path.join(output, latents.CAPTIONS_NAME))

    transform = pipeline.ExampleTransform(
        decode=source.decode, describe=source.describe, kind="image", image_size=int(d.image_size),
        channels=int(d.channels), resize=str(d.resize), random_flip=False, dequantize=False, skip_bad=False, seed=0,
    )  # fmt: skip
    devices = jax.local_devices()
    sharding, replicated = _local_shardings()
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, replicated)
    encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x), out_shardings=(sharding, sharding))
    chunk = _rounded_to_devices(batch_size)

    p, pc = jax.process_index(), jax.process_count()
    mine = [i for i in range(p, count, pc)]
    todo = [i for i in mine if not os.path.exists(latents.shard_path(output, i, count))]
    bar = None
    if progress and p == 0:
        from tqdm import tqdm

        done = sum(min(shard_size, n - i * shard_size) for i in mine if i not in todo)
        total = sum(min(shard_size, n - i * shard_size) for i in mine)
        bar = tqdm(total=total, initial=done, unit="img", desc=f"encode-data -> {output}", disable=None)
    for i in todo:
        rows = range(i * shard_size, min((i + 1) * shard_size, n))
        examples = [transform(j, source.records[j]) for j in rows]
        images = np.stack([e["image"] for e in examples])
        means, stds = [], []
        for start in range(0, len(images), chunk):
            x = images[start : start + chunk]
            pad = (-len(x)) % len(devices)
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
            mean, logvar = encode(state, jax.device_put(x, sharding))
            keep = len(x) - pad
            means.append(np.asarray(mean)[:keep])
            stds.append(np.exp(0.5 * np.asarray(logvar))[:keep])
            if bar is not None:
                bar.update(keep)
        path = latents.shard_path(output, i, count)
        tmp = os.path.join(output, f".tmp-{p}-{os.path.basename(path)}")
        with open(tmp, "wb") as f:
            np.savez(f, mean=np.concatenate(means).astype(np.float32), std=np.concatenate(stds).astype(np.float32),
                     label=np.array([e["label"] for e in examples], np.int32))  # fmt: skip
        os.replace(tmp, path)  # a shard exists only once it is complete
    if bar is not None:
        bar.close()
    if identity is not None:
        if source.captions is None:
            raise UserError(f"--text_embeddings: {d.name} has no captions to encode.")
        encode_captions(config, output, source, identity, dtype=text_embeddings, shard_size=int(shard_size),
                        count=count, batch_size=int(batch_size))
    return meta


def encode_captions(config: Any, output: str, source: Any, identity: dict[str, Any], *, dtype: str, shard_size: int,
                    count: int, batch_size: int) -> None:
    """Store the frozen text encoder's embedding of every caption of `source` beside the latent shards, and the
    empty prompt's once (diffax/data/latents.py has the format); resumable like the latents."""
    from diffax.models.text.pretrained import load_text_encoder
    from diffax.training import text as text_lib

    encoder, tokenizer = load_text_encoder(str(config.text.encoder))
    graphdef, state = nnx.split(encoder)
    sharding, replicated = _local_shardings()
    state = jax.device_put(state, replicated)
    encode = jax.jit(lambda s, tokens: _hidden_and_pooled(nnx.merge(graphdef, s), tokens),
                     out_shardings=sharding)  # fmt: skip
    batch_size = _rounded_to_devices(batch_size)

    def embed(texts: list[str]) -> dict[str, np.ndarray]:
        """Embeddings of `texts` in batches of `batch_size`, split over the local devices (the last batch
        padded: one compiled shape)."""
        tokens = text_lib.tokens_of(tokenizer, texts) if texts else np.zeros((0, 2, tokenizer.max_length), np.int32)
        parts: dict[str, list] = {"hidden": [], "mask": [], "pooled": []}
        for start in range(0, len(tokens), batch_size):
            chunk = tokens[start:start + batch_size]
            padded = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - len(chunk), 0)])
            hidden, pooled = encode(state, jax.device_put(padded, sharding))
            parts["hidden"].append(np.asarray(hidden, np.float32)[:len(chunk)].astype(dtype))
            parts["mask"].append(chunk[:, 1].astype(np.uint8))
            if pooled is not None:
                parts["pooled"].append(np.asarray(pooled, np.float32)[:len(chunk)].astype(dtype))
        return {k: np.concatenate(v) for k, v in parts.items() if v}

    null = embed([""])
    meta = dict(format=latents.FORMAT, encoder=identity, dtype=dtype, max_length=int(tokenizer.max_length),
                hidden_size=int(null["hidden"].shape[-1]),
                pooled_size=int(null["pooled"].shape[-1]) if "pooled" in null else 0)
    path = os.path.join(output, latents.TEXT_META_NAME)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if json.load(f) != json.loads(json.dumps(meta)):
                raise UserError(f"{path} holds text embeddings of another encoder or dtype: use a new --output, "
                                f"or delete the {latents.TEXT_META_NAME}, {latents.TEXT_NULL_NAME} and text-*.npz "
                                "files of it to encode them again.")
    n = len(source.records)
    p, pc = jax.process_index(), jax.process_count()
    if p == 0:
        _write_npz(os.path.join(output, latents.TEXT_NULL_NAME), {k: v[0] for k, v in null.items()})
    for i in range(p, count, pc):
        shard = latents.text_shard_path(output, i, count)
        if os.path.exists(shard):
            continue
        captions = [list(source.captions(source.records[j])) for j in range(i * shard_size, min((i + 1) * shard_size, n))]
        offsets = np.cumsum([0] + [len(c) for c in captions]).astype(np.int64)
        _write_npz(shard, {**embed([c for cs in captions for c in cs]), "offsets": offsets})
    if pc > 1:  # text.json marks the embeddings complete: every process's shards first
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("diffax encode-data: text shards written")
    if p == 0:  # last: a cache is one with embeddings only once they are all there
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        os.replace(tmp, path)


def _local_shardings() -> tuple[NamedSharding, NamedSharding]:
    """A batch split over this process's devices, and a copy on each (each process encodes its own shards)."""
    mesh = Mesh(np.array(jax.local_devices()), ("data",))
    return NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())


def _rounded_to_devices(batch_size: int) -> int:
    n = jax.local_device_count()
    return math.ceil(batch_size / n) * n


def _hidden_and_pooled(encoder: Any, tokens: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    emb = encoder(tokens[:, 0], tokens[:, 1])
    return emb.hidden, emb.pooled


def _write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` to `path` atomically (a temporary file renamed once complete)."""
    tmp = os.path.join(os.path.dirname(path), f".tmp-{jax.process_index()}-{os.path.basename(path)}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _write_or_check_meta(output: str, meta: dict[str, Any]) -> None:
    """Write meta.json, or check that the one already there describes the same cache (a resumed run)."""
    path = os.path.join(output, latents.META_NAME)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old != json.loads(json.dumps(meta)):
            diffs = sorted(k for k in set(old) | set(meta) if old.get(k) != json.loads(json.dumps(meta)).get(k))
            raise ValueError(
                f"{output} holds a latent cache of other settings ({', '.join(diffs)} differ): "
                "use a new --output, or delete it to re-encode."
            )
        return
    if jax.process_index() == 0:
        os.makedirs(output, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        os.replace(tmp, path)
    else:
        os.makedirs(output, exist_ok=True)

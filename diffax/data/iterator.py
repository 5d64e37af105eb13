"""`make_iterator`: config -> a checkpointable iterator of global, sharded batches."""
from __future__ import annotations

import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffax import parallel
from diffax.data import pipeline, sources
from diffax.errors import UserError

STATE_FORMAT = 1
log = logging.getLogger(__name__)


def check_config(config) -> None:
    """Validates the `config.data` fields every source uses; each error names its field."""
    d = config.data
    if not isinstance(d.image_size, int) or d.image_size <= 0:
        raise ValueError(f"config.data.image_size must be a positive integer, got {d.image_size!r}.")
    if d.channels not in (1, 3):
        raise ValueError(f"config.data.channels must be 1 (grayscale) or 3 (RGB), got {d.channels!r}.")
    if d.resize not in pipeline.RESIZE_MODES:
        raise ValueError(f"config.data.resize must be one of {', '.join(pipeline.RESIZE_MODES)}, got {d.resize!r}.")
    if d.num_workers < 0:
        raise ValueError(f"config.data.num_workers must be >= 0 (0 = in-process), got {d.num_workers}.")
    if d.read_threads < 0:
        raise ValueError(f"config.data.read_threads must be >= 0, got {d.read_threads}.")


def data_shape(config) -> tuple[int, ...]:
    """Shape of one example: (image_size, image_size, channels), or (2,) for `toy2d:` points."""
    kind, arg = sources.split_name(config.data.name)
    if kind == "toy2d":
        return (2,)
    if kind == "latents":  # the cache's latent shape (h, w, latent channels)
        from diffax.data.latents import latent_shape

        return latent_shape(arg)
    check_config(config)
    return (config.data.image_size, config.data.image_size, config.data.channels)


def _check_source(config, source: sources.Source) -> None:
    """Errors that can be found before reading any image (each names its config field)."""
    d = config.data
    if source.kind == "image" and source.image_shape is not None and len(source.image_shape) == 3:
        h, w, c = source.image_shape
        if d.resize == "pad" and (h > d.image_size or w > d.image_size):
            raise ValueError(
                f"{source.name} images are {h}x{w}, larger than config.data.image_size={d.image_size}, and "
                f"config.data.resize='pad' only pads: set config.data.resize='resize' or image_size >= {max(h, w)}."
            )
        if c not in (1, 2, 3, 4):
            raise ValueError(
                f"{source.name} images have {c} channels; config.data.channels={d.channels} "
                "can only be reached from 1-4 channels."
            )
    if source.float_images and d.dequantize:
        raise ValueError(
            f"config.data.dequantize=True adds uniform noise to 8-bit pixels, but {source.name} holds float images."
        )
    if d.conditional and source.num_classes > d.num_classes:
        raise ValueError(
            f"{source.name} has {source.num_classes} classes but config.data.num_classes={d.num_classes}."
        )


class DataIterator:
    """Endless iterator of global batches {"image": float32 [B, ...] in [-1, 1], "label": int32 [B]}.

    Each process reads only its `batch_size // process_count` rows of every
    global batch (so the global batch does not depend on the process count);
    with a `sharding` the host batches become one global `jax.Array` through
    `jax.make_array_from_process_local_data`, otherwise the host batch becomes
    a plain device array. `get_state()` is JSON-serialisable: restore it with
    `set_state` (same config) and the next batch is the one that would have come.
    """

    def __init__(self, config, source: sources.Source, *, sharding, process_index: int, process_count: int,
                 tokenizer: Callable | None = None, text_embeddings: bool = False):
        self.source = source
        self.sharding = sharding
        self.process_index = process_index
        self.process_count = process_count
        self.local_batch_size = config.training.batch_size // process_count
        self.num_batches = 0
        self._identity = {
            "source": source.name,
            "seed": int(config.seed),
            "process_count": process_count,
            "local_batch_size": self.local_batch_size,
            "num_workers": int(config.data.num_workers),
            "shuffle": bool(config.data.shuffle),
        }
        self._batches = pipeline.make_batches(
            config, source, process_index=process_index, process_count=process_count, tokenizer=tokenizer,
            text_embeddings=text_embeddings,
        )

    @property
    def num_skipped(self) -> int:
        """Unreadable images skipped so far by this process (config.data.skip_bad); log it."""
        return self._batches.num_skipped

    @property
    def num_classes(self) -> int:
        """Number of classes the source knows (0 when it has no labels)."""
        return self.source.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.source.class_names

    @property
    def num_examples(self) -> int | None:
        """Examples in one epoch of the whole dataset (None for an endless stream)."""
        return None if self.source.records is None else len(self.source.records)

    def __iter__(self) -> "DataIterator":
        return self

    def next_local(self) -> dict[str, np.ndarray]:
        """The next host-local numpy batch (no device transfer)."""
        skipped = self.num_skipped
        batch = next(self._batches)
        if self.num_skipped and not skipped:  # the first time only; the count is in `num_skipped`
            log.warning("Skipping unreadable images (config.data.skip_bad=True); the first: %s",
                        self._batches.last_error)
        self.num_batches += 1
        return batch

    def __next__(self) -> dict[str, jax.Array]:
        return {k: self._to_global(v) for k, v in self.next_local().items()}

    def _to_global(self, local: np.ndarray) -> jax.Array:
        if self.sharding is None:
            return jnp.asarray(local)
        sharding = self.sharding
        if isinstance(sharding, jax.sharding.NamedSharding) and len(sharding.spec) > 1:
            # Shard only the batch axis; the spec may have been written for a different rank.
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(sharding.spec[0]))
        return jax.make_array_from_process_local_data(sharding, local)

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position in the stream (save it with `ocp.args.JsonSave`)."""
        return {
            "format": STATE_FORMAT,
            **self._identity,
            "num_batches": self.num_batches,
            "num_skipped": self.num_skipped,
            "pipeline": self._batches.get_state(),
        }

    def check_state(self, state: dict[str, Any]) -> None:
        """Refuse a `get_state()` from a different data set-up, naming the field and the value to go back to."""
        if state.get("format") != STATE_FORMAT:
            raise UserError(f"Unknown data iterator state format {state.get('format')!r}.")
        fields = {
            "source": "config.data.name",
            "seed": "config.seed",
            "process_count": "the number of processes",
            "local_batch_size": "config.training.batch_size / process count",
            "num_workers": "config.data.num_workers",
            "shuffle": "config.data.shuffle",
        }
        for key, field in fields.items():
            if state.get(key) != self._identity[key]:
                raise UserError(
                    f"The saved data iterator state has {key}={state.get(key)!r} but this run has "
                    f"{self._identity[key]!r} ({field}); resuming would not continue the same stream. "
                    f"Set {field} back to {state.get(key)!r} to resume this run, or train in a new --workdir."
                )

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from a `get_state()`; a state from a different data set-up is refused."""
        self.check_state(state)
        self._batches.set_state(state["pipeline"])
        self._batches.num_skipped = int(state["num_skipped"])
        self.num_batches = int(state["num_batches"])

    def close(self) -> None:
        """Stops worker processes (also done on garbage collection)."""
        self._batches.close()

    def __enter__(self) -> "DataIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_iterator(
    config, *, sharding: jax.sharding.Sharding | None = None, process_index: int | None = None,
    process_count: int | None = None, tokenizer_for: Callable[[sources.Source], Callable] | None = None,
    text_embeddings: bool = False,
) -> DataIterator:
    """Builds the training input iterator described by `config.data`.

    `config.training.batch_size` is the global batch; process `process_index`
    of `process_count` (default: this JAX process) reads only its rows of it.
    Shuffling, flips and dequantisation noise derive from `config.seed`.
    Text models pass `tokenizer_for(source) -> tokenizer` (it may build its vocabulary from the
    source's captions); every batch then holds "tokens" int32 [B, 2, max_length] (ids, mask). A text
    run on a latent cache's stored embeddings passes `text_embeddings=True` instead: batches hold
    "text_hidden", "text_mask" and "text_pooled" (diffax/data/latents.py).
    """
    check_config(config)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count}).")
    batch_size = config.training.batch_size
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(
            f"config.training.batch_size={batch_size} must be a positive multiple of the "
            f"{process_count} processes."
        )
    if isinstance(sharding, jax.sharding.NamedSharding) and batch_size % parallel.batch_shards(sharding):
        raise ValueError(
            f"config.training.batch_size={batch_size} does not split over the {parallel.batch_shards(sharding)} "
            f"devices of mesh axes {sharding.spec[0]} (config.mesh)."
        )
    source = sources.get_source(config)
    _check_source(config, source)
    tokenizer = None
    if tokenizer_for is not None:
        if source.captions is None:
            raise UserError(f"{source.name} has no captions, and this is a text model (config.text.encoder="
                            f"{config.text.encoder!r}): give the data captions (folder: metadata.jsonl or .txt files; "
                            "npz: / tfds: set config.data.caption_key), or set config.text.encoder=''.")
        tokenizer = tokenizer_for(source)
    if text_embeddings and source.caption_embeddings is None:
        raise UserError(f"{source.name} holds no text embeddings: encode it with `diffax encode-data "
                        "--text_embeddings=float16`.")
    log.info("Input: %s (%s examples), %d per host per step.", source.name,
             "endless" if source.records is None else len(source.records), batch_size // process_count)
    return DataIterator(config, source, sharding=sharding, process_index=process_index, process_count=process_count,
                        tokenizer=tokenizer, text_embeddings=text_embeddings)

"""The Grain input pipeline: shuffle, repeat, decode, augment, batch, shard, prefetch.

    MapDataset.source(records)
      .shuffle(seed)          a new deterministic permutation every epoch
      .repeat()               endless
      .map_with_index(...)    decode, channels, pad / resize + centre crop, flip, [-1, 1]
      .batch(local batch)     unreadable images dropped and counted (config.data.skip_bad)
      [p::process_count]      this process's part of every global batch
      .to_iter_dataset(...)   `config.data.read_threads` threads build batches ahead
      .mp_prefetch(...)       `config.data.num_workers` worker processes (0 = in-process)
    Rebatcher                 exact batch sizes again after skipped images

Every random choice (order, flip, dequantisation noise) is a function of
`config.seed` and the example's position in the stream, so the same seed gives
the same batches and an iterator restored with `set_state` continues with
exactly the next batch. Batches are built whole in one thread or worker, so
they are the same for every `num_workers` (a saved state is tied to it, though).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import grain
import numpy as np
from absl import flags
from PIL import Image

from diffax.data.sources import BadImageError, Source

RESIZE_MODES = ("pad", "resize")
# what a batch holds ("tokens": text models; "text_*": a text run on a cache's stored embeddings)
TEXT_KEYS = ("text_hidden", "text_mask", "text_pooled")
BATCH_KEYS = ("image", "label", "tokens", *TEXT_KEYS, "size_ids")  # size_ids: SDXL's (orig h, w, crop top, left)
_ENDLESS = 2**62  # length of the index range behind an endless stream


def stream_seed(seed: int, salt: int) -> int:
    """A 32-bit seed for one use of the config seed (shuffle, augmentation, ...), so uses never coincide."""
    return int(np.random.SeedSequence([seed % 2**32, salt]).generate_state(1)[0])


# ----------------------------------------------------------------------------- per-example transforms


def convert_channels(image: np.ndarray, channels: int, what: str) -> np.ndarray:
    """Converts [H, W, C] to `channels` (1 or 3): grey -> RGB repeats, RGB -> grey is ITU-R 601-2 luma.

    An alpha channel (C = 2 or 4) is dropped. uint8 images go through PIL so the
    result matches images decoded from files bit for bit.
    """
    c = image.shape[-1]
    if c == channels:
        return image
    if c not in (1, 2, 3, 4):
        raise ValueError(
            f"{what} has {c} channels; config.data.channels={channels} can only be reached from 1-4 channels."
        )
    if c in (2, 4):
        image = image[..., : c - 1]
        c -= 1
    if c == channels:
        return image
    if channels == 3:
        return np.repeat(image, 3, axis=-1)
    if image.dtype == np.uint8:
        return np.asarray(Image.fromarray(image, "RGB").convert("L"))[..., None]
    luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return luma[..., None]


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bicubic (antialiased when shrinking) resize of [H, W, C] uint8 or float32 with PIL."""
    if image.dtype == np.uint8:
        mode = "L" if image.shape[-1] == 1 else "RGB"
        pil = Image.fromarray(image[..., 0] if mode == "L" else image, mode)
        out = np.asarray(pil.resize((width, height), Image.Resampling.BICUBIC))
        return out[..., None] if mode == "L" else out
    planes = [
        np.asarray(Image.fromarray(plane.astype(np.float32), "F").resize((width, height), Image.Resampling.BICUBIC))
        for plane in np.moveaxis(image, -1, 0)
    ]
    return np.clip(np.stack(planes, -1), 0.0, 1.0)


def fit_to_size(image: np.ndarray, size: int, mode: str, what: str) -> np.ndarray:
    """Brings [H, W, C] to [size, size, C].

    "pad" centres the image on a black canvas (extra pixel of an odd margin at
    the bottom / right) and refuses larger images; "resize" scales the shorter
    side to `size` (bicubic) and centre-crops the longer one.
    """
    h, w = image.shape[:2]
    if h == size and w == size:
        return image
    if mode == "pad":
        if h > size or w > size:
            raise ValueError(
                f"{what} is {h}x{w}, larger than config.data.image_size={size}, and "
                f"config.data.resize='pad' only pads: set config.data.resize='resize' or a larger image_size."
            )
        top, left = (size - h) // 2, (size - w) // 2
        return np.pad(image, ((top, size - h - top), (left, size - w - left), (0, 0)))
    if mode != "resize":
        raise ValueError(f"config.data.resize={mode!r} is not one of {', '.join(RESIZE_MODES)}.")
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    image = _resize(image, new_w, new_h)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return image[top : top + size, left : left + size]


def size_ids(h: int, w: int, size: int, mode: str) -> np.ndarray:
    """SDXL's per-image micro-conditioning (Podell et al. 2023, sec. 2.2) for an [h, w] image that `fit_to_size`
    brings to size x size: float32 (original h, original w, crop top, crop left), the crop in resized pixels as
    diffusers' train_text_to_image_sdxl records it (0, 0 when nothing is cut: a padded or exact image). The offsets
    are those of diffax's own crop (an odd margin: floor, where diffusers' crop rounds)."""
    top = left = 0
    if mode == "resize" and (h, w) != (size, size):
        scale = size / min(h, w)
        top, left = (max(size, round(h * scale)) - size) // 2, (max(size, round(w * scale)) - size) // 2
    return np.asarray([h, w, top, left], np.float32)


def to_model_range(image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """Maps an image to float32 in [-1, 1] (Ho et al., 2020, Sec. 3.3).

    uint8: x / 255 * 2 - 1; with `rng` uniform dequantisation (Theis et al.,
    2016, Sec. 3.1) first: (x + u) / 256 * 2 - 1, u ~ U[0, 1). Float images in
    [0, 1]: x * 2 - 1.
    """
    if image.dtype == np.uint8:
        x = image.astype(np.float32)
        if rng is None:
            return x * np.float32(2.0 / 255.0) - np.float32(1.0)
        x += rng.random(image.shape, dtype=np.float32)
        return np.minimum(x * np.float32(2.0 / 256.0) - np.float32(1.0), np.float32(1.0))
    return image.astype(np.float32) * np.float32(2.0) - np.float32(1.0)


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Placeholder for an example whose image could not be read (config.data.skip_bad)."""

    message: str


@dataclasses.dataclass(frozen=True)
class ExampleTransform:
    """Grain map_with_index transform: record -> {"image": float32 [-1, 1], "label": int32}.

    The random generator of an example is seeded by (seed, position in the
    global stream), so a flip or the dequantisation noise never depends on the
    number of processes, of worker processes, or on restarts.
    """

    decode: Callable[[Any], tuple[np.ndarray, int]]
    describe: Callable[[Any], str]
    kind: str
    image_size: int
    channels: int
    resize: str
    random_flip: bool
    dequantize: bool
    skip_bad: bool
    seed: int
    latent_scaling: tuple[float, float] | None = None
    captions: Callable[[Any], Any] | None = None  # text models: record -> captions (Source.captions)
    tokenizer: Callable[[Any], tuple[np.ndarray, np.ndarray]] | None = None  # texts -> (ids, mask)
    # a cache's stored embeddings (Source.caption_embeddings), read instead of tokens when given
    caption_embeddings: Callable[[Any], dict] | None = None
    size_ids: bool = False  # SDXL runs: also "size_ids", each image's original size and crop (`size_ids`)

    def __call__(self, index: int, record: Any) -> dict[str, np.ndarray] | Skipped:
        example = self._example(index, record)
        if isinstance(example, Skipped):
            return example
        if self.caption_embeddings is not None:
            stored = self.caption_embeddings(record)
            k = self._caption_index(index, record, len(stored["hidden"]))
            example.update({f"text_{name}": value[k] for name, value in stored.items()})
        elif self.tokenizer is not None:
            texts = tuple(self.captions(record))
            ids, mask = self.tokenizer([texts[self._caption_index(index, record, len(texts))]])
            example["tokens"] = np.stack([ids[0], mask[0]]).astype(np.int32)  # int32 [2, max_length]
        return example

    def _caption_index(self, index: int, record: Any, count: int) -> int:
        """Which of the record's `count` captions this step reads: chosen by (seed, stream position), i.e.
        deterministic per seed and step, and the same for its tokens and its stored embedding."""
        if not count:
            raise ValueError(f"{self.describe(record)} has no caption; give it one (an empty string trains the "
                             "unconditional model).")
        return 0 if count == 1 else int(np.random.default_rng([self.seed, index, 7]).integers(count))

    def _example(self, index: int, record: Any) -> dict[str, np.ndarray] | Skipped:
        try:
            image, label = self.decode(record)
        except BadImageError as e:
            if self.skip_bad:
                return Skipped(str(e))
            raise
        if self.kind == "points":
            return {"image": np.asarray(image, np.float32), "label": np.int32(label)}
        if self.kind == "latent":  # a draw from the cached posterior (diffax/data/latents.py)
            from diffax.data.latents import sample_latent

            rng = np.random.default_rng([self.seed, index])
            return {"image": sample_latent(image, rng, *self.latent_scaling), "label": np.int32(label)}
        what = self.describe(record)
        image = convert_channels(image, self.channels, what)
        sizes = size_ids(*image.shape[:2], self.image_size, self.resize) if self.size_ids else None
        image = fit_to_size(image, self.image_size, self.resize, what)
        rng = None
        if self.random_flip or self.dequantize:
            rng = np.random.default_rng([self.seed, index])
        if self.random_flip and rng.random() < 0.5:
            image = image[:, ::-1]
        image = to_model_range(image, rng if self.dequantize else None)
        return {"image": image, "label": np.int32(label), **({"size_ids": sizes} if sizes is not None else {})}


@dataclasses.dataclass(frozen=True)
class StreamBatch:
    """Grain map transform for an endless stream: global batch index -> this process's rows of it.

    The whole global batch is drawn from a generator seeded by (seed, batch
    index), so the global batch is the same for any number of processes.
    """

    draw: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]
    global_batch_size: int
    local_batch_size: int
    seed: int
    process_index: int

    def __call__(self, batch_index: int) -> dict[str, np.ndarray]:
        points, labels = self.draw(np.random.default_rng([self.seed, int(batch_index)]), self.global_batch_size)
        rows = slice(self.process_index * self.local_batch_size, (self.process_index + 1) * self.local_batch_size)
        return {
            "image": points[rows].astype(np.float32),
            "label": labels[rows].astype(np.int32),
            "num_skipped": np.int64(0),
        }


# ----------------------------------------------------------------------------- batching


def stack_examples(examples: list[dict[str, np.ndarray] | Skipped]) -> dict[str, np.ndarray]:
    """Grain batch_fn: stacks the readable examples, counting the `Skipped` ones in "num_skipped".

    A batch with skipped examples is short; `Rebatcher` restores the batch size.
    """
    good = [e for e in examples if not isinstance(e, Skipped)]
    bad = [e for e in examples if isinstance(e, Skipped)]
    if not good:
        return {"image": np.zeros((0,), np.float32), "label": np.zeros((0,), np.int32),
                "num_skipped": np.int64(len(bad)), "last_error": bad[-1].message}
    batch = {
        "image": np.stack([e["image"] for e in good]),
        "label": np.array([e["label"] for e in good], np.int32),
        "num_skipped": np.int64(len(bad)),
    }
    for key in ("tokens", *TEXT_KEYS, "size_ids"):  # text models: tokens [B, 2, L] (ids, mask), or the embeddings
        if key in good[0]:
            batch[key] = np.stack([e[key] for e in good])
    if bad:
        batch["last_error"] = bad[-1].message
    return batch


class Rebatcher:
    """Cuts the stream of (possibly short) chunks from Grain into batches of exactly `batch_size`.

    Chunks are only short when images were skipped. The state is the Grain
    state before the current chunk plus the offset into it, so nothing held
    here is lost by a checkpoint.
    """

    def __init__(self, iterator: grain.DatasetIterator, batch_size: int, max_consecutive_bad: int):
        self._iterator = iterator
        self._batch_size = batch_size
        self._max_consecutive_bad = max_consecutive_bad
        self._chunk: dict[str, np.ndarray] | None = None
        self._chunk_state: dict[str, Any] | None = None
        self._offset = 0
        self._resume_offset = 0  # set by set_state: rows of the next chunk already consumed before the save
        self._consecutive_bad = 0
        self.num_skipped = 0  # unreadable images skipped so far
        self.last_error = ""  # why the last one was skipped

    def _next_chunk(self) -> None:
        while True:
            self._chunk_state = self._iterator.get_state()
            chunk = next(self._iterator)
            skipped = int(chunk["num_skipped"])
            if not self._resume_offset:  # a chunk we resume inside was counted before the save
                self.num_skipped += skipped
            if skipped:
                self.last_error = str(chunk["last_error"])
            rows = len(chunk["label"])
            self._consecutive_bad = self._consecutive_bad + skipped if rows == 0 else 0
            if self._consecutive_bad >= self._max_consecutive_bad:
                raise RuntimeError(
                    f"{self._consecutive_bad} unreadable images in a row, as many as the data set holds "
                    f"(config.data.skip_bad=True). Last error: {chunk.get('last_error')}"
                )
            if rows:
                self._chunk, self._offset, self._resume_offset = chunk, self._resume_offset, 0
                return

    def __next__(self) -> dict[str, np.ndarray]:
        parts, need = [], self._batch_size
        while need:
            if self._chunk is None or self._offset == len(self._chunk["label"]):
                self._next_chunk()
            take = min(need, len(self._chunk["label"]) - self._offset)
            parts.append({k: self._chunk[k][self._offset : self._offset + take] for k in BATCH_KEYS
                          if k in self._chunk})
            self._offset += take
            need -= take
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self) -> dict[str, Any]:
        if self._chunk is None or self._offset == len(self._chunk["label"]):
            return {"grain": self._iterator.get_state(), "offset": 0}
        return {"grain": self._chunk_state, "offset": self._offset}

    def set_state(self, state: dict[str, Any]) -> None:
        self._iterator.set_state(state["grain"])
        self._chunk = None
        self._resume_offset = int(state["offset"])

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


def build_dataset(config, source: Source, *, process_index: int, process_count: int,
                  tokenizer: Callable | None = None, text_embeddings: bool = False) -> grain.IterDataset:
    """The Grain dataset of host-local numpy chunks {"image", "label", "num_skipped"} for one process.

    The global stream (shuffled anew each epoch, repeated) is cut into global
    batches of `config.training.batch_size`; process p reads only rows
    [p * L, (p + 1) * L) of each, L = batch_size // process_count. So the
    processes read disjoint examples that cover each epoch once, and the
    global batch is the same for any number of processes. A chunk is those L
    examples minus unreadable ones (`config.data.skip_bad`); `Rebatcher` turns
    chunks into exact batches. Chunks are built whole in one thread, so the
    batches do not depend on `config.data.num_workers` either.
    """
    d = config.data
    local_batch = config.training.batch_size // process_count
    seed = stream_seed(config.seed, 2)
    if source.stream is not None:
        ds = grain.MapDataset.range(_ENDLESS).map(
            StreamBatch(source.stream, config.training.batch_size, local_batch, seed, process_index)
        )
        ds = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=min(d.read_threads, 1), prefetch_buffer_size=max(d.prefetch, 1))
        )
    else:
        ds = grain.MapDataset.source(source.records)
        if d.shuffle:
            ds = ds.shuffle(seed=stream_seed(config.seed, 1))
        ds = ds.repeat().map_with_index(
            ExampleTransform(
                decode=source.decode,
                describe=source.describe,
                kind=source.kind,
                image_size=d.image_size,
                channels=d.channels,
                resize=d.resize,
                random_flip=bool(d.random_flip) and source.kind == "image",
                dequantize=bool(d.dequantize) and source.kind == "image",
                skip_bad=bool(d.skip_bad),
                seed=seed,
                latent_scaling=source.latent_scaling,
                captions=source.captions if tokenizer is not None else None,
                tokenizer=tokenizer,
                caption_embeddings=source.caption_embeddings if text_embeddings else None,
                size_ids=bool(config.text.get("encoder_2", "")) and tokenizer is not None and source.kind == "image",
            )
        )
        ds = ds.batch(local_batch, drop_remainder=True, batch_fn=stack_examples)[process_index::process_count]
        ds = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=d.read_threads, prefetch_buffer_size=max(d.prefetch, d.read_threads, 1))
        )
    if d.num_workers > 0:
        # Grain reads absl flags when it starts workers; outside an absl app
        # (tests, notebooks) use their defaults instead of failing.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=d.num_workers, per_worker_buffer_size=max(d.prefetch, 1))
        )
    return ds


def make_batches(config, source: Source, *, process_index: int, process_count: int,
                 tokenizer: Callable | None = None, text_embeddings: bool = False) -> Rebatcher:
    """An endless iterator of host-local numpy batches {"image", "label"} (with get/set_state); with a
    `tokenizer` (text models) also "tokens" int32 [B, 2, max_length]: the (ids, mask) of a caption; with
    `text_embeddings` (a latent cache's) "text_hidden" [B, L, D], "text_mask" [B, L] and "text_pooled" [B, P]
    of a caption."""
    dataset = build_dataset(config, source, process_index=process_index, process_count=process_count,
                            tokenizer=tokenizer, text_embeddings=text_embeddings)
    size = _ENDLESS if source.records is None else len(source.records)
    return Rebatcher(iter(dataset), config.training.batch_size // process_count, max(size, 1))


__all__ = [
    "Rebatcher",
    "make_batches",
    "stack_examples",
    "ExampleTransform",
    "StreamBatch",
    "build_dataset",
    "convert_channels",
    "fit_to_size",
    "to_model_range",
]

"""Data sources: one small function per `config.data.name` prefix.

A source turns `config.data.name` into random-access records and a `decode`
function (record -> image array, label). Decoding happens inside the Grain
pipeline (in worker processes when `config.data.num_workers > 0`), so a source
only lists its records; it never reads every image up front.

    tfds:NAME[/CONFIG]   a prepared TFDS dataset in ArrayRecord format (tfds.data_source)
    folder:PATH          a tree of PNG/JPEG images; labels from sub-folders if asked
    digits               scikit-learn's bundled 8x8 handwritten digits (offline)
    toy2d:NAME           generated 2-D distributions (moons, swiss_roll, 8gaussians, ...)
    npz:PATH             arrays in a .npz file: "image" [N,H,W(,C)], optional "label" [N]
"""
from __future__ import annotations

import dataclasses
import io
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from diffax.errors import UserError
from diffax.registry import Registry

SOURCES: Registry[Callable[[str, Any], "Source"]] = Registry("data source", "config.data.name")
TOY2D: Registry[Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]] = Registry(
    "toy2d distribution", "config.data.name (toy2d:NAME)"
)
FORMS = "tfds:NAME[/CONFIG], folder:PATH, digits, toy2d:NAME, npz:PATH, latents:DIR"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class BadImageError(ValueError):
    """An image that cannot be decoded; the message names the file or record."""


@dataclasses.dataclass(frozen=True)
class Source:
    """What a source hands to the pipeline.

    `records` is a random-access sequence (None for an endless stream); `decode`
    maps one record to (array, label): an image [H, W, C] (uint8, or float32 in
    [0, 1]) for kind "image", a float32 vector for kind "points". `stream`
    (endless toy data only) maps (generator, n) to (points [n, D], labels [n]).
    """

    name: str
    kind: str = "image"  # image | points | latent (a cached posterior, diffax/data/latents.py)
    records: Sequence[Any] | None = None
    decode: Callable[[Any], tuple[np.ndarray, int]] | None = None
    stream: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]] | None = None
    num_classes: int = 0
    class_names: tuple[str, ...] = ()
    image_shape: tuple[int, ...] | None = None  # (H, W, C) when every image has it (checked early)
    float_images: bool = False  # images are float in [0, 1] rather than uint8
    describe: Callable[[Any], str] = lambda record: f"example {record}"  # names a record in errors
    latent_scaling: tuple[float, float] | None = None  # kind "latent": (scale, shift) of its autoencoder
    # text models: record -> its captions (one or more; one is chosen per step); None: the source has none
    captions: Callable[[Any], Sequence[str]] | None = None
    # latent caches with text embeddings: record -> {"hidden", "mask", "pooled"} of each of its captions
    caption_embeddings: Callable[[Any], dict] | None = None


def split_name(name: str) -> tuple[str, str]:
    """Splits `config.data.name` into (prefix, argument), e.g. "tfds:mnist" -> ("tfds", "mnist")."""
    prefix, _, arg = str(name).partition(":")
    return prefix.strip(), arg.strip()


def get_source(config) -> Source:
    """Builds the source named by `config.data.name`; an unknown prefix lists the valid forms."""
    prefix, arg = split_name(config.data.name)
    try:
        make = SOURCES.get(prefix)
    except ValueError as e:
        raise ValueError(f"{e} config.data.name must be one of: {FORMS}.") from None
    return make(arg, config)


# ----------------------------------------------------------------------------- decoding


def pil_to_array(image: Image.Image, channels: int) -> np.ndarray:
    """Converts a PIL image of any mode to uint8 [H, W, channels].

    Palette images go through RGBA/RGB, 16-bit images are scaled to 8 bits,
    RGBA drops its alpha channel (PIL's convert), RGB -> L uses PIL's ITU-R 601-2
    luma (L = 0.299 R + 0.587 G + 0.114 B).
    """
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.round(np.asarray(image)), 0, 255).astype(np.uint8), "L")
    target = "L" if channels == 1 else "RGB"
    if image.mode != target:
        image = image.convert(target)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if channels == 1 else array


def decode_image_bytes(data: bytes, channels: int, what: str) -> np.ndarray:
    """Decodes encoded image bytes (PNG, JPEG, ...) to uint8 [H, W, channels]; errors name `what`."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return pil_to_array(image, channels)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImageError(f"Cannot decode image {what}: {type(e).__name__}: {e}") from e


def load_image_file(path: str, channels: int) -> np.ndarray:
    """Reads an image file to uint8 [H, W, channels]; an unreadable file raises BadImageError naming it."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadImageError(f"Cannot read image file {path}: {e}") from e
    return decode_image_bytes(data, channels, f"file {path}")


# ----------------------------------------------------------------------------- sources


@SOURCES.register("digits")
def digits_source(arg: str, config) -> Source:
    """scikit-learn's bundled 8x8 handwritten digits (Alpaydin & Kaynak, 1998; UCI optdigits test set).

    The 17 grey levels 0..16 become uint8 round(v * 255 / 16), so 16 -> 255 and
    the pipeline maps them to v / 16 * 2 - 1 (up to the uint8 rounding). There
    is no official split: "train" is the first 1500 images, "test" the other
    297, "all" every one of the 1797. Labels are the digits 0..9.
    """
    if arg:
        raise ValueError(f"config.data.name='digits' takes no argument (got {config.data.name!r}).")
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    splits = {"train": slice(0, 1500), "test": slice(1500, None), "all": slice(None)}
    if config.data.split not in splits:
        raise ValueError(
            f"config.data.split={config.data.split!r} is not a split of digits; valid: {', '.join(splits)}."
        )
    images, labels = images[splits[config.data.split]], labels[splits[config.data.split]]
    captions = [digit_captions(int(label)) for label in labels]
    return _array_source("digits", images, labels, num_classes=10, captions=captions)


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_captions(digit: int) -> tuple[str, ...]:
    """The captions of a handwritten `digit` in several phrasings, the numeral and the word alike."""
    n, word = str(digit), DIGIT_WORDS[digit]
    return (f"a handwritten {n}", f"the digit {word}", f"number {n}", f"a handwritten {word}",
            f"the number {word}", f"digit {n}")


@SOURCES.register("npz")
def npz_source(arg: str, config) -> Source:
    """Images stored as arrays in a NumPy .npz file.

    Key `config.data.image_key` (default "image") holds [N, H, W, C] or [N, H, W]
    uint8 in [0, 255] or float in [0, 1]; `config.data.label_key` (default
    "label", optional) holds N integer class labels.
    """
    if not arg:
        raise ValueError("config.data.name='npz:PATH' needs a path, e.g. npz:/data/images.npz.")
    path = Path(arg).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"config.data.name={config.data.name!r}: no such file {path}.")
    image_key, label_key, caption_key = config.data.image_key, config.data.label_key, caption_field(config)
    try:
        with np.load(path) as f:
            names = list(f.files)
            images = f[image_key] if image_key in names else None
            labels = f[label_key] if label_key and label_key in names else None
            captions = f[caption_key] if caption_key and caption_key in names else None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:  # truncated, or not an .npz at all
        raise UserError(f"config.data.name={config.data.name!r}: {path} cannot be read as a .npz file "
                        f"({type(e).__name__}: {e}). Write it again (np.savez), or point config.data.name at another file.") from None
    if images is None:
        raise UserError(
            f"{path} has no array {image_key!r} (config.data.image_key); it holds: {', '.join(names) or 'nothing'}. "
            "Set config.data.image_key to the array that holds the images."
        )
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"{path}[{image_key!r}] must be [N, H, W, C] with N > 0, got shape {images.shape}.")
    if np.issubdtype(images.dtype, np.floating):
        lo, hi = float(images.min()), float(images.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{path}[{image_key!r}]: float images must lie in [0, 1]; found [{lo:g}, {hi:g}].")
        images = images.astype(np.float32)
    elif images.dtype != np.uint8:
        raise ValueError(f"{path}[{image_key!r}] must be uint8 or float, got {images.dtype}.")
    num_classes = 0
    if labels is not None:
        if labels.shape != (len(images),):
            raise ValueError(f"{path}[{label_key!r}] must have shape ({len(images)},), got {labels.shape}.")
        labels = labels.astype(np.int32)
        num_classes = int(labels.max()) + 1
    if captions is not None:  # [N] strings, or [N, K] with K captions per image
        if captions.shape[:1] != (len(images),) or captions.ndim > 2:
            raise UserError(f"{path}[{caption_key!r}] (config.data.caption_key) must hold N={len(images)} captions "
                            f"[N] or [N, K], got shape {captions.shape}.")
        captions = [tuple(str(c) for c in np.atleast_1d(row)) for row in captions]
    return _array_source(f"npz:{path}", images, labels, num_classes=num_classes, captions=captions)


def caption_field(config) -> str:
    """config.data.caption_key ("" when a config predates it): npz array / tfds feature / metadata.jsonl key."""
    return str(config.data.get("caption_key", "") or "")


def _array_source(name: str, images: np.ndarray, labels: np.ndarray | None, num_classes: int,
                  captions: Sequence[Sequence[str]] | None = None) -> Source:
    """A source over in-memory images [N, H, W, C] (uint8 or float in [0, 1]), with captions per image."""
    if labels is None:
        labels = np.zeros(len(images), np.int32)

    def decode(index: int) -> tuple[np.ndarray, int]:
        return images[index], int(labels[index])

    return Source(
        name=name,
        describe=lambda index: f"{name} example {index}",
        records=range(len(images)),
        decode=decode,
        num_classes=num_classes,
        image_shape=tuple(images.shape[1:]),
        float_images=images.dtype != np.uint8,
        captions=None if captions is None else captions.__getitem__,
    )


@SOURCES.register("folder")
def folder_source(arg: str, config) -> Source:
    """A directory tree of images (PNG, JPEG, BMP, GIF, WebP), read in sorted path order.

    With `config.data.labels_from_folders` the label of an image is the index
    of its top-level sub-folder among the sorted sub-folder names (the
    torchvision ImageFolder convention); otherwise every label is 0.
    """
    if not arg:
        raise ValueError("config.data.name='folder:PATH' needs a path, e.g. folder:/data/images.")
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"config.data.name={config.data.name!r}: folder {root} does not exist.")
    files = []
    for directory, subdirs, names in os.walk(root, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        files += [
            os.path.join(directory, n)
            for n in sorted(names)
            if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)
        ]
    if not files:
        raise FileNotFoundError(
            f"No images found in folder {root} (config.data.name={config.data.name!r}); "
            f"looked for files ending in {', '.join(IMAGE_EXTENSIONS)} in it and its sub-folders."
        )
    class_names: tuple[str, ...] = ()
    labels = [0] * len(files)
    if config.data.labels_from_folders:
        parts = [Path(f).relative_to(root).parts for f in files]
        loose = [f for f, p in zip(files, parts) if len(p) == 1]
        if loose:
            raise ValueError(
                f"config.data.labels_from_folders=True but {len(loose)} image(s) lie directly in {root}, "
                f"not in a class sub-folder (e.g. {loose[0]})."
            )
        class_names = tuple(sorted({p[0] for p in parts}))
        index = {c: i for i, c in enumerate(class_names)}
        labels = [index[p[0]] for p in parts]
    channels = config.data.channels
    records = list(zip(files, labels))
    captions = folder_captions(root, files, caption_field(config) or "text")

    def decode(record: tuple[str, int]) -> tuple[np.ndarray, int]:
        path, label = record
        return load_image_file(path, channels), label

    return Source(
        name=f"folder:{root}",
        describe=lambda record: f"file {record[0]}",
        records=records,
        decode=decode,
        num_classes=len(class_names),
        class_names=class_names,
        captions=None if captions is None else (lambda record: captions[record[0]]),
    )


def folder_captions(root: Path, files: Sequence[str], key: str) -> dict[str, tuple[str, ...]] | None:
    """The captions of a folder's images: Hugging Face imagefolder's metadata.jsonl, or sidecar .txt files.

    metadata.jsonl (in `root`): one JSON object per line with "file_name" (relative to root) and
    `key` (config.data.caption_key, default "text"): a string or a list of strings. Sidecar
    files: photo.png -> photo.txt, one caption per non-empty line. An image without a caption
    (missing from metadata.jsonl, or no .txt beside it when others have one) is an error naming
    it; an empty caption is allowed and trains the unconditional (empty-prompt) model.
    Returns None when the folder has neither (a folder without captions).
    """
    import json

    metadata = root / "metadata.jsonl"
    found: dict[str, tuple[str, ...]] = {}
    if metadata.is_file():
        with open(metadata) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    name, text = row["file_name"], row[key]
                except (ValueError, KeyError, TypeError) as e:
                    raise UserError(f"{metadata} line {n}: needs a JSON object with 'file_name' and {key!r} "
                                    f"(config.data.caption_key) ({type(e).__name__}: {e}).") from None
                texts = (text,) if isinstance(text, str) else tuple(text)
                if not texts or not all(isinstance(t, str) for t in texts):
                    raise UserError(f"{metadata} line {n}: {key!r} must be a string or a list of strings, got {text!r}.")
                found[str((root / name).resolve())] = texts
        out = {}
        for path in files:
            if str(Path(path).resolve()) not in found:
                raise UserError(f"Image {path} has no caption in {metadata}: add a line for it, or remove the image.")
            out[path] = found[str(Path(path).resolve())]
        return out
    sidecars = {path: os.path.splitext(path)[0] + ".txt" for path in files}
    have = [p for p, t in sidecars.items() if os.path.isfile(t)]
    if not have:
        return None
    missing = [p for p in files if p not in have]
    if missing:
        raise UserError(f"{len(missing)} image(s) in {root} have no caption file beside them (e.g. {missing[0]} needs "
                        f"{sidecars[missing[0]]}) while {len(have)} do; add them (an empty file = no caption).")
    out = {}
    for path in files:
        with open(sidecars[path], encoding="utf-8") as f:
            lines = tuple(line.strip() for line in f.read().splitlines() if line.strip())
        out[path] = lines or ("",)
    return out


class _TfdsRecords(Sequence):
    """Random access to a tfds data source, each record paired with its index (for error messages)."""

    def __init__(self, data_source: Sequence, length: int):
        self._data_source = data_source
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self._data_source[index]

    def _getitems(self, indices: Sequence[int]) -> list[tuple[int, Any]]:
        """Batched read (Grain calls it for a whole batch): ArrayRecord reads the records together."""
        return list(zip(indices, self._data_source.__getitems__(list(indices))))


def tfds_default_data_dir() -> str:
    """The directory TFDS reads when config.data.data_dir is empty ($TFDS_DATA_DIR or ~/tensorflow_datasets)."""
    from tensorflow_datasets.core import constants

    return os.environ.get("TFDS_DATA_DIR") or constants.DATA_DIR


def prepare_commands(name: str, data_dir: str) -> str:
    """The two commands that build a TFDS dataset in ArrayRecord format, for error messages."""
    dir_flag = f" --config.data.data_dir={data_dir}" if data_dir else ""
    return (
        f"  diffax prepare-data --config=<your config> --config.data.name=tfds:{name}{dir_flag}\n"
        f"or, with TensorFlow installed:\n"
        f"  tfds build {name} --file_format=array_record --data_dir={data_dir or tfds_default_data_dir()}"
    )


@SOURCES.register("tfds")
def tfds_source(arg: str, config) -> Source:
    """A TFDS dataset read with `tfds.data_source` from ArrayRecord files (no TensorFlow needed).

    The dataset must have been prepared in ArrayRecord format (`prepare`);
    images (feature `config.data.image_key`) are decoded here with PIL, labels
    come from `config.data.label_key` when the dataset has it (else 0).
    """
    if not arg:
        raise ValueError("config.data.name='tfds:NAME[/CONFIG]' needs a dataset name, e.g. tfds:cifar10.")
    import tensorflow_datasets as tfds

    data_dir = config.data.data_dir or None
    searched = data_dir or tfds_default_data_dir()
    try:
        builder = tfds.builder(arg, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise FileNotFoundError(
            f"TFDS dataset {arg!r} (config.data.name) is neither a registered TFDS dataset nor prepared "
            f"under {searched} (config.data.data_dir). Check the name; to build a registered one run:\n"
            f"{prepare_commands(arg, config.data.data_dir)}"
        ) from e
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS dataset {arg!r} is not prepared: nothing in {builder.data_dir} "
            f"(searched data_dir {searched}). Build it in ArrayRecord format with:\n"
            f"{prepare_commands(arg, config.data.data_dir)}"
        )
    features = builder.info.features
    image_key, label_key = config.data.image_key, config.data.label_key
    if image_key not in features:
        raise UserError(
            f"TFDS dataset {arg!r} has no feature {image_key!r} (config.data.image_key); "
            f"its features are: {', '.join(features)}. Set config.data.image_key to one of them."
        )
    encoded = isinstance(features[image_key], tfds.features.Image)
    decoders = {image_key: tfds.decode.SkipDecoding()} if encoded else None
    try:
        data_source = tfds.data_source(
            arg, split=config.data.split, data_dir=data_dir, download=False, decoders=decoders
        )
    except NotImplementedError as e:  # prepared as TFRecord: no random access
        raise ValueError(
            f"TFDS dataset {arg!r} in {builder.data_dir} is not in ArrayRecord format, which "
            f"tfds.data_source needs. Rebuild it in another data_dir with:\n"
            f"{prepare_commands(arg, config.data.data_dir)}\n({e})"
        ) from e
    has_label = bool(label_key) and label_key in features
    num_classes = 0
    if has_label and isinstance(features[label_key], tfds.features.ClassLabel):
        num_classes = features[label_key].num_classes
    channels = config.data.channels
    what = f"tfds:{arg} split {config.data.split!r} example"
    shape = getattr(features[image_key], "shape", None)
    image_shape = tuple(shape) if shape and all(isinstance(s, int) for s in shape) else None

    caption_key = caption_field(config)
    if caption_key and caption_key.split("/")[0] not in features:
        raise UserError(f"TFDS dataset {arg!r} has no feature {caption_key!r} (config.data.caption_key); "
                        f"its features are: {', '.join(features)}.")

    def captions(record: tuple[int, dict]) -> tuple[str, ...]:
        index, value = record
        for part in caption_key.split("/"):  # a nested feature, e.g. "captions/text"
            value = value[part]
        texts = np.atleast_1d(np.asarray(value))
        return tuple(t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts)

    def decode(record: tuple[int, dict]) -> tuple[np.ndarray, int]:
        index, example = record
        image = example[image_key]
        if encoded:
            image = decode_image_bytes(image, channels, f"{what} {index} ({builder.data_dir})")
        label = int(example[label_key]) if has_label else 0
        return np.asarray(image), label

    return Source(
        name=f"tfds:{arg}",
        describe=lambda record: f"{what} {record[0]}",
        records=_TfdsRecords(data_source, len(data_source)),
        decode=decode,
        num_classes=num_classes,
        class_names=tuple(features[label_key].names) if num_classes else (),
        image_shape=image_shape,
        captions=captions if caption_key else None,
    )


@SOURCES.register("toy2d")
def toy2d_source(arg: str, config) -> Source:
    """Generated 2-D points (the FFJORD toy densities, Grathwohl et al. 2019, plus a 5x5 GMM).

    `config.data.num_points` == 0 gives an endless stream (every batch freshly
    drawn from a generator seeded by (seed, process, batch)); N > 0 draws a
    fixed set of N points once from `config.seed`, shuffled and repeated like
    an image dataset. Labels are mixture components where they exist.
    """
    distribution = TOY2D.get(arg)
    if config.data.num_points < 0:
        raise ValueError(f"config.data.num_points must be >= 0 (0 = endless), got {config.data.num_points}.")
    num_classes = {"8gaussians": 8, "gmm": 25, "moons": 2}.get(arg, 0)
    if config.data.num_points == 0:
        return Source(name=f"toy2d:{arg}", kind="points", stream=distribution, num_classes=num_classes)
    points, labels = distribution(np.random.default_rng([config.seed % 2**32, 0x70]), config.data.num_points)

    def decode(index: int) -> tuple[np.ndarray, int]:
        return points[index], int(labels[index])

    return Source(
        name=f"toy2d:{arg}",
        kind="points",
        records=range(len(points)),
        decode=decode,
        num_classes=num_classes,
    )


@TOY2D.register("moons")
def moons(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved half circles (sklearn make_moons, noise 0.1), as FFJORD: 2 x + (-1, -0.2)."""
    labels = rng.integers(0, 2, n)
    t = rng.uniform(0.0, np.pi, n)
    x = np.where(labels == 0, np.cos(t), 1.0 - np.cos(t))
    y = np.where(labels == 0, np.sin(t), 0.5 - np.sin(t))
    points = np.stack([x, y], -1) + 0.1 * rng.standard_normal((n, 2))
    return (2.0 * points + np.array([-1.0, -0.2])).astype(np.float32), labels.astype(np.int32)


@TOY2D.register("swiss_roll")
def swiss_roll(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's Swiss roll (noise 1.0), coordinates (x, z) / 5 as in FFJORD."""
    t = 1.5 * np.pi * (1.0 + 2.0 * rng.uniform(size=n))
    points = np.stack([t * np.cos(t), t * np.sin(t)], -1) + rng.standard_normal((n, 2))
    return (points / 5.0).astype(np.float32), np.zeros(n, np.int32)


@TOY2D.register("8gaussians")
def eight_gaussians(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Eight Gaussians (std 0.5) on a circle of radius 4, all divided by 1.414 as in FFJORD."""
    labels = rng.integers(0, 8, n)
    angles = labels * (np.pi / 4.0)
    centres = 4.0 * np.stack([np.cos(angles), np.sin(angles)], -1)
    points = centres + 0.5 * rng.standard_normal((n, 2))
    return (points / 1.414).astype(np.float32), labels.astype(np.int32)


@TOY2D.register("checkerboard")
def checkerboard(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """FFJORD's checkerboard: uniform on 8 of the 16 unit squares of [-2, 2]^2, times 2."""
    x1 = rng.uniform(size=n) * 4.0 - 2.0
    x2 = rng.uniform(size=n) - rng.integers(0, 2, n) * 2.0
    x2 = x2 + np.floor(x1) % 2
    return (np.stack([x1, x2], -1) * 2.0).astype(np.float32), np.zeros(n, np.int32)


@TOY2D.register("gmm")
def gmm(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A mixture of 25 equal Gaussians (std 0.1) centred on the grid {-2, -1, 0, 1, 2}^2."""
    labels = rng.integers(0, 25, n)
    centres = np.stack([labels // 5 - 2, labels % 5 - 2], -1).astype(np.float64)
    points = centres + 0.1 * rng.standard_normal((n, 2))
    return points.astype(np.float32), labels.astype(np.int32)

"""diffax.data: sources, the Grain pipeline, sharding over processes, resumable state, bad input.

Everything runs on tiny data written to tmp dirs; values are checked, not only shapes.
"""
import importlib.util
import io
import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs.default import get_config
from diffax import data


def make_config(name="digits", batch_size=8, **data_fields):
    config = get_config()
    config.data.name = name
    config.training.batch_size = batch_size
    config.data.read_threads = 1
    for key, value in data_fields.items():
        setattr(config.data, key, value)
    return config


def take(config, n, **kwargs):
    it = data.make_iterator(config, **kwargs)
    batches = [it.next_local() for _ in range(n)]
    it.close()
    return batches


def write_npz(path, images, labels=None):
    arrays = {"image": images}
    if labels is not None:
        arrays["label"] = labels
    np.savez(path, **arrays)
    return f"npz:{path}"


@pytest.fixture
def indexed_npz(tmp_path):
    """24 images whose pixels and label are the example index (8x8x1 uint8)."""
    n = 24
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 8, 8, 1)).copy()
    return write_npz(tmp_path / "indexed.npz", images, np.arange(n))


def decoded_index(batch):
    """Recovers the example index from a batch of `indexed_npz` images scaled to [-1, 1]."""
    return np.round((batch["image"][:, 0, 0, 0] + 1) / 2 * 255).astype(int)


# ----------------------------------------------------------------------------- digits and scaling


def test_digits_values_and_pad_geometry():
    from sklearn.datasets import load_digits

    digits = load_digits()
    batch = take(make_config(batch_size=16, shuffle=False), 1)[0]
    image = batch["image"]
    assert image.shape == (16, 16, 16, 1) and image.dtype == np.float32
    expected = np.round(digits.images[:16] * 255 / 16) / 255 * 2 - 1  # v / 16 -> [-1, 1] via uint8
    np.testing.assert_allclose(image[:, 4:12, 4:12, 0], expected, atol=1e-6)
    np.testing.assert_allclose(image[:, 4:12, 4:12, 0], digits.images[:16] / 16 * 2 - 1, atol=1 / 255 + 1e-6)
    border = np.ones((16, 16), bool)
    border[4:12, 4:12] = False
    assert np.all(image[:, border, 0] == -1.0)  # 4 pixels of black padding on every side
    np.testing.assert_array_equal(batch["label"], digits.target[:16])


def test_digits_resize_and_rgb():
    from sklearn.datasets import load_digits

    digit = np.round(load_digits().images[0] * 255 / 16).astype(np.uint8)
    gray, rgb = (take(make_config(shuffle=False, resize="resize", channels=c), 1)[0]["image"][0] for c in (1, 3))
    expected = np.asarray(Image.fromarray(digit).resize((16, 16), Image.Resampling.BICUBIC)) / 255 * 2 - 1
    np.testing.assert_allclose(gray[..., 0], expected, atol=1e-6)
    np.testing.assert_array_equal(rgb, np.repeat(gray, 3, axis=-1))


def test_scaling_and_dequantisation_ranges(tmp_path):
    values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    name = write_npz(tmp_path / "ramp.npz", values)
    plain = take(make_config(name, batch_size=1), 1)[0]["image"][0, ..., 0]
    np.testing.assert_allclose(plain, values[0, ..., 0] / 255 * 2 - 1, atol=1e-6)
    assert plain.min() == -1.0 and plain.max() == 1.0
    noisy = np.stack([b["image"][0, ..., 0] for b in take(make_config(name, batch_size=1, dequantize=True), 20)])
    assert noisy.min() >= -1.0 and noisy.max() <= 1.0
    u = (noisy + 1) / 2 * 256 - values[0, ..., 0]  # the uniform noise added to each pixel
    assert u.min() >= -1e-4 and u.max() <= 1 + 1e-4
    assert abs(u.mean() - 0.5) < 0.02 and abs(u.var() - 1 / 12) < 0.01
    floats = write_npz(tmp_path / "floats.npz", np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 8, 8, 1))
    f = take(make_config(floats, batch_size=1, image_size=8), 1)[0]["image"][0, ..., 0]
    np.testing.assert_allclose(f.ravel(), np.linspace(-1, 1, 64), atol=1e-6)


def test_array_channels_and_float_resize(tmp_path):
    rng = np.random.default_rng(2)
    rgba = rng.integers(0, 256, (1, 8, 8, 4), dtype=np.uint8)
    name = write_npz(tmp_path / "rgba.npz", rgba)
    gray = take(make_config(name, batch_size=1, image_size=8, channels=1), 1)[0]["image"][0]
    luma = np.asarray(Image.fromarray(rgba[0, ..., :3]).convert("L"))  # alpha dropped, ITU-R 601-2 luma
    np.testing.assert_allclose((gray[..., 0] + 1) / 2 * 255, luma, atol=1e-3)
    rgb = take(make_config(name, batch_size=1, image_size=8, channels=3), 1)[0]["image"][0]
    np.testing.assert_allclose((rgb + 1) / 2 * 255, rgba[0, ..., :3], atol=1e-3)
    floats = rng.uniform(size=(1, 8, 12, 1)).astype(np.float32)
    name = write_npz(tmp_path / "floats.npz", floats)
    got = take(make_config(name, batch_size=1, image_size=4, resize="resize"), 1)[0]["image"][0, ..., 0]
    small = np.asarray(Image.fromarray(floats[0, ..., 0], "F").resize((6, 4), Image.Resampling.BICUBIC))
    np.testing.assert_allclose(got, np.clip(small[:, 1:5], 0, 1) * 2 - 1, atol=1e-6)


def test_random_flip_is_a_mirror_and_deterministic():
    base = take(make_config(batch_size=64), 1)[0]["image"]
    flipped = take(make_config(batch_size=64, random_flip=True), 1)[0]["image"]
    same = np.all(flipped == base, axis=(1, 2, 3))
    mirrored = np.all(flipped == base[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same | mirrored) and 10 < np.sum(mirrored & ~same) < 54
    again = take(make_config(batch_size=64, random_flip=True), 1)[0]["image"]
    np.testing.assert_array_equal(flipped, again)


# ----------------------------------------------------------------------------- determinism, shards, resume


def test_same_seed_same_batches_other_seed_other_batches():
    config = make_config(random_flip=True, dequantize=True)
    a, b = take(config, 3), take(config, 3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    config.seed = 1
    c = take(config, 3)
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_processes_read_disjoint_parts_covering_each_epoch_once(indexed_npz):
    config = make_config(indexed_npz, batch_size=8, image_size=8)
    per_process = [take(config, 6, process_index=p, process_count=2) for p in range(2)]
    for epoch in range(2):  # 24 examples = 3 global batches of 8 per epoch
        seen = [np.concatenate([decoded_index(b) for b in batches[3 * epoch : 3 * epoch + 3]])
                for batches in per_process]
        assert len(seen[0]) == len(seen[1]) == 12
        assert not set(seen[0]) & set(seen[1])
        assert sorted(np.concatenate(seen)) == list(range(24))
        labels = np.concatenate([b["label"] for b in per_process[0][3 * epoch : 3 * epoch + 3]])
        np.testing.assert_array_equal(labels, seen[0])  # labels travel with their images
    # The global batch is the same for any process count: concatenating the processes gives one process.
    single = take(config, 6)
    for step in range(6):
        both = np.concatenate([per_process[0][step]["image"], per_process[1][step]["image"]])
        np.testing.assert_array_equal(both, single[step]["image"])
    # A second epoch is a different permutation.
    assert list(decoded_index(single[0])) != list(decoded_index(single[3]))


def test_resume_mid_epoch_gives_the_next_batches():
    config = make_config(batch_size=32, random_flip=True, dequantize=True)  # 1500 digits: k, m mid epoch
    it = data.make_iterator(config)
    for _ in range(5):
        it.next_local()
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    expected = [it.next_local() for _ in range(4)]
    resumed = data.make_iterator(config)
    resumed.set_state(state)
    for want in expected:
        got = resumed.next_local()
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])
    assert resumed.get_state() == it.get_state()


def test_state_from_another_setup_is_refused():
    it = data.make_iterator(make_config())
    it.next_local()
    state = it.get_state()
    other = data.make_iterator(make_config(batch_size=16))
    with pytest.raises(ValueError, match="batch_size"):
        other.set_state(state)


def test_worker_processes_give_the_same_batches_and_resume(indexed_npz):
    config = make_config(indexed_npz, batch_size=4, image_size=8, random_flip=True)
    reference = take(config, 6)
    config.data.num_workers = 2
    it = data.make_iterator(config)
    try:
        got = [it.next_local() for _ in range(2)]
        state = json.loads(json.dumps(it.get_state()))
        got += [it.next_local() for _ in range(4)]
    finally:
        it.close()
    for x, y in zip(got, reference):
        np.testing.assert_array_equal(x["image"], y["image"])
    resumed = data.make_iterator(config)
    try:
        resumed.set_state(state)
        for want in reference[2:]:
            np.testing.assert_array_equal(resumed.next_local()["image"], want["image"])
    finally:
        resumed.close()


def test_global_array_over_the_mesh_data_axis():
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    config = make_config(batch_size=8 * jax.device_count())
    batch = next(data.make_iterator(config, sharding=sharding))
    assert isinstance(batch["image"], jax.Array) and batch["image"].sharding.is_equivalent_to(sharding, 4)
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (8 * jax.device_count(),)
    np.testing.assert_array_equal(np.asarray(batch["image"]), take(config, 1)[0]["image"])


# ----------------------------------------------------------------------------- folder source


def png_bytes(image, mode=None, fmt="PNG", **save):
    buffer = io.BytesIO()
    pil = Image.fromarray(image, mode) if isinstance(image, np.ndarray) else image
    pil.save(buffer, format=fmt, **save)
    return buffer.getvalue()


@pytest.fixture
def image_folder(tmp_path):
    """cat/ (RGB PNG, grayscale PNG) and dog/ (RGBA PNG, palette PNG, JPEG); all 8x8."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    palette = Image.fromarray(rgb).quantize(colors=16)
    smooth = np.tile(np.linspace(0, 255, 8, dtype=np.uint8)[None, :, None], (8, 1, 3))
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    files = {
        "cat/a_rgb.png": png_bytes(rgb),
        "cat/b_gray.png": png_bytes(gray, "L"),
        "dog/c_rgba.png": png_bytes(rgba, "RGBA"),
        "dog/d_palette.png": png_bytes(palette),
        "dog/e_smooth.jpg": png_bytes(smooth, fmt="JPEG", quality=95),
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "notes.txt").write_text("not an image")
    expected_rgb = [rgb, np.repeat(gray[..., None], 3, -1), rgba[..., :3],
                    np.asarray(palette.convert("RGB")), smooth]
    return tmp_path, expected_rgb


def test_folder_converts_modes_to_rgb_and_labels_from_folders(image_folder):
    root, expected = image_folder
    config = make_config(f"folder:{root}", batch_size=5, image_size=8, channels=3, shuffle=False,
                         labels_from_folders=True)
    it = data.make_iterator(config)
    assert it.class_names == ("cat", "dog") and it.num_classes == 2 and it.num_examples == 5
    batch = it.next_local()
    pixels = (batch["image"] + 1) / 2 * 255
    for got, want in zip(pixels[:4], expected[:4]):
        np.testing.assert_allclose(got, want, atol=1e-3)
    np.testing.assert_allclose(pixels[4], expected[4], atol=6)  # JPEG is lossy
    np.testing.assert_array_equal(batch["label"], [0, 0, 1, 1, 1])


def test_folder_to_grayscale_uses_luma(image_folder):
    root, expected = image_folder
    batch = take(make_config(f"folder:{root}", batch_size=5, image_size=8, channels=1, shuffle=False), 1)[0]
    luma = np.asarray(Image.fromarray(expected[0]).convert("L"))
    np.testing.assert_allclose((batch["image"][0, ..., 0] + 1) / 2 * 255, luma, atol=1e-3)
    np.testing.assert_array_equal(batch["label"], 0)  # no labels asked for


def test_folder_resize_and_centre_crop(tmp_path):
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 256, (4, 8, 3), dtype=np.uint8)
    big = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    (tmp_path / "a_wide.png").write_bytes(png_bytes(wide))
    (tmp_path / "b_big.png").write_bytes(png_bytes(big))
    config = make_config(f"folder:{tmp_path}", batch_size=2, image_size=4, channels=3, resize="resize",
                         shuffle=False)
    pixels = (take(config, 1)[0]["image"] + 1) / 2 * 255
    np.testing.assert_allclose(pixels[0], wide[:, 2:6], atol=1e-3)  # shorter side fits: centre crop only
    shrunk = np.asarray(Image.fromarray(big).resize((7, 4), Image.Resampling.BICUBIC))  # 20 * 4 / 12 -> 7
    np.testing.assert_allclose(pixels[1], shrunk[:, 1:5], atol=1e-3)
    config.data.resize = "pad"
    with pytest.raises(ValueError, match="a_wide.png is 4x8, larger than config.data.image_size=4"):
        take(config, 1)


def test_corrupt_file_is_named_or_skipped_and_counted(image_folder):
    root, _ = image_folder
    bad = root / "cat" / "broken.png"
    bad.write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8))[:40])  # truncated
    config = make_config(f"folder:{root}", batch_size=3, image_size=8, channels=3, shuffle=False)
    with pytest.raises(Exception, match="broken.png"):
        take(config, 1)
    config.data.skip_bad = True
    it = data.make_iterator(config)
    # Sorted order a_rgb, b_gray, broken, c_rgba, d_palette, e_smooth: chunks of 3 stream positions,
    # the bad file at positions 2, 8, 14; 12 good images need the chunks up to position 14.
    batches = [it.next_local() for _ in range(4)]
    assert it.num_skipped == 3
    assert all(len(b["label"]) == 3 for b in batches)
    state = json.loads(json.dumps(it.get_state()))
    after = it.next_local()
    resumed = data.make_iterator(config)
    resumed.set_state(state)
    np.testing.assert_array_equal(resumed.next_local()["image"], after["image"])
    assert resumed.num_skipped == it.num_skipped


def test_empty_folder_and_missing_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=f"No images found in folder {tmp_path / 'empty'}"):
        data.make_iterator(make_config(f"folder:{tmp_path / 'empty'}"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.make_iterator(make_config(f"folder:{tmp_path / 'nope'}"))


# ----------------------------------------------------------------------------- configuration errors


def test_unknown_source_lists_the_valid_ones():
    with pytest.raises(ValueError, match="Valid names: digits, folder, latents, npz, tfds, toy2d") as e:
        data.make_iterator(make_config("imagenet"))
    assert "config.data.name" in str(e.value)


def test_field_errors_name_the_field(tmp_path, indexed_npz):
    with pytest.raises(ValueError, match="config.data.channels"):
        data.make_iterator(make_config(channels=2))
    with pytest.raises(ValueError, match="config.data.image_size"):
        data.make_iterator(make_config(image_size=4))  # 8x8 digits cannot be padded to 4
    with pytest.raises(ValueError, match="config.data.resize"):
        data.make_iterator(make_config(resize="stretch"))
    with pytest.raises(ValueError, match="config.training.batch_size"):
        data.make_iterator(make_config(batch_size=7), process_index=0, process_count=2)
    with pytest.raises(ValueError, match="config.data.num_classes"):
        data.make_iterator(make_config(conditional=True, num_classes=5))
    floats = write_npz(tmp_path / "f.npz", np.full((2, 8, 8, 1), 2.0, np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        data.make_iterator(make_config(floats))
    with pytest.raises(ValueError, match="config.data.image_key"):
        data.make_iterator(make_config(indexed_npz, image_key="pixels"))
    assert data.data_shape(make_config(image_size=12, channels=3)) == (12, 12, 3)
    assert data.data_shape(make_config("toy2d:moons")) == (2,)


# ----------------------------------------------------------------------------- toy2d


def toy_batch(name, batch_size=4000, **fields):
    return take(make_config(f"toy2d:{name}", batch_size=batch_size, **fields), 1)[0]


def test_toy2d_statistics():
    g = toy_batch("8gaussians")
    angles = g["label"] * np.pi / 4
    centres = 4 / 1.414 * np.stack([np.cos(angles), np.sin(angles)], -1)
    residual = g["image"] - centres
    assert np.abs(residual.mean(0)).max() < 0.03 and abs(residual.std() - 0.5 / 1.414) < 0.02
    assert abs(np.linalg.norm(g["image"], axis=1).mean() - 4 / 1.414) < 0.05
    assert sorted(set(g["label"])) == list(range(8))
    m = toy_batch("moons")["image"]
    np.testing.assert_allclose(m.mean(0), [0.0, 0.3], atol=0.05)  # closed form of 2 * moons + (-1, -0.2)
    assert -3.8 < m[:, 0].min() and m[:, 0].max() < 3.8 and -2.0 < m[:, 1].min() and m[:, 1].max() < 2.6
    c = toy_batch("checkerboard")["image"] / 2
    assert np.all(np.abs(c) <= 2) and np.all((np.floor(c[:, 0]) + np.floor(c[:, 1])) % 2 == 0)
    mix = toy_batch("gmm")["image"]
    np.testing.assert_allclose(mix.mean(0), 0, atol=0.06)
    np.testing.assert_allclose(mix.var(0), 2.01, rtol=0.05)  # grid variance 2 + 0.1^2
    roll = toy_batch("swiss_roll")["image"] * 5
    radius = np.linalg.norm(roll, axis=1)
    assert 1.5 * np.pi - 4 < radius.min() and radius.max() < 4.5 * np.pi + 4 and abs(radius.mean() - 3 * np.pi) < 0.3


def test_toy2d_is_deterministic_endless_and_process_invariant():
    a, b = toy_batch("moons", 64), toy_batch("moons", 64)
    np.testing.assert_array_equal(a["image"], b["image"])
    other = take(make_config("toy2d:moons", batch_size=64), 2)
    assert not np.array_equal(other[0]["image"], other[1]["image"])  # fresh points every batch
    config = make_config("toy2d:moons", batch_size=64)
    config.seed = 3
    assert not np.array_equal(take(config, 1)[0]["image"], a["image"])
    parts = [take(make_config("toy2d:moons", batch_size=64), 1, process_index=p, process_count=2)[0]
             for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), a["image"])
    finite = take(make_config("toy2d:8gaussians", batch_size=50, num_points=100), 4)
    first, second = (np.concatenate([f["image"] for f in finite[i : i + 2]]) for i in (0, 2))
    assert len(np.unique(first, axis=0)) == 100  # one epoch of the fixed set
    np.testing.assert_array_equal(np.sort(first, axis=0), np.sort(second, axis=0))


# ----------------------------------------------------------------------------- tfds


def tiny_examples(n):
    for i in range(n):
        image = np.zeros((8, 8, 3), np.uint8)
        image[..., 0], image[..., 1], image[..., 2] = i, 255 - i, np.arange(8)[None, :] * 30
        yield i, {"image": png_bytes(image), "label": i % 3}


class DiffaxTestTinyImages(tfds.core.GeneratorBasedBuilder):
    """A registered 8x8 RGB dataset written without TensorFlow (images given as PNG bytes)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict(
            {"image": tfds.features.Image(shape=(8, 8, 3)), "label": tfds.features.ClassLabel(num_classes=3)}
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(12), "test": self._generate_examples(4)}

    def _generate_examples(self, n):
        yield from tiny_examples(n)


class DiffaxTestNeedsTf(DiffaxTestTinyImages):
    """Gives numpy images, which TFDS can only encode with TensorFlow."""

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"image": np.zeros((8, 8, 3), np.uint8), "label": 0}


class DiffaxTestOffline(DiffaxTestTinyImages):
    """Fails the way a download does without network."""

    def _split_generators(self, dl_manager):
        raise ConnectionError("Failed to establish a new connection: Network is unreachable")


def test_tfds_array_record_round_trip(tmp_path):
    config = make_config("tfds:diffax_test_tiny_images", batch_size=12, image_size=8, channels=3,
                         shuffle=False, data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        data.make_iterator(config)
    message = str(e.value)
    assert "not prepared" in message and str(tmp_path) in message
    assert "diffax prepare-data" in message and "tfds build diffax_test_tiny_images" in message
    data.prepare(config)  # the TFDS builder, ArrayRecord, no TensorFlow
    assert list((tmp_path / "diffax_test_tiny_images" / "1.0.0").glob("*.array_record*"))
    it = data.make_iterator(config)
    assert it.num_classes == 3 and it.num_examples == 12
    batch = it.next_local()
    pixels = np.round((batch["image"] + 1) / 2 * 255).astype(int)
    order = pixels[:, 0, 0, 0]  # TFDS stores examples in its own (hashed) order
    assert sorted(order) == list(range(12))
    images = {i: np.asarray(Image.open(io.BytesIO(e["image"]))) for i, e in tiny_examples(12)}
    expected = np.stack([images[i] for i in order])
    np.testing.assert_array_equal(pixels, expected)
    np.testing.assert_array_equal(batch["label"], order % 3)


def test_tfds_dataset_read_from_files_alone(tmp_path):
    """A dataset prepared elsewhere (no builder class here) is read from its ArrayRecord files."""

    class DiffaxUnregistered(DiffaxTestTinyImages, skip_registration=True):
        pass

    DiffaxUnregistered(data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
    config = make_config("tfds:diffax_unregistered", batch_size=4, image_size=8, channels=1,
                         split="test", data_dir=str(tmp_path))
    batch = take(config, 1)[0]
    assert batch["image"].shape == (4, 8, 8, 1) and np.all(batch["label"] < 3)


def test_prepare_explains_missing_tensorflow_and_network(tmp_path):
    if importlib.util.find_spec("tensorflow"):
        pytest.skip("TensorFlow is installed")
    config = make_config("tfds:diffax_test_needs_tf", data_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="pip install tensorflow"):
        data.prepare(config)
    config.data.name = "tfds:diffax_test_offline"
    with pytest.raises(RuntimeError, match="download failed .*Network is unreachable"):
        data.prepare(config)
    config.data.name = "tfds:no_such_dataset_xyz"
    with pytest.raises(FileNotFoundError, match="neither a registered TFDS dataset"):
        data.make_iterator(config)
    data.prepare(make_config("digits"))  # nothing to prepare: a no-op
    assert os.path.isdir(tmp_path)

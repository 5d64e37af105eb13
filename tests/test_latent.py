"""Latent caches and latent runs: encode-data, the latents: source, decoding samples, and each bad input's error.

The autoencoder is the SD-layout random-weight fixture of tests/fixtures/diffusers_vae/sd
(3 channels, downsampling 2, 4 latent channels); the data are the bundled digits at 8x8 in RGB.
"""
from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from diffax import data
from diffax.data.latents import shard_path
from diffax.data.pipeline import stream_seed
from diffax.models.diffusers_vae import load_diffusers_autoencoder
from diffax.training.encode_data import encode_data

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers_vae")
SD, FLUX = os.path.join(FIXTURES, "sd"), os.path.join(FIXTURES, "flux")


def image_config(**data):
    config = digits.get_config()
    config.data.channels = 3
    config.autoencoder.path = SD
    config.data.update(data)
    return config


def latent_config(cache, **data):
    config = image_config(name=f"latents:{cache}", shuffle=False, **data)
    config.training.batch_size = 8
    return config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cache"))
    encode_data(image_config(), out, shard_size=512, batch_size=128, progress=False)
    return out


def test_cache_holds_each_images_posterior(cache):
    from sklearn.datasets import load_digits

    model, _ = load_diffusers_autoencoder(SD)
    d = load_digits()
    x = np.repeat(np.round(d.images[:4] * 255 / 16)[..., None], 3, -1) / 255 * 2 - 1
    mean, logvar = model.encode(jnp.asarray(x, jnp.float32))
    with np.load(shard_path(cache, 0, 3)) as f:
        np.testing.assert_allclose(f["mean"][:4], mean, atol=1e-5)
        np.testing.assert_allclose(f["std"][:4], np.exp(0.5 * np.asarray(logvar)), rtol=1e-5)
        np.testing.assert_array_equal(f["label"][:512], d.target[:512])
    with np.load(shard_path(cache, 2, 3)) as f:
        assert f["mean"].shape == (1500 - 1024, 4, 4, 4)


def test_resume_encodes_only_missing_shards(cache, tmp_path):
    import shutil

    copy = str(tmp_path / "cache")
    shutil.copytree(cache, copy)
    before = {i: os.stat(shard_path(copy, i, 3)).st_mtime_ns for i in (0, 2)}
    with np.load(shard_path(copy, 1, 3)) as f:
        mean1 = f["mean"]
    os.remove(shard_path(copy, 1, 3))
    encode_data(image_config(), copy, shard_size=512, batch_size=128, progress=False)
    assert {i: os.stat(shard_path(copy, i, 3)).st_mtime_ns for i in (0, 2)} == before
    with np.load(shard_path(copy, 1, 3)) as f:
        np.testing.assert_array_equal(f["mean"], mean1)
    with pytest.raises(ValueError, match="other settings"):  # another data set into the same folder
        encode_data(image_config(split="test"), copy, shard_size=512, progress=False)


def test_latents_source_draws_from_the_posterior_per_seed_and_position(cache):
    config = latent_config(cache)
    assert data.data_shape(config) == (4, 4, 4)
    it = data.make_iterator(config, process_index=0, process_count=1)
    batch = np.asarray(next(it)["image"])
    it.close()
    with np.load(shard_path(cache, 0, 3)) as f:
        mean, std = f["mean"][:8], f["std"][:8]
    seed = stream_seed(config.seed, 2)
    eps = np.stack([np.random.default_rng([seed, i]).standard_normal((4, 4, 4), dtype=np.float32) for i in range(8)])
    np.testing.assert_allclose(batch, (mean + std * eps) * 0.18215, rtol=1e-5, atol=1e-6)
    config.seed = 1
    it = data.make_iterator(config, process_index=0, process_count=1)
    assert not np.allclose(np.asarray(next(it)["image"]), batch)
    it.close()


def test_cache_of_another_autoencoder_is_refused(cache):
    config = latent_config(cache)
    config.autoencoder.path = FLUX
    with pytest.raises(ValueError, match="encoded by the autoencoder"):
        data.make_iterator(config, process_index=0, process_count=1)
    config.autoencoder.path = ""
    with pytest.raises(ValueError, match="needs config.autoencoder.path"):
        data.make_iterator(config, process_index=0, process_count=1)


def test_random_flip_is_refused(cache):
    with pytest.raises(ValueError, match="random_flip"):
        data.make_iterator(latent_config(cache, random_flip=True), process_index=0, process_count=1)
    with pytest.raises(ValueError, match="random_flip"):
        encode_data(image_config(random_flip=True), "/nonexistent", progress=False)


def test_missing_and_corrupt_shards_are_named(cache, tmp_path):
    import shutil

    copy = str(tmp_path / "cache")
    shutil.copytree(cache, copy)
    path = shard_path(copy, 0, 3)
    with open(path, "r+b") as f:
        f.truncate(1000)
    it = data.make_iterator(latent_config(copy), process_index=0, process_count=1)
    with pytest.raises(Exception, match="shard-00000-of-00003.npz is corrupt"):
        next(it)
    it.close()
    os.remove(path)
    with pytest.raises(FileNotFoundError, match="shard-00000-of-00003.npz is missing"):
        data.make_iterator(latent_config(copy), process_index=0, process_count=1)


def test_images_that_do_not_fit_the_autoencoder_are_refused(tmp_path):
    with pytest.raises(ValueError, match="config.data.channels=1"):
        encode_data(image_config(channels=1), str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="image_size=9 is not divisible"):
        encode_data(image_config(image_size=9), str(tmp_path), progress=False)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        data.data_shape(latent_config(str(tmp_path / "nothing")))


@pytest.mark.slow  # a latent training run with previews: ~20 s
def test_a_latent_runs_grid_is_checked_before_step_1_and_draws_the_decoded_latents(cache):
    """The trainer's sample grid of a latent run (traced before step 1) draws the sampler's latents decoded."""
    import jax

    from diffax import parallel, samplers
    from diffax.training import inference, trainer
    from diffax.training.build import build
    from diffax.training.step import state_layout

    config = latent_config(cache)
    config.model.update(channels=8, channel_mult=(1,), attention_resolutions=(), norm_groups=4)
    config.sampling.update(steps=2, num_samples=4, batch_size=4)
    d = build(config)
    mesh = parallel.make_mesh(config.mesh)
    _, abstract, shardings = state_layout(d, config, mesh)
    grids = trainer.SampleGrids(d, config, mesh, "unused", shardings.ema, abstract.ema)
    run = inference.Inference(config=config, step=0, diffusion=d, params=d.params, mesh=mesh, _sample=grids.sample)
    noise = np.random.default_rng(0).standard_normal((4, 4, 4, 4)).astype(np.float32)
    images = run.draw(4, seed=0, noise=noise, progress=False)["images"]
    assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8
    z = samplers.make_sampler(config)(d.schedule(d.params), d.parameterization, d.apply_fn(d.params),
                                      jnp.asarray(noise), jax.random.key(0))  # DDIM, eta 0: the key is unused
    model, scaling = load_diffusers_autoencoder(SD)
    expected = np.round(np.clip((np.asarray(model.decode(scaling.from_latent(z))) + 1) * 127.5, 0, 255))
    assert np.abs(images.astype(np.int32) - expected).max() <= 1


@pytest.mark.slow
def test_dit_small_trains_samples_and_evaluates_in_latent_space(tmp_path):
    """configs/imagenet256_dit.py:small end to end: encode, train on latents, decoded samples, refusals."""
    from configs import imagenet256_dit
    from diffax.training import inference, trainer

    config = imagenet256_dit.get_config("small")
    cache = str(tmp_path / "cache")
    encode_data(config, cache, shard_size=1024, progress=False)
    config.data.name = f"latents:{cache}"
    config.training.progress_bar = False
    workdir = str(tmp_path / "run")
    trainer.train(config, workdir)
    from PIL import Image

    grid = Image.open(os.path.join(workdir, "samples", "step_00000020.png"))
    assert grid.mode == "RGB" and grid.size[0] == (3 * 33 + 1) * 4  # 8 decoded 32x32 images, 3 columns, x4 zoom
    run = inference.load(workdir, config=config)
    out = run.draw(4, seed=0)
    assert out["images"].shape == (4, 32, 32, 3) and out["images"].dtype == np.uint8
    other = config.copy_and_resolve_references()
    other.autoencoder.path = FLUX
    with pytest.raises(ValueError, match="was trained on the latents of the autoencoder"):
        inference.load(workdir, config=other)
    with pytest.raises(ValueError, match="was trained on the latents of the autoencoder"):
        trainer.train(other, workdir, force=True)

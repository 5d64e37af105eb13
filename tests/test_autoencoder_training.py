"""Training a KL autoencoder with the diffax trainer: it learns, exports a loadable diffusers folder, resumes exactly."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits_autoencoder
from diffax.models.diffusers_vae import load_diffusers_autoencoder
from diffax.training import trainer
from diffax.training.autoencoder import EXPORT_DIR, adaptive_weight, hinge_d_loss

STEPS = 40


def tiny_config(**training):
    config = digits_autoencoder.get_config()
    config.data.image_size = 8
    config.data.resize = "pad"
    a = config.autoencoder
    a.block_out_channels, a.norm_groups, a.latent_channels = (8, 16), 4, 4
    a.disc_weight, a.disc_start, a.disc_channels, a.disc_layers = 0.5, 20, 8, 1
    config.optimizer.learning_rate, config.optimizer.warmup_steps = 3e-3, 5
    t = config.training
    t.num_steps, t.batch_size, t.log_every, t.checkpoint_every, t.sample_every = STEPS, 32, 10, 20, STEPS
    t.progress_bar = False
    t.update(training)
    config.sampling.num_samples = 8
    return config


def metrics(workdir) -> dict[int, dict]:
    rows = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            rows.setdefault(row["step"], {}).update(row)
    return rows


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ae")
    trainer.train(tiny_config(), str(workdir))
    return workdir


def test_reconstruction_error_falls_and_the_discriminator_starts(run):
    rows = metrics(run)
    assert rows[STEPS]["rec_loss"] < 0.75 * rows[10]["rec_loss"]
    assert rows[10]["d_loss"] == 0.0  # disc_factor 0 before disc_start
    assert rows[STEPS]["d_loss"] > 0.0 and rows[STEPS]["d_weight"] > 0.0
    assert os.path.exists(run / "samples" / f"step_{STEPS:08d}.png")


def test_export_is_a_loadable_autoencoder_with_the_runs_reconstructions(run):
    model, scaling = load_diffusers_autoencoder(str(run / EXPORT_DIR))
    assert model.latent_channels == 4 and model.downsampling == 2 and scaling.shift == 0.0
    from sklearn.datasets import load_digits

    x = jnp.asarray(load_digits().images[1500:1508, :, :, None] / 16.0 * 2 - 1, jnp.float32)
    mean, logvar = model.encode(x)
    recon = model.decode(mean)
    mse = float(jnp.mean(jnp.square(recon - x)))
    assert abs(mse - metrics(run)[STEPS]["heldout_mse"]) < 1e-3 * max(mse, 1.0)  # same weights (EMA), same images
    z = mean + jnp.exp(0.5 * logvar)  # scale is 1 / std of posterior samples: the scaled latents have std ~1
    assert 0.5 < float(jnp.std(scaling.to_latent(z))) < 2.0


@pytest.mark.slow
def test_resume_reproduces_the_losses(run, tmp_path):
    trainer.train(tiny_config(num_steps=20), str(tmp_path))
    trainer.train(tiny_config(), str(tmp_path), force=True)
    ref, resumed = metrics(run), metrics(tmp_path)
    for step in (30, 40):
        np.testing.assert_allclose(resumed[step]["loss"], ref[step]["loss"], rtol=1e-5)


def test_hinge_and_adaptive_weight_closed_forms():
    real, fake = jnp.array([2.0, 0.5]), jnp.array([-3.0, 0.0])
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.25 + 0.5))
    w = adaptive_weight(jnp.array([3.0, 4.0]), jnp.array([0.0, 1.0]))
    assert float(w) == pytest.approx(5.0 / (1.0 + 1e-4))
    assert float(adaptive_weight(jnp.ones(2), jnp.zeros(2))) == 1e4  # clipped

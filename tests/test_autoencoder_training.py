"""Training a KL autoencoder with the diffax trainer: it learns, exports a loadable diffusers folder, resumes exactly."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits_autoencoder
from diffax.errors import UserError
from diffax.models.autoencoder import kl_to_standard_normal, sample_posterior
from diffax.models.diffusers_vae import load_diffusers_autoencoder
from diffax.models.lpips import load_lpips
from diffax.training import autoencoder, trainer
from diffax.training.autoencoder import EXPORT_DIR, adaptive_weight, hinge_d_loss

STEPS = 40
LPIPS_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "lpips")  # a narrow random VGG16 (test_lpips.py)
LPIPS_VGG, LPIPS_LIN = (os.path.join(LPIPS_DIR, f) for f in ("vgg16_narrow.pth", "lin_narrow.pth"))


def tiny_config(perceptual_weight=1.0, **training):
    """The 8x8 digits centred on 16x16 (LPIPS needs 16x16), the perceptual term from the narrow fixture VGG16."""
    config = digits_autoencoder.get_config()
    config.data.image_size = 16
    config.data.resize = "pad"
    a = config.autoencoder
    a.block_out_channels, a.norm_groups, a.latent_channels = (8, 16), 4, 4
    a.disc_weight, a.disc_start, a.disc_channels, a.disc_layers = 0.5, 20, 8, 1
    a.perceptual_weight, a.lpips_vgg, a.lpips_lin = perceptual_weight, LPIPS_VGG, LPIPS_LIN
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
    """Without the perceptual term, on the 8x8 digits (a quarter of the pixels: the default suite's run)."""
    config = tiny_config(perceptual_weight=0.0)
    config.data.image_size = 8
    config.autoencoder.lpips_vgg = config.autoencoder.lpips_lin = ""
    workdir = tmp_path_factory.mktemp("ae")
    trainer.train(config, str(workdir))
    return workdir


def test_reconstruction_error_falls_and_the_discriminator_starts(run):
    rows = metrics(run)
    assert rows[STEPS]["rec_loss"] < 0.75 * rows[10]["rec_loss"]
    assert rows[10]["d_loss"] == 0.0  # disc_factor 0 before disc_start
    assert rows[STEPS]["d_loss"] > 0.0 and rows[STEPS]["d_weight"] > 0.0
    assert os.path.exists(run / "samples" / f"step_{STEPS:08d}.png")


@pytest.mark.slow  # a second 40-step run, at 16x16 with LPIPS: ~40 s on 2 cores
def test_reconstruction_and_perceptual_errors_fall_with_the_perceptual_term(tmp_path):
    trainer.train(tiny_config(), str(tmp_path))
    rows = metrics(tmp_path)
    assert rows[STEPS]["rec_loss"] < 0.75 * rows[10]["rec_loss"]  # L1 + LPIPS
    assert rows[STEPS]["p_loss"] < 0.75 * rows[10]["p_loss"]
    assert rows[STEPS]["d_loss"] > 0.0 and rows[STEPS]["d_weight"] > 0.0


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


@pytest.mark.slow  # compiles the LPIPS-weighted loss and gradient: ~33 s (LPIPS parity stays in the default run)
def test_generator_loss_with_the_perceptual_term_is_ldms():
    """L_G = mean(sum |x - x_hat| + w * H * W * C * LPIPS) + kl_weight * mean KL with its gradient, and the
    adaptive weight from the gradient of that rec at the decoder's last layer (LDM's contperceptual.py)."""
    config = tiny_config(perceptual_weight=0.7)
    a = config.autoencoder
    a.disc_start = 10**6  # the GAN term is off, its adaptive weight is still reported
    a.block_out_channels, a.mid_attention = (8,), False  # a smaller program to compile
    task = autoencoder.build(config)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 1)), jnp.float32)
    key = jax.random.key(3)
    step = jax.jit(autoencoder.make_value_and_grad(task, config))
    (loss, aux), grads = step(task.params, {"image": x}, key, 0)
    lpips = load_lpips(LPIPS_VGG, LPIPS_LIN)

    @jax.jit
    def closed_form(params):
        disc = task.discriminator(params)

        def through(net, f):  # f(x_hat, mean, logvar) of the net's reconstruction
            mean, logvar = task.autoencoder({"net": net}).encode(x)
            return f(task.autoencoder({"net": net}).decode(sample_posterior(mean, logvar, key)), mean, logvar)

        def loss(recon, mean, logvar):  # (L_G, LPIPS)
            p = lpips(x, recon)
            l1 = jnp.sum(jnp.abs(x - recon), axis=(1, 2, 3))
            kl = jnp.mean(kl_to_standard_normal(mean, logvar))
            return jnp.mean(l1 + 0.7 * 16 * 16 * p) + 1e-6 * kl, jnp.mean(p)

        (value, p_loss), grad = jax.value_and_grad(through, has_aux=True)(params["net"], loss)
        def last(g):  # the norm of a gradient at the decoder's last layer
            return jnp.linalg.norm(g["decoder"]["conv_out"]["kernel"][...])

        gan = last(jax.grad(through)(params["net"], lambda r, *_: -jnp.mean(disc(r))))
        l1 = last(jax.grad(through)(params["net"], lambda r, *_: jnp.mean(jnp.sum(jnp.abs(x - r), axis=(1, 2, 3)))))
        return value, grad, p_loss, 0.5 * last(grad) / (gan + 1e-4), 0.5 * l1 / (gan + 1e-4)  # disc_weight 0.5

    expected, grad, p_loss, weight, without = closed_form(task.params)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(aux["p_loss"], p_loss, rtol=1e-5)
    assert 0.7 * 256 * float(p_loss) > 0.2 * float(expected)  # the perceptual part weighs
    for got, want in zip(jax.tree.leaves(grads["net"]), jax.tree.leaves(grad)):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5 * float(jnp.max(jnp.abs(want))))
    np.testing.assert_allclose(aux["d_weight"], weight, rtol=1e-4)
    assert abs(float(weight / without) - 1) > 0.01  # LPIPS changes the adaptive weight (100x the tolerance)


def test_perceptual_term_needs_its_files_and_fitting_images():
    config = tiny_config(perceptual_weight=0.7)
    config.autoencoder.lpips_lin = ""
    with pytest.raises(UserError, match="perceptual_weight=0.7 needs the LPIPS weights, but config.autoencoder.lpips_lin is"):
        autoencoder.perceptual_network(config)
    config.autoencoder.lpips_vgg = ""
    with pytest.raises(UserError, match="config.autoencoder.lpips_vgg and config.autoencoder.lpips_lin are empty"):
        autoencoder.perceptual_network(config)
    config = tiny_config(perceptual_weight=0.7)
    config.data.image_size = 8
    with pytest.raises(UserError, match="config.data.image_size=8: the perceptual .LPIPS. term needs images of at least 16"):
        autoencoder.perceptual_network(config)
    config = tiny_config(perceptual_weight=0.7)
    config.autoencoder.lpips_vgg = config.autoencoder.lpips_lin  # the two files swapped up
    with pytest.raises(UserError, match="config.autoencoder.lpips_vgg .*lin_narrow.pth. has no 'features.0.weight'"):
        autoencoder.perceptual_network(config)
    config.autoencoder.perceptual_weight = 0.0  # no term: the paths are not read
    assert autoencoder.perceptual_network(config) is None

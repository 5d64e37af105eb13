"""Training learns: a few hundred steps on toy 2-D data bring the loss well below its start and the
samples' moments and modes near the data's (the other training tests compare runs with each other,
so a wrong sign in the update would pass them)."""
import jax
import numpy as np
import pytest

from configs import toy2d
from diffax import data, parallel
from diffax.training import inference
from diffax.training.build import build
from diffax.training.state import learning_rate_schedule
from diffax.training.step import init_state, make_train_step, state_layout

STEPS = 300


@pytest.fixture(scope="module")
def trained():
    """(per-step losses, 1000 samples of the EMA weights, 2048 data points) of a 300-step toy2d run."""
    config = toy2d.get_config("8gaussians")
    config.model.update(dict(hidden=64, layers=2))
    config.training.update(dict(num_steps=STEPS, batch_size=256, ema_decay=0.99))
    config.optimizer.warmup_steps = 20
    config.sampling.update(dict(sampler="ddim", steps=25, num_samples=1000, batch_size=1000))
    mesh = parallel.make_mesh(config.mesh)
    diffusion = build(config)
    tx, _, shardings = state_layout(diffusion, config, mesh)
    step = jax.jit(make_train_step(diffusion, tx, learning_rate_schedule(config.optimizer, STEPS), config))
    state = init_state(diffusion, tx)
    batches = data.make_iterator(config, process_index=0, process_count=1)
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, next(batches))
        losses.append(metrics["loss"])
    run = inference.Inference(config=config, step=STEPS, diffusion=diffusion, params=state.ema, mesh=mesh,
                              _sample=inference.make_sample_fn(diffusion, config, mesh, shardings.ema))
    samples = run.draw(1000, seed=0, progress=False)["images"]
    points = np.concatenate([np.asarray(next(batches)["image"]) for _ in range(8)])
    return np.asarray(jax.device_get(losses)), samples, points


def test_loss_falls_well_below_its_start(trained):
    losses, _, _ = trained
    # eps-prediction starts at ~1 (the output layer is zero-initialised: it predicts 0 for unit noise)
    assert 0.8 < losses[:5].mean() < 1.2
    assert losses[-50:].mean() < 0.5 * losses[:5].mean(), (losses[:5].mean(), losses[-50:].mean())


def test_samples_match_the_data(trained):
    _, samples, points = trained
    assert samples.shape == (1000, 2) and np.isfinite(samples).all()
    np.testing.assert_allclose(samples.mean(0), points.mean(0), atol=0.25)  # data std ~2 per axis
    np.testing.assert_allclose(np.cov(samples.T), np.cov(points.T), atol=0.6)  # data covariance ~4 I
    # most samples sit on one of the 8 modes (std 0.35; 98% of the data is within 1.0, ~10% of unit noise)
    centres = 4.0 / 1.414 * np.stack([np.cos(np.arange(8) * np.pi / 4), np.sin(np.arange(8) * np.pi / 4)], -1)
    nearest = np.linalg.norm(samples[:, None, :] - centres[None], axis=-1).min(1)
    assert (nearest < 1.0).mean() > 0.7, (nearest < 1.0).mean()

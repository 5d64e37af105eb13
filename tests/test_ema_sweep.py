"""`diffax eval --ema ...` (evaluation/ema_sweep.py): one record per sigma_rel, the best named, a plot, and the
records kept apart from the per-checkpoint evaluation. Samples come from a fake run whose quality peaks at 0.08."""
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from diffax import data, samplers
from diffax.evaluation import ema_sweep, job


def config():
    c = default.get_config()
    c.eval.num_samples, c.eval.batch_size, c.eval.metrics = 100, 50, ("fid",)
    return c


def test_sweep_records_each_length_and_names_the_best(tmp_path, monkeypatch, capsys):
    from sklearn.datasets import load_digits

    workdir = str(tmp_path)
    real = np.pad(load_digits().images[:1500] / 8.0 - 1.0, ((0, 0), (4, 4), (4, 4)))[..., None]
    pool = jnp.asarray(real, jnp.float32)
    loads = []

    @jax.jit  # compiled once: the EMA length only changes `blur`
    def noisy_data(noise, key, blur):
        picked = pool[jax.random.choice(key, len(pool), (noise.shape[0],), replace=False)]
        return jnp.clip(picked + blur * noise, -1.0, 1.0)

    def load(w, step=None, use_ema=True, config=None, ema_sigma_rel=None):
        loads.append((step, ema_sigma_rel))
        blur = jnp.float32(20.0 * abs(ema_sigma_rel - 0.08))  # the further from 0.08, the noisier the samples

        def sample_fn(noise, key, labels):
            return noisy_data(noise, key, blur)

        shape = tuple(data.data_shape(config))

        def draw(num_samples, seed, batch_size=None, progress=False):
            return samplers.draw_samples(sample_fn, num_samples, batch_size, shape, seed, progress=False)

        return types.SimpleNamespace(step=200, draw=draw, diffusion=types.SimpleNamespace(data_shape=shape))

    monkeypatch.setattr("diffax.training.inference.load", load)
    projection = np.random.default_rng(0).standard_normal((16 * 16, 16)) / 16.0  # a cheap stand-in feature space

    def feature_fn(images):
        return {"features": images.reshape(len(images), -1).astype(np.float64) / 255.0 @ projection}

    space = job.FeatureSpace("random-projection", "none", feature_fn, 16, {"fid": "fd_test"}, "reference_stats_test.npz")
    monkeypatch.setattr(job, "feature_space", lambda config, cache_dir: space)
    records = ema_sweep.run(config(), workdir, [0.12, 0.03, 0.08, 0.05])
    assert loads == [(None, s) for s in (0.03, 0.05, 0.08, 0.12)]
    fd = {r["ema_sigma_rel"]: r["metrics"]["fd_test"] for r in records}
    assert min(fd, key=fd.get) == 0.08 and fd[0.03] > fd[0.05] > fd[0.08] < fd[0.12]
    assert "best sigma_rel at step 200: 0.08 (fd_test" in capsys.readouterr().out
    stored = job.read_results(workdir)
    assert [(r["step"], r["ema_sigma_rel"], r["use_ema"]) for r in stored] == [(200, s, "posthoc") for s in sorted(fd)]
    with open(os.path.join(workdir, "eval", "posthoc_ema.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # The per-checkpoint evaluation neither counts these records as done nor plots them against the step.
    settings = job._settings(config(), types.SimpleNamespace(name=stored[0]["feature_space"], protocol="none"))
    assert job._done_steps(workdir, settings) == set()
    assert job.plot_results(workdir) is None
    # A second sweep (a resumed job) finds every length scored and adds nothing.
    again = ema_sweep.run(config(), workdir, [0.05, 0.08])
    assert [r["metrics"] for r in again] == [r["metrics"] for r in stored if r["ema_sigma_rel"] in (0.05, 0.08)]
    assert len(job.read_results(workdir)) == len(stored)

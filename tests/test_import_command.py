"""`diffax import-diffusers`: the imported run's checkpoint predicts what diffusers does, and samples."""
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "diffusers_unet", "ddpm")


def diffax(*args, cwd):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "diffax", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow  # a CLI import + sample; the import's predictions are checked in-process by test_diffusers_import.py
def test_import_then_load_predicts_like_diffusers_and_samples(tmp_path):
    workdir = tmp_path / "run"
    r = diffax("import-diffusers", "--src", FIXTURE, "--workdir", str(workdir), cwd=tmp_path)  # not from the repo
    assert r.returncode == 0, r.stderr
    r = diffax("import-diffusers", "--src", FIXTURE, "--workdir", str(workdir), cwd=tmp_path)
    assert r.returncode == 1 and "already holds checkpoints" in r.stderr

    from diffax.training import inference

    run = inference.load(str(workdir))
    assert run.step == 0 and run.config.diffusion.num_steps == 1000
    io = np.load(os.path.join(FIXTURE, "io.npz"))
    x = jnp.asarray(io["sample"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    out = np.asarray(run.apply_fn(x, jnp.asarray(io["timestep"]))).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out, io["output"], atol=1e-4, rtol=0)

    config = run.config
    config.sampling.sampler, config.sampling.steps = "ddim", 3
    images = inference.load(str(workdir), config=config).draw(4, seed=0, progress=False)["images"]
    assert images.dtype == np.uint8 and images.shape == (4, 8, 8, 3) and images.std() > 0

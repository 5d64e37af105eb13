"""Memory options on the Stable Diffusion fine-tune (the tiny SD fixture pipeline, its UNet weights and CLIP):
remat (config.model.remat) gives the same loss and gradients, fsdp over 8 simulated devices (config.mesh.fsdp)
the same loss as one device, and bfloat16 activations (config.model.dtype) a loss close to float32's.

Each computes the fine-tune's loss and gradients for one fixed batch (latents, captions), noise and times.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = os.path.join(ROOT, "tests", "fixtures", "sd_pipeline", "pipeline")
CAPTIONS = ["a red square", "a blue circle", "a green line", "a dark spot"] * 2
pytestmark = pytest.mark.slow  # 3-4 compiles of the fine-tune gradient: 2-7 min on 2 busy cores


def loss_and_grads(mesh_fsdp: int = 1, **model):
    """(loss, UNet gradients) of the imported pipeline's fine-tune loss on a fixed batch of 8, with config.model
    fields `model` changed; with `mesh_fsdp` > 1 the weights >= 256 elements and the batch are split over an fsdp
    axis of that many devices."""
    from configs.default import get_config
    from flax import nnx

    from diffax import parallel
    from diffax.models.diffusers_sd import load_sd_pipeline
    from diffax.training import text
    from diffax.training.build import build
    from diffax.training.importing import merge
    from diffax.training.step import _diffusion_value_and_grad

    config = get_config()
    overrides, unet = load_sd_pipeline(PIPELINE)
    merge(config, overrides)
    config.model.update(model)
    config.mesh.fsdp, config.mesh.fsdp_min_size = mesh_fsdp, 256
    config.text.caption_dropout = 0.0
    diffusion = build(config)
    params = {**diffusion.params, "net": nnx.split(unet, nnx.Param, ...)[1]}
    rs = np.random.RandomState(0)
    batch = {"image": jnp.asarray(rs.randn(8, 8, 8, 4), jnp.float32),
             "tokens": jnp.asarray(text.tokens_of(diffusion.tokenizer, CAPTIONS))}
    value_and_grad = _diffusion_value_and_grad(diffusion, config)
    fn = lambda p, b: value_and_grad(p, b, jax.random.key(3), jnp.int32(0))  # noqa: E731
    if mesh_fsdp > 1:
        mesh = parallel.make_mesh(config.mesh)
        shardings = parallel.param_sharding(mesh, params, config.mesh.fsdp_min_size)
        params = jax.device_put(params, shardings)
        batch = jax.device_put(batch, parallel.batch_sharding(mesh))
        split = [x for x in jax.tree.leaves(params) if not x.sharding.is_fully_replicated]
        assert split, "no weight is sharded"
    (loss, _), grads = jax.jit(fn)(params, batch)
    return float(loss), jax.tree.map(np.asarray, grads["net"])


@pytest.fixture(scope="module")
def float32():
    return loss_and_grads()


def _max_rel(a, b):
    return max(float(np.abs(x - y).max() / (np.abs(y).max() + 1e-12)) for x, y in zip(jax.tree.leaves(a),
                                                                                       jax.tree.leaves(b)))


def test_remat_gives_the_same_loss_and_gradients(float32):
    """Measured on CPU: the same loss bit for bit, gradients within 2.7e-6 of their largest value."""
    loss, grads = loss_and_grads(remat=True)
    assert abs(loss - float32[0]) <= 1e-6 * abs(float32[0])
    assert _max_rel(grads, float32[1]) < 1e-5


@pytest.mark.slow  # a bfloat16 compile: ~30 s on 2 busy cores
def test_bfloat16_loss_is_close_to_float32(float32):
    """bfloat16 activations (float32 weights and diffusion math): loss within 1e-3 of float32's, relative
    (measured on CPU: 3.8e-5; 1.05333 against 1.05329)."""
    loss, _ = loss_and_grads(dtype="bfloat16")
    assert abs(loss - float32[0]) <= 1e-3 * abs(float32[0]), (loss, float32[0])


FSDP_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from tests.test_sd_memory import loss_and_grads
print("LOSS", repr(loss_and_grads(mesh_fsdp=8)[0]))
"""


@pytest.mark.slow  # a subprocess with 8 simulated devices: ~60 s on 2 busy cores
def test_fsdp_on_8_devices_gives_the_loss_of_one(float32):
    """Measured on CPU: the same loss bit for bit (1.053290605545044)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", FSDP_SCRIPT.format(root=ROOT)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    loss = float(proc.stdout.split("LOSS")[-1])
    assert abs(loss - float32[0]) <= 1e-5 * abs(float32[0]), (loss, float32[0])

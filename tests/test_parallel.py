"""The mesh from config.mesh and the fsdp sharding rule; sharded = single-device on 8 simulated devices."""
import os
import subprocess
import sys

import jax
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from diffax import parallel


def mesh_cfg(data, fsdp):
    return ml_collections.ConfigDict({"data": data, "fsdp": fsdp})


def test_mesh_takes_all_devices_on_the_data_axis():
    devices = jax.devices() * 8  # the rule only looks at the count
    mesh = parallel.make_mesh(mesh_cfg(-1, 1), devices=devices[:8])
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1}
    mesh = parallel.make_mesh(mesh_cfg(2, -1), devices=devices[:8])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}


@pytest.mark.parametrize("data, fsdp, match", [(3, 1, "does not match"), (-1, -1, "at most one"), (0, 1, "positive"), (3, -1, "cannot be split")])
def test_bad_mesh_is_named(data, fsdp, match):
    with pytest.raises(ValueError, match=match):
        parallel.make_mesh(mesh_cfg(data, fsdp), devices=(jax.devices() * 8)[:8])


def test_fsdp_rule_splits_the_largest_divisible_axis_of_large_weights():
    assert parallel.fsdp_spec((3, 3, 64, 128), 4, 1000) == P(None, None, None, "fsdp")
    assert parallel.fsdp_spec((3, 3, 130, 64), 4, 1000) == P(None, None, None, "fsdp")  # 130 % 4 != 0
    assert parallel.fsdp_spec((128,), 4, 1000) == P()  # small: replicated
    assert parallel.fsdp_spec((3, 3, 64, 128), 1, 0) == P()  # no fsdp axis
    assert parallel.fsdp_spec((7, 9, 11), 4, 0) == P()  # nothing divides


def test_batch_size_must_split_over_devices():
    mesh = parallel.make_mesh(mesh_cfg(-1, 1), devices=(jax.devices() * 8)[:8])  # the check only reads the count
    parallel.check_batch_size(24, mesh)
    with pytest.raises(ValueError, match="config.training.batch_size=9 must be divisible by the 8 devices"):
        parallel.check_batch_size(9, mesh)


# Run with 8 simulated CPU devices: a small MLP denoiser's forward pass with the batch split over the
# mesh (and, with fsdp, the weights split by the fsdp rule) against the same pass on one device.
EIGHT_DEVICES = r"""
import jax, ml_collections, numpy as np
from flax import nnx
from configs.default import get_config
from diffax import parallel
from diffax.models import build_model

assert jax.device_count() == 8, jax.devices()
cfg = get_config().model
cfg.update(dict(name="mlp", hidden=64, layers=2))
graphdef, params = nnx.split(build_model(cfg, data_shape=(2,), num_classes=0, rngs=nnx.Rngs(0)))
rng = np.random.default_rng(0)
params = jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape).astype(p.dtype), params)  # output layer live
x = rng.standard_normal((16, 2)).astype(np.float32)
c = np.linspace(0.0, 999.0, 16).astype(np.float32)

def forward(params, x, c):
    return nnx.merge(graphdef, params)(x, c)

single = np.asarray(jax.jit(forward)(jax.device_put(params, jax.devices()[0]), x, c))
for data, fsdp in ((8, 1), (2, 4)):
    mesh = parallel.make_mesh(ml_collections.ConfigDict({"data": data, "fsdp": fsdp}))
    param_sh, batch_sh = parallel.param_sharding(mesh, params, min_size=0), parallel.batch_sharding(mesh)
    assert parallel.batch_shards(batch_sh) == 8
    placed = jax.device_put(params, param_sh)
    kernel = placed["hid"][0]["kernel"]
    assert kernel.addressable_shards[0].data.shape == ((64, 64) if fsdp == 1 else (16, 64)), kernel.sharding
    out = jax.jit(forward, in_shardings=(param_sh, batch_sh, batch_sh), out_shardings=batch_sh)(
        placed, jax.device_put(x, batch_sh), jax.device_put(c, batch_sh))
    assert {s.data.shape for s in out.addressable_shards} == {(2, 2)} and len(out.addressable_shards) == 8
    if fsdp == 1:  # per-example work on each device: bit for bit the single-device result
        np.testing.assert_array_equal(np.asarray(out), single)
    else:  # contractions over split weights sum partial products in another order: float rounding only
        np.testing.assert_allclose(np.asarray(out), single, rtol=1e-5, atol=1e-5 * np.abs(single).max())
print("ok")
"""


def test_sharded_forward_equals_single_device_on_eight_devices():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    r = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], cwd=root, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr

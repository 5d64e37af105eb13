"""The mesh from config.mesh and the fsdp sharding rule."""
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
    mesh = parallel.make_mesh(mesh_cfg(-1, 1))
    parallel.check_batch_size(mesh.size * 3, mesh)
    if mesh.size > 1:
        with pytest.raises(ValueError, match="config.training.batch_size"):
            parallel.check_batch_size(mesh.size + 1, mesh)

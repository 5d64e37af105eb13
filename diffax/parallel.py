"""Devices: multi-host start-up, the mesh from the config, and sharding rules.

diffax uses `jax.jit` with `NamedSharding` over a `Mesh` with two axes:
`data` (batch parallelism) and `fsdp` (the batch is split over it too, and
the large weights are sharded along it, as in ZeRO-3 / FSDP). Parameters are
placed by one declared rule (`param_sharding`) instead of annotations sprinkled
through the models.
"""
from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")

# Environment variables for starting several processes by hand (GPU clusters, SLURM,
# or several processes on one machine). On a TPU pod slice jax finds its peers itself.
_ENV_COORDINATOR = "DIFFAX_COORDINATOR_ADDRESS"
_ENV_NUM_PROCESSES = "DIFFAX_NUM_PROCESSES"
_ENV_PROCESS_ID = "DIFFAX_PROCESS_ID"


def initialize_distributed() -> None:
    """Join the other processes of a multi-host run, if this is one.

    Uses `DIFFAX_COORDINATOR_ADDRESS`, `DIFFAX_NUM_PROCESSES` and
    `DIFFAX_PROCESS_ID` when set (GPU clusters, tests on localhost); on a TPU VM
    pod slice `jax.distributed.initialize()` needs no arguments. A single
    process on one host does nothing.
    """
    if jax.distributed.is_initialized():
        return
    if os.environ.get(_ENV_COORDINATOR):
        missing = [v for v in (_ENV_NUM_PROCESSES, _ENV_PROCESS_ID) if not os.environ.get(v)]
        if missing:
            raise ValueError(f"{_ENV_COORDINATOR} is set but {', '.join(missing)} is not: set all three.")
        jax.distributed.initialize(
            coordinator_address=os.environ[_ENV_COORDINATOR],
            num_processes=int(os.environ[_ENV_NUM_PROCESSES]),
            process_id=int(os.environ[_ENV_PROCESS_ID]),
        )
    elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        jax.distributed.initialize()  # a multi-host TPU pod slice: automatic


def make_mesh(mesh_cfg: Any, devices: list | None = None) -> Mesh:
    """Build the (data, fsdp) mesh described by `config.mesh`.

    One of the two sizes may be -1, meaning "all remaining devices". The
    product must equal the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {"data": int(mesh_cfg.data), "fsdp": int(mesh_cfg.fsdp)}
    unknown = [k for k, v in sizes.items() if v == -1]
    if len(unknown) > 1:
        raise ValueError("config.mesh: at most one of data, fsdp may be -1.")
    for k, v in sizes.items():
        if v == 0 or v < -1:
            raise ValueError(f"config.mesh.{k}={v}: use a positive size or -1 for all remaining devices.")
    if unknown:
        known = math.prod(v for v in sizes.values() if v != -1)
        if n % known:
            raise ValueError(f"config.mesh: {n} devices cannot be split into groups of {known}.")
        sizes[unknown[0]] = n // known
    if math.prod(sizes.values()) != n:
        raise ValueError(
            f"config.mesh: data={sizes['data']} x fsdp={sizes['fsdp']} does not match the {n} devices present; "
            "set one of them to -1."
        )
    grid = np.asarray(devices).reshape(sizes["data"], sizes["fsdp"])
    return Mesh(grid, BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Shard the leading (batch) axis over every device of the mesh (arrays of any rank)."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(sharding: NamedSharding) -> int:
    """How many ways `sharding` splits an array's leading (batch) axis: the product of its mesh axes."""
    lead = sharding.spec[0] if len(sharding.spec) else None
    axes = (lead,) if isinstance(lead, str) else tuple(lead or ())
    return math.prod(sharding.mesh.shape[a] for a in axes)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
    """The sharding rule for one weight: split its largest axis that the fsdp
    axis divides, if the weight has at least `min_size` elements; else replicate."""
    if fsdp_size <= 1 or math.prod(shape) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def param_sharding(mesh: Mesh, tree: Any, min_size: int) -> Any:
    """NamedShardings for a pytree of weights (or optimizer / EMA state) by `fsdp_spec`."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(np.shape(x)), fsdp, min_size)), tree)


def check_batch_size(batch_size: int, mesh: Mesh, field: str = "config.training.batch_size") -> None:
    """The global batch must split evenly over the devices and the processes."""
    n = mesh.size
    if batch_size % n or batch_size % jax.process_count():
        raise ValueError(
            f"{field}={batch_size} must be divisible by the {n} devices of the mesh "
            f"(and the {jax.process_count()} processes); try {max(n, batch_size // n * n)}."
        )


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any (a small all-gather; free with one process).

    Used where all processes must take the same branch: stop to save on a
    preemption signal, skip a damaged checkpoint.
    """
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.asarray(flag, np.int32))).any())


def barrier(name: str) -> None:
    """Wait until every process gets here (nothing to wait for with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)

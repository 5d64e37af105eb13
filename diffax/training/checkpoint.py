"""Checkpoints: Orbax `CheckpointManager` under `<workdir>/checkpoints`.

A checkpoint holds the whole `TrainState` (weights, EMA, optimizer state,
step; the step is also the RNG state) and, per process, the data iterator's
position. Orbax writes each checkpoint to a temporary folder and renames it
when complete, so a process killed mid-save leaves the previous checkpoints
intact and the half-written one is ignored.
"""
from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def all_steps(workdir: str) -> list[int]:
    """Steps of the complete checkpoints in a workdir, oldest first."""
    path = checkpoint_dir(workdir)
    if not os.path.isdir(path):
        return []
    return sorted(ocp.utils.checkpoint_steps(path))


def latest_step(workdir: str) -> int | None:
    steps = all_steps(workdir)
    return steps[-1] if steps else None


class _DataStateAdapter:
    """Lets grain's Orbax handler store our iterator's JSON state, one file per process."""

    def __init__(self, iterator: Any):
        self.iterator = iterator

    def get_state(self) -> bytes:
        return json.dumps(self.iterator.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        self.iterator.set_state(json.loads(state.decode()))

    def start_prefetch(self) -> None:
        pass


class Checkpointer:
    """Saves and restores train state and data position for one workdir."""

    def __init__(self, workdir: str, keep: int, *, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any | None = None) -> None:
        """Start an asynchronous save; returns once the arrays are copied off the devices."""
        items = {"state": ocp.args.PyTreeSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_DataStateAdapter(data_iterator))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> Any:
        """Restore the train state (placed as `abstract_state`'s shardings say) and the data position."""
        items = {"state": ocp.args.PyTreeRestore(abstract_state)}
        # An imported checkpoint (diffax import-diffusers) has no data position: the data starts afresh.
        if data_iterator is not None and os.path.isdir(os.path.join(self.manager.directory, str(step), "data")):
            items["data"] = grain.checkpoint.CheckpointRestore(_DataStateAdapter(data_iterator))
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with shardings: the restore target for `Checkpointer.restore`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

"""Checkpoints: Orbax `CheckpointManager` under `<workdir>/checkpoints`.

A checkpoint holds the whole `TrainState` (weights, EMA, optimizer state,
step; the step is also the RNG state) and, per process, the data iterator's
position. Orbax writes each checkpoint to a temporary folder and renames it
when complete, so a process killed mid-save leaves the previous checkpoints
intact and the half-written one is ignored.

A checkpoint damaged later (a truncated file, a deleted folder) is found on
restore: `restore_newest` sets it aside as `<step>.damaged` (nothing is
deleted), says why, and falls back to the next older one. A checkpoint whose
arrays do not fit the config (another model) is not damaged: that is an error
naming the first array that differs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from diffax import errors, parallel
from diffax.errors import UserError


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


class DamagedCheckpoint(UserError):
    """A checkpoint that cannot be read (the message names its step and why)."""

    def __init__(self, step: int, path: str, reason: str):
        super().__init__(f"The checkpoint at step {step} ({path}) is damaged: {reason}.")
        self.step, self.path, self.reason = step, path, reason


def _key_name(key: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _arrays(tree: Any) -> dict[str, Any]:
    """Dotted path -> leaf, the way Orbax names a checkpoint's arrays."""
    return {".".join(_key_name(k) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def first_mismatch(saved: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """The first array (dotted path) whose presence, shape or dtype differs, described; None if all match."""
    for name in sorted(set(saved) | set(wanted)):
        if name not in saved:
            return f"{name} is not in the checkpoint (this config has it, {tuple(wanted[name].shape)} {wanted[name].dtype})"
        if name not in wanted:
            return f"the checkpoint has {name} ({tuple(saved[name].shape)} {saved[name].dtype}), this config does not"
        a, b = saved[name], wanted[name]
        if tuple(a.shape) != tuple(b.shape) or jax.numpy.dtype(a.dtype) != jax.numpy.dtype(b.dtype):
            return f"{name} is {tuple(a.shape)} {a.dtype} in the checkpoint but {tuple(b.shape)} {b.dtype} in this config"
    return None


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
        self._check_free_space(step, state)
        items = {"state": ocp.args.PyTreeSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_DataStateAdapter(data_iterator))
        with self._disk_errors(step):  # also raises a failure of the previous asynchronous save
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def _check_free_space(self, step: int, state: Any) -> None:
        """Refuse to start a save that cannot fit, instead of failing in the background one save later."""
        need = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
        free = shutil.disk_usage(str(self.manager.directory)).free
        if free < need:
            raise UserError(
                f"No space for the checkpoint of step {step} in {self.manager.directory}: it needs about "
                f"{need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free. Free some space (or lower "
                f"config.training.keep_checkpoints) and run the same command again: it resumes from the latest "
                "checkpoint."
            )

    @contextlib.contextmanager
    def _disk_errors(self, step: int) -> Any:
        """A full disk or a write error, from Orbax's threads too, as one UserError naming the folder."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - only disk errors are translated; the rest is re-raised as is
            cause = e
            while cause is not None and not (isinstance(cause, OSError) and cause.errno is not None):
                cause = cause.__cause__ or cause.__context__
            text = str(e)
            if cause is None and "No space left on device" not in text and "Disk quota exceeded" not in text:
                raise
            reason = errors.os_error_message(cause) if cause is not None else text.splitlines()[0]
            raise UserError(f"Writing a checkpoint (step {step} or the one before) in {self.manager.directory} "
                            f"failed: {reason} The checkpoints already complete are intact; run the same command "
                            "again to resume from the latest.") from e

    def step_dir(self, step: int) -> str:
        return os.path.join(str(self.manager.directory), str(step))

    def check(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> Any:
        """Before reading any array: raise DamagedCheckpoint if the checkpoint's metadata is missing or
        unreadable, and UserError if its arrays or data position do not fit this config. Returns the
        saved state's metadata tree."""
        path = self.step_dir(step)
        state_dir = os.path.join(path, "state")
        if not os.path.isdir(state_dir):
            raise DamagedCheckpoint(step, path, "its state/ folder is missing")
        try:
            metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir))
        except Exception as e:  # noqa: BLE001 - any unreadable metadata means a damaged checkpoint
            raise DamagedCheckpoint(step, path, f"its metadata cannot be read ({type(e).__name__}: {e})") from e
        tree = getattr(metadata, "tree", metadata)
        mismatch = first_mismatch(_arrays(tree), _arrays(abstract_state))
        if mismatch:
            raise UserError(
                f"The checkpoint at step {step} in {os.path.dirname(os.path.dirname(path))} does not fit this config: "
                f"{mismatch}. Use the config the run was trained with (its config.json), or a new --workdir."
            )
        data_file = os.path.join(path, "data", f"process_{jax.process_index()}-of-{jax.process_count()}.json")
        if data_iterator is not None and os.path.isdir(os.path.dirname(data_file)):
            if not os.path.isfile(data_file):
                raise UserError(f"The checkpoint at step {step} has no data position for process "
                                f"{jax.process_index()} of {jax.process_count()}: it was saved by a run with another "
                                "number of processes. Resume with that number, or train in a new --workdir.")
            try:
                with open(data_file, encoding="utf-8") as f:
                    saved_position = json.load(f)
            except (OSError, ValueError) as e:
                raise DamagedCheckpoint(step, path, f"{data_file} cannot be read ({e})") from e
            data_iterator.check_state(saved_position)
        return tree

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> Any:
        """Restore the train state (placed as `abstract_state`'s shardings say) and the data position.

        Checks first (see `check`); any failure of the restore itself means a damaged checkpoint.
        """
        target, fill = _saved_fields(self.check(step, abstract_state, data_iterator), abstract_state)
        restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target)
        items = {"state": ocp.args.PyTreeRestore(target, restore_args=restore_args)}
        # An imported checkpoint (diffax import-diffusers) has no data position: the data starts afresh.
        if data_iterator is not None and os.path.isdir(os.path.join(self.step_dir(step), "data")):
            items["data"] = grain.checkpoint.CheckpointRestore(_DataStateAdapter(data_iterator))
        try:
            return fill(self.manager.restore(step, args=ocp.args.Composite(**items))["state"])
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - shapes and metadata were fine, so the files are damaged
            raise DamagedCheckpoint(step, self.step_dir(step), f"{type(e).__name__}: {_first_line(e)}") from e

    def set_aside(self, damaged: DamagedCheckpoint) -> str:
        """Rename a damaged checkpoint to `<step>.damaged` (Orbax ignores it; nothing is deleted)."""
        target = damaged.path + ".damaged"
        if jax.process_index() == 0:
            n = 1
            while os.path.exists(target):
                n, target = n + 1, f"{damaged.path}.damaged{n + 1}"
            os.rename(damaged.path, target)
        parallel.barrier(f"diffax_set_aside_{damaged.step}")
        self.manager.reload()
        return target

    def wait(self) -> None:
        """Block until the asynchronous save has committed (a failure of it is raised here)."""
        with self._disk_errors(self.manager.latest_step() or 0):
            self.manager.wait_until_finished()
            self.manager.check_for_errors()

    def close(self) -> None:
        self.manager.close()


def _saved_fields(saved: Any, abstract_state: Any) -> tuple[Any, Any]:
    """The restore target and a function completing what it restores, for a checkpoint of an older diffax.

    A TrainState field added since (e.g. posthoc_ema) that holds no arrays in this config
    (its value is empty) is absent from such a checkpoint's metadata tree `saved`: it is left
    out of the target and put back, empty, after the restore. Any other difference is for
    `check` to report.
    """
    if not dataclasses.is_dataclass(abstract_state) or not isinstance(saved, dict):
        return abstract_state, lambda state: state
    fields = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)}
    absent = {k: v for k, v in fields.items() if k not in saved and not jax.tree.leaves(v)}
    if not absent:
        return abstract_state, lambda state: state
    target = {k: v for k, v in fields.items() if k not in absent}
    return target, lambda state: type(abstract_state)(**state, **absent)


def _first_line(error: BaseException) -> str:
    text = str(error).split(" See full TensorStore details")[0].strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def restore_newest(ckpt: Checkpointer, abstract_state: Any, data_iterator: Any | None = None,
                   *, set_aside: bool = True) -> tuple[int | None, Any]:
    """(step, state) of the newest checkpoint that restores, or (None, None) when none does.

    Each damaged checkpoint met on the way is named in a warning that says
    why and, with `set_aside` (the trainer; readers such as `diffax sample`
    leave the folder alone), renamed to `<step>.damaged`. Every process takes
    the same decision.
    """
    for step in reversed(sorted(ckpt.manager.all_steps())):
        damaged = None
        try:
            state = ckpt.restore(step, abstract_state, data_iterator)
        except DamagedCheckpoint as e:
            damaged = e
        if not parallel.any_process(damaged is not None):
            return step, state
        damaged = damaged or DamagedCheckpoint(step, ckpt.step_dir(step), "another process could not read it")
        moved = f"Moved it to {ckpt.set_aside(damaged)}; " if set_aside else ""
        warn(f"{damaged} {moved}falling back to the previous checkpoint.")
    return None, None


def warn(message: str) -> None:
    """A warning the user must see (printed by process 0 whatever the log level)."""
    if jax.process_index() == 0:
        print(f"diffax: warning: {message}", file=sys.stderr, flush=True)


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with shardings: the restore target for `Checkpointer.restore`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

"""The run folder: one trainer at a time (a lock), checked before anything is written.

`train` first takes the lock, then checks the workdir is writable and that its
`config.json` (if any) describes the same run, then builds and restores
everything, and only then writes the new `config.json` (`write_config`). So a
refused or failing command leaves the workdir as it found it.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import sys
import time
from typing import Any, Iterator

import jax

from diffax import configuration
from diffax.errors import UserError
from diffax.training import checkpoint


def check_writable(folder: str, what: str = "--workdir") -> None:
    """Create `folder` if needed and check a file can be written there (before any work is done)."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write_test_{socket.gethostname()}_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"The folder {folder!r} is not writable ({e.strerror}). Choose another {what}, "
                        "or make that one writable.") from None


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
    """Hold `<workdir>/.train.lock.<process>` so a second `diffax train` on the same workdir is refused.

    The lock file says who holds it (process id, host, start time, command),
    and the error names that process. The operating system releases the lock
    when the process ends, however it ends.
    """
    path = os.path.join(workdir, f".train.lock.{jax.process_index()}")
    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise UserError(f"Another diffax train is using the workdir {workdir!r}: {holder}. Wait for it to finish "
                            "or stop it, or train in another --workdir (two trainers would overwrite each "
                            "other's checkpoints).") from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')} "
                f"({' '.join(sys.argv)})\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


def check_config(workdir: str, config: Any, *, force: bool = False) -> list[str]:
    """Refuse to mix two different runs in one workdir; returns the differences (empty: the same run).

    An existing `config.json` that differs from `config` (in anything but how
    long to train, how often to log and how to sample) is refused unless
    `force`. A config.json of an older diffax is first brought up to date
    (configuration.upgrade). Writes nothing.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        if checkpoint.latest_step(workdir) is not None and not force:
            raise UserError(
                f"{workdir!r} has checkpoints but no config.json, so it cannot be checked against this config. "
                "Pass --force to resume from them anyway."
            )
        return []
    diffs = configuration.differences(configuration.to_dict(configuration.load(path)), configuration.to_dict(config))
    if diffs and not force and imported_untrained(workdir) and all(d.startswith(FINE_TUNE_FIELDS) for d in diffs):
        return diffs  # fine-tuning an imported checkpoint: its data, optimiser and schedule of training are the user's
    if diffs and not force:
        raise UserError(
            f"{workdir!r} holds a run with a different config:\n  " + "\n  ".join(diffs)
            + "\nUse a new --workdir, or pass --force to continue this run with the new config."
        )
    return diffs


IMPORTED_NAME = "imported.json"  # written by `diffax import-diffusers`: where the step-0 weights came from
FINE_TUNE_FIELDS = ("data.", "optimizer.", "training.", "sampling.", "eval.", "mesh.", "seed:", "text.caption_dropout:",
                    "lora.dropout:", "model.dtype:", "model.remat:")


def imported_untrained(workdir: str) -> bool:
    """A run made by import-diffusers that has not trained yet (only its step-0 checkpoint)."""
    return os.path.exists(os.path.join(workdir, IMPORTED_NAME)) and checkpoint.latest_step(workdir) == 0


def write_config(workdir: str, config: Any, *, keep_old: bool) -> None:
    """Write `config.json` (process 0), keeping the old one as `config.<time>.json` when `keep_old`."""
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, "config.json")
    if keep_old and os.path.exists(path):
        shutil.copy(path, os.path.join(workdir, f"config.{time.strftime('%Y%m%d-%H%M%S')}.json"))
    configuration.save(config, path)

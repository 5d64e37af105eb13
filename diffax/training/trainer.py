"""The training loop: `diffax train --config C --workdir W`.

Read top to bottom: check the workdir, build the mesh, model, optimizer and
data, restore the latest checkpoint if there is one, then loop: dispatch the
jitted step, log, checkpoint, sample. Resuming a run on the same workdir
continues exactly where the last checkpoint left off.
"""
from __future__ import annotations

import os
import shutil
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffax import compilation, configuration, data, parallel
from diffax.training import checkpoint, inference
from diffax.training.build import build, count_params
from diffax.training.state import TrainState, learning_rate_schedule
from diffax.training.step import init_state, make_train_step, state_layout
from diffax.training.writers import MetricWriter, format_duration
from diffax.visualize import save_samples


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must act on (the message says what to do)."""


def check_config(config: Any) -> None:
    """Reject inconsistent training settings before anything runs."""
    t = config.training
    k = int(t.steps_per_dispatch)
    if k < 1:
        raise ValueError(f"config.training.steps_per_dispatch={k}: must be >= 1.")
    for name in ("num_steps", "log_every", "checkpoint_every", "sample_every"):
        value = int(t[name])
        if value < 0 or (name != "sample_every" and value == 0):
            raise ValueError(f"config.training.{name}={value}: must be positive.")
        if value % k:
            raise ValueError(
                f"config.training.{name}={value} must be a multiple of config.training.steps_per_dispatch={k}."
            )


def prepare_workdir(workdir: str, config: Any, *, force: bool = False) -> None:
    """Create the workdir, check it is writable, and refuse to mix two different runs in it.

    An existing `config.json` that differs from `config` (in anything but how
    long to train, how often to log and how to sample) stops here unless
    `force`, in which case the old config is kept as `config.<time>.json`.
    """
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test_{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise TrainingError(f"The workdir {workdir!r} is not writable ({e.strerror}). Choose another --workdir.") from None

    path = os.path.join(workdir, "config.json")
    new = configuration.to_dict(config)
    if os.path.exists(path):
        old = configuration.to_dict(configuration.load(path))
        diffs = configuration.differences(old, new)
        if diffs and not force:
            raise TrainingError(
                f"{workdir!r} holds a run with a different config:\n  "
                + "\n  ".join(diffs)
                + "\nUse a new --workdir, or pass --force to continue this run with the new config."
            )
        if diffs and jax.process_index() == 0:
            shutil.copy(path, os.path.join(workdir, f"config.{time.strftime('%Y%m%d-%H%M%S')}.json"))
    elif checkpoint.latest_step(workdir) is not None and not force:
        raise TrainingError(
            f"{workdir!r} has checkpoints but no config.json, so it cannot be checked against this config. "
            "Pass --force to resume from them anyway."
        )
    if jax.process_index() == 0:
        configuration.save(config, path)


def _stack(batches: list[dict]) -> dict:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *batches)


class _Sampler:
    """Writes a grid (images) or a scatter plot (2-D data) of samples during training."""

    def __init__(self, diffusion, config, mesh, workdir, writer, param_shardings):
        self.config, self.workdir, self.writer = config, workdir, writer
        self.sample = inference.make_sample_fn(diffusion, config, mesh, param_shardings)
        self.mesh = mesh
        self.num_classes = diffusion.num_classes
        self.shape = diffusion.data_shape
        self.reference = None  # data points for 2-D scatter plots
        if jax.process_index() == 0:
            os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)

    def __call__(self, step: int, state: TrainState) -> str:
        s = self.config.sampling
        params = state.ema if s.use_ema else state.params
        out = inference.draw(self.sample, params, self.config, self.mesh, self.shape, self.num_classes,
                             num_samples=s.num_samples, seed=self.config.seed, progress=False)
        path = os.path.join(self.workdir, "samples", f"step_{step:08d}.png")
        if jax.process_index() != 0:  # every process samples its share; process 0 draws the picture
            return path
        if len(self.shape) == 1 and self.reference is None:  # 2-D toy data: samples over data points
            it = data.make_iterator(self.config, process_index=0, process_count=1)
            self.reference = np.concatenate([np.asarray(next(it)["image"]) for _ in range(4)])
        picture = save_samples(out["images"], path, reference=self.reference, title=f"step {step}")
        self.writer.image(step, "samples", picture)
        return path


def train(config: Any, workdir: str, *, force: bool = False) -> dict[str, float]:
    """Train `config` in `workdir`, resuming from its latest checkpoint. Returns the last logged metrics."""
    check_config(config)
    prepare_workdir(workdir, config, force=force)
    t = config.training
    k = int(t.steps_per_dispatch)

    mesh = parallel.make_mesh(config.mesh)
    parallel.check_batch_size(t.batch_size, mesh)
    diffusion = build(config)
    lr_schedule = learning_rate_schedule(config.optimizer, t.num_steps)
    tx, abstract, state_shardings = state_layout(diffusion, config, mesh)
    state = jax.device_put(init_state(diffusion, tx), state_shardings)
    batch_sharding = parallel.batch_sharding(mesh)
    iterator = data.make_iterator(config, sharding=batch_sharding)

    ckpt = checkpoint.Checkpointer(workdir, t.keep_checkpoints)
    start = ckpt.latest_step()
    if start is not None:
        state = ckpt.restore(start, checkpoint.abstract_like(abstract, state_shardings), iterator)
        logging.info("Resumed from the checkpoint at step %d in %s", start, workdir)
    step = int(state.step)

    if k == 1:
        batch_in = batch_sharding
    else:
        batch_in = parallel.NamedSharding(mesh, parallel.P(None, *batch_sharding.spec))
    train_step = jax.jit(
        make_train_step(diffusion, tx, lr_schedule, config),
        in_shardings=(state_shardings, batch_in),
        out_shardings=(state_shardings, parallel.replicated(mesh)),
        donate_argnums=0,
        compiler_options=compilation.compiler_options(config),
    )
    writer = MetricWriter(workdir, resume_step=step)
    sampler = _Sampler(diffusion, config, mesh, workdir, writer, state_shardings.ema)
    is_main = jax.process_index() == 0
    if is_main:
        print(
            f"diffax: training {config.model.name} ({count_params(state.params) / 1e6:.2f}M parameters) on "
            f"{config.data.name}, {jax.device_count()} {jax.devices()[0].platform} device(s), "
            f"mesh {dict(mesh.shape)}, batch {t.batch_size}, steps {step} -> {t.num_steps}, workdir {workdir}",
            flush=True,
        )
    progress = None
    if is_main and t.progress_bar and step < t.num_steps:
        from tqdm import tqdm

        progress = tqdm(total=t.num_steps, initial=step, unit="step", dynamic_ncols=True, leave=False,
                        disable=None, mininterval=1.0)  # disable=None: only on a terminal

    last: dict[str, float] = {}
    window = {"loss": 0.0, "steps": 0, "data_wait": 0.0, "start": time.perf_counter()}
    run_start, run_start_step = time.perf_counter(), step
    try:
        while step < t.num_steps:
            wait_start = time.perf_counter()
            batches = [next(iterator) for _ in range(k)]
            window["data_wait"] += time.perf_counter() - wait_start
            state, metrics = train_step(state, batches[0] if k == 1 else _stack(batches))
            step += k
            window["loss"] = window["loss"] + metrics["loss"]  # stays on device until logged
            window["steps"] += 1
            if progress is not None:
                progress.update(k)

            end = step >= t.num_steps
            if step % t.log_every == 0 or end:
                last = _log(step, state, metrics, window, config, writer, progress, iterator, run_start, run_start_step)
            if step % t.checkpoint_every == 0 or end:
                _raise_if_bad(state, config)
                ckpt.save(step, state, iterator)
            _fault_injection(step)
            if (t.sample_every and step % t.sample_every == 0) or end:
                path = sampler(step, state)
                if is_main:
                    _write(progress, f"step {step}: samples in {path}")
    finally:
        if progress is not None:
            progress.close()
        ckpt.wait()
        ckpt.close()
        writer.close()
    return last


def _fault_injection(step: int) -> None:
    """Tests set DIFFAX_FAULT_KILL_AT_STEP=N to SIGKILL this process at step N, right after
    a checkpoint save starts when N is a checkpoint step (a kill during the save)."""
    if os.environ.get("DIFFAX_FAULT_KILL_AT_STEP") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def _raise_if_bad(state: TrainState, config: Any) -> None:
    bad = int(state.first_bad_step)
    if bad >= 0 and config.training.nan_policy == "stop":
        raise TrainingError(
            f"The loss or its gradient became NaN or Inf at step {bad} (the update to step {bad + 1}). Training "
            "stopped without applying it; the last checkpoint is intact. Lower config.optimizer.learning_rate, "
            "check the data, or set "
            "config.training.nan_policy='skip' to skip such steps."
        )


def _write(progress: Any, line: str) -> None:
    if progress is not None:
        progress.write(line)
    else:
        print(line, flush=True)


def _log(step, state, metrics, window, config, writer, progress, iterator, run_start, run_start_step):
    """Fetch the metrics of the window since the last log, write them everywhere, reset the window."""
    _raise_if_bad(state, config)
    t = config.training
    now = time.perf_counter()
    elapsed = now - window["start"]
    values = {k: float(v) for k, v in metrics.items()}
    values["loss"] = float(window["loss"]) / window["steps"]
    steps_done = window["steps"] * t.steps_per_dispatch
    values["steps_per_sec"] = steps_done / elapsed
    values["images_per_sec"] = values["steps_per_sec"] * t.batch_size
    values["data_wait_fraction"] = window["data_wait"] / elapsed
    skipped = getattr(iterator, "num_skipped", 0)
    if skipped:
        values["data_skipped"] = skipped
    writer.scalars(step, values)
    if jax.process_index() == 0:
        rate = (step - run_start_step) / max(now - run_start, 1e-9)
        eta = format_duration((t.num_steps - step) / max(rate, 1e-9))
        _write(
            progress,
            f"step {step}/{t.num_steps} | loss {values['loss']:.4f} | {values['steps_per_sec']:.2f} steps/s | "
            f"{values['images_per_sec']:.0f} img/s | data wait {100 * values['data_wait_fraction']:.1f}% | ETA {eta}",
        )
    window.update(loss=0.0, steps=0, data_wait=0.0, start=time.perf_counter())
    return values

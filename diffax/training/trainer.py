"""The training loop: `diffax train --config C --workdir W`.

Read top to bottom: lock and check the workdir, build the mesh, model,
optimizer, data and sampler, restore the newest checkpoint that restores, and
only then write config.json; then loop: dispatch the jitted step, log,
checkpoint, sample, and stop cleanly on SIGTERM / SIGINT. Resuming a run on
the same workdir continues exactly where the last checkpoint left off.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffax import compilation, data, errors, parallel, samplers
from diffax.errors import UserError
from diffax.models import count_params
from diffax.training import autoencoder, checkpoint, inference, latent, posthoc_snapshots, preemption
from diffax.training import workdir as workdir_lib
from diffax.training.build import build
from diffax.training.state import TrainState, learning_rate_schedule
from diffax.training import text as text_lib
from diffax.training.step import init_state, make_train_step, state_layout
from diffax.training.writers import MetricWriter, format_duration
from diffax.visualize import save_samples


class TrainingError(UserError):
    """Training stopped for a reason the user must act on (the message says what to do)."""


def check_config(config: Any) -> None:
    """Reject inconsistent training settings before anything runs."""
    t = config.training
    k = int(t.steps_per_dispatch)
    if t.task not in ("diffusion", "autoencoder"):
        raise ValueError(f"config.training.task={t.task!r}: use 'diffusion' or 'autoencoder'.")
    if k < 1:
        raise UserError(f"config.training.steps_per_dispatch={k}: must be >= 1.")
    for name in ("num_steps", "log_every", "checkpoint_every", "sample_every"):
        value = int(t[name])
        if value < 0 or (name != "sample_every" and value == 0):
            raise UserError(f"config.training.{name}={value}: must be positive.")
        if value % k:
            raise UserError(
                f"config.training.{name}={value} must be a multiple of config.training.steps_per_dispatch={k}."
            )
    if t.nan_policy not in ("stop", "skip"):
        raise UserError(f"config.training.nan_policy={t.nan_policy!r}: use 'stop' or 'skip'.")
    samplers.SAMPLERS.get(config.sampling.sampler)  # an unknown name lists the valid ones
    posthoc_snapshots.check_config(t)


def prepare_workdir(workdir: str, config: Any, *, force: bool = False) -> None:
    """Check the workdir and write the run's config.json, for commands that create a run without
    training it (import-diffusers). `train` does the same in two halves around its own checks."""
    workdir_lib.check_writable(workdir)
    diffs = workdir_lib.check_config(workdir, config, force=force)
    workdir_lib.write_config(workdir, config, keep_old=bool(diffs))


def _stack(batches: list[dict]) -> dict:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *batches)


class SampleGrids:
    """Writes the preview of samples during training: a grid (images) or a scatter plot (2-D data)."""

    def __init__(self, diffusion, config, mesh, workdir, param_shardings, abstract_params, *, source=None):
        self.config, self.workdir = config, workdir
        tokenizer, null = inference.text_tokenizer(config, workdir, diffusion)
        param_shardings = inference.sampling_shardings(diffusion, param_shardings, mesh)
        self.diffusion = diffusion = inference.frozen_text_on_devices(diffusion, param_shardings)
        abstract_params = diffusion.sampling_params(abstract_params)
        self.sample = inference.make_sample_fn(diffusion, config, mesh, param_shardings, null_label=null)
        self.run = inference.Inference(config=config, step=0, diffusion=diffusion, params=None, mesh=mesh,
                                       _sample=self.sample, tokenizer=tokenizer)
        self.num_classes = diffusion.num_classes
        self.shape = diffusion.data_shape
        self.reference = None  # data points for 2-D scatter plots
        self.tokens = None  # text models: the prompts' tokens, written beside the grids
        if self.run.is_text:
            prompts = text_lib.preview_prompts(config, source)
            self.tokens = self.run.prompt_tokens(prompts)
            os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
            with open(os.path.join(workdir, "samples", "prompts.txt"), "w") as f:
                f.write("".join(p + "\n" for p in prompts))
        # Trace the sampler once now, so a bad sampling setting stops the run before step 1, not at the first grid.
        n = mesh.size
        labels = jax.ShapeDtypeStruct((n,), jnp.int32) if self.num_classes else None
        if self.tokens is not None:
            labels = jax.ShapeDtypeStruct((n, *self.tokens.shape[1:]), jnp.int32)
        jax.eval_shape(getattr(self.sample, "sampler", self.sample), abstract_params,
                       jax.ShapeDtypeStruct((n, *self.shape), jnp.float32),
                       jax.eval_shape(lambda: jax.random.key(0)), labels)

    metrics: dict[str, float] = {}  # nothing to log beside the picture (autoencoder.Reconstructions logs errors)

    def path(self, step: int) -> str:
        return os.path.join(self.workdir, "samples", f"step_{step:08d}.png")

    def __call__(self, step: int, state: TrainState) -> np.ndarray | None:
        """Write the preview of step `step` to `path(step)`; returns the picture (None on processes > 0)."""
        s = self.config.sampling
        params = self.diffusion.sampling_params(state.ema if s.use_ema else state.params)  # with the frozen encoder
        run = dataclasses.replace(self.run, step=step, params=params)
        out = run.draw(s.num_samples, self.config.seed, labels=self.tokens, progress=False)
        path = self.path(step)
        if jax.process_index() != 0:  # every process samples its share; process 0 draws the picture
            return None
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if len(self.shape) == 1 and self.reference is None:  # 2-D toy data: samples over data points
            it = data.make_iterator(self.config, process_index=0, process_count=1)
            self.reference = np.concatenate([np.asarray(next(it)["image"]) for _ in range(4)])
        return save_samples(out["images"], path, reference=self.reference, title=f"step {step}")


def train(config: Any, workdir: str, *, force: bool = False) -> dict[str, float]:
    """Train `config` in `workdir`, resuming from its latest checkpoint. Returns the last logged metrics.

    Everything is checked (config names, the data, the restore) before the
    workdir's config.json is written. SIGTERM / SIGINT stop after the current
    step with a checkpoint (`errors.Stopped`); a second signal exits at once.
    """
    check_config(config)
    created = not os.path.exists(workdir)
    workdir_lib.check_writable(workdir)
    with workdir_lib.lock(workdir), preemption.StopOnSignal() as stop:
        try:
            diffs = workdir_lib.check_config(workdir, config, force=force)
            latent.record_autoencoder(workdir, config)
            run = _set_up(config, workdir)
        except BaseException:
            if created and jax.process_count() == 1:  # leave nothing behind for a command that was refused
                shutil.rmtree(workdir, ignore_errors=True)
            raise
        workdir_lib.write_config(workdir, config, keep_old=bool(diffs))
        try:
            return _loop(config, workdir, run, stop)
        finally:
            run.checkpointer.wait()
            run.checkpointer.close()


@dataclasses.dataclass
class _Run:
    """What the loop needs, built and restored (and so checked) before anything is written."""

    mesh: Any
    state: TrainState
    train_step: Any
    iterator: Any
    checkpointer: checkpoint.Checkpointer
    grids: Any  # SampleGrids, or autoencoder.Reconstructions
    abstract: TrainState  # shapes and dtypes of the state
    snapshots: posthoc_snapshots.Snapshotter | None  # post-hoc EMA snapshots (config.training.posthoc_ema)
    encode: Any = None  # latent runs on images: batch, step -> the batch with latents (latent.make_encoder)


def _set_up(config: Any, workdir: str) -> _Run:
    t = config.training
    mesh = parallel.make_mesh(config.mesh)
    parallel.check_batch_size(t.batch_size, mesh)
    batch_sharding = parallel.batch_sharding(mesh)
    train_autoencoder = t.task == "autoencoder"
    diffusion, tokenizer_for, cache = None, None, ""
    if text_lib.enabled(config) and not train_autoencoder:
        cache = text_lib.cached_embeddings(config)
        if cache:  # the cache brings its captions' embeddings, made by this very encoder (or refused)
            from diffax.data.latents import check_text_encoder

            check_text_encoder(cache, text_lib.encoder_identity(config))
            logging.info("Training on the text embeddings stored in %s: no text encoder in the train step.", cache)
        elif config.text.encoder == "small":  # its vocabulary comes from the captions
            tokenizer_for = text_lib.small_tokenizer_for_training(config, workdir)
        else:  # a pretrained encoder brings its tokenizer
            diffusion = build(config)
            tokenizer_for = lambda source: diffusion.tokenizer  # noqa: E731
        text_lib.record_cached_embeddings(workdir, config, cache, bool(checkpoint.all_steps(workdir)))
    iterator = data.make_iterator(config, sharding=batch_sharding, tokenizer_for=tokenizer_for,
                                  text_embeddings=bool(cache))  # opening the data is quick
    if diffusion is None:
        diffusion = autoencoder.build(config) if train_autoencoder else build(config)
    lr_schedule = learning_rate_schedule(config.optimizer, t.num_steps)
    tx, abstract, state_shardings = state_layout(diffusion, config, mesh)
    train_step = jax.jit(
        make_train_step(diffusion, tx, lr_schedule, config,
                        autoencoder.make_value_and_grad(diffusion, config) if train_autoencoder else None),
        in_shardings=(state_shardings, batch_sharding if t.steps_per_dispatch == 1
                      else parallel.NamedSharding(mesh, parallel.P(None, *batch_sharding.spec))),
        out_shardings=(state_shardings, parallel.replicated(mesh)),
        donate_argnums=0,
        compiler_options=compilation.compiler_options(config),
    )
    ckpt = checkpoint.Checkpointer(workdir, t.keep_checkpoints)
    try:
        if train_autoencoder:  # a grid of reconstructions and the exported autoencoder instead of samples
            grids = autoencoder.Reconstructions(diffusion, config, workdir)
        else:
            grids = SampleGrids(diffusion, config, mesh, workdir, state_shardings.ema, abstract.ema,
                                source=getattr(iterator, "source", None))
        saved = ckpt.manager.all_steps()
        start, state = checkpoint.restore_newest(ckpt, checkpoint.abstract_like(abstract, state_shardings), iterator)
        if saved and start is None:  # never start over silently in place of a long run
            raise UserError(f"None of the checkpoints of {workdir} (steps {sorted(saved)}) could be restored; each "
                            "was set aside as <step>.damaged (the warnings above say why). Run the same command "
                            "again to train from step 0 in this workdir, or use a new --workdir.")
    except BaseException:
        ckpt.close()
        raise
    if start is None:
        state = jax.device_put(init_state(diffusion, tx, len(t.posthoc_ema)), state_shardings)
    else:
        logging.info("Resumed from the checkpoint at step %d in %s", start, workdir)
    snapshots = None
    if t.posthoc_ema:
        snapshots = posthoc_snapshots.Snapshotter(workdir, t.posthoc_ema, t.posthoc_ema_every, t.num_steps)
    encode = None if train_autoencoder else latent.make_encoder(config, batch_sharding)
    return _Run(mesh, state, train_step, iterator, ckpt, grids, abstract, snapshots, encode)


def _loop(config: Any, workdir: str, run: _Run, stop: preemption.StopOnSignal) -> dict[str, float]:
    """Dispatch the jitted step, log, checkpoint and sample until config.training.num_steps (or a signal)."""
    t = config.training
    k = int(t.steps_per_dispatch)
    state, iterator, ckpt = run.state, run.iterator, run.checkpointer
    step = int(state.step)
    writer = MetricWriter(workdir, resume_step=step)
    is_main = jax.process_index() == 0
    if is_main:
        print(
            f"diffax: training {'autoencoder' if t.task == 'autoencoder' else config.model.name} ({count_params(state.params) / 1e6:.2f}M parameters) on "
            f"{config.data.name}, {jax.device_count()} {jax.devices()[0].platform} device(s), "
            f"mesh {dict(run.mesh.shape)}, batch {t.batch_size}, steps {step} -> {t.num_steps}, workdir {workdir}",
            flush=True,
        )
        if run.snapshots is not None:
            print(run.snapshots.describe(run.abstract.posthoc_ema), flush=True)
    progress = None
    if is_main and t.progress_bar and step < t.num_steps:
        from tqdm import tqdm

        progress = tqdm(total=t.num_steps, initial=step, unit="step", dynamic_ncols=True, leave=False,
                        disable=None, mininterval=1.0)  # disable=None: only on a terminal

    def preview(step: int, state: TrainState) -> None:  # every process draws its share
        picture = run.grids(step, state)
        if picture is not None:
            writer.image(step, "samples", picture)
            if run.grids.metrics:
                writer.scalars(step, run.grids.metrics)
            _write(progress, f"step {step}: samples in {run.grids.path(step)}")

    last: dict[str, float] = {}
    window = LogWindow(steps_per_dispatch=k, batch_size=t.batch_size, num_steps=t.num_steps, step=step)
    try:
        while step < t.num_steps:
            wait_start = time.perf_counter()
            batches = [next(iterator) for _ in range(k)]
            if run.encode is not None:  # images -> latents of the frozen autoencoder
                batches = [run.encode(b, step + i) for i, b in enumerate(batches)]
            data_wait = time.perf_counter() - wait_start
            state, metrics = run.train_step(state, batches[0] if k == 1 else _stack(batches))
            step += k
            window.add(metrics, data_wait)
            if progress is not None:
                progress.update(k)

            end = step >= t.num_steps
            if step % t.log_every == 0 or end:
                _raise_if_bad(state, config, ckpt)
                last = window.flush(step, metrics, data_skipped=getattr(iterator, "num_skipped", 0))
                writer.scalars(step, last)
                if is_main:
                    _write(progress, window.line(step, last))
                if config.training.nan_policy == "skip" and last["skipped"] >= window.last_steps:
                    raise TrainingError(
                        f"Every step of the log window ending at step {step} ({window.last_steps} steps) was skipped: "
                        "the loss or its gradient is NaN or Inf at every step, so nothing is learned. Lower "
                        "config.optimizer.learning_rate or check the data; the checkpoints before this window "
                        "are intact.")
            stopping = stop.requested()
            if step % t.checkpoint_every == 0 or end or stopping:
                _raise_if_bad(state, config, ckpt)
                ckpt.save(step, state, iterator)
            if run.snapshots is not None:
                run.snapshots.maybe_save(step, state)
            if stopping:
                ckpt.wait()  # committed before we say so
                raise errors.Stopped(
                    f"stopped by {stop.name} at step {step} after saving a checkpoint with the data position in "
                    f"{checkpoint.checkpoint_dir(workdir)}. Run the same command again to resume.", stop.exit_code)
            if t.sample_every and step % t.sample_every == 0 and not end:
                preview(step, state)
        # The final preview, also when a restart finds the training done but the preview missing (a kill
        # between the last checkpoint and the preview). Every process must take the same branch.
        if step >= t.num_steps and parallel.any_process(not os.path.exists(run.grids.path(step))):
            preview(step, state)
    finally:
        if progress is not None:
            progress.close()
        if run.snapshots is not None:
            run.snapshots.close()
        writer.close()
    return last


def _raise_if_bad(state: TrainState, config: Any, ckpt: checkpoint.Checkpointer) -> None:
    bad = int(state.first_bad_step)
    if bad >= 0 and config.training.nan_policy == "stop":
        latest = ckpt.latest_step()
        kept = (f"the last checkpoint (step {latest}) is intact" if latest is not None else
                "no checkpoint was written before it")
        raise TrainingError(
            f"The loss or its gradient became NaN or Inf at step {bad} (the update to step {bad + 1}). Training "
            f"stopped without applying it; {kept}. Lower config.optimizer.learning_rate, check the data, or set "
            "config.training.nan_policy='skip' to skip such steps."
        )


def _write(progress: Any, line: str) -> None:
    if progress is not None:
        progress.write(line)
    else:
        print(line, flush=True)


class LogWindow:
    """The steps since the last log line: their summed loss and skipped steps (on device until
    logged), the time they took, the time spent waiting for data, and the run's rate for the ETA."""

    def __init__(self, *, steps_per_dispatch: int, batch_size: int, num_steps: int, step: int):
        self.k, self.batch_size, self.num_steps = steps_per_dispatch, batch_size, num_steps
        self.run_start, self.run_start_step = time.perf_counter(), step
        self.last_steps = 0  # optimizer steps in the window last flushed
        self._reset()

    def _reset(self) -> None:
        self.loss, self.skipped, self.dispatches, self.data_wait = 0.0, 0.0, 0, 0.0
        self.start = time.perf_counter()

    def add(self, metrics: dict, data_wait: float) -> None:
        """Count one dispatch (k optimizer steps); `metrics` are means over its steps."""
        self.loss = self.loss + metrics["loss"]
        self.skipped = self.skipped + metrics["skipped"] * self.k
        self.dispatches += 1
        self.data_wait += data_wait

    def flush(self, step: int, metrics: dict, *, data_skipped: int = 0) -> dict[str, float]:
        """Fetch the window's values (the last dispatch's for the other metrics) and start a new window."""
        elapsed = time.perf_counter() - self.start
        steps = self.dispatches * self.k
        values = {k: float(v) for k, v in metrics.items()}
        values["loss"] = float(self.loss) / self.dispatches
        values["skipped"] = round(float(self.skipped))  # steps skipped in the window (nan_policy="skip")
        values["steps_per_sec"] = steps / elapsed
        values["images_per_sec"] = values["steps_per_sec"] * self.batch_size
        values["data_wait_fraction"] = self.data_wait / elapsed
        if data_skipped:
            values["data_skipped"] = data_skipped
        self.last_steps = steps
        self._reset()
        return values

    def line(self, step: int, values: dict[str, float]) -> str:
        """The console line of a log step."""
        rate = (step - self.run_start_step) / max(time.perf_counter() - self.run_start, 1e-9)
        eta = format_duration((self.num_steps - step) / max(rate, 1e-9))
        skipped = f" | skipped {values['skipped']:.0f}" if values.get("skipped") else ""
        return (f"step {step}/{self.num_steps} | loss {values['loss']:.4f} | {values['steps_per_sec']:.2f} steps/s | "
                f"{values['images_per_sec']:.0f} img/s | data wait {100 * values['data_wait_fraction']:.1f}%{skipped} | "
                f"ETA {eta}")

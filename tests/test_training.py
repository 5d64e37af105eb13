"""The training spine end to end, through the `diffax` command in subprocesses.

Each run is a tiny MLP on 2-D data; the device count is fixed when a process
starts, so 1 and 8 simulated devices run in separate processes.
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from runs import assert_same_state, checkpoint_steps, final_state, losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24


def toy_args(workdir, *extra):
    return [
        "train", "--config", "configs/toy2d.py", "--workdir", str(workdir),
        f"--config.training.num_steps={STEPS}", "--config.training.batch_size=64",
        "--config.training.log_every=2", "--config.training.checkpoint_every=8",
        "--config.training.sample_every=0", "--config.training.progress_bar=False",
        "--config.model.hidden=32", "--config.model.layers=2",
        "--config.sampling.steps=4", "--config.sampling.num_samples=64", "--config.sampling.batch_size=64",
        *extra,
    ]


def run_diffax(args, devices=1, env=None, check=True):
    environ = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    environ.update(env or {})
    r = subprocess.run([sys.executable, "-m", "diffax", *args], cwd=ROOT, env=environ,
                       capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"diffax {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run on one device."""
    workdir = tmp_path_factory.mktemp("reference")
    run_diffax(toy_args(workdir))
    return workdir


def test_run_leaves_everything_in_the_workdir(reference):
    names = set(os.listdir(reference))
    assert {"config.json", "metrics.jsonl", "checkpoints", "tb", "samples"} <= names
    assert sorted(int(s) for s in os.listdir(reference / "checkpoints") if s.isdigit()) == [8, 16, 24]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(reference / "tb"))
    assert os.path.exists(reference / "samples" / f"step_{STEPS:08d}.png")
    history = losses(reference)
    assert sorted(history) == list(range(2, STEPS + 1, 2))
    assert all(np.isfinite(v) for v in history.values())


@pytest.mark.slow  # a second training run on 8 simulated devices: ~23 s (test_parallel keeps the 8-device forward)
def test_eight_devices_give_the_same_losses(reference, tmp_path):
    run_diffax(toy_args(tmp_path), devices=8)
    one, eight = losses(reference), losses(tmp_path)
    assert one.keys() == eight.keys()
    np.testing.assert_allclose([eight[k] for k in sorted(one)], [one[k] for k in sorted(one)], rtol=2e-4)


def test_several_steps_per_dispatch_give_the_same_losses(reference, tmp_path):
    run_diffax(toy_args(tmp_path, "--config.training.steps_per_dispatch=2"))
    one, two = losses(reference), losses(tmp_path)
    np.testing.assert_allclose([two[k] for k in sorted(one)], [one[k] for k in sorted(one)], rtol=2e-4)


def start_diffax(args, env=None):
    """`diffax` in the background, its stdout and stderr merged, for tests that signal it from outside."""
    environ = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    environ.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "diffax", *args], cwd=ROOT, env=environ, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def signal_at_line(proc, text, signum):
    """Send `signum` once the process prints a line containing `text`; returns (return code, output)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            proc.send_signal(signum)
            break
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, "".join(seen) + out


def signal_when(proc, ready, signum, timeout=300):
    """Send `signum` as soon as `ready()` is true (polled every millisecond); returns (return code, output)."""
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def saving(workdir, step):
    """True once Orbax has begun writing the checkpoint of `step` (its temporary folder or the final one)."""
    folder = os.path.join(workdir, "checkpoints")
    return os.path.isdir(folder) and any(n == str(step) or n.startswith(f"{step}.") for n in os.listdir(folder))


# Killed from outside as soon as the checkpoint of step 16 starts to be written. Orbax finishes one
# save before starting the next, so checkpoint 8 is complete.
def test_sigkill_during_a_save_then_resume_reproduces_the_run(reference, tmp_path):
    code, out = signal_when(start_diffax(toy_args(tmp_path)), lambda: saving(tmp_path, 16), signal.SIGKILL)
    assert code == -9, out
    steps = checkpoint_steps(tmp_path)
    assert 8 in steps and steps[-1] <= 16
    run_diffax(toy_args(tmp_path))
    np.testing.assert_allclose([losses(tmp_path)[k] for k in sorted(losses(reference))],
                               [losses(reference)[k] for k in sorted(losses(reference))], rtol=1e-6)
    assert_same_state(final_state(tmp_path), final_state(reference))


# SIGTERM after the log line of step 8, while the grid of step 8 compiles: the trainer finishes the
# step it is in (8, or 9 if the signal lands after the check of step 8), saves it with the data
# position, waits for the save and exits 143 saying how to resume.
@pytest.mark.slow  # ~26 s; SIGKILL resume and the preemption unit tests stay in the default suite
def test_sigterm_saves_at_the_step_reached_and_resumes_bit_identical(reference, tmp_path):
    code, out = signal_at_line(start_diffax(toy_args(tmp_path, "--config.training.sample_every=8")),
                               f"step 8/{STEPS}", signal.SIGTERM)
    assert code == 143, out
    stopped = int(re.search(r"stopped by SIGTERM at step (\d+)", out).group(1))
    assert stopped in (8, 9) and "Run the same command again to resume" in out
    assert checkpoint_steps(tmp_path)[-1] == stopped
    assert os.path.isdir(tmp_path / "checkpoints" / str(stopped) / "data")
    from diffax import configuration
    from diffax.training import trainer

    trainer.train(configuration.load(str(tmp_path / "config.json")), str(tmp_path))  # `diffax train --workdir`
    assert_same_state(final_state(tmp_path), final_state(reference))
    # The losses of every log window (k - 2, k] the stop did not cut.
    for k in sorted(losses(reference)):
        if not k - 2 < stopped < k:
            assert losses(tmp_path)[k] == losses(reference)[k], k


@pytest.mark.slow  # two CLI runs; the refusal itself is checked in-process by test_reliability.py
def test_a_different_config_is_refused_unless_forced(reference, tmp_path):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    r = run_diffax(toy_args(workdir, "--config.optimizer.learning_rate=0.1"), check=False)
    assert r.returncode == 1
    assert "optimizer.learning_rate" in r.stderr and "--force" in r.stderr
    # Training longer is a resume, not a different run.
    run_diffax(toy_args(workdir, f"--config.training.num_steps={STEPS + 8}"))
    assert max(losses(workdir)) == STEPS + 8
    # Forced: the new config is recorded and the old one kept (nothing left to train, so nothing compiles).
    run_diffax(toy_args(workdir, "--config.optimizer.learning_rate=0.1", f"--config.training.num_steps={STEPS + 8}", "--force"))
    kept = [f for f in os.listdir(workdir) if f.startswith("config.") and f != "config.json"]
    assert len(kept) == 1
    assert json.load(open(workdir / kept[0]))["optimizer"]["learning_rate"] != 0.1
    assert json.load(open(workdir / "config.json"))["optimizer"]["learning_rate"] == 0.1


def test_unwritable_workdir_is_reported_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = run_diffax(toy_args(blocker / "run"), check=False)
    assert r.returncode == 1 and "not writable" in r.stderr and str(blocker / "run") in r.stderr


@pytest.mark.slow  # CLI sampling of the toy run; `diffax sample` is also run by test_posthoc_ema_run.py and test_sd_sampling.py
def test_sample_command_uses_the_latest_checkpoint(reference, tmp_path):
    noise = np.random.default_rng(0).standard_normal((50, 2)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    outputs = []
    for seed in ("1", "2"):
        r = run_diffax(["sample", "--workdir", str(reference), "--output", str(tmp_path / seed), "--num_samples", "50",
                        "--sampler", "ddim", "--steps", "5", "--noise", str(tmp_path / "noise.npy"), "--seed", seed])
        assert "50 samples from step 24 (ddim, 5 steps)" in r.stdout
        assert os.path.exists(tmp_path / seed / "grid.png")
        outputs.append(np.load(tmp_path / seed / "samples.npz")["images"])
    assert outputs[0].shape == (50, 2) and np.isfinite(outputs[0]).all()
    labels = np.load(tmp_path / "1" / "samples.npz")["labels"]  # no allow_pickle needed: unconditional -> empty
    assert labels.dtype == np.int32 and labels.shape == (0,)
    # DDIM with eta = 0 is deterministic given the noise, whatever the seed.
    np.testing.assert_array_equal(outputs[0], outputs[1])


def nan_args(workdir, data_path, *extra):
    """A tiny UNet on 64 8x8 images whose image 40 is NaN: with batch 8 and no shuffling, step 5 meets it."""
    return [
        "train", "--config", "configs/digits.py", "--workdir", str(workdir),
        f"--config.data.name=npz:{data_path}", "--config.data.image_size=8", "--config.data.shuffle=False",
        "--config.model.channels=8", "--config.model.channel_mult=(1,)", "--config.model.attention_resolutions=()",
        "--config.model.norm_groups=4", "--config.training.batch_size=8", "--config.training.num_steps=8",
        "--config.training.log_every=1", "--config.training.checkpoint_every=2", "--config.training.sample_every=0",
        "--config.training.progress_bar=False", "--config.sampling.num_samples=8", "--config.sampling.steps=2",
        *extra,
    ]


@pytest.mark.slow  # ~22 s: a run poisoned mid-way and its restart
def test_nan_loss_stops_training_and_keeps_the_last_checkpoint(tmp_path):
    images = np.random.default_rng(0).uniform(size=(64, 8, 8, 1)).astype(np.float32)
    images[40] = np.nan
    np.savez(tmp_path / "data.npz", image=images)
    r = run_diffax(nan_args(tmp_path / "stop", tmp_path / "data.npz"), check=False)
    assert r.returncode == 1
    assert "NaN or Inf at step 5" in r.stderr and "nan_policy='skip'" in r.stderr
    assert sorted(int(s) for s in os.listdir(tmp_path / "stop" / "checkpoints") if s.isdigit()) == [2, 4]
    from diffax.training import inference

    run = inference.load(str(tmp_path / "stop"))
    assert run.step == 4 and all(np.isfinite(x).all() for x in __import__("jax").tree.leaves(run.params))


@pytest.mark.slow  # a CLI run; skipped steps are counted in-process by test_reliability.py too
def test_nan_loss_with_skip_skips_and_counts_the_step(tmp_path):
    images = np.random.default_rng(0).uniform(size=(64, 8, 8, 1)).astype(np.float32)
    images[40] = np.nan
    np.savez(tmp_path / "data.npz", image=images)
    # skip: step 5 (the update to step 6) is skipped and counted in the log window (5, 6].
    run_diffax(nan_args(tmp_path / "skip", tmp_path / "data.npz", "--config.training.nan_policy=skip",
                        "--config.training.log_every=2"))
    with open(tmp_path / "skip" / "metrics.jsonl") as f:
        rows = {row["step"]: row for row in map(json.loads, f)}
    assert {s: row["skipped"] for s, row in rows.items()} == {2: 0, 4: 0, 6: 1, 8: 0}
    assert all(np.isfinite(row["loss"]) for s, row in rows.items() if s != 6)


@pytest.mark.slow  # about 15 runs of the toy model
def test_ten_random_kills_then_resume_reproduce_the_run(reference, tmp_path):
    """SIGKILL at random moments between the start of training and its end (compile, steps, saves,
    sample grids), resuming each time; every round that reaches the end is bit-identical to the
    uninterrupted run. Rounds start over in a new workdir until 10 kills have landed."""
    rng = random.Random(13)
    args = ["--config.training.sample_every=8"]
    start = time.time()
    code, out = signal_at_line(start_diffax(toy_args(tmp_path / "timing", *args)), "no such line", signal.SIGKILL)
    assert code == 0, out
    span = time.time() - start  # a whole run: a kill at uniform(0, span) lands anywhere in it
    kills, rounds, attempts = 0, 0, 0
    workdir = tmp_path / "round0"
    while kills < 10:
        attempts += 1
        assert attempts < 60, f"only {kills} kills landed in {attempts} runs"
        proc = start_diffax(toy_args(workdir, *args))
        try:
            proc.wait(rng.uniform(0, span))
        except subprocess.TimeoutExpired:
            proc.kill()
        out, _ = proc.communicate(timeout=300)
        if proc.returncode == -9:
            kills += 1
            continue
        assert proc.returncode == 0, out
        assert_same_state(final_state(workdir), final_state(reference))
        rounds += 1
        workdir = tmp_path / f"round{rounds}"
    code, out = signal_at_line(start_diffax(toy_args(workdir, *args)), "no such line", signal.SIGKILL)
    assert code == 0, out
    assert_same_state(final_state(workdir), final_state(reference))

"""The training spine end to end, through the `diffax` command in subprocesses.

Each run is a tiny MLP on 2-D data; the device count is fixed when a process
starts, so 1 and 8 simulated devices run in separate processes.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from runs import losses

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


def test_eight_devices_give_the_same_losses(reference, tmp_path):
    run_diffax(toy_args(tmp_path), devices=8)
    one, eight = losses(reference), losses(tmp_path)
    assert one.keys() == eight.keys()
    np.testing.assert_allclose([eight[k] for k in sorted(one)], [one[k] for k in sorted(one)], rtol=2e-4)


def test_several_steps_per_dispatch_give_the_same_losses(reference, tmp_path):
    run_diffax(toy_args(tmp_path, "--config.training.steps_per_dispatch=2"))
    one, two = losses(reference), losses(tmp_path)
    np.testing.assert_allclose([two[k] for k in sorted(one)], [one[k] for k in sorted(one)], rtol=2e-4)


# Killed during the asynchronous save of checkpoint 16, and (slow) between checkpoints. Orbax
# finishes one save before starting the next, so checkpoint 8 is complete in both cases.
@pytest.mark.parametrize("kill_at", [16, pytest.param(20, marks=pytest.mark.slow)])
def test_sigkill_then_resume_reproduces_the_losses(reference, tmp_path, kill_at):
    killed = run_diffax(toy_args(tmp_path), env={"DIFFAX_FAULT_KILL_AT_STEP": str(kill_at)}, check=False)
    assert killed.returncode == -9, killed.stderr
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    assert 8 in steps and steps[-1] <= kill_at
    run_diffax(toy_args(tmp_path))
    np.testing.assert_allclose(
        [losses(tmp_path)[k] for k in sorted(losses(reference))],
        [losses(reference)[k] for k in sorted(losses(reference))],
        rtol=1e-6,
    )


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

    run_diffax(nan_args(tmp_path / "skip", tmp_path / "data.npz", "--config.training.nan_policy=skip"))
    with open(tmp_path / "skip" / "metrics.jsonl") as f:
        rows = {row["step"]: row for row in map(json.loads, f)}
    assert [s for s, row in rows.items() if row["skipped"]] == [6]  # logged after step 5 ran, i.e. at step 6
    assert all(np.isfinite(row["loss"]) for s, row in rows.items() if s != 6)

"""Trouble a run meets (issue 13), in-process: validation before writing, damaged checkpoints, the
workdir lock, skipped steps, and the one `diffax: error:` format of the command line.

One tiny toy2d run is trained here once (module fixture); each test works on a copy of it.
Signals and kills, which need a separate process, are in test_training.py.
"""
import json
import os
import shutil
import sys

import numpy as np
import pytest

from runs import assert_same_state, checkpoint_steps, final_state, losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/

from configs import toy2d  # noqa: E402
from diffax import cli, configuration  # noqa: E402
from diffax.errors import UserError  # noqa: E402
from diffax.training import inference, trainer  # noqa: E402
from diffax.training import workdir as workdir_lib  # noqa: E402

STEPS = 24


def toy_config(**fields):
    """The toy run of test_training.py (tiny MLP, 24 steps, checkpoints at 8, 16, 24), with `fields` set."""
    config = toy2d.get_config()
    overrides = {
        "training.num_steps": STEPS, "training.batch_size": 64, "training.log_every": 2,
        "training.checkpoint_every": 8, "training.sample_every": 0, "training.progress_bar": False,
        "model.hidden": 32, "model.layers": 2, "sampling.steps": 4, "sampling.num_samples": 64,
        "sampling.batch_size": 64, **fields,
    }
    config = configuration.apply_overrides(config, [f"--config.{k}={v}" for k, v in overrides.items()])
    return config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference") / "run"
    trainer.train(toy_config(), str(workdir))
    return workdir


@pytest.fixture
def run(reference, tmp_path):
    """A copy of the reference run to damage or refuse things in."""
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    return workdir


def config_json(workdir):
    return open(os.path.join(workdir, "config.json")).read()


# ------------------------------------------------------------------ validate before writing anything
def test_a_typo_on_a_new_workdir_leaves_nothing_behind(tmp_path):
    workdir = tmp_path / "new"
    with pytest.raises(ValueError, match=r"config.diffusion.schedule.*Did you mean 'linear'"):
        trainer.train(toy_config(**{"diffusion.schedule": "linaer"}), str(workdir))
    assert not workdir.exists()  # so the corrected command is not refused as "a different config"


def test_an_unknown_sampler_is_refused_before_step_1(run):
    before = config_json(run)
    with pytest.raises(ValueError, match=r"config.sampling.sampler.*Valid names"):
        trainer.train(toy_config(**{"sampling.sampler": "ddmi", "training.num_steps": 32}), str(run))
    assert config_json(run) == before and checkpoint_steps(run) == [8, 16, 24]


def test_force_with_another_model_names_the_first_mismatch_and_keeps_the_run_usable(run):
    before = config_json(run)
    with pytest.raises(UserError, match=r"does not fit this config: ema\.net\..* is \(32,?.*\) float32 in the "
                                        r"checkpoint but \(16,?.*\) float32 in this config"):
        trainer.train(toy_config(**{"model.hidden": 16}), str(run), force=True)
    assert config_json(run) == before
    assert not [f for f in os.listdir(run) if f.startswith("config.") and f != "config.json"]
    assert inference.load(str(run)).step == 24  # `diffax sample --workdir` still works


def test_a_num_workers_change_is_refused_before_writing_and_says_how_to_resume(run):
    before = config_json(run)
    with pytest.raises(UserError, match=r"(?s)data.num_workers: 0 -> 1.*--force"):
        trainer.train(toy_config(**{"data.num_workers": 1}), str(run))
    with pytest.raises(UserError, match=r"Set config.data.num_workers back to 0"):
        trainer.train(toy_config(**{"data.num_workers": 1}), str(run), force=True)
    assert config_json(run) == before


def test_a_second_trainer_on_the_workdir_is_refused_naming_the_first(run):
    with workdir_lib.lock(str(run)):
        with pytest.raises(UserError, match=rf"Another diffax train is using the workdir .*process {os.getpid()} on "):
            trainer.train(toy_config(), str(run))
    assert checkpoint_steps(run) == [8, 16, 24]


# ------------------------------------------------------------------ damaged checkpoints
def truncate_data_files(workdir, step):
    folder = os.path.join(workdir, "checkpoints", str(step), "state", "ocdbt.process_0", "d")
    for name in os.listdir(folder):
        os.truncate(os.path.join(folder, name), 10)


DAMAGE = {
    "truncated data": truncate_data_files,
    "no _METADATA": lambda w, s: os.remove(os.path.join(w, "checkpoints", str(s), "state", "_METADATA")),
    "no state/": lambda w, s: shutil.rmtree(os.path.join(w, "checkpoints", str(s), "state")),
}


@pytest.mark.parametrize("damage", [d if d != "no state/" else pytest.param(d, marks=pytest.mark.slow) for d in DAMAGE])
def test_sample_falls_back_past_a_damaged_checkpoint_and_names_it(run, damage, capsys):
    DAMAGE[damage](str(run), 24)
    assert inference.load(str(run)).step == 16
    assert "The checkpoint at step 24" in capsys.readouterr().err
    assert checkpoint_steps(run) == [8, 16, 24]  # a reader leaves the folder alone
    with pytest.raises(UserError, match=r"checkpoint at step 24 .* is damaged"):
        inference.load(str(run), step=24)


def test_training_resumes_past_a_damaged_checkpoint_bit_identical(run, reference, capsys):
    truncate_data_files(str(run), 24)
    DAMAGE["no _METADATA"](str(run), 16)
    trainer.train(toy_config(), str(run))  # falls back to 8 and trains 8 -> 24 again
    err = capsys.readouterr().err
    assert "step 24" in err and "step 16" in err and "_METADATA" in err
    assert sorted(n for n in os.listdir(run / "checkpoints") if "damaged" in n) == ["16.damaged", "24.damaged"]
    assert checkpoint_steps(run) == [8, 16, 24]
    assert_same_state(final_state(run), final_state(reference))
    assert losses(run) == pytest.approx(losses(reference), rel=1e-6)


def test_when_no_checkpoint_restores_the_run_stops_once_then_starts_over(run, reference, capsys):
    for step in (8, 16, 24):
        truncate_data_files(str(run), step)
    with pytest.raises(UserError, match=r"None of the checkpoints .* \(steps \[8, 16, 24\]\) could be restored"):
        trainer.train(toy_config(), str(run))
    assert checkpoint_steps(run) == []  # all set aside, none deleted
    assert len([n for n in os.listdir(run / "checkpoints") if "damaged" in n]) == 3
    trainer.train(toy_config(), str(run))  # asked again: trains from step 0
    assert_same_state(final_state(run), final_state(reference))


def test_a_checkpoint_of_an_older_diffax_restores(run, reference, tmp_path):
    """A TrainState field added since a checkpoint was written (posthoc_ema) is absent from it."""
    import dataclasses

    import orbax.checkpoint as ocp

    from diffax import parallel
    from diffax.training import checkpoint
    from diffax.training.build import build
    from diffax.training.step import state_layout

    config = toy_config()
    _, abstract, shardings = state_layout(build(config), config, parallel.make_mesh(config.mesh))
    ckpt = checkpoint.Checkpointer(str(run), 10, async_save=False)
    state = ckpt.restore(24, checkpoint.abstract_like(abstract, shardings))
    ckpt.close()
    old = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "posthoc_ema"}
    shutil.rmtree(run / "checkpoints" / "24" / "state")
    ocp.PyTreeCheckpointer().save(str(run / "checkpoints" / "24" / "state"), old)
    assert "posthoc_ema" not in os.listdir(run / "checkpoints" / "24" / "state")
    assert_same_state(final_state(run), final_state(reference))
    assert inference.load(str(run)).step == 24


def test_a_restart_writes_the_missing_final_grid(run):
    os.remove(run / "samples" / f"step_{STEPS:08d}.png")  # killed between the last checkpoint and the grid
    trainer.train(toy_config(), str(run))
    assert os.path.exists(run / "samples" / f"step_{STEPS:08d}.png")
    assert checkpoint_steps(run) == [8, 16, 24]


# ------------------------------------------------------------------ non-finite steps

def test_nan_before_the_first_checkpoint_says_there_is_none(tmp_path):
    import jax.numpy as jnp
    import types

    from diffax.training import checkpoint

    state = types.SimpleNamespace(first_bad_step=jnp.int32(1))
    ckpt = checkpoint.Checkpointer(str(tmp_path), 1)
    with pytest.raises(trainer.TrainingError, match=r"NaN or Inf at step 1 .* no checkpoint was written before it"):
        trainer._raise_if_bad(state, toy_config(), ckpt)
    ckpt.close()


def test_skip_counts_skipped_steps_and_stops_when_a_whole_log_window_was_skipped(tmp_path):
    workdir = tmp_path / "w"
    # A learning rate of 1e30 makes the first update blow the weights up: every later step is non-finite.
    diverge = {"optimizer.learning_rate": 1e30, "optimizer.warmup_steps": 0, "optimizer.grad_clip": 0.0,
               "training.nan_policy": "skip"}
    with pytest.raises(trainer.TrainingError, match=r"Every step of the log window ending at step 4 \(2 steps\)"):
        trainer.train(toy_config(**diverge), str(workdir))
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [(r["step"], r["skipped"]) for r in rows] == [(2, 1), (4, 2)]


# ------------------------------------------------------------------ one error format
def diffax(*args):
    """`diffax ARGS` in this process: its exit code. A bug's exception propagates."""
    argv, saved = ["diffax", *map(str, args)], sys.argv
    sys.argv = argv  # config_flags reads --config.x=y overrides from sys.argv
    try:
        cli.run(argv)
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = saved
    return 0


def test_missing_config_file_and_config_without_get_config(tmp_path, capsys):
    assert diffax("train", "--config", tmp_path / "nope.py", "--workdir", tmp_path / "w") == 2
    assert f"no such file {str(tmp_path / 'nope.py')!r}" in capsys.readouterr().err
    (tmp_path / "c.py").write_text("x = 1\n")
    assert diffax("train", "--config", tmp_path / "c.py", "--workdir", tmp_path / "w") == 2
    assert f"{tmp_path / 'c.py'} has no get_config() function" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["wrong key", pytest.param("truncated", marks=pytest.mark.slow)])
def test_a_bad_npz_is_one_error_naming_the_file(tmp_path, capsys, content):
    path = tmp_path / "data.npz"
    np.savez(path, pixels=np.zeros((8, 8, 8, 1), np.uint8))
    if content == "truncated":
        os.truncate(path, 100)
    code = diffax("train", "--config", os.path.join(ROOT, "configs", "digits.py"), "--workdir", tmp_path / "w", f"--config.data.name=npz:{path}")
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("diffax: error: ") and str(path) in err and "Traceback" not in err
    assert ("has no array 'image'" in err) if content == "wrong key" else ("cannot be read as a .npz file" in err)
    assert not (tmp_path / "w").exists()


def test_sample_checks_noise_and_output_before_drawing(run, tmp_path, capsys):
    (tmp_path / "noise.npy").write_text("not numbers\n")
    assert diffax("sample", "--workdir", run, "--output", tmp_path / "out", "--noise", tmp_path / "noise.npy") == 1
    assert "is not a .npy array file" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert diffax("sample", "--workdir", run, "--output", tmp_path / "file" / "out") == 1
    err = capsys.readouterr().err
    assert "is not writable" in err and "--output" in err


def test_eval_on_2d_data_and_on_an_unwritable_workdir(run, capsys):
    assert diffax("eval", "--workdir", run) == 1
    err = capsys.readouterr().err
    assert "gives points of shape (2,)" in err and "Inception weights" not in err
    (run / "eval").write_text("")  # eval/ cannot be created (as root, permissions would not stop the write)
    assert diffax("eval", "--workdir", run, "--config.data.name=digits") == 1
    assert "is not writable" in capsys.readouterr().err


def test_debug_shows_the_traceback_and_bugs_keep_theirs(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="config.diffusion.schedule"):
        diffax("train", "--config", os.path.join(ROOT, "configs", "toy2d.py"), "--workdir", tmp_path / "w",
               "--config.diffusion.schedule=linaer", "--debug")

    def bug(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(trainer, "train", bug)
    with pytest.raises(KeyError, match="a bug"):
        diffax("train", "--config", os.path.join(ROOT, "configs", "toy2d.py"), "--workdir", tmp_path / "w")


def test_a_full_disk_is_reported_before_the_save_and_named(tmp_path, monkeypatch):
    import collections
    import errno

    import jax.numpy as jnp

    from diffax.training import checkpoint

    ckpt = checkpoint.Checkpointer(str(tmp_path), 1)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 100, 100))
    with pytest.raises(UserError, match=r"No space for the checkpoint of step 3 in .*checkpoints: it needs about"):
        ckpt.save(3, {"w": jnp.zeros(1000)})
    assert checkpoint.all_steps(str(tmp_path)) == []
    # An error from Orbax's background thread, caused by a full disk, names the folder and the reason.
    with pytest.raises(UserError, match=r"step 5 or the one before.*no space left on the device"):
        with ckpt._disk_errors(5):
            try:
                raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "checkpoints" / "5"))
            except OSError as e:
                raise RuntimeError("async save failed") from e
    ckpt.close()


@pytest.mark.parametrize("damage", ["config.json", "safetensors"])
def test_import_diffusers_names_a_damaged_file(tmp_path, capsys, damage):
    src = tmp_path / "unet"
    shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "diffusers_unet", "ddpm"), src)
    name = "config.json" if damage == "config.json" else "diffusion_pytorch_model.safetensors"
    os.truncate(src / name, os.path.getsize(src / name) // 2)
    assert diffax("import-diffusers", "--src", src, "--workdir", tmp_path / "w") == 1
    err = capsys.readouterr().err
    assert str(src / name) in err and "Traceback" not in err and "again" in err
    assert not (tmp_path / "w" / "config.json").exists()


def test_the_first_signal_asks_to_stop_and_the_second_exits_at_once(tmp_path):
    import subprocess
    import textwrap

    script = tmp_path / "signals.py"
    script.write_text(textwrap.dedent("""
        import os, signal, time
        from diffax.training.preemption import StopOnSignal
        with StopOnSignal() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            print("stop requested:", stop.requested(), stop.exit_code, flush=True)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
            print("still running")
    """))
    r = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
    assert r.stdout.strip() == "stop requested: True 143" and r.returncode == -2, (r.stdout, r.stderr)
    assert "send it again to exit at once" in r.stderr

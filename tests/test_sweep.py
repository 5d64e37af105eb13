"""`diffax sweep`: sweep helpers, trial names and checks, commands (local, SLURM, TPU VM), running
through submitit with status files and resuming, the report, and one tiny real toy2d trial.

Most tests run a fake `diffax train` (a small script given by --train_command) so they take
seconds; one test trains a real 4-step toy2d model through the sweep.
"""
import csv
import json
import os
import shlex
import subprocess
import sys
from unittest import mock

import pytest
from absl import flags

from diffax import sweep as sw
from diffax import sweep_command as cmd
from diffax import sweep_launch, sweep_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWEEP_CONFIG = """
from configs import toy2d
from diffax.sweep import chain, fixed, product, sweep, zip_axes


def get_config(arg="8gaussians"):
    return toy2d.get_config(arg)


def get_sweep(arg=None):
    {body}
"""

# A stand-in for `diffax train`: logs three losses (learning_rate * 1000 / step), writes an eval result,
# records its environment, fails with code 3 for prediction=v unless FAKE_OK is set, and with
# FAKE_BARRIER=N waits until N trials have started (so trials run one at a time would time out).
FAKE_TRAIN = r"""
import json, os, sys, time
args = sys.argv[1:]
workdir = args[args.index("--workdir") + 1]
over = dict(a[len("--config."):].split("=", 1) for a in args if a.startswith("--config."))
os.makedirs(workdir, exist_ok=True)
with open(os.path.join(workdir, "fake_env.json"), "w") as f:
    json.dump({"argv": sys.argv, "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
               "affinity": sorted(os.sched_getaffinity(0))}, f)
barrier = int(os.environ.get("FAKE_BARRIER", "0"))
if barrier:
    shared = os.path.dirname(workdir)
    open(os.path.join(shared, "started_" + os.path.basename(workdir)), "w").close()
    deadline = time.time() + 20
    while len([f for f in os.listdir(shared) if f.startswith("started_")]) < barrier:
        if time.time() > deadline:
            sys.exit("barrier timed out: trials did not run at once")
        time.sleep(0.05)
print("fake training", over, flush=True)
if over.get("diffusion.prediction") == "v" and not os.environ.get("FAKE_OK"):
    print("simulated failure", file=sys.stderr)
    sys.exit(3)
lr = float(over.get("optimizer.learning_rate", "0.003"))
with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    for step in (1, 2, 3):
        f.write(json.dumps({"step": step, "loss": lr * 1000 / step}) + "\n")
os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
with open(os.path.join(workdir, "eval", "results.jsonl"), "w") as f:
    f.write(json.dumps({"step": 2, "fid": 50.0, "kid": 0.1}) + "\n")
    f.write(json.dumps({"step": 3, "fid": 40.0 + lr, "kid": 0.05}) + "\n")
"""


def write_config(tmp_path, body, name="sweep_config.py"):
    path = tmp_path / name
    path.write_text(SWEEP_CONFIG.format(body=body))
    return str(path)


def parse(*args):
    """FlagValues of `diffax sweep ARGS`, parsed as the CLI does (config_flags reads overrides from sys.argv)."""
    fv = flags.FlagValues()
    cmd.define_flags(fv)
    argv = ["diffax sweep", *args]
    with mock.patch.object(sys, "argv", argv):
        fv(argv)
    return fv


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}"


def statuses(workdir):
    with open(os.path.join(workdir, sweep_launch.SWEEP_FILE)) as f:
        names = [t["name"] for t in json.load(f)["trials"]]
    return {n: sweep_launch.read_status(os.path.join(workdir, n)) for n in names}


# ----------------------------------------------------------------------------- helpers and names


def test_helpers_build_the_trials():
    a = sw.sweep("config.diffusion.schedule", ["linear", "cosine"])
    b = sw.sweep("diffusion.prediction", ["eps", "v"])
    assert a == [{"diffusion.schedule": "linear"}, {"diffusion.schedule": "cosine"}]
    assert sw.product(a, b) == [
        {"diffusion.schedule": "linear", "diffusion.prediction": "eps"},
        {"diffusion.schedule": "linear", "diffusion.prediction": "v"},
        {"diffusion.schedule": "cosine", "diffusion.prediction": "eps"},
        {"diffusion.schedule": "cosine", "diffusion.prediction": "v"},
    ]
    assert sw.zip_axes(a, b) == [{"diffusion.schedule": "linear", "diffusion.prediction": "eps"},
                            {"diffusion.schedule": "cosine", "diffusion.prediction": "v"}]
    assert sw.chain(a, b) == a + b
    assert sw.product(a, sw.fixed("config.seed", 3)) == [{"diffusion.schedule": "linear", "seed": 3},
                                                         {"diffusion.schedule": "cosine", "seed": 3}]
    with pytest.raises(ValueError, match="equal length"):
        sw.zip_axes(a, sw.sweep("seed", [1, 2, 3]))
    with pytest.raises(ValueError, match="twice"):
        sw.product(a, sw.fixed("diffusion.schedule", "edm"))
    with pytest.raises(ValueError, match="no values"):
        sw.sweep("seed", [])


def test_trial_names_are_readable_and_unique():
    trials = sw.product(sw.sweep("model.dropout", [0.0, 0.1]), sw.sweep("optimizer.learning_rate", [1e-4]),
                        sw.sweep("data.name", ["toy2d:moons"]), sw.sweep("model.channel_mult", [(1, 2)]))
    names = sw.trial_names(trials)
    assert names[0] == "dropout=0,learning_rate=0.0001,name=toy2d_moons,channel_mult=1-2"
    assert names[1].startswith("dropout=0.1,")
    # Two fields with the same last name keep enough of their path to tell them apart.
    assert sw.trial_names([{"model.name": "mlp", "data.name": "toy2d:moons"}]) == ["model.name=mlp,data.name=toy2d_moons"]
    assert sw.trial_names([{}]) == ["base"]
    with pytest.raises(ValueError, match="same overrides"):
        sw.make_trials([{"seed": 1}, {"seed": 1}])


@pytest.mark.parametrize("body, message", [
    ("return sweep('config.optimizer.learning_rate', ['big'])", r"optimizer.learning_rate is a float but the sweep "
                                                                  r"gives 'big'"),
    ("return sweep('config.training.num_steps', [1.5])", "num_steps is an int"),
    ("return sweep('config.training.progress_bar', [1])", "progress_bar is a bool"),
    ("return sweep('config.model', [1])", "is a section"),
    ("return chain(sweep('seed', [1]), sweep('config.nope.x', [2]))", r"Trial 1 .*config.nope.x is not a config field"),
    ("return 3", "must return a list of dicts"),
])
def test_bad_sweeps_fail_before_anything_starts(tmp_path, fake, body, message):
    config = write_config(tmp_path, body)
    workdir = tmp_path / "w"
    with pytest.raises(ValueError, match=message):
        cmd.main(parse("--config", config, "--workdir", str(workdir), "--train_command", fake))
    assert not workdir.exists()


def test_values_are_coerced_and_survive_the_command_line(tmp_path, capsys):
    config = write_config(tmp_path, "return product(sweep('config.optimizer.learning_rate', [1, 1e-4]), "
                                    "fixed('config.model.channel_mult', [1, 2, 4]), "
                                    "fixed('config.data.name', 'folder:/my data/it\\'s'))")
    cmd.main(parse("--config", config, "--workdir", str(tmp_path / "w"), "--dry_run"))
    lines = [l for l in capsys.readouterr().out.splitlines() if not l.startswith("#")]
    argv = shlex.split(lines[0])
    assert "--config.optimizer.learning_rate=1.0" in argv  # an int where a float goes becomes a float
    assert "--config.model.channel_mult=(1, 2, 4)" in argv
    assert "--config.data.name=folder:/my data/it's" in argv
    # What the trainer parses back is what the sweep resolved.
    fv = flags.FlagValues()
    cmd.define_flags(fv)
    back = ["diffax train"] + argv[argv.index("--config"):]
    with mock.patch.object(sys, "argv", back):
        fv(back)
    assert fv.config.optimizer.learning_rate == 1.0 and fv.config.model.channel_mult == (1, 2, 4)
    assert fv.config.data.name == "folder:/my data/it's"


# ----------------------------------------------------------------------------- commands


def test_dry_run_prints_the_exact_commands_and_writes_nothing(tmp_path, capsys):
    config = write_config(tmp_path, "return product(sweep('config.diffusion.schedule', ['linear', 'cosine']), "
                                    "sweep('config.diffusion.prediction', ['eps', 'v']))")
    workdir = tmp_path / "w"
    cmd.main(parse("--config", config + ":moons", "--workdir", str(workdir), "--dry_run",
                  "--config.training.num_steps=7", "--config.diffusion.schedule=edm"))
    out = capsys.readouterr().out
    commands = [shlex.split(l) for l in out.splitlines() if not l.startswith("#")]
    assert len(commands) == 4
    assert commands[1] == [
        sys.executable, "-m", "diffax", "train", "--config", config + ":moons",
        "--workdir", str(workdir / "schedule=linear,prediction=v"),
        "--config.training.num_steps=7",  # the sweep's own overrides reach every trial ...
        "--config.diffusion.schedule=linear", "--config.diffusion.prediction=v",  # ... except those the trial sets
    ]
    assert "# [4/4] schedule=cosine,prediction=v (pending)" in out
    assert not workdir.exists()


def test_tpu_vm_launcher_runs_each_trial_on_all_workers(tmp_path, capsys):
    config = write_config(tmp_path, "return sweep('config.data.name', ['toy2d:moons', \"folder:/a b/it's\"])")
    cmd.main(parse("--config", config, "--workdir", str(tmp_path / "w"), "--dry_run", "--launcher", "tpu-vm",
                  "--tpu", "my-pod", "--zone", "us-central2-b", "--project", "proj",
                  "--remote_workdir", "/mnt/shared/sweep", "--remote_setup", "cd ~/diffax && source venv/bin/activate"))
    lines = [l for l in capsys.readouterr().out.splitlines() if not l.startswith("#")]
    argv = shlex.split(lines[1])
    assert argv[:12] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod", "--zone", "us-central2-b",
                         "--project", "proj", "--worker=all", "--command"]
    assert len(argv) == 13
    remote = argv[12]
    assert remote.startswith("cd ~/diffax && source venv/bin/activate && python3 -m diffax train ")
    # The remote shell splits the command back into exactly the train arguments.
    assert shlex.split(remote.split(" && ", 2)[2]) == [
        "python3", "-m", "diffax", "train", "--config", config,
        "--workdir", "/mnt/shared/sweep/name=folder__a_b_it_s", "--config.data.name=folder:/a b/it's"]
    with pytest.raises(ValueError, match="--tpu NAME and --zone"):
        cmd.main(parse("--config", config, "--workdir", str(tmp_path / "w"), "--dry_run", "--launcher", "tpu-vm"))


def test_slurm_launcher_submits_one_job_array_through_submitit(tmp_path, fake, capsys, monkeypatch):
    """submitit writes the sbatch script (a fake sbatch records it); the trials' status says submitted."""
    config = write_config(tmp_path, "return sweep('config.seed', [1, 2, 3])")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {tmp_path}/submitted.sh\necho Submitted batch job 4242\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    args = ("--config", config, "--workdir", str(tmp_path / "w"), "--train_command", fake, "--launcher", "slurm",
            "--parallel", "2", "--slurm_partition", "gpu", "--gpus_per_node", "4", "--timeout_min", "90")
    cmd.main(parse(*args, "--dry_run"))
    out = capsys.readouterr().out
    assert "SLURM job array" in out and "slurm_partition=gpu" in out and "gpus_per_node=4" in out
    assert not (tmp_path / "submitted.sh").exists()  # --dry_run submits nothing
    cmd.main(parse(*args))
    script = (tmp_path / "submitted.sh").read_text()
    assert "#SBATCH --array=0-2%2" in script and "#SBATCH --partition=gpu" in script
    assert "#SBATCH --gpus-per-node=4" in script and "#SBATCH --time=90" in script
    status = statuses(tmp_path / "w")
    assert {s["status"] for s in status.values()} == {"submitted"}
    assert sorted(s["job_id"] for s in status.values()) == ["4242_0", "4242_1", "4242_2"]


# ----------------------------------------------------------------------------- running, resuming, report


def test_run_records_status_goes_on_after_a_failure_and_resumes(tmp_path, fake, capsys):
    config = write_config(tmp_path, "return product(sweep('config.diffusion.prediction', ['eps', 'v']), "
                                    "sweep('config.optimizer.learning_rate', [0.001, 0.002]))")
    workdir = tmp_path / "w"
    args = ("--config", config, "--workdir", str(workdir), "--train_command", fake)
    with pytest.raises(RuntimeError, match=r"2 trial\(s\) failed: prediction=v,learning_rate=0.001"):
        cmd.main(parse(*args))
    status = statuses(workdir)
    assert {n: s["status"] for n, s in status.items()} == {
        "prediction=eps,learning_rate=0.001": "done", "prediction=eps,learning_rate=0.002": "done",
        "prediction=v,learning_rate=0.001": "failed", "prediction=v,learning_rate=0.002": "failed"}
    failed = status["prediction=v,learning_rate=0.001"]
    assert failed["returncode"] == 3 and failed["attempts"] == 1
    assert "simulated failure" in open(failed["log"]).read()
    trial = json.load(open(workdir / "prediction=eps,learning_rate=0.002" / sweep_launch.TRIAL_FILE))
    assert trial["overrides"] == {"diffusion.prediction": "eps", "optimizer.learning_rate": 0.002}
    assert trial["config"]["optimizer"]["learning_rate"] == 0.002 and trial["config"]["model"]["name"] == "mlp"

    # Again, with the failure fixed: finished trials are skipped, the failed ones run again.
    with mock.patch.dict(os.environ, {"FAKE_OK": "1"}):
        cmd.main(parse(*args))
    out = capsys.readouterr().out
    assert out.count("done already, skipped") == 2
    status = statuses(workdir)
    assert all(s["status"] == "done" and s["returncode"] == 0 for s in status.values())
    assert status["prediction=eps,learning_rate=0.001"]["attempts"] == 1
    assert status["prediction=v,learning_rate=0.001"]["attempts"] == 2
    log = open(status["prediction=v,learning_rate=0.001"]["log"]).read()
    assert log.count("===== diffax sweep: attempt") == 2  # the log keeps both attempts

    # Training longer changes the command: done trials run again (the trainer resumes them).
    with mock.patch.dict(os.environ, {"FAKE_OK": "1"}):
        cmd.main(parse(*args, "--config.training.num_steps=9", "--only", "prediction=eps,*"))
    status = statuses(workdir)
    assert status["prediction=eps,learning_rate=0.001"]["attempts"] == 2
    assert status["prediction=v,learning_rate=0.001"]["attempts"] == 2  # not selected by --only

    cmd.main(parse(*args, "--report"))
    with open(workdir / "report.csv") as f:
        rows = {r["trial"]: r for r in csv.DictReader(f)}
    row = rows["prediction=v,learning_rate=0.002"]
    assert row["diffusion.prediction"] == "v" and row["optimizer.learning_rate"] == "0.002"
    assert row["status"] == "done" and row["step"] == "3" and float(row["loss"]) == pytest.approx(2.0 / 3)
    assert float(row["fid"]) == pytest.approx(40.002) and row["eval_step"] == "3"
    md = (workdir / "report.md").read_text()
    assert md.splitlines()[0].startswith("| trial | status | diffusion.prediction | optimizer.learning_rate | step | loss")
    assert len(md.splitlines()) == 2 + 4
    assert (workdir / "loss.png").stat().st_size > 1000


def test_parallel_runs_trials_at_once(tmp_path, fake):
    config = write_config(tmp_path, "return sweep('config.seed', [1, 2])")
    workdir = tmp_path / "w"
    with mock.patch.dict(os.environ, {"FAKE_BARRIER": "2"}):  # each trial waits until both have started
        cmd.main(parse("--config", config, "--workdir", str(workdir), "--train_command", fake, "--parallel", "2"))
    assert {s["status"] for s in statuses(workdir).values()} == {"done"}


def test_example_experiment_expands(capsys):
    config = os.path.join(ROOT, "experiments", "cifar10_schedules", "config.py")
    cmd.main(parse("--config", config, "--workdir", "/nonexistent/sweep", "--dry_run"))
    out = capsys.readouterr().out
    names = [l.split("] ")[1].rsplit(" (", 1)[0] for l in out.splitlines() if l.startswith("# [")]
    assert names == [f"schedule={s},prediction={p}" for s in ("linear", "cosine") for p in ("eps", "v", "x0")]
    assert "--config.diffusion.schedule=cosine" in out and "--config.diffusion.prediction=x0" in out


# ----------------------------------------------------------------------------- the command and a real trial


@pytest.mark.slow  # real trials through submitit (20-35 s); the engine's bookkeeping is tested with fakes
def test_a_real_toy2d_trial(tmp_path):
    """One 4-step toy2d trial through `python -m diffax sweep`: it trains exactly what `diffax train` trains."""
    config = write_config(tmp_path, "return sweep('config.diffusion.prediction', ['v'])")
    workdir = tmp_path / "w"
    args = ["--config", config, "--workdir", str(workdir),
            "--config.training.num_steps=4", "--config.training.batch_size=32", "--config.training.log_every=2",
            "--config.training.checkpoint_every=4", "--config.training.progress_bar=False",
            "--config.model.hidden=16", "--config.model.layers=2", "--config.sampling.steps=2",
            "--config.sampling.num_samples=32", "--config.sampling.batch_size=32"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")

    def run(*extra):
        r = subprocess.run([sys.executable, "-m", "diffax", "sweep", *args, *extra], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    run()
    trial = workdir / "prediction=v"
    status = sweep_launch.read_status(trial)
    assert status["status"] == "done", open(trial / sweep_launch.LOG_FILE).read()
    steps, losses = sweep_report.loss_curve(str(trial))
    assert json.load(open(trial / "config.json"))["diffusion"]["prediction"] == "v"  # the trainer saw the override
    # The run a user would type by hand gives the very same losses (so no override was lost or changed).
    direct = tmp_path / "direct"
    by_hand = [sys.executable, "-m", "diffax", "train", *args[:2], "--workdir", str(direct), *args[4:],
               "--config.diffusion.prediction=v"]
    r = subprocess.run(by_hand, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert steps == [2, 4] and (steps, losses) == sweep_report.loss_curve(str(direct))
    run()
    assert sweep_launch.read_status(trial)["attempts"] == 1  # finished: skipped
    run("--report")
    assert "prediction=v" in (workdir / "report.md").read_text()


def test_a_second_sweep_on_the_same_workdir_is_refused(tmp_path, fake):
    config = write_config(tmp_path, "return sweep('config.seed', [1])")
    workdir = tmp_path / "w"
    with sweep_launch.sweep_lock(str(workdir)):
        with pytest.raises(RuntimeError, match="Another diffax sweep is running"):
            cmd.main(parse("--config", config, "--workdir", str(workdir), "--train_command", fake))
    cmd.main(parse("--config", config, "--workdir", str(workdir), "--train_command", fake))
    assert sweep_launch.read_status(workdir / "seed=1")["status"] == "done"

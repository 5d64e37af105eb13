"""Run a sweep's trials on an existing engine: submitit (local processes or SLURM) or gcloud (TPU VM pods).

Each trial is one command, `python -m diffax train --config C --workdir W/<trial>
--config.k=v ...`, run by `run_trial` wherever the engine puts it. `run_trial`
appends the command's output to `W/<trial>/log.txt` and records
`W/<trial>/status.json` (running, then done or failed with the return code), so
the status is right however the trial was launched.

- local: submitit's LocalExecutor, `parallel` trials at a time on this host
  (they share its devices).
- slurm: submitit's SLURM executor, all trials as one job array (at most
  `parallel` running at once); the command returns after submitting.
- tpu-vm: each trial on all workers of a TPU VM pod slice through
  `gcloud compute tpus tpu-vm ssh --worker=all`, one after the other.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import shlex
import subprocess
from typing import Any, Mapping, Sequence

TRIAL_FILE, STATUS_FILE, LOG_FILE, SWEEP_FILE = "trial.json", "status.json", "log.txt", "sweep.json"
LAUNCHERS = ("local", "slurm", "tpu-vm")


@dataclasses.dataclass
class Plan:
    """One trial ready to launch: its name, bookkeeping folder on this machine and exact command."""

    name: str
    folder: str
    argv: list[str]


# ============================================================================ commands


def tpu_vm_command(remote: Sequence[str], *, tpu: str, zone: str, project: str = "", setup: str = "") -> list[str]:
    """`gcloud compute tpus tpu-vm ssh TPU --zone ZONE --worker=all --command "SETUP && REMOTE"`.

    Every worker of the pod slice runs the same command; `jax.distributed.initialize()`
    (called by `diffax train`) finds the other workers by itself on TPU VMs.
    """
    if not tpu or not zone:
        raise ValueError("--launcher=tpu-vm needs --tpu NAME and --zone ZONE.")
    remote_line = shlex.join(remote)
    if setup:
        remote_line = f"{setup} && {remote_line}"
    argv = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, "--zone", zone]
    if project:
        argv += ["--project", project]
    return argv + ["--worker=all", "--command", remote_line]


def shell_line(argv: Sequence[str]) -> str:
    """A command as one copy-pasteable shell line."""
    return shlex.join(argv)


# ============================================================================ status files


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def write_json(path: str, data: Any) -> None:
    """Write `data` as JSON atomically (a reader never sees half a file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


def read_status(trial_dir: str) -> dict[str, Any]:
    """The trial's status.json, or {"status": "pending"} when it has none."""
    try:
        with open(os.path.join(trial_dir, STATUS_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {"status": "pending"}


def write_status(trial_dir: str, **fields: Any) -> None:
    """Update status.json with `fields` (keeping the attempt count and command)."""
    status = {k: v for k, v in read_status(trial_dir).items() if k in ("attempts", "command")}
    status.update(fields, updated=_now())
    write_json(os.path.join(trial_dir, STATUS_FILE), status)


def is_finished(trial_dir: str, command: list[str]) -> bool:
    """Done with this very command (a changed command, e.g. more steps, runs again and resumes)."""
    status = read_status(trial_dir)
    return status.get("status") == "done" and status.get("command") == command


# ============================================================================ the job


def run_trial(argv: list[str], folder: str) -> int:
    """The job of one trial: run `argv`, its output appended to folder/log.txt, and record status.json.

    Runs inside a submitit job (on this host or a SLURM node). Returns the command's return code.
    """
    os.makedirs(folder, exist_ok=True)
    attempts = int(read_status(folder).get("attempts", 0)) + 1
    log_path = os.path.join(folder, LOG_FILE)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n===== diffax sweep: attempt {attempts} at {_now()}\n$ {shell_line(argv)}\n")
        log.flush()
        write_status(folder, status="running", returncode=None, log=log_path, command=argv, attempts=attempts,
                     started=_now())
        code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"), check=False).returncode
    write_status(folder, status="done" if code == 0 else "failed", returncode=code, finished=_now(), log=log_path)
    return code


# ============================================================================ engines


@dataclasses.dataclass
class Engine:
    """Where trials run: a launcher name and its submitit parameters."""

    launcher: str = "local"  # local | slurm | tpu-vm
    parallel: int = 1  # trials at once (local: processes on this host; slurm: the job array's limit)
    timeout_min: int = 7 * 24 * 60  # a trial's time limit (submitit kills it after)
    slurm: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra SLURM parameters, e.g. partition

    def describe(self) -> str:
        """One line saying how the trials will run (printed by --dry_run)."""
        if self.launcher == "slurm":
            params = ", ".join(f"{k}={v}" for k, v in self._slurm_parameters().items())
            return f"one SLURM job array through submitit's SlurmExecutor ({params})"
        if self.launcher == "tpu-vm":
            return "one at a time on all workers of the TPU VM (gcloud, through submitit's LocalExecutor)"
        return f"{self.parallel} at a time on this host through submitit's LocalExecutor"

    def _slurm_parameters(self) -> dict[str, Any]:
        return {"timeout_min": self.timeout_min, "nodes": 1, "tasks_per_node": 1,
                "slurm_array_parallelism": self.parallel, **self.slurm}

    def executor(self, folder: str) -> Any:
        """The submitit executor, its job files and logs under `folder`."""
        # Without this, importing submitit runs logging.config.dictConfig, which closes every existing
        # logging handler (absl's among them) in this process.
        os.environ.setdefault("SUBMITIT_LOG_LEVEL", "NOCONFIG")
        import submitit

        if self.launcher == "slurm":
            executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
            executor.update_parameters(name="diffax-sweep", **self._slurm_parameters())
        else:
            executor = submitit.LocalExecutor(folder=folder)
            executor.update_parameters(timeout_min=self.timeout_min)
        return executor


def launch(plans: Sequence[Plan], engine: Engine, workdir: str) -> dict[str, list[str]]:
    """Run (or, on SLURM, submit) the plans. Returns {"done"|"failed"|"submitted": [trial names]}."""
    if engine.launcher not in LAUNCHERS:
        raise ValueError(f"--launcher={engine.launcher!r}: use one of {', '.join(LAUNCHERS)}.")
    if engine.parallel < 1:
        raise ValueError(f"--parallel={engine.parallel}: must be >= 1.")
    executor = engine.executor(os.path.join(workdir, ".submitit", "%j"))
    if engine.launcher == "slurm":
        with executor.batch():
            jobs = [executor.submit(run_trial, plan.argv, plan.folder) for plan in plans]
        for plan, job in zip(plans, jobs):
            write_status(plan.folder, status="submitted", job_id=job.job_id, command=plan.argv, submitted=_now())
            print(f"{plan.name}: SLURM job {job.job_id}", flush=True)
        return {"submitted": [p.name for p in plans]}

    def run(plan: Plan) -> bool:
        job = executor.submit(run_trial, plan.argv, plan.folder)
        print(f"{plan.name}: running (job {job.job_id}, log {os.path.join(plan.folder, LOG_FILE)})", flush=True)
        try:
            code = job.result()
        except Exception as e:  # submitit's UncompletedJobError / FailedJobError: the job itself died
            code = None
            write_status(plan.folder, status="failed", returncode=None, note=f"{type(e).__name__}: {e}")
        print(f"{plan.name}: " + ("done" if code == 0 else f"FAILED (return code {code}); see "
                                  f"{os.path.join(plan.folder, LOG_FILE)}"), flush=True)
        return code == 0

    workers = 1 if engine.launcher == "tpu-vm" else engine.parallel
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # each thread waits for one job at a time
        ok = list(pool.map(run, plans))
    return {"done": [p.name for p, good in zip(plans, ok) if good],
            "failed": [p.name for p, good in zip(plans, ok) if not good]}


@contextlib.contextmanager
def sweep_lock(workdir: str):
    """Hold W/.sweep.lock while launching, so two sweeps never run the same trial at once."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, ".sweep.lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"Another diffax sweep is running in {workdir}; wait for it or stop it first.") from None
        yield


def write_trial_files(plan: Plan, index: int, overrides: Mapping[str, Any], config: dict | None) -> None:
    """W/<trial>/trial.json (overrides, command, resolved config) and a pending status.json."""
    os.makedirs(plan.folder, exist_ok=True)
    write_json(os.path.join(plan.folder, TRIAL_FILE), {
        "index": index, "name": plan.name, "overrides": dict(overrides), "command": plan.argv, "config": config})
    if not os.path.exists(os.path.join(plan.folder, STATUS_FILE)):
        write_status(plan.folder, status="pending", returncode=None, log=os.path.join(plan.folder, LOG_FILE))

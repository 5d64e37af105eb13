"""`diffax sweep --config C --workdir W`: expand the config's sweep, then dry-run, launch or report it.

Each trial runs as `python -m diffax train --config C --workdir W/<trial name>
--config.k=v ...` (the sweep's own --config.* overrides first, the trial's
last), next to `trial.json` (its overrides, command and resolved config),
`status.json` and `log.txt`. Running the same command again skips the finished
trials and resumes the others (the trainer resumes a workdir from its latest
checkpoint).
"""
from __future__ import annotations

import os
import shlex
import sys
from typing import Any, Mapping, Sequence

from absl import flags
from ml_collections import config_flags

from diffax import configuration, sweep_launch, sweep_report
from diffax.sweep import Trial, expand, override_args, select


# ============================================================================ commands


def train_args(
    config_spec: str, workdir: str, overrides: Mapping[str, Any], base_overrides: Mapping[str, Any]
) -> list[str]:
    """Arguments of `diffax train` for one trial: the sweep's own --config.* overrides, then the trial's."""
    base = {k: v for k, v in base_overrides.items()
            if k not in overrides and not any(o.startswith(k + ".") for o in overrides)}
    return ["--config", config_spec, "--workdir", workdir, *override_args(base), *override_args(overrides)]


def plans(trials: Sequence[Trial], fv: flags.FlagValues, config_spec: str,
          base_overrides: Mapping[str, Any]) -> list[sweep_launch.Plan]:
    """Each trial's exact command: `diffax train` here, or gcloud running it on every TPU VM worker."""
    out = []
    for t in trials:
        folder = os.path.join(fv.workdir, t.name)
        if fv.launcher == "tpu-vm":
            prefix = shlex.split(fv.train_command or "python3 -m diffax train")
            remote = prefix + train_args(config_spec, os.path.join(fv.remote_workdir or fv.workdir, t.name),
                                         t.overrides, base_overrides)
            argv = sweep_launch.tpu_vm_command(remote, tpu=fv.tpu, zone=fv.zone, project=fv.project,
                                               setup=fv.remote_setup)
        else:
            prefix = shlex.split(fv.train_command) if fv.train_command else [sys.executable, "-m", "diffax", "train"]
            argv = prefix + train_args(config_spec, folder, t.overrides, base_overrides)
        out.append(sweep_launch.Plan(t.name, folder, argv))
    return out


# ============================================================================ command line


def define_flags(fv: flags.FlagValues) -> None:
    """The flags of `diffax sweep`."""
    config_flags.DEFINE_config_file(
        "config", None,
        "Config file defining get_config() and get_sweep(), optionally with an argument: x.py or x.py:arg. "
        "--config.section.field=value overrides apply to every trial.",
        flag_values=fv, lock_config=True)
    flags.DEFINE_string("workdir", None, "Sweep folder: one sub-folder per trial, sweep.json and the report.",
                        flag_values=fv)
    flags.DEFINE_bool("dry_run", False, "Check the sweep and print how and with which command each trial would run; "
                      "run nothing.", flag_values=fv)
    flags.DEFINE_bool("report", False, "Write report.csv, report.md (overrides and latest metrics of every trial) "
                      "and loss.png in the workdir; run nothing.", flag_values=fv)
    flags.DEFINE_enum("launcher", "local", sweep_launch.LAUNCHERS, "local: submitit's LocalExecutor on this host. "
                      "slurm: one submitit job array. tpu-vm: each trial on all workers of a TPU VM pod slice "
                      "through gcloud ssh.", flag_values=fv)
    flags.DEFINE_integer("parallel", 1, "Trials running at once (local: on this host, sharing its devices; slurm: "
                         "the job array's limit).", flag_values=fv)
    flags.DEFINE_integer("timeout_min", 7 * 24 * 60, "A trial's time limit in minutes (SLURM's --time).",
                         flag_values=fv)
    flags.DEFINE_string("slurm_partition", "", "slurm: the partition.", flag_values=fv)
    flags.DEFINE_integer("gpus_per_node", 0, "slurm: GPUs per trial.", flag_values=fv)
    flags.DEFINE_integer("cpus_per_task", 0, "slurm: CPU cores per trial (0: the cluster's default).", flag_values=fv)
    flags.DEFINE_multi_string("only", [], "Run or report only the trials whose name matches this glob, e.g. "
                              "'schedule=cosine,*' (repeat the flag for several).", flag_values=fv)
    flags.DEFINE_bool("retry_failed", True, "Run failed trials again (--noretry_failed skips them).", flag_values=fv)
    flags.DEFINE_string("tpu", "", "tpu-vm: the TPU VM name.", flag_values=fv)
    flags.DEFINE_string("zone", "", "tpu-vm: its zone.", flag_values=fv)
    flags.DEFINE_string("project", "", "tpu-vm: its Google Cloud project (default: gcloud's).", flag_values=fv)
    flags.DEFINE_string("remote_workdir", "", "tpu-vm: the sweep folder as the workers see it, on a filesystem they "
                        "share (default: --workdir).", flag_values=fv)
    flags.DEFINE_string("remote_setup", "cd ~/diffax", "tpu-vm: shell commands each worker runs before "
                        "'diffax train' (e.g. activate a venv).", flag_values=fv)
    flags.DEFINE_string("train_command", "", "The command a trial runs, before its flags (default: "
                        "'<this python> -m diffax train'; 'python3 -m diffax train' on tpu-vm).", flag_values=fv)


def _engine(fv: flags.FlagValues) -> sweep_launch.Engine:
    if fv.launcher == "tpu-vm" and fv.parallel != 1:
        raise ValueError("--launcher=tpu-vm runs one trial at a time on the whole slice; drop --parallel.")
    slurm = {"slurm_partition": fv.slurm_partition, "gpus_per_node": fv.gpus_per_node,
             "cpus_per_task": fv.cpus_per_task}
    return sweep_launch.Engine(launcher=fv.launcher, parallel=fv.parallel, timeout_min=fv.timeout_min,
                               slurm={k: v for k, v in slurm.items() if v})


def main(fv: flags.FlagValues) -> None:
    """`diffax sweep`: check the sweep, then dry-run, report or launch its trials."""
    if fv.config is None or not fv.workdir:
        raise ValueError("diffax sweep needs --config and --workdir.")
    config_spec = config_flags.get_config_filename(fv["config"])
    base_overrides = config_flags.get_override_values(fv["config"])
    all_trials = expand(config_spec, fv.config)
    trials = select(all_trials, fv.only)
    workdir = fv.workdir

    if fv.report:
        remote = fv.launcher == "tpu-vm" and fv.remote_workdir and os.path.isdir(fv.remote_workdir)
        paths = sweep_report.write_report(trials, workdir, fv.remote_workdir if remote else workdir)
        print(open(paths["md"], encoding="utf-8").read(), end="")
        print(f"\nreport: {paths['csv']}, {paths['md']}, {paths['png']}")
        return

    engine = _engine(fv)
    todo = plans(trials, fv, config_spec, base_overrides)
    if fv.dry_run:
        print(f"# {len(todo)} trial(s) of {config_spec} in {workdir}, {engine.describe()}")
        for i, plan in enumerate(todo):
            state = "done" if sweep_launch.is_finished(plan.folder, plan.argv) else \
                sweep_launch.read_status(plan.folder).get("status")
            print(f"# [{i + 1}/{len(todo)}] {plan.name} ({state})")
            print(sweep_launch.shell_line(plan.argv))
        return

    with sweep_launch.sweep_lock(workdir):
        sweep_launch.write_json(os.path.join(workdir, sweep_launch.SWEEP_FILE), {
            "config": config_spec, "overrides": dict(base_overrides),
            "trials": [{"name": t.name, "overrides": t.overrides} for t in all_trials]})
        for trial, plan in zip(trials, todo):
            sweep_launch.write_trial_files(plan, trial.index, trial.overrides, configuration.to_dict(trial.config))
        run, skipped = [], []
        for plan in todo:
            failed_before = sweep_launch.read_status(plan.folder).get("status") == "failed"
            if sweep_launch.is_finished(plan.folder, plan.argv) or (failed_before and not fv.retry_failed):
                skipped.append(plan.name)
                print(f"{plan.name}: {'failed before' if failed_before else 'done already'}, skipped", flush=True)
            else:
                run.append(plan)
        result = sweep_launch.launch(run, engine, workdir) if run else {}
    if result.get("submitted"):
        print(f"sweep {workdir}: {len(run)} trial(s) submitted to SLURM. Status: W/<trial>/status.json; "
              f"table and plot: diffax sweep --config {config_spec} --workdir {workdir} --report")
        return
    failed = result.get("failed", [])
    print(f"sweep {workdir}: {len(todo) - len(failed)} done or skipped ({len(skipped)} skipped), {len(failed)} failed "
          f"of {len(todo)}. Table and plot: diffax sweep --config {config_spec} --workdir {workdir} --report")
    if failed:
        raise RuntimeError(f"{len(failed)} trial(s) failed: "
                           + ", ".join(f"{n} (log {os.path.join(workdir, n, sweep_launch.LOG_FILE)})" for n in failed))

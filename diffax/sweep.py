"""Hyper-parameter sweeps: `diffax sweep --config C --workdir W`.

A config file may define `get_sweep()` (optionally taking the same argument
as its `get_config`) next to `get_config()`. It returns the trials as a list
of config overrides, built with four small helpers as in big_vision:

    from diffax.sweep import product, sweep

    def get_sweep(arg=None):
        return product(
            sweep("config.diffusion.schedule", ["linear", "cosine"]),
            sweep("config.diffusion.prediction", ["eps", "v"]),
        )   # -> [{"diffusion.schedule": "linear", "diffusion.prediction": "eps"}, ...]

`sweep(key, values)` is one axis; `fixed(key, value)` a one-trial axis;
`product(*axes)` every combination; `zip(*axes)` the i-th trial of each axis
merged (equal lengths); `chain(*axes)` one list after the other. A plain list
of dicts works too.

Each trial runs as its own `diffax train` in `W/<trial name>` (a name read
from its overrides), next to `trial.json` (its overrides, command and
resolved config), `status.json` (pending | running | done | failed, the
return code) and `log.txt` (everything it printed). Trials run one after the
other, or `--parallel N` at once on disjoint sets of local devices, or on a
TPU pod slice through `gcloud compute tpus tpu-vm ssh --worker=all`. Running
the same command again skips the finished trials and resumes the others (the
trainer resumes a workdir from its latest checkpoint). `--report` writes a
table of every trial's overrides and final metrics (CSV and markdown) and a
plot of the loss curves.
"""
from __future__ import annotations

import builtins
import contextlib
import csv
import dataclasses
import datetime
import fcntl
import fnmatch
import glob
import hashlib
import importlib.util
import inspect
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Iterable, Mapping, Sequence

from absl import flags
from ml_collections import ConfigDict, config_flags
from ml_collections.config_flags import tuple_parser

STATUSES = ("pending", "running", "done", "failed")
TRIAL_FILE, STATUS_FILE, LOG_FILE, SWEEP_FILE = "trial.json", "status.json", "log.txt", "sweep.json"
REPORT_FILES = ("report.csv", "report.md", "loss.png")
PLATFORMS = ("auto", "cpu", "gpu", "tpu")
_TPU_FIRST_PORT = 8476  # libtpu's default mesh-controller port; trial i of a host uses 8476 + i

Overrides = dict[str, Any]


# ============================================================================ building sweeps (config files)


def _key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"A sweep key must be a config field name such as 'config.optimizer.learning_rate', got {key!r}.")
    return key[len("config."):] if key.startswith("config.") else key


def sweep(key: str, values: Iterable[Any]) -> list[Overrides]:
    """One axis of a sweep: a trial per value of the config field `key`.

    `key` is the field's dotted name, with or without the leading "config."
    (as on the command line: `--config.optimizer.learning_rate`).
    """
    values = list(values)
    if not values:
        raise ValueError(f"sweep({key!r}, ...) has no values.")
    return [{_key(key): v} for v in values]


def fixed(key: str, value: Any) -> list[Overrides]:
    """An axis with a single trial: set `key` to `value` in every trial it is combined with."""
    return [{_key(key): value}]


def product(*axes: Sequence[Overrides]) -> list[Overrides]:
    """Every combination of the axes' trials (the last axis varies fastest), as itertools.product."""
    out = []
    for combo in itertools.product(*axes):
        out.append(_merge(combo, "product"))
    return out


def zip(*axes: Sequence[Overrides]) -> list[Overrides]:  # noqa: A001 -- the name big_vision / xmanager use
    """The i-th trials of all axes merged into trial i; the axes must have the same length."""
    lengths = [len(a) for a in axes]
    if len(set(lengths)) > 1:
        raise ValueError(f"zip() needs axes of equal length, got lengths {lengths}.")
    return [_merge(combo, "zip") for combo in builtins.zip(*axes)]


def chain(*axes: Sequence[Overrides]) -> list[Overrides]:
    """The trials of each axis one after the other (a union of sweeps)."""
    return [dict(t) for axis in axes for t in axis]


def _merge(parts: Iterable[Mapping[str, Any]], what: str) -> Overrides:
    out: Overrides = {}
    for part in parts:
        for k, v in part.items():
            if k in out:
                raise ValueError(f"{what}() sets config.{k} twice in one trial ({out[k]!r} and {v!r}).")
            out[k] = v
    return out


# ============================================================================ trials


@dataclasses.dataclass
class Trial:
    """One run of a sweep: its overrides, folder name and the config they resolve to."""

    index: int
    name: str
    overrides: Overrides
    config: ConfigDict | None = None  # the base config with the overrides applied (set by `resolve`)


def load_sweep(config_spec: str) -> list[Overrides]:
    """Call `get_sweep()` of the config file `path[:arg]`, passing `arg` when it takes one.

    Returns the trials as flat override dicts with keys relative to `config`.
    """
    path, _, arg = config_spec.partition(":")
    _add_config_root(path)
    name = "diffax_sweep_" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or not os.path.exists(path):
        raise FileNotFoundError(f"No config file {path!r}.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    get_sweep = getattr(module, "get_sweep", None)
    if get_sweep is None:
        raise ValueError(
            f"{path} defines no get_sweep(). Add one returning the trials, e.g.\n"
            "    from diffax.sweep import product, sweep\n"
            "    def get_sweep():\n"
            "        return product(sweep('config.optimizer.learning_rate', [1e-4, 3e-4]), "
            "sweep('config.seed', [0, 1]))"
        )
    params = [p for p in inspect.signature(get_sweep).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    if arg and params:
        trials = get_sweep(arg)
    elif params and params[0].default is inspect.Parameter.empty and params[0].kind != params[0].VAR_POSITIONAL:
        raise ValueError(f"{path}: get_sweep() needs an argument; pass it as --config {path}:ARG.")
    else:
        trials = get_sweep()
    if isinstance(trials, Mapping):
        trials = [trials]
    if not isinstance(trials, (list, tuple)) or not all(isinstance(t, Mapping) for t in trials):
        raise ValueError(f"{path}: get_sweep() must return a list of dicts (build it with diffax.sweep.product, ...), "
                         f"got {type(trials).__name__}.")
    if not trials:
        raise ValueError(f"{path}: get_sweep() returned no trials.")
    return [{_key(k): v for k, v in t.items()} for t in trials]


def _add_config_root(path: str) -> None:
    """Make `from configs import default` importable from config files anywhere below the repository."""
    folder = os.path.dirname(os.path.abspath(path))
    while True:
        if os.path.isdir(os.path.join(folder, "configs")):
            if folder not in sys.path:
                sys.path.insert(0, folder)
            return
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent


def _name_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (tuple, list)):
        return "-".join(_name_value(x) for x in v) or "none"
    return str(v)


def trial_names(trials: Sequence[Overrides]) -> list[str]:
    """Readable folder names: `key=value` pairs joined by commas, each key shortened to its
    shortest dotted suffix that is unique in the sweep (`schedule=linear,prediction=eps`)."""
    keys = sorted({k for t in trials for k in t})
    short = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if all(o == k or not ("." + o).endswith("." + suffix) for o in keys):
                short[k] = suffix
                break
        else:
            short[k] = k
    names = []
    for t in trials:
        name = ",".join(f"{short[k]}={_name_value(v)}" for k, v in t.items()) or "base"
        name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)
        if len(name) > 100:
            name = name[:90] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
        names.append(name)
    seen: dict[str, int] = {}
    for i, name in enumerate(names):  # distinct overrides that read the same (e.g. "a/b" and "a_b")
        if name in seen:
            names[i] = f"{name}-{i}"
        seen[name] = i
    return names


def make_trials(overrides: Sequence[Overrides]) -> list[Trial]:
    """Number and name the trials; two trials with the same overrides are an error."""
    seen: dict[str, int] = {}
    for i, t in enumerate(overrides):
        key = json.dumps(t, sort_keys=True, default=repr)
        if key in seen:
            raise ValueError(f"Trials {seen[key]} and {i} of the sweep have the same overrides {dict(t)}.")
        seen[key] = i
    return [Trial(i, name, dict(t)) for i, (name, t) in enumerate(builtins.zip(trial_names(overrides), overrides))]


def _field_type(config: ConfigDict, key: str) -> type:
    """The type of config field `key`, or a ValueError naming the closest fields."""
    import difflib

    node, seen = config, "config"
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = list(node.keys()) if isinstance(node, ConfigDict) else []
        if part not in fields:
            close = difflib.get_close_matches(part, fields, n=3)
            hint = f" Did you mean {', '.join(seen + '.' + c for c in close)}?" if close else ""
            raise ValueError(f"config.{key} is not a config field ({seen}.{part} does not exist).{hint}")
        node, seen = node[part], f"{seen}.{part}"
    if isinstance(node, ConfigDict):
        raise ValueError(f"config.{key} is a section, not a field: sweep its fields (config.{key}.FIELD) instead.")
    return type(node)


def _coerce(key: str, kind: type, value: Any) -> Any:
    """`value` as the field's type (int -> float, list -> tuple), or a TypeError."""
    def bad(expected: str) -> TypeError:
        return TypeError(f"config.{key} is {expected} but the sweep gives {value!r} ({type(value).__name__}).")

    if kind is bool:
        if not isinstance(value, bool):
            raise bad("a bool")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an int")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a float")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if kind in (tuple, list):
        if not isinstance(value, (tuple, list)):
            raise bad("a tuple")
        return tuple(value)
    raise TypeError(f"config.{key} holds a {kind.__name__}, which cannot be set from the command line.")


def format_value(value: Any) -> str:
    """The command-line text of an override value (`--config.key=TEXT`), parsed back exactly by config_flags."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))
    return str(value)


def _parse_back(kind: type, text: str) -> Any:
    parser = {bool: flags.BooleanParser(), int: flags.IntegerParser(), float: flags.FloatParser(),
              tuple: tuple_parser.TupleParser(), list: tuple_parser.TupleParser()}.get(kind)
    return text if parser is None else parser.parse(text)


def resolve(config: ConfigDict, trials: Sequence[Trial]) -> None:
    """Check every trial's overrides against `config` and set `trial.config` to the result.

    An unknown field, a section, a value of the wrong type or a value the
    command line cannot carry exactly raises before any trial starts.
    """
    for trial in trials:
        resolved = ConfigDict(config.to_dict())  # an unlocked deep copy
        for key, value in trial.overrides.items():
            where = f"Trial {trial.index} ({trial.name})"
            try:
                kind = _field_type(config, key)
                value = _coerce(key, kind, value)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}: {e}") from None
            back = _parse_back(kind, format_value(value))
            if back != value and not (isinstance(value, float) and math.isnan(value)):
                raise ValueError(f"{where}: config.{key}={value!r} does not survive the command line "
                                 f"(it reads back as {back!r}).")
            node = resolved
            *parents, last = key.split(".")
            for part in parents:
                node = node[part]
            node[last] = value
            trial.overrides[key] = value
        trial.config = resolved


def expand(config_spec: str, config: ConfigDict) -> list[Trial]:
    """The named and checked trials of the config file's sweep."""
    trials = make_trials(load_sweep(config_spec))
    resolve(config, trials)
    return trials


def select(trials: Sequence[Trial], only: Sequence[str]) -> list[Trial]:
    """The trials whose name matches one of the globs `only` (all of them when it is empty)."""
    if not only:
        return list(trials)
    chosen = [t for t in trials if any(fnmatch.fnmatchcase(t.name, p) for p in only)]
    if not chosen:
        raise ValueError(f"--only {' '.join(only)} matches no trial name; the names are: "
                         + ", ".join(t.name for t in trials))
    return chosen


# ============================================================================ commands and devices


def train_args(config_spec: str, workdir: str, overrides: Mapping[str, Any], base_overrides: Mapping[str, Any]) -> list[str]:
    """Arguments of `diffax train` for one trial: the sweep's own --config.* overrides, then the trial's."""
    args = ["--config", config_spec, "--workdir", workdir]
    for key, value in base_overrides.items():
        if key not in overrides and not any(k.startswith(key + ".") for k in overrides):
            args.append(f"--config.{key}={format_value(value)}")
    args += [f"--config.{k}={format_value(v)}" for k, v in overrides.items()]
    return args


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


@dataclasses.dataclass
class Slot:
    """A share of this host's devices for one trial at a time: extra environment and a command prefix."""

    label: str
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    prefix: list[str] = dataclasses.field(default_factory=list)


def detect_platform() -> str:
    """cpu, gpu or tpu, found without starting JAX (the sweep process must not hold the accelerators)."""
    forced = os.environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
    if forced:
        return {"cuda": "gpu", "rocm": "gpu"}.get(forced, forced)
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return "tpu"
    if shutil.which("nvidia-smi"):
        return "gpu"
    return "cpu"


def local_devices(platform: str) -> list[str]:
    """Ids of this host's devices: GPUs (CUDA_VISIBLE_DEVICES or nvidia-smi), TPU chips
    (TPU_VISIBLE_CHIPS or /dev/accel*, /dev/vfio/N), or CPU devices (XLA_FLAGS' count, default 1)."""
    if platform == "gpu":
        if os.environ.get("CUDA_VISIBLE_DEVICES"):
            return [d.strip() for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        return [str(i) for i, _ in enumerate(line for line in out.splitlines() if line.startswith("GPU "))]
    if platform == "tpu":
        for var in ("TPU_VISIBLE_CHIPS", "TPU_VISIBLE_DEVICES"):
            if os.environ.get(var):
                return [d.strip() for d in os.environ[var].split(",") if d.strip()]
        chips = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
        return [str(i) for i in range(len(chips))]
    match = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return [str(i) for i in range(int(match.group(1)) if match else 1)]


_TPU_CHIP_BOUNDS = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1", 8: "2,4,1"}


def device_slots(parallel: int, platform: str = "auto", devices: Sequence[str] | None = None) -> list[Slot]:
    """Split this host's devices into `parallel` disjoint groups, one running trial each.

    gpu: CUDA_VISIBLE_DEVICES=<group>. tpu: TPU_VISIBLE_CHIPS=<group> with the
    chip bounds of a single process and its own mesh-controller port (1, 2, 4
    or 8 chips per trial). cpu: XLA_FLAGS=--xla_force_host_platform_device_count
    = devices / parallel (the count in XLA_FLAGS, default one per trial), each
    trial pinned with `taskset` to its share of the CPU cores. With
    `parallel` 1 the environment is left as it is.
    """
    if parallel < 1:
        raise ValueError(f"--parallel={parallel}: must be >= 1.")
    if parallel == 1 and not devices:
        return [Slot("all devices")]
    platform = detect_platform() if platform == "auto" else platform
    if platform not in PLATFORMS[1:]:
        raise ValueError(f"--platform={platform!r}: use one of {', '.join(PLATFORMS)}.")
    if platform == "cpu" and not devices and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        devices = [str(i) for i in range(parallel)]
    ids = list(devices) if devices else local_devices(platform)
    if len(ids) < parallel:
        raise ValueError(f"--parallel={parallel} needs at least {parallel} {platform} devices; found {len(ids)} "
                         f"({', '.join(ids) or 'none'}). Lower --parallel or pass --devices.")
    per = len(ids) // parallel
    groups = [ids[i * per:(i + 1) * per] for i in range(parallel)]
    slots = []
    if platform == "cpu":
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        per_cores = len(cores) // parallel
        flags_now = re.sub(r"\s*--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
        for i, group in enumerate(groups):
            env = {"XLA_FLAGS": f"{flags_now} --xla_force_host_platform_device_count={per}".strip()}
            prefix = []
            if per_cores and shutil.which("taskset"):
                prefix = ["taskset", "-c", ",".join(str(c) for c in cores[i * per_cores:(i + 1) * per_cores])]
            slots.append(Slot(f"{per} cpu device(s)" + (f", cores {prefix[-1]}" if prefix else ""), env, prefix))
    elif platform == "gpu":
        for group in groups:
            slots.append(Slot(f"gpu {','.join(group)}", {"CUDA_VISIBLE_DEVICES": ",".join(group)}))
    else:
        if per not in _TPU_CHIP_BOUNDS:
            raise ValueError(f"--parallel={parallel} gives {per} TPU chips per trial; a process can use "
                             f"{', '.join(map(str, _TPU_CHIP_BOUNDS))} chips of a host.")
        for i, group in enumerate(groups):
            port = str(_TPU_FIRST_PORT + i)
            slots.append(Slot(f"tpu chips {','.join(group)}", {
                "TPU_VISIBLE_CHIPS": ",".join(group),
                "TPU_VISIBLE_DEVICES": ",".join(group),
                "TPU_CHIPS_PER_PROCESS_BOUNDS": _TPU_CHIP_BOUNDS[per],
                "TPU_PROCESS_BOUNDS": "1,1,1",
                "TPU_PROCESS_PORT": port,
                "TPU_MESH_CONTROLLER_ADDRESS": f"localhost:{port}",
                "TPU_MESH_CONTROLLER_PORT": port,
            }))
    return slots


def shell_line(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """A command as one copy-pasteable shell line, its extra environment in front."""
    pairs = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    return " ".join(pairs + [shlex.join(argv)])


# ============================================================================ status files


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def _write_json(path: str, data: Any) -> None:
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


def _write_status(trial_dir: str, **fields: Any) -> dict[str, Any]:
    status = {k: v for k, v in read_status(trial_dir).items() if k in ("attempts", "command")}
    status.update(fields)
    status["updated"] = _now()
    _write_json(os.path.join(trial_dir, STATUS_FILE), status)
    return status


def _is_finished(trial_dir: str, command: list[str]) -> bool:
    """Done with this very command (a changed command, e.g. more steps, runs again and resumes)."""
    status = read_status(trial_dir)
    return status.get("status") == "done" and status.get("command") == command


# ============================================================================ running


@dataclasses.dataclass
class _Plan:
    trial: Trial
    folder: str  # bookkeeping folder on this machine
    argv: list[str]  # the command, without a device slot


def _plans(trials: Sequence[Trial], *, config_spec: str, workdir: str, base_overrides: Mapping[str, Any],
           launcher: str, train_command: str, tpu: str, zone: str, project: str, remote_workdir: str,
           remote_setup: str) -> list[_Plan]:
    plans = []
    for t in trials:
        folder = os.path.join(workdir, t.name)
        if launcher == "local":
            prefix = shlex.split(train_command) if train_command else [sys.executable, "-m", "diffax", "train"]
            argv = prefix + train_args(config_spec, folder, t.overrides, base_overrides)
        elif launcher == "tpu-vm":
            prefix = shlex.split(train_command) if train_command else ["python3", "-m", "diffax", "train"]
            remote = prefix + train_args(config_spec, os.path.join(remote_workdir or workdir, t.name),
                                         t.overrides, base_overrides)
            argv = tpu_vm_command(remote, tpu=tpu, zone=zone, project=project, setup=remote_setup)
        else:
            raise ValueError(f"--launcher={launcher!r}: use local or tpu-vm.")
        plans.append(_Plan(t, folder, argv))
    return plans


def _start(plan: _Plan, slot: Slot, position: str) -> tuple[subprocess.Popen, Any]:
    os.makedirs(plan.folder, exist_ok=True)
    attempts = int(read_status(plan.folder).get("attempts", 0)) + 1
    log_path = os.path.join(plan.folder, LOG_FILE)
    log = open(log_path, "a", encoding="utf-8")
    line = shell_line(slot.prefix + plan.argv, slot.env)
    log.write(f"\n===== diffax sweep: attempt {attempts} at {_now()} on {slot.label}\n$ {line}\n")
    log.flush()
    env = dict(os.environ, **slot.env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(slot.prefix + plan.argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    _write_status(plan.folder, status="running", returncode=None, log=log_path, command=plan.argv,
                  attempts=attempts, started=_now(), devices=slot.label, pid=proc.pid)
    print(f"[{position}] {plan.trial.name}: running on {slot.label} (log {log_path})", flush=True)
    return proc, log


def _finish(plan: _Plan, proc: subprocess.Popen, log: Any, position: str) -> bool:
    log.close()
    code = proc.returncode
    ok = code == 0
    status = read_status(plan.folder)
    elapsed = ""
    try:
        seconds = (datetime.datetime.now() - datetime.datetime.fromisoformat(status["started"])).total_seconds()
        elapsed = f" in {seconds:.0f}s"
    except (KeyError, ValueError):
        pass
    _write_status(plan.folder, status="done" if ok else "failed", returncode=code, finished=_now(),
                  log=os.path.join(plan.folder, LOG_FILE))
    print(f"[{position}] {plan.trial.name}: {'done' if ok else f'FAILED (return code {code})'}{elapsed}"
          + ("" if ok else f"; see {os.path.join(plan.folder, LOG_FILE)}"), flush=True)
    return ok


def _stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGINT the trial's process group (the trainer finishes its checkpoint write), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def run_trials(plans: Sequence[_Plan], slots: Sequence[Slot], *, retry_failed: bool = True) -> dict[str, list[str]]:
    """Run the unfinished trials, each on a free slot, until all are done or failed.

    Returns {"done": [...], "failed": [...], "skipped": [...]} by trial name.
    A failed trial is recorded and the others go on.
    """
    result: dict[str, list[str]] = {"done": [], "failed": [], "skipped": []}
    queue = []
    for i, plan in enumerate(plans):
        position = f"{i + 1}/{len(plans)}"
        status = read_status(plan.folder).get("status")
        if _is_finished(plan.folder, plan.argv):
            result["skipped"].append(plan.trial.name)
            print(f"[{position}] {plan.trial.name}: done already, skipped", flush=True)
        elif status == "failed" and not retry_failed:
            result["failed"].append(plan.trial.name)
            print(f"[{position}] {plan.trial.name}: failed before, skipped (--noretry_failed)", flush=True)
        else:
            queue.append((plan, position))
    free = list(slots)
    running: dict[int, tuple[_Plan, subprocess.Popen, Any, Slot, str]] = {}
    try:
        while queue or running:
            while queue and free:
                (plan, position), slot = queue.pop(0), free.pop(0)
                proc, log = _start(plan, slot, position)
                running[proc.pid] = (plan, proc, log, slot, position)
            time.sleep(0.2)
            for pid in [pid for pid, (_, proc, *_) in running.items() if proc.poll() is not None]:
                plan, proc, log, slot, position = running.pop(pid)
                result["done" if _finish(plan, proc, log, position) else "failed"].append(plan.trial.name)
                free.append(slot)
    except KeyboardInterrupt:
        for plan, proc, log, _, _ in running.values():
            _stop(proc)
            log.close()
            _write_status(plan.folder, status="failed", returncode=proc.returncode, finished=_now(),
                          note="interrupted; run the sweep again to resume")
        raise
    return result


@contextlib.contextmanager
def sweep_lock(workdir: str):
    """Hold W/.sweep.lock while running, so two sweeps never train the same trial at once.

    SIGTERM (e.g. a preempted machine) is turned into KeyboardInterrupt meanwhile, so the running
    trials are stopped cleanly and marked failed (run the sweep again to resume them).
    """
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, ".sweep.lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"Another diffax sweep is running in {workdir}; wait for it or stop it first.") from None
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        previous = None
        if threading.current_thread() is threading.main_thread():
            def interrupt(signum, frame):
                raise KeyboardInterrupt

            previous = signal.signal(signal.SIGTERM, interrupt)
        try:
            yield
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def write_sweep_file(workdir: str, config_spec: str, base_overrides: Mapping[str, Any], trials: Sequence[Trial]) -> None:
    """W/sweep.json: the config, the sweep-wide overrides and every trial's name and overrides."""
    os.makedirs(workdir, exist_ok=True)
    _write_json(os.path.join(workdir, SWEEP_FILE), {
        "config": config_spec,
        "overrides": dict(base_overrides),
        "trials": [{"name": t.name, "overrides": t.overrides} for t in trials],
        "updated": _now(),
    })


def _write_trial_files(plan: _Plan) -> None:
    from diffax import configuration

    os.makedirs(plan.folder, exist_ok=True)
    _write_json(os.path.join(plan.folder, TRIAL_FILE), {
        "index": plan.trial.index,
        "name": plan.trial.name,
        "overrides": plan.trial.overrides,
        "command": plan.argv,
        "config": configuration.to_dict(plan.trial.config) if plan.trial.config is not None else None,
    })
    if not os.path.exists(os.path.join(plan.folder, STATUS_FILE)):
        _write_status(plan.folder, status="pending", returncode=None, log=os.path.join(plan.folder, LOG_FILE))


# ============================================================================ report


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut short by a kill
    except FileNotFoundError:
        pass
    return rows


def loss_curve(run_dir: str) -> tuple[list[int], list[float]]:
    """(steps, losses) from `run_dir/metrics.jsonl`; a step logged twice keeps its last value."""
    by_step = {}
    for row in _read_jsonl(os.path.join(run_dir, "metrics.jsonl")):
        if "step" in row and "loss" in row:
            by_step[int(row["step"])] = float(row["loss"])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def latest_eval(run_dir: str) -> dict[str, Any]:
    """The latest value of every numeric metric in `run_dir/eval/results.jsonl` (rows ordered by step)."""
    rows = _read_jsonl(os.path.join(run_dir, "eval", "results.jsonl"))
    rows.sort(key=lambda r: r.get("step", -1) if isinstance(r.get("step"), (int, float)) else -1)
    out: dict[str, Any] = {}
    for row in rows:
        for k, v in row.items():
            if k in ("time", "timestamp") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            out["eval_step" if k == "step" else k] = v
    return out


def report_rows(trials: Sequence[Trial], workdir: str, run_root: str | None = None) -> tuple[list[str], list[dict]]:
    """The report table: (columns, rows), one row per trial with its overrides and latest metrics."""
    run_root = run_root or workdir
    keys = list(dict.fromkeys(k for t in trials for k in t.overrides))
    eval_keys: list[str] = []
    rows = []
    for t in trials:
        run_dir = os.path.join(run_root, t.name)
        status = read_status(os.path.join(workdir, t.name))
        steps, losses = loss_curve(run_dir)
        row = {"trial": t.name, "status": status.get("status", "pending")}
        row.update({k: format_value(t.overrides[k]) if k in t.overrides else "" for k in keys})
        row["step"] = steps[-1] if steps else ""
        row["loss"] = losses[-1] if losses else ""
        evals = latest_eval(run_dir)
        eval_keys += [k for k in evals if k not in eval_keys]
        row.update(evals)
        rows.append(row)
    columns = ["trial", "status", *keys, "step", "loss", *eval_keys]
    return columns, [{c: r.get(c, "") for c in columns} for r in rows]


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def markdown_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    """A GitHub markdown table of `rows` (floats to 6 significant digits)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r[c]).replace("|", "\\|") for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(trials: Sequence[Trial], workdir: str, run_root: str | None = None) -> dict[str, str]:
    """Write W/report.csv, W/report.md and W/loss.png (loss curves of all trials). Returns their paths."""
    columns, rows = report_rows(trials, workdir, run_root)
    paths = {name.split(".")[-1]: os.path.join(workdir, name) for name in REPORT_FILES}
    os.makedirs(workdir, exist_ok=True)
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(markdown_table(columns, rows))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    positive = True
    for t in trials:
        steps, losses = loss_curve(os.path.join(run_root or workdir, t.name))
        if steps:
            ax.plot(steps, losses, label=t.name, linewidth=1.2)
            positive &= min(losses) > 0
    if ax.lines:
        if positive:
            ax.set_yscale("log")
        ax.legend(fontsize="small", loc="upper right")
    else:
        ax.text(0.5, 0.5, "no metrics.jsonl yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(os.path.basename(os.path.abspath(workdir)))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths


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
    flags.DEFINE_bool("dry_run", False, "Check the sweep and print each trial's command; run nothing.", flag_values=fv)
    flags.DEFINE_bool("report", False, "Write report.csv, report.md (overrides and latest metrics of every trial) "
                      "and loss.png in the workdir; run nothing.", flag_values=fv)
    flags.DEFINE_integer("parallel", 1, "Trials run at once, each on its own share of this host's devices "
                         "(CUDA_VISIBLE_DEVICES on GPU, TPU_VISIBLE_CHIPS on TPU, XLA_FLAGS device count and "
                         "taskset cores on CPU).", flag_values=fv)
    flags.DEFINE_enum("platform", "auto", PLATFORMS, "Device kind split by --parallel (auto: JAX_PLATFORMS, "
                      "else TPU chips, else nvidia-smi, else cpu).", flag_values=fv)
    flags.DEFINE_list("devices", [], "Device ids to split among --parallel trials (default: all found).",
                      flag_values=fv)
    flags.DEFINE_multi_string("only", [], "Run or report only the trials whose name matches this glob, e.g. "
                              "'schedule=cosine,*' (repeat the flag for several).", flag_values=fv)
    flags.DEFINE_bool("retry_failed", True, "Run failed trials again (--noretry_failed skips them).", flag_values=fv)
    flags.DEFINE_enum("launcher", "local", ["local", "tpu-vm"], "local: subprocesses on this host. tpu-vm: each "
                      "trial on all workers of a TPU VM pod slice through gcloud ssh.", flag_values=fv)
    flags.DEFINE_string("tpu", "", "tpu-vm: the TPU VM name.", flag_values=fv)
    flags.DEFINE_string("zone", "", "tpu-vm: its zone.", flag_values=fv)
    flags.DEFINE_string("project", "", "tpu-vm: its Google Cloud project (default: gcloud's).", flag_values=fv)
    flags.DEFINE_string("remote_workdir", "", "tpu-vm: the sweep folder as the workers see it, on a filesystem they "
                        "share (default: --workdir).", flag_values=fv)
    flags.DEFINE_string("remote_setup", "cd ~/diffax", "tpu-vm: shell commands each worker runs before "
                        "'diffax train' (e.g. activate a venv).", flag_values=fv)
    flags.DEFINE_string("train_command", "", "The command a trial runs, before its flags (default: "
                        "'<this python> -m diffax train'; 'python3 -m diffax train' on tpu-vm).", flag_values=fv)


def main(fv: flags.FlagValues) -> None:
    """`diffax sweep`: check the sweep, then dry-run, report or run its trials."""
    if fv.config is None or not fv.workdir:
        raise ValueError("diffax sweep needs --config and --workdir.")
    config_spec = config_flags.get_config_filename(fv["config"])
    base_overrides = config_flags.get_override_values(fv["config"])
    all_trials = expand(config_spec, fv.config)
    trials = select(all_trials, fv.only)
    workdir = fv.workdir

    if fv.report:
        run_root = fv.remote_workdir if fv.launcher == "tpu-vm" and fv.remote_workdir and os.path.isdir(
            fv.remote_workdir) else workdir
        paths = write_report(trials, workdir, run_root)
        print(open(paths["md"], encoding="utf-8").read(), end="")
        print(f"\nreport: {paths['csv']}, {paths['md']}, {paths['png']}")
        return

    if fv.launcher == "tpu-vm" and fv.parallel != 1:
        raise ValueError("--launcher=tpu-vm runs one trial at a time on the whole slice; drop --parallel.")
    plans = _plans(trials, config_spec=config_spec, workdir=workdir, base_overrides=base_overrides,
                   launcher=fv.launcher, train_command=fv.train_command, tpu=fv.tpu, zone=fv.zone,
                   project=fv.project, remote_workdir=fv.remote_workdir, remote_setup=fv.remote_setup)
    slots = [Slot("the TPU slice")] if fv.launcher == "tpu-vm" else device_slots(fv.parallel, fv.platform, fv.devices)

    if fv.dry_run:
        print(f"# {len(plans)} trial(s) of {config_spec} in {workdir}"
              + (f", {len(slots)} at a time" if len(slots) > 1 else ""))
        for i, plan in enumerate(plans):
            slot = slots[i % len(slots)]
            state = "done" if _is_finished(plan.folder, plan.argv) else read_status(plan.folder).get("status")
            print(f"# [{i + 1}/{len(plans)}] {plan.trial.name} ({state})")
            print(shell_line(slot.prefix + plan.argv, slot.env))
        return

    with sweep_lock(workdir):
        write_sweep_file(workdir, config_spec, base_overrides, all_trials)
        for plan in plans:
            _write_trial_files(plan)
        result = run_trials(plans, slots, retry_failed=fv.retry_failed)
    print(f"sweep {workdir}: {len(result['done']) + len(result['skipped'])} done "
          f"({len(result['skipped'])} already), {len(result['failed'])} failed of {len(plans)}. "
          f"Table and plot: diffax sweep --config {config_spec} --workdir {workdir} --report")
    if result["failed"]:
        raise RuntimeError(f"{len(result['failed'])} trial(s) failed: "
                           + ", ".join(f"{n} (log {os.path.join(workdir, n, LOG_FILE)})" for n in result["failed"]))

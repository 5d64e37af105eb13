"""Hyper-parameter sweeps: `diffax sweep --config C --workdir W`.

A config file may define `get_sweep()` (optionally taking the same argument
as its `get_config`) next to `get_config()`. It returns the trials as a list
of config overrides, built with small helpers as in big_vision:

    from diffax.sweep import product, sweep

    def get_sweep(arg=None):
        return product(
            sweep("config.diffusion.schedule", ["linear", "cosine"]),
            sweep("config.diffusion.prediction", ["eps", "v"]),
        )   # -> [{"diffusion.schedule": "linear", "diffusion.prediction": "eps"}, ...]

`sweep(key, values)` is one axis; `fixed(key, value)` a one-trial axis;
`product(*axes)` every combination; `zip_axes(*axes)` the i-th trial of each
axis merged (equal lengths); `chain(*axes)` one list after the other. A plain
list of dicts works too.

This module defines and expands the sweep (every trial is checked against the
config before anything runs); `sweep_command` is `diffax sweep`, `sweep_launch`
runs the trials through submitit (local processes or SLURM) or on a TPU VM pod
slice through gcloud, and `sweep_report` tabulates them.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import importlib.util
import inspect
import itertools
import json
import math
import os
import re
from typing import Any, Iterable, Mapping, Sequence

from ml_collections import ConfigDict

from diffax import configuration

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


def zip_axes(*axes: Sequence[Overrides]) -> list[Overrides]:
    """The i-th trials of all axes merged into trial i (as builtin zip); the axes must have the same length."""
    lengths = [len(a) for a in axes]
    if len(set(lengths)) > 1:
        raise ValueError(f"zip_axes() needs axes of equal length, got lengths {lengths}.")
    return [_merge(combo, "zip_axes") for combo in zip(*axes)]


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
    configuration.add_config_root(path)
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
    return [Trial(i, name, dict(t)) for i, (name, t) in enumerate(zip(trial_names(overrides), overrides))]


# What a Python value from get_sweep() may be for a field of each type (an int goes where a float goes).
_ACCEPTS = {bool: (bool,), int: (int,), float: (int, float), str: (str,), tuple: (tuple, list), list: (tuple, list)}
_TYPE_NAMES = {bool: "a bool", int: "an int", float: "a float", str: "a string", tuple: "a tuple", list: "a tuple"}


def _check_type(key: str, kind: type, value: Any) -> None:
    if kind not in _ACCEPTS:
        raise ValueError(f"config.{key} holds a {kind.__name__}, which cannot be set from the command line.")
    if not isinstance(value, _ACCEPTS[kind]) or (isinstance(value, bool) and kind is not bool):
        raise ValueError(f"config.{key} is {_TYPE_NAMES[kind]} but the sweep gives {value!r} ({type(value).__name__}).")


def override_args(overrides: Mapping[str, Any]) -> list[str]:
    """`--config.key=value` arguments of `overrides`, in order."""
    return [f"--config.{k}={configuration.format_value(v)}" for k, v in overrides.items()]


def resolve(config: ConfigDict, trials: Sequence[Trial]) -> None:
    """Check every trial's overrides against `config` and set `trial.config` to the result.

    The overrides go through the command-line text and `configuration.apply_overrides`,
    the parser `diffax train` uses, so an unknown field, a section, a value of the
    wrong type or a value the command line cannot carry exactly raises before any
    trial starts.
    """
    for trial in trials:
        where = f"Trial {trial.index} ({trial.name})"
        try:
            for key, value in trial.overrides.items():
                error = configuration.field_error(config, key)
                if error:
                    raise ValueError(error)
                _check_type(key, type(_get(config, key)), value)
            trial.config = configuration.apply_overrides(config, override_args(trial.overrides))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        for key, value in trial.overrides.items():
            back = _get(trial.config, key)
            if isinstance(value, list):
                value = tuple(value)
            if back != value and not (isinstance(value, float) and math.isnan(value)):
                raise ValueError(f"{where}: config.{key}={value!r} does not survive the command line "
                                 f"(it reads back as {back!r}).")
            trial.overrides[key] = back  # the field's type: 1 -> 1.0, [1, 2] -> (1, 2)


def _get(config: ConfigDict, key: str) -> Any:
    for part in key.split("."):
        config = config[part]
    return config


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

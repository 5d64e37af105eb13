"""Config files on disk (the resolved config a run writes, reading it back, comparing two) and the one
parser of `--config.a.b=value` overrides outside a config file (through ml_collections' config_flags)."""
from __future__ import annotations

import difflib
import json
import os
import re
import sys
from typing import Any, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

# Fields that may change when a run is resumed: they say how long to train, how
# often to log or save, and how to sample or evaluate, not what is trained.
# (data.num_workers is not among them: a saved data position is tied to it.)
RESUMABLE_PREFIXES = (
    "training.num_steps",
    "training.log_every",
    "training.checkpoint_every",
    "training.keep_checkpoints",
    "training.sample_every",
    "training.progress_bar",
    "training.nan_policy",
    "data.prefetch",
    "sampling.",
    "eval.",
    "xla_cpu_ynnpack",
)


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON-ready nested dict (tuples become lists)."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def save(config: ml_collections.ConfigDict, path: str) -> None:
    """Write atomically, so another process never reads a half-written file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _tuples(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


def load(path: str) -> ml_collections.ConfigDict:
    """Read a config written by `save` (lists come back as tuples, as configs write them).

    A config written by an older diffax is brought up to date (`upgrade`): fields added
    since take their defaults, fields removed since are dropped.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"No config at {path}: pass --config, or point --workdir at a diffax run.") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a valid diffax config (JSON error: {e}).") from None
    return ml_collections.ConfigDict(_tuples(upgrade(data, path)))


# Fields diffax no longer has, with the value that behaves as diffax does now.
REMOVED_FIELDS = {"model.conv_impl": "xla"}


def upgrade(data: dict[str, Any], path: str = "config.json") -> dict[str, Any]:
    """A config dict written by an older diffax, as today's diffax reads it.

    Fields added since it was written take configs/default.py's values (a field is
    added with a default that keeps the old behaviour); removed fields are dropped
    when they hold the value that behaves as diffax does now, else refused.
    """
    data = json.loads(json.dumps(data))
    for key, now in REMOVED_FIELDS.items():
        *parents, name = key.split(".")
        node = data
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and name in node:
            if node[name] != now:
                raise ValueError(f"{path} sets {key}={node[name]!r}, which this diffax no longer supports "
                                 f"(only {now!r}): start a new run, or edit the file.")
            del node[name]
    defaults = default_config()
    return _fill(data, defaults) if defaults else data


def _fill(data: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    for k, v in defaults.items():
        if k not in data:
            data[k] = v
        elif isinstance(v, dict) and isinstance(data[k], dict):
            _fill(data[k], v)
    return data


def default_config() -> dict[str, Any] | None:
    """configs/default.py's config as a dict, from the checkout diffax runs from; None without one."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.py")
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location("diffax_default_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return to_dict(module.get_config())


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def differences(old: dict[str, Any], new: dict[str, Any], *, ignore_resumable: bool = True) -> list[str]:
    """Fields whose values differ between two config dicts, as 'field: old -> new' lines."""
    a, b = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if ignore_resumable and key.startswith(RESUMABLE_PREFIXES):
            continue
        if a.get(key, "<missing>") != b.get(key, "<missing>"):
            lines.append(f"{key}: {a.get(key, '<missing>')!r} -> {b.get(key, '<missing>')!r}")
    return lines


# ----------------------------------------------------------------------------- command-line overrides


def add_config_root(config_file: str) -> None:
    """Make `from configs import default` importable from a config file anywhere below a checkout.

    The nearest folder above `config_file` that holds `configs/` goes on sys.path
    (experiments/x/config.py imports configs/ from the repository root).
    """
    folder = os.path.dirname(os.path.abspath(config_file))
    while not os.path.isdir(os.path.join(folder, "configs")) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    if os.path.isdir(os.path.join(folder, "configs")) and folder not in sys.path:
        sys.path.insert(0, folder)


def field_error(config: ml_collections.ConfigDict, key: str) -> str | None:
    """Why `config.<key>` (dotted) is not a field, naming the closest fields; None when it is one."""
    node, seen = config, "config"
    for part in key.split("."):
        fields = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        if part not in fields:
            close = difflib.get_close_matches(part, fields, n=3)
            hint = f" Did you mean {', '.join(seen + '.' + c for c in close)}?" if close else ""
            where = "" if f"{seen}.{part}" == f"config.{key}" else f" ({seen}.{part} does not exist)"
            return f"config.{key} is not a config field{where}.{hint} Fields of {seen}: {', '.join(sorted(fields))}."
        node, seen = node[part], f"{seen}.{part}"
    if isinstance(node, ml_collections.ConfigDict):
        return f"config.{key} is a section, not a field: set its fields (config.{key}.FIELD) instead."
    return None


def format_value(value: Any) -> str:
    """The command-line text of an override value (`--config.key=TEXT`), read back exactly by config_flags."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))
    return str(value)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """A copy of `config` with `--config.a.b=value` overrides applied, parsed by ml_collections' config_flags.

    The same parser reads `diffax train --config FILE --config.a.b=value`, so a
    config.json with overrides and a sweep's trials resolve exactly as the trainer
    will. A field that does not exist, a section, or a value of the wrong type is
    a ValueError naming the field.
    """
    for arg in overrides:
        name, sep, _ = arg[len("--config."):].partition("=")
        error = field_error(config, name) or (None if sep else f"--config.{name} needs a value: --config.{name}=VALUE.")
        if error:
            raise ValueError(error)
    fv = flags.FlagValues()
    argv = ["diffax", *overrides]
    config_flags.DEFINE_config_dict("config", ml_collections.ConfigDict(config.to_dict()), flag_values=fv,
                                    lock_config=True, sys_argv=argv)
    try:
        fv(argv)
    except flags.Error as e:  # e.g. "flag --config.training.num_steps=1.5: invalid literal for int() ..."
        name = re.search(r"--config\.([\w.]+)", str(e))
        kind = type(_get(config, name.group(1))) if name else None
        expected = "true or false" if kind is bool else f"a value of type {kind.__name__}" if kind else "another value"
        raise ValueError(f"{e}: expected {expected}.") from None
    return fv.config


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    for part in key.split("."):
        config = config[part]
    return config

"""Config files on disk: the resolved config a run writes, reading it back, comparing two."""
from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

# Fields that may change when a run is resumed: they say how long to train, how
# often to log or save, and how to sample or evaluate, not what is trained.
RESUMABLE_PREFIXES = (
    "training.num_steps",
    "training.log_every",
    "training.checkpoint_every",
    "training.keep_checkpoints",
    "training.sample_every",
    "training.progress_bar",
    "training.nan_policy",
    "data.num_workers",
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
    """Read a config written by `save` (lists come back as tuples, as configs write them)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"No config at {path}: pass --config, or point --workdir at a diffax run.") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a valid diffax config (JSON error: {e}).") from None
    return ml_collections.ConfigDict(_tuples(data))


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

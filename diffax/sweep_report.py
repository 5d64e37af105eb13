"""The report of a sweep: one table row per trial (status, overrides, final loss, latest eval metrics)
as W/report.csv and W/report.md, and W/loss.png with every trial's loss curve."""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Mapping, Sequence

from diffax import configuration, sweep_launch

REPORT_FILES = ("report.csv", "report.md", "loss.png")


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


def report_rows(trials: Sequence[Any], workdir: str, run_root: str | None = None) -> tuple[list[str], list[dict]]:
    """The report table: (columns, rows), one row per trial with its overrides and latest metrics."""
    run_root = run_root or workdir
    keys = list(dict.fromkeys(k for t in trials for k in t.overrides))
    eval_keys: list[str] = []
    rows = []
    for t in trials:
        run_dir = os.path.join(run_root, t.name)
        status = sweep_launch.read_status(os.path.join(workdir, t.name))
        steps, losses = loss_curve(run_dir)
        row = {"trial": t.name, "status": status.get("status", "pending")}
        row.update({k: configuration.format_value(t.overrides[k]) if k in t.overrides else "" for k in keys})
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


def write_report(trials: Sequence[Any], workdir: str, run_root: str | None = None) -> dict[str, str]:
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

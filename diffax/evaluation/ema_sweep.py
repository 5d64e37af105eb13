"""`diffax eval --ema 0.03,0.05,0.08`: score post-hoc EMAs of several lengths and find the best (EDM2 Fig. 5).

Karras et al. (2024, Sec. 3.2, Fig. 5) show FID against the EMA length
sigma_rel, reconstructed after training from one run's snapshots. Each
sigma_rel's EMA (`posthoc_snapshots.load`: read, or reconstructed and saved)
is sampled and scored exactly as `job.run_eval` scores a checkpoint; one
record per sigma_rel goes to eval/results.jsonl (with "ema_sigma_rel" and
use_ema "posthoc"), and eval/posthoc_ema.png plots the metric against sigma_rel,
with the fixed-decay EMA of the same step as a dashed line when it was scored.
"""
from __future__ import annotations

import os
import time
from typing import Any, Sequence

from diffax.evaluation import job


def run(config: Any, workdir: str, sigma_rels: Sequence[float], *, step: int | None = None) -> list[dict]:
    """Score the post-hoc EMA of each sigma_rel at snapshot `step` (default: the latest); returns the records."""
    import jax

    from diffax.training import inference

    is_main = jax.process_index() == 0
    os.makedirs(job.eval_dir(workdir), exist_ok=True)
    space = job.feature_space(config, job.eval_dir(workdir)) if is_main else None
    ref = job.reference_stats(config, workdir, space) if is_main else None
    settings = {**job._settings(config, space), "use_ema": "posthoc"} if is_main else {}
    records = []
    for sigma_rel in sorted(sigma_rels):
        t0 = time.time()
        inf = inference.load(workdir, step, config=config, ema_sigma_rel=sigma_rel)
        done = _done(workdir, settings, int(inf.step), float(sigma_rel)) if is_main else None
        if done is not None and jax.process_count() == 1:  # a resumed sweep skips the lengths it scored
            print(f"step {inf.step}, sigma_rel {sigma_rel:g}: already in results.jsonl", flush=True)
            records.append(done)
            continue
        timer = [0.0]
        chunks = job._sample_chunks(config, inf, timer)
        if not is_main:  # the other processes only sample their share
            for _ in chunks:
                pass
            continue
        result = job.score_stream(chunks, [space], [ref], config)
        record = {"step": int(inf.step), **settings, "ema_sigma_rel": float(sigma_rel), "metrics": result,
                  "sample_time_s": round(timer[0], 3), "wall_time_s": round(time.time() - t0, 3), "time": time.time()}
        job._append(workdir, record)
        records.append(record)
        print(f"step {inf.step}, sigma_rel {sigma_rel:g}: " + ", ".join(f"{k}={v:.4g}" for k, v in result.items()),
              flush=True)
    if is_main and records:
        name = space.metric_names["fid"] if space.metric_names["fid"] in records[0]["metrics"] else \
            sorted(records[0]["metrics"])[0]
        best = min(records, key=lambda r: r["metrics"][name])
        path = plot(workdir, records, name)
        print(f"best sigma_rel at step {best['step']}: {best['ema_sigma_rel']:g} ({name} "
              f"{best['metrics'][name]:.4g}); plot in {path}", flush=True)
    return records


def _done(workdir: str, settings: dict, step: int, sigma_rel: float) -> dict | None:
    """The record of this step and sigma_rel with the same settings, if results.jsonl has one."""
    for r in job.read_results(workdir):
        if r["step"] == step and r.get("ema_sigma_rel") == sigma_rel and all(r.get(k) == v for k, v in settings.items()):
            return r
    return None


def plot(workdir: str, records: list[dict], metric: str) -> str:
    """eval/posthoc_ema.png: `metric` against sigma_rel, the best marked; the fixed-decay EMA dashed if scored."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = sorted((r["ema_sigma_rel"], r["metrics"][metric]) for r in records)
    step = records[0]["step"]
    fig = Figure(figsize=(5, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="post-hoc EMA")
    best = min(pts, key=lambda p: p[1])
    ax.plot([best[0]], [best[1]], marker="*", markersize=14, color="C3", linestyle="none",
            label=f"best: sigma_rel {best[0]:g}")
    keys = ("sampler", "steps", "num_samples", "guidance_scale", "feature_space")
    fixed = [r for r in job.read_results(workdir) if r["step"] == step and r.get("use_ema") is True
             and metric in r["metrics"] and all(r.get(k) == records[0].get(k) for k in keys)]
    if fixed:
        ax.axhline(fixed[-1]["metrics"][metric], color="gray", linestyle="--", label="fixed-decay EMA")
    ax.set_xlabel("sigma_rel (EMA length relative to training time)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against EMA length at step {step}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(job.eval_dir(workdir), "posthoc_ema.png")
    fig.savefig(path, dpi=100)
    return path

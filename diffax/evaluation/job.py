"""The evaluation job: walk a run's checkpoints, sample, score, record.

    run_eval(config, workdir)              `diffax eval`: every checkpoint not yet scored
    compute_reference_stats(config, path)  `diffax stats`: statistics of the training images

FID / KID / IS (Heusel et al. 2017; Binkowski et al. 2018; Salimans et al. 2016)
use the FID InceptionV3 when its converted weights exist. Without them, on the
offline digits dataset, a small classifier trained on the data gives
"fd_digits" / "kd_digits" / "is_digits" instead (see `digits_features.py`),
with a warning that says how to get the Inception weights.

Everything goes under `<workdir>/eval/`:
    results.jsonl   one JSON line per (checkpoint, sampler settings); read back to resume
    tb/             TensorBoard scalars, tag "<metric>/<sampler>_<steps>"
    metrics.png     each metric against the training step
    reference_stats.npz, reference_stats_digits.npz, digits_features.npz   caches
Generated images are quantised to uint8 exactly as a PNG would hold them
(`samplers.draw_samples` does it) before any feature extractor sees them;
reference images are the training images as uint8 (no flips, no dequantisation).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Iterator

import numpy as np

from diffax.evaluation import digits_features, inception, metrics, statistics

log = logging.getLogger(__name__)
RESULTS = "results.jsonl"
INCEPTION_SPACE = "fid_inception_v3_pool3"
METRICS = ("fid", "kid", "is")


def eval_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "eval")


# ----------------------------------------------------------------------------- data


def dataset_images(config: Any, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every training image of `config.data` exactly once, in order, as uint8 [B, H, W, C] with labels.

    A direct pass over the data source with the pipeline's own channel conversion
    and pad / resize-and-crop, so the images are those the model trains on, before
    augmentation (no flips, no dequantisation noise) and before scaling to [-1, 1].
    Unreadable images are skipped when config.data.skip_bad is set.
    """
    from diffax.data import pipeline, sources

    src = sources.get_source(config)
    if src.kind != "image" or src.records is None:
        raise ValueError(
            f"Image metrics need image data; config.data.name={config.data.name!r} is not a finite image dataset."
        )
    d = config.data
    imgs, labels, skipped = [], [], 0
    for record in src.records:
        try:
            image, label = src.decode(record)
        except sources.BadImageError:
            if not d.skip_bad:
                raise
            skipped += 1
            continue
        what = src.describe(record)
        image = pipeline.convert_channels(image, d.channels, what)
        image = pipeline.fit_to_size(image, d.image_size, d.resize, what)
        if image.dtype != np.uint8:  # float sources hold [0, 1]
            image = np.round(np.clip(image * 255.0, 0, 255)).astype(np.uint8)
        imgs.append(image)
        labels.append(label)
        if len(imgs) == batch_size:
            yield np.stack(imgs), np.asarray(labels, np.int32)
            imgs, labels = [], []
    if imgs:
        yield np.stack(imgs), np.asarray(labels, np.int32)
    if skipped:
        log.warning("Skipped %d unreadable image(s) of %s.", skipped, config.data.name)


# ----------------------------------------------------------------------------- feature spaces


@dataclasses.dataclass
class FeatureSpace:
    """A feature extractor and the names its metrics are reported under."""

    name: str  # recorded in statistics files and results
    feature_fn: Callable[[np.ndarray], dict[str, np.ndarray]]
    dim: int
    metric_names: dict[str, str]  # "fid" -> "fid" or "fd_digits", ...
    reference_file: str  # default reference statistics file name under eval/


def _digits_fingerprint(config: Any) -> dict:
    d = config.data
    return {"data": str(d.name), "split": str(d.split), "image_size": int(d.image_size),
            "channels": int(d.channels), "resize": str(d.resize)}


def feature_space(config: Any, cache_dir: str) -> FeatureSpace:
    """Inception pool3 when the weights exist; else, for config.data.name == 'digits', the digits net.

    The digits net is trained on first use and cached in `cache_dir`. For any
    other dataset missing weights are an error naming the file and how to get it.
    """
    path = inception.resolve_weights_path(config.eval.inception_weights)
    if os.path.isfile(path):
        model = inception.load_inception(path)
        return FeatureSpace(INCEPTION_SPACE, inception.make_feature_fn(model), inception.NUM_FEATURES,
                            {"fid": "fid", "kid": "kid", "is": "is"}, "reference_stats.npz")
    if config.data.name != "digits":
        raise FileNotFoundError(inception.missing_weights_message(path))
    log.warning(
        "No FID Inception weights (%s), so reporting fd_digits / kd_digits / is_digits: the same formulas in "
        "the feature space of a small classifier trained on the digits, NOT comparable with FID. For FID: %s",
        path, inception.missing_weights_message(path),
    )

    def data_fn():
        batches = list(dataset_images(config, 4096))
        return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])

    net = digits_features.load_or_train(os.path.join(cache_dir, "digits_features.npz"),
                                        _digits_fingerprint(config), data_fn)
    return FeatureSpace(digits_features.feature_space_name(net), digits_features.make_feature_fn(net),
                        digits_features.FEATURE_DIM,
                        {"fid": "fd_digits", "kid": "kd_digits", "is": "is_digits"}, "reference_stats_digits.npz")


def _dataset_stats(config: Any, space: FeatureSpace) -> statistics.FeatureStats:
    from tqdm.auto import tqdm

    bs = int(config.eval.batch_size)
    bar = tqdm(desc="reference features", unit="img")
    stats, _ = statistics.accumulate(
        space.feature_fn, (b for b, _ in dataset_images(config, bs)), batch_size=bs, dim=space.dim,
        keep_features=int(config.eval.kid_reference_features), seed=int(config.seed), progress=bar.update,
    )
    bar.close()
    return stats


def _save(stats: statistics.FeatureStats, path: str, space: FeatureSpace) -> None:
    statistics.save_stats(path, stats.mu, stats.sigma, features=stats.features,
                          feature_space=space.name, num_images=stats.n)


def compute_reference_stats(config: Any, output_path: str) -> dict:
    """`diffax stats --config C --output FILE.npz`: mean/covariance of the dataset's training images.

    Every training image once, as uint8, through the feature space that
    `diffax eval` would use (Inception pool3, or the digits net cached next to
    the output). The .npz holds mu and sigma (pytorch-fid's format) plus a random
    subset of config.eval.kid_reference_features feature rows for KID.
    """
    space = feature_space(config, os.path.dirname(os.path.abspath(output_path)))
    stats = _dataset_stats(config, space)
    _save(stats, output_path, space)
    print(f"wrote {output_path}: {stats.n} images, {space.dim}-d {space.name} features")
    return statistics.load_stats(output_path)


def reference_stats(config: Any, workdir: str, space: FeatureSpace) -> dict:
    """The reference statistics for `space`, computed once and cached.

    Inception: config.eval.reference_stats if set (any pytorch-fid / clean-fid /
    EDM .npz), else <workdir>/eval/reference_stats.npz. Digits space: always
    <workdir>/eval/reference_stats_digits.npz.
    """
    path = os.path.join(eval_dir(workdir), space.reference_file)
    if space.name == INCEPTION_SPACE and config.eval.reference_stats:
        path = os.path.expanduser(config.eval.reference_stats)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config.eval.reference_stats={path!r} does not exist; make it with "
                                    f"`diffax stats --config ... --output {path}` or leave it empty.")
    if not os.path.isfile(path):
        log.info("Computing reference statistics of %s into %s", config.data.name, path)
        _save(_dataset_stats(config, space), path, space)
    ref = statistics.load_stats(path, feature_space=space.name)
    if ref["mu"].shape != (space.dim,):
        raise ValueError(f"{path} holds {ref['mu'].shape[0]}-d statistics; {space.name} features are {space.dim}-d.")
    return ref


# ----------------------------------------------------------------------------- scoring


def score(images: np.ndarray, space: FeatureSpace, ref: dict, config: Any) -> dict[str, float]:
    """Metrics of uint8 sample images against reference statistics, named by the feature space."""
    e = config.eval
    wanted = tuple(e.metrics)
    unknown = sorted(set(wanted) - set(METRICS))
    if unknown:
        raise ValueError(f"Unknown metric(s) {unknown} in config.eval.metrics; valid: {', '.join(METRICS)}.")
    stats, logits = statistics.accumulate(
        space.feature_fn, [images], batch_size=int(e.batch_size), dim=space.dim,
        keep_features=len(images) if "kid" in wanted else 0, keep_logits="is" in wanted,
    )
    out = {}
    if "fid" in wanted:
        out[space.metric_names["fid"]] = metrics.frechet_distance(stats.mu, stats.sigma, ref["mu"], ref["sigma"])
    if "kid" in wanted:
        if ref.get("features") is None:
            log.warning("The reference statistics hold no feature vectors, so no KID: make them with `diffax stats`.")
        else:
            k, k_std = metrics.kernel_distance(stats.features, ref["features"], num_subsets=int(e.kid_subsets),
                                               subset_size=int(e.kid_subset_size), seed=int(config.seed))
            out[space.metric_names["kid"]] = k
            out[space.metric_names["kid"] + "_std"] = k_std
    if "is" in wanted:
        s, s_std = metrics.inception_score(logits, splits=int(e.is_splits))
        out[space.metric_names["is"]] = s
        out[space.metric_names["is"] + "_std"] = s_std
    return out


# ----------------------------------------------------------------------------- results


def _settings(config: Any, space: FeatureSpace) -> dict:
    """What identifies an evaluation besides the step: a record with other settings is not a duplicate."""
    s = config.sampling
    return {"sampler": str(s.sampler), "steps": int(s.steps), "num_samples": int(config.eval.num_samples),
            "use_ema": bool(s.use_ema), "guidance_scale": float(s.guidance_scale), "feature_space": space.name}


def read_results(workdir: str) -> list[dict]:
    """All records of <workdir>/eval/results.jsonl (a torn last line from a crash is ignored)."""
    path = os.path.join(eval_dir(workdir), RESULTS)
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("Ignoring a malformed line in %s", path)
    return out


def _done_steps(workdir: str, settings: dict) -> set[int]:
    return {r["step"] for r in read_results(workdir) if all(r.get(k) == v for k, v in settings.items())}


def _append(workdir: str, record: dict) -> None:
    path = os.path.join(eval_dir(workdir), RESULTS)
    torn = False
    if os.path.isfile(path) and os.path.getsize(path):
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"  # a crash mid-write left a partial line: start a new one
    with open(path, "a", encoding="utf-8") as f:
        f.write(("\n" if torn else "") + json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def plot_results(workdir: str, path: str | None = None) -> str | None:
    """PNG of every metric against the training step, one line per sampler setting (matplotlib Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_results(workdir)
    names = sorted({k for r in records for k in r["metrics"] if not k.endswith("_std")})
    if not names:
        return None
    fig = Figure(figsize=(4.5 * len(names), 3.5))
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        groups: dict[str, list] = {}
        for r in records:
            if name in r["metrics"]:
                label = f"{r['sampler']} {r['steps']} steps, n={r['num_samples']}"
                groups.setdefault(label, []).append((r["step"], r["metrics"][name]))
        for label, pts in sorted(groups.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xlabel("training step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = path or os.path.join(eval_dir(workdir), "metrics.png")
    fig.savefig(path, dpi=100)
    return path


# ----------------------------------------------------------------------------- the job


def _eval_seed(config: Any) -> int:
    """The sampling seed of every evaluation: fixed per config seed, distinct from training's streams."""
    return int(np.random.SeedSequence([int(config.seed) % 2**32, 0xE7A1]).generate_state(1)[0] % 2**31)


def _draw(config: Any, inf: Any) -> np.ndarray:
    shape = inf.diffusion.data_shape
    if len(shape) != 3:
        raise ValueError(f"Image metrics need image data; config.data.name={config.data.name!r} gives shape {shape}.")
    out = inf.draw(int(config.eval.num_samples), _eval_seed(config), batch_size=int(config.eval.batch_size))
    images = out["images"]
    return images if images.dtype == np.uint8 else statistics.to_uint8(images)


def _pending(config: Any, workdir: str, settings: dict, mode: str, step: int | None) -> list[int]:
    from diffax.training import checkpoint

    steps = checkpoint.all_steps(workdir)
    if mode == "step":
        if step not in steps:
            raise ValueError(f"No checkpoint at step {step} in {workdir}; available steps: {steps}.")
        steps = [step]
    elif mode == "latest":
        steps = steps[-1:]
    elif mode != "all":
        raise ValueError(f"mode must be 'all', 'latest' or 'step', got {mode!r}.")
    done = _done_steps(workdir, settings) if settings else set()
    pending = [s for s in steps if s not in done]
    import jax

    if jax.process_count() > 1:  # every process must sample the same checkpoints: process 0 decides
        from jax.experimental import multihost_utils

        arr = np.full(len(steps), -1, np.int64)
        arr[: len(pending)] = pending
        arr = np.asarray(multihost_utils.broadcast_one_to_all(arr))
        pending = [int(s) for s in arr if s >= 0]
    return pending


def _agree(flag: bool) -> bool:
    """Process 0's value of `flag` on every process (so all leave the watch loop together)."""
    import jax

    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def run_eval(
    config: Any,
    workdir: str,
    *,
    step: int | None = None,
    mode: str = "all",
    watch: bool = False,
) -> list[dict]:
    """`diffax eval`: score the run's checkpoints and append one record per checkpoint to eval/results.jsonl.

    mode "all" scores every checkpoint, "latest" the newest, "step" the one at
    `step` (giving `step` implies it). Checkpoints already in results.jsonl with
    the same sampler, steps, num_samples, use_ema, guidance and feature space are
    skipped, so a preempted job resumes where it stopped. With `watch`, polls every
    config.eval.watch_interval seconds for new checkpoints until step
    config.training.num_steps is scored (or config.eval.watch_timeout seconds pass
    without a new checkpoint). Returns the records written by this call.
    """
    import jax

    from diffax.training import inference

    if step is not None:
        mode = "step"
    is_main = jax.process_index() == 0
    edir = eval_dir(workdir)
    os.makedirs(edir, exist_ok=True)
    # Only process 0 extracts features, scores and writes; the others only sample with it.
    space = feature_space(config, edir) if is_main else None
    settings = _settings(config, space) if is_main else {}
    ref = reference_stats(config, workdir, space) if is_main else None
    writer = None
    if is_main:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(os.path.join(edir, "tb"))
    written, final = [], int(config.training.num_steps)
    from diffax.training import checkpoint

    if not checkpoint.all_steps(workdir):
        log.warning("No checkpoint in %s yet%s.", workdir, "; waiting for one" if watch else "")
    last_new = time.time()
    try:
        while True:
            pending = _pending(config, workdir, settings, mode, step)
            for s in pending:
                t0 = time.time()
                inf = inference.load(workdir, s, use_ema=bool(config.sampling.use_ema), config=config)
                images = _draw(config, inf)
                t_sample = time.time() - t0
                result = score(images, space, ref, config) if is_main else {}
                record = {"step": int(s), **settings, "metrics": result, "sample_time_s": round(t_sample, 3),
                          "wall_time_s": round(time.time() - t0, 3), "time": time.time()}
                written.append(record)
                if is_main:
                    _append(workdir, record)
                    tag = f"{settings['sampler']}_{settings['steps']}"
                    for k, v in result.items():
                        writer.add_scalar(f"{k}/{tag}", v, s)
                    writer.flush()
                    plot_results(workdir)
                    print(f"step {s}: " + ", ".join(f"{k}={v:.4g}" for k, v in result.items())
                          + f" ({record['wall_time_s']:.1f} s)", flush=True)
                last_new = time.time()
            if not watch or mode != "all":
                break
            timeout = float(config.eval.watch_timeout)
            timed_out = timeout > 0 and time.time() - last_new > timeout
            if _agree(timed_out or (is_main and final in _done_steps(workdir, settings))):
                if timed_out:
                    log.warning("No new checkpoint for %.0f s (config.eval.watch_timeout); stopping.", timeout)
                break
            time.sleep(float(config.eval.watch_interval))
    finally:
        if writer is not None:
            writer.close()
    return written

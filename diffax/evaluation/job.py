"""The evaluation job: walk a run's checkpoints, sample, score, record.

    run_eval(config, workdir)              `diffax eval`: every checkpoint not yet scored
    compute_reference_stats(config, path)  `diffax stats`: statistics of the training images

FID / KID / IS (Heusel et al. 2017; Binkowski et al. 2018; Salimans et al. 2016)
use the FID InceptionV3 when its converted weights exist, with the preprocessing
of config.eval.protocol (`protocols.py`). Without them, on the offline digits
dataset, a small classifier trained on the data gives "fd_digits" / "kd_digits" /
"is_digits" instead (see `digits_features.py`), with a warning that says how to
get the Inception weights. With config.eval.dinov2_weights set, FD-DINOv2 (Stein
et al. 2023) is reported too, as "fd_dinov2" (`dinov2.py`).

Everything goes under `<workdir>/eval/`:
    results.jsonl   one JSON line per (checkpoint, sampler settings); read back to resume
    tb/             TensorBoard scalars, tag "<metric>/<sampler>_<steps>"
    metrics.png     each metric against the training step
    reference_stats_<protocol>.npz, reference_stats_digits.npz, reference_stats_dinov2.npz,
    digits_features.npz   caches; each statistics file records its extractor and protocol
Samples are drawn and scored in chunks (`_sample_chunks`): only one chunk of images
is in host memory at a time, whatever config.eval.num_samples is.
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
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from diffax.errors import UserError
from diffax.evaluation import digits_features, inception, metrics, prompt_fidelity, protocols, statistics

log = logging.getLogger(__name__)
RESULTS = "results.jsonl"
INCEPTION_SPACE = inception.EXTRACTOR
DIGITS_PROTOCOL = "digits-native"  # the digits net's own input: uint8 / 255 at the data's size
METRICS = ("fid", "kid", "is")
SAMPLE_CHUNK_BATCHES = 4  # images drawn per chunk = this x config.eval.batch_size


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
    from diffax.training.latent import pixel_data_config

    config = pixel_data_config(config)  # a latent cache's source images
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

    name: str  # the extractor, recorded in statistics files and results
    protocol: str  # its preprocessing, recorded beside it (protocols.py for Inception)
    feature_fn: Callable[[np.ndarray], dict[str, np.ndarray]]
    dim: int
    metric_names: dict[str, str]  # "fid" -> "fid" or "fd_digits", ...
    reference_file: str  # default reference statistics file name under eval/
    metrics: tuple[str, ...] = METRICS  # which of METRICS this space reports


def _digits_fingerprint(config: Any) -> dict:
    d = config.data
    return {"data": str(d.name), "split": str(d.split), "image_size": int(d.image_size),
            "channels": int(d.channels), "resize": str(d.resize)}


def feature_space(config: Any, cache_dir: str) -> FeatureSpace:
    """Inception pool3 when the weights exist; else, for config.data.name == 'digits', the digits net.

    The Inception input follows config.eval.protocol. Missing weights are fetched
    first when config.eval.download_weights is set. The digits net is trained on
    first use and cached in `cache_dir`. For any other dataset missing weights are
    an error naming the file and how to get it.
    """
    import jax

    protocol = protocols.check_protocol(str(config.eval.protocol))
    path = inception.resolve_weights_path(config.eval.inception_weights)
    if os.path.isfile(path) or config.eval.download_weights:
        model = inception.load_inception(inception.ensure_weights(path, download=bool(config.eval.download_weights)))
        feature_fn = inception.make_feature_fn(model, protocol, devices=jax.local_devices())
        return FeatureSpace(INCEPTION_SPACE, protocol, feature_fn, inception.NUM_FEATURES,
                            {"fid": "fid", "kid": "kid", "is": "is"}, f"reference_stats_{protocol}.npz")
    from diffax.training.latent import pixel_data_config

    config = pixel_data_config(config)  # a latent cache's source images
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
    return FeatureSpace(digits_features.feature_space_name(net), DIGITS_PROTOCOL, digits_features.make_feature_fn(net),
                        digits_features.FEATURE_DIM,
                        {"fid": "fd_digits", "kid": "kd_digits", "is": "is_digits"}, "reference_stats_digits.npz")


def dinov2_space(config: Any) -> FeatureSpace | None:
    """The FD-DINOv2 feature space when config.eval.dinov2_weights names a transformers Dinov2Model folder."""
    if not config.eval.dinov2_weights:
        return None
    import jax

    from diffax.evaluation import dinov2

    model = dinov2.load_dinov2(os.path.expanduser(config.eval.dinov2_weights))
    return FeatureSpace(dinov2.extractor_name(model), dinov2.PROTOCOL,
                        dinov2.make_feature_fn(model, devices=jax.local_devices()), model.hidden_size,
                        {"fid": "fd_dinov2"}, "reference_stats_dinov2.npz", metrics=("fid",))


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
                          feature_space=space.name, protocol=space.protocol, num_images=stats.n)


def compute_reference_stats(config: Any, output_path: str) -> dict:
    """`diffax stats --config C --output FILE.npz`: mean/covariance of the dataset's training images.

    Every training image once, as uint8, through the feature space that
    `diffax eval` would use (Inception pool3, or the digits net cached next to
    the output). The .npz holds mu and sigma (pytorch-fid's format) plus a random
    subset of config.eval.kid_reference_features feature rows for KID, and the
    extractor and protocol (config.eval.protocol) that made them.
    """
    space = feature_space(config, os.path.dirname(os.path.abspath(output_path)))
    stats = _dataset_stats(config, space)
    _save(stats, output_path, space)
    print(f"wrote {output_path}: {stats.n} images, {space.dim}-d {space.name} features, protocol {space.protocol}")
    return statistics.load_stats(output_path)


def reference_stats(config: Any, workdir: str, space: FeatureSpace) -> dict:
    """The reference statistics for `space`, computed once and cached.

    Inception: config.eval.reference_stats if set (any pytorch-fid / clean-fid /
    EDM .npz, whose protocol config.eval.reference_protocol must state when the
    file does not record it), else <workdir>/eval/reference_stats_<protocol>.npz.
    Digits and DINOv2 spaces: <workdir>/eval/<space.reference_file>. Statistics of
    another protocol than the features' are an error naming both.
    """
    path = os.path.join(eval_dir(workdir), space.reference_file)
    stated = ""
    if space.name == INCEPTION_SPACE and config.eval.reference_stats:
        stated = str(config.eval.reference_protocol)
        if stated:
            protocols.check_protocol(stated, "config.eval.reference_protocol")
        path = os.path.expanduser(config.eval.reference_stats)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config.eval.reference_stats={path!r} does not exist; make it with "
                                    f"`diffax stats --config ... --output {path}` or leave it empty.")
    if not os.path.isfile(path):
        log.info("Computing reference statistics of %s into %s", config.data.name, path)
        _save(_dataset_stats(config, space), path, space)
    ref = statistics.load_stats(path, feature_space=space.name)
    if space.name == INCEPTION_SPACE or ref["protocol"]:  # caches of the other spaces predate protocols
        statistics.check_comparable(ref, path, protocol=space.protocol, stated_protocol=stated)
    if ref["mu"].shape != (space.dim,):
        raise ValueError(f"{path} holds {ref['mu'].shape[0]}-d statistics; {space.name} features are {space.dim}-d.")
    return ref


# ----------------------------------------------------------------------------- scoring


def score(images: np.ndarray, space: FeatureSpace, ref: dict, config: Any) -> dict[str, float]:
    """Metrics of uint8 sample images against reference statistics, named by the feature space."""
    return score_stream([images], [space], [ref], config)


def score_stream(chunks: Iterable[np.ndarray], spaces: list[FeatureSpace], refs: list[dict],
                 config: Any) -> dict[str, float]:
    """Metrics of a stream of uint8 sample batches in every feature space, each against its reference.

    Each chunk goes through every space's extractor before the next is drawn, so
    host memory holds one chunk of images, not all samples; per space it keeps the
    D x D statistics, the features for KID and the logits for IS (float32 rows).
    """
    e = config.eval
    wanted = tuple(e.metrics)
    unknown = sorted(set(wanted) - set(METRICS))
    if unknown:
        raise ValueError(f"Unknown metric(s) {unknown} in config.eval.metrics; valid: {', '.join(METRICS)}.")
    num = int(e.num_samples)
    accs = []
    for space in spaces:
        want = [m for m in wanted if m in space.metrics] or ["fid"]  # a space always gives its distance
        accs.append((want, statistics.Accumulator(
            space.feature_fn, batch_size=int(e.batch_size), dim=space.dim,
            keep_features=num if "kid" in want else 0, keep_logits="is" in want)))
    for chunk in chunks:
        for _, acc in accs:
            acc.add(chunk)
    out = {}
    for space, ref, (want, acc) in zip(spaces, refs, accs):
        stats, logits = acc.finish()
        names = space.metric_names
        if "fid" in want:
            out[names["fid"]] = metrics.frechet_distance(stats.mu, stats.sigma, ref["mu"], ref["sigma"])
        if "kid" in want:
            if ref.get("features") is None:
                log.warning("The reference statistics hold no feature vectors, so no KID: make them with `diffax stats`.")
            else:
                k, k_std = metrics.kernel_distance(stats.features, ref["features"], num_subsets=int(e.kid_subsets),
                                                   subset_size=int(e.kid_subset_size), seed=int(config.seed))
                out[names["kid"]] = k
                out[names["kid"] + "_std"] = k_std
        if "is" in want:
            s_mean, s_std = metrics.inception_score(logits, splits=int(e.is_splits))
            out[names["is"]] = s_mean
            out[names["is"] + "_std"] = s_std
    return out


# ----------------------------------------------------------------------------- results


def _settings(config: Any, space: FeatureSpace, dino: FeatureSpace | None = None) -> dict:
    """What identifies an evaluation besides the step: a record with other settings is not a duplicate."""
    s = config.sampling
    return {"sampler": str(s.sampler), "steps": int(s.steps), "num_samples": int(config.eval.num_samples),
            "use_ema": bool(s.use_ema), "guidance_scale": float(s.guidance_scale), "feature_space": space.name,
            "protocol": space.protocol, "dinov2": dino.name if dino else ""}


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

    records = [r for r in read_results(workdir) if "ema_sigma_rel" not in r]  # post-hoc EMA: ema_sweep.plot
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


def _check_image_data(config: Any) -> None:
    from diffax import data

    shape = tuple(data.data_shape(config))
    if len(shape) != 3:
        raise UserError(f"diffax eval scores images (FID, KID, IS); config.data.name={config.data.name!r} gives points "
                        f"of shape {shape}, which no image feature network (Inception or the digits net) can score. "
                        "Look at the samples diffax train writes (samples/*.png) instead.")


def _sample_chunks(config: Any, inf: Any, timer: list[float]) -> Iterator[np.ndarray]:
    """config.eval.num_samples uint8 samples, drawn and yielded SAMPLE_CHUNK_BATCHES batches at a time.

    Chunk c is drawn with its own seed (from the eval seed and c), so the samples
    are a fixed function of the config and never all in memory. Seconds spent
    sampling are added to timer[0].
    """
    import jax
    from tqdm.auto import tqdm

    total, bs = int(config.eval.num_samples), int(config.eval.batch_size)
    chunk = bs * SAMPLE_CHUNK_BATCHES
    bar = tqdm(total=total, desc="sampling + features", unit="img", disable=jax.process_index() != 0)
    prompts = _eval_prompts(config, total) if getattr(inf, "is_text", False) else None
    for c, lo in enumerate(range(0, total, chunk)):
        seed = int(np.random.SeedSequence([_eval_seed(config), c]).generate_state(1)[0] % 2**31)
        t0 = time.time()
        n = min(chunk, total - lo)
        text = {} if prompts is None else {"labels": inf.prompt_tokens(prompts[lo:lo + n])}
        images = inf.draw(n, seed, batch_size=bs, progress=False, **text)["images"]
        timer[0] += time.time() - t0
        yield images if images.dtype == np.uint8 else statistics.to_uint8(images)
        bar.update(len(images))
    bar.close()


def _eval_prompts(config: Any, total: int) -> list[str]:
    """A text model's FID prompts: config.eval.prompts (a file, one per line), else the data set's own
    captions (the first of each image, in order, cycled)."""
    from diffax.data import sources
    from diffax.training import text

    path = str(config.eval.get("prompts", "") or "")
    if path:
        prompts = text.read_prompts((), path)
    else:
        src = sources.get_source(config)
        if src.captions is None or not src.records:
            raise UserError(f"{src.name} has no captions to draw FID samples from: set config.eval.prompts to a file.")
        prompts = [src.captions(src.records[i])[0] for i in range(min(total, len(src.records)))]
    if not prompts:
        raise UserError(f"config.eval.prompts={path}: the file holds no prompt.")
    return [prompts[i % len(prompts)] for i in range(total)]


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
    from diffax.training import workdir as workdir_lib

    if step is not None:
        mode = "step"
    is_main = jax.process_index() == 0
    _check_image_data(config)
    edir = eval_dir(workdir)
    workdir_lib.check_writable(edir, what="--workdir (results go to its eval/ folder)")
    # Only process 0 extracts features, scores and writes; the others only sample with it.
    space = feature_space(config, edir) if is_main else None
    dino = dinov2_space(config) if is_main else None
    spaces = [space] + ([dino] if dino else []) if is_main else []
    settings = _settings(config, space, dino) if is_main else {}
    refs = [reference_stats(config, workdir, sp) for sp in spaces]
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
                try:
                    inf = inference.load(workdir, s, use_ema=bool(config.sampling.use_ema), config=config)
                except checkpoint.DamagedCheckpoint as e:  # the others can still be scored
                    if mode == "step":
                        raise
                    checkpoint.warn(f"{e} Skipping it.")
                    continue
                timer = [0.0]
                chunks = _sample_chunks(config, inf, timer)
                if is_main:
                    result = score_stream(chunks, spaces, refs, config)
                else:  # the other processes only take part in sampling
                    result = {}
                    for _ in chunks:
                        pass
                t_sample = timer[0]
                if prompt_fidelity.applies(config):  # every process samples; process 0 classifies and scores
                    classify = prompt_fidelity.digits_classifier(config, edir) if is_main else None
                    result.update(prompt_fidelity.evaluate(
                        workdir, s, config, classify,
                        per_digit=int(config.eval.get("prompt_fidelity_per_digit", 50)), seed=_eval_seed(config)))
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

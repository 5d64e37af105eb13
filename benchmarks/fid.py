"""FID job throughput: `python -m benchmarks.fid [--num-samples 10000] [--output fid.json]`.

Images/s of the FID feature path as `diffax eval` runs it: uint8 images -> the
protocol's resize and scaling (`evaluation/protocols.py`) -> InceptionV3 pool3 and
logits, each batch split over all devices (`inception.make_feature_fn(devices=...)`),
-> float64 running mean / covariance on the host (`statistics.Accumulator`), then the
Frechet distance to a second set. The images are seeded uniform noise at
--image-size (what the pixels are does not change the work). With --weights the
converted Inception weights are used; without, seeded random weights of the same
shapes (same FLOPs; the FID value is then meaningless, the throughput is not).

Reported: wall time of the first (compiling) batch, then the median of per-batch
times, images/s over the whole stream, and the host memory high-water mark
(ru_maxrss) at the end. Times on a shared or busy machine are not results.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics as stats
import sys
import time

import jax
import numpy as np
from flax import nnx

from benchmarks.common import environment
from diffax.evaluation import inception, metrics, protocols
from diffax.evaluation import statistics as fid_stats


def images_stream(num: int, batch: int, size: int, seed: int):
    """`num` seeded uint8 noise images [size, size, 3] in batches of `batch` (generated batch by batch)."""
    rng = np.random.default_rng(seed)
    for lo in range(0, num, batch):
        yield rng.integers(0, 256, (min(batch, num - lo), size, size, 3), dtype=np.uint8)


def run(num_samples: int, batch_size: int, image_size: int, protocol: str, weights: str) -> dict:
    devices = jax.devices()
    if batch_size % len(devices):
        raise ValueError(f"--batch-size {batch_size} must be a multiple of the {len(devices)} devices")
    if weights:
        model = inception.load_inception(weights)
    else:
        model = inception.InceptionV3(rngs=nnx.Rngs(0))
    feature_fn = inception.make_feature_fn(model, protocol, devices=devices)
    times: list[float] = []

    def timed(images):
        t0 = time.perf_counter()
        out = feature_fn(images)  # np.asarray inside: waits for the devices
        times.append(time.perf_counter() - t0)
        return out

    t_start = time.perf_counter()
    acc = fid_stats.Accumulator(timed, batch_size=batch_size, dim=inception.NUM_FEATURES)
    for batch in images_stream(num_samples, batch_size, image_size, seed=0):
        acc.add(batch)
    a, _ = acc.finish()
    wall = time.perf_counter() - t_start
    b, _ = fid_stats.accumulate(feature_fn, images_stream(num_samples, batch_size, image_size, seed=1),
                                batch_size=batch_size, dim=inception.NUM_FEATURES)
    fid = metrics.frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    steady = times[1:] or times
    return {
        "num_samples": num_samples, "batch_size": batch_size, "image_size": image_size, "protocol": protocol,
        "weights": weights or "random (seeded)", "devices": len(devices),
        "first_batch_s": times[0], "median_batch_s": stats.median(steady),
        "images_per_s_steady": batch_size / stats.median(steady), "images_per_s_total": num_samples / wall,
        "wall_s": wall, "fid_noise_vs_noise": fid,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fid", description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=500, help="a multiple of the device count")
    p.add_argument("--image-size", type=int, default=32, help="side of the square input images (resized to 299)")
    p.add_argument("--protocol", default=protocols.DEFAULT, choices=protocols.PROTOCOLS)
    p.add_argument("--weights", default="", help="converted Inception weights (.npz); default: random weights")
    p.add_argument("--output", default="", help="write the results as JSON here")
    args = p.parse_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    meta = environment(given)
    meta["command"] = " ".join(["python -m benchmarks.fid", *given])
    result = {"meta": meta, **run(args.num_samples, args.batch_size, args.image_size, args.protocol, args.weights)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()

"""Latent diffusion benchmark: `python -m benchmarks.latent [--quick] [--autoencoder DIR] [--output R.json]`.

Measures, in one run on whatever devices JAX finds:

  encode            the autoencoder's encoder on device batches: images/s (median over repeats after a
                    warm-up), and the wall time of the whole `diffax encode-data` pass (decode, resize,
                    encode, write shards; compile included) over the data set
  train step        the same denoiser config trained on pixels and on the cache's latents (benchmarks/
                    train_step.py's Bench, the trainer's step on a fixed batch): images/s of each and
                    their ratio latent / pixel, formed within this run

Default: the bundled digits at 32x32 RGB, the random-weight SD-layout test autoencoder
(tests/fixtures/diffusers_vae/sd: factor 2, 4 channels) and configs/cifar10_ddpm.py:small's UNet;
pass --autoencoder for a real one (e.g. SD's VAE at --image_size 256). Wall-clock figures are only
meaningful on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

from benchmarks.common import environment, median
from benchmarks.train_step import Bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "diffusers_vae", "sd")


def pixel_config(image_size: int, batch_size: int, autoencoder: str):
    from configs import cifar10_ddpm

    config = cifar10_ddpm.get_config("small")
    config.data.name, config.data.image_size, config.data.channels = "digits", image_size, 3
    config.data.random_flip, config.data.num_workers = False, 0
    config.training.batch_size = batch_size
    config.model.attention_resolutions = ()
    config.autoencoder.path = autoencoder
    return config


def encode_throughput(config, repeats: int, batch_size: int) -> float:
    """Images/s of the jitted encoder on one device batch (median over `repeats` after a warm-up)."""
    from flax import nnx

    from diffax.models.diffusers_vae import load_diffusers_autoencoder

    model, _ = load_diffusers_autoencoder(config.autoencoder.path)
    graphdef, state = nnx.split(model)
    encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x))
    x = np.random.default_rng(0).uniform(-1, 1, (batch_size, config.data.image_size, config.data.image_size,
                                                  config.data.channels)).astype(np.float32)  # fmt: skip
    jax.block_until_ready(encode(state, x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(encode(state, x))
        times.append(time.perf_counter() - start)
    return batch_size / median(times)


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few repeats, batch 8: a CPU smoke run")
    p.add_argument("--autoencoder", default=FIXTURE)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--output", default="")
    args = p.parse_args(argv)
    from diffax.training.encode_data import encode_data

    repeats, steps, batch = (2, 2, 8) if args.quick else (10, 10, 64)
    config = pixel_config(args.image_size, batch, args.autoencoder)
    result = {"environment": environment(sys.argv), "autoencoder": args.autoencoder, "image_size": args.image_size}
    result["encode_images_per_s"] = encode_throughput(config, repeats, batch)
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        meta = encode_data(config, cache, shard_size=512, batch_size=batch, progress=False)
        result["encode_data_wall_s"] = time.perf_counter() - start
        result["encode_data_images"] = meta["num_examples"]
        result["latent_shape"] = meta["latent_shape"]
        rows = {}
        for name, cfg in (("pixel", config), ("latent", config.copy_and_resolve_references())):
            if name == "latent":
                cfg.data.name = f"latents:{cache}"
            else:
                cfg.autoencoder.path = ""
            bench = Bench(cfg)
            rows[name] = bench.throughput(repeats, steps)["images_per_s"]
        result["train_images_per_s"] = rows
        result["latent_over_pixel"] = rows["latent"] / rows["pixel"]
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

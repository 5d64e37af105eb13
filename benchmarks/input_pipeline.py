"""Input-pipeline throughput: images/s of diffax.data for 32x32 folder and TFDS sources.

    python -m benchmarks.input_pipeline [--num-images 2048] [--batch-size 128] [--workers 0,1,2]
                                        [--output results.json]

Writes a folder of 32x32 RGB PNGs and the same images as a TFDS dataset in
ArrayRecord format (built without TensorFlow) in a temporary directory, then
times host batches (`DataIterator.next_local`: read, decode, flip, scale,
batch) with 0, 1 and 2 Grain worker processes. Each number is the median
over `--repeats` timed runs of `--batches` batches after `--warmup` batches.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np
from PIL import Image


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def synthetic_images(n: int, size: int = 32) -> list[bytes]:
    """Smooth random colour images (they compress like photos rather than like noise)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(0, 2 * np.pi, 3)
        image = np.stack([np.sin(6 * x + a), np.cos(5 * y + b), np.sin(4 * (x + y) + c)], -1)
        out.append(png(((image + 1) * 127.5).astype(np.uint8)))
    return out


def write_folder(root: str, images: list[bytes]) -> str:
    for i, data in enumerate(images):
        directory = os.path.join(root, f"class_{i % 10}")
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"{i:06d}.png"), "wb") as f:
            f.write(data)
    return root


def write_tfds(data_dir: str, images: list[bytes]) -> str:
    """A TFDS dataset `diffax_bench_images` in ArrayRecord format (PNG bytes: no TensorFlow needed)."""
    import tensorflow_datasets as tfds

    class DiffaxBenchImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {"image": tfds.features.Image(shape=(32, 32, 3)), "label": tfds.features.ClassLabel(num_classes=10)}
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, data in enumerate(images):
                yield i, {"image": data, "label": i % 10}

    DiffaxBenchImages(data_dir=data_dir).download_and_prepare(file_format="array_record")
    return "diffax_bench_images"


def measure(config, warmup: int, batches: int, repeats: int) -> dict:
    from diffax import data

    it = data.make_iterator(config, process_index=0, process_count=1)
    try:
        start = time.perf_counter()
        for _ in range(warmup):
            it.next_local()
        first = time.perf_counter() - start
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(batches):
                batch = it.next_local()
            rates.append(batches * len(batch["label"]) / (time.perf_counter() - start))
    finally:
        it.close()
    return {"images_per_s": statistics.median(rates), "runs": rates, "warmup_s": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    parser.add_argument("--read-threads", default="", help="comma-separated config.data.read_threads values "
                        "(default: the config's)")
    parser.add_argument("--warmup", type=int, default=5, help="batches before timing")
    parser.add_argument("--batches", type=int, default=20, help="batches per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
    parser.add_argument("--random-flip", action="store_true", default=True)
    parser.add_argument("--output", default="", help="write the results as JSON here")
    args = parser.parse_args()

    from configs.default import get_config

    workers = [int(w) for w in args.workers.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        images = synthetic_images(args.num_images)
        sources = {
            "folder": f"folder:{write_folder(os.path.join(tmp, 'folder'), images)}",
            "tfds": f"tfds:{write_tfds(os.path.join(tmp, 'tfds'), images)}",
        }
        threads = [int(t) for t in args.read_threads.split(",")] if args.read_threads else [None]
        for source, name in sources.items():
            for num_workers, read_threads in ((w, t) for w in workers for t in threads):
                config = get_config()
                config.data.name = name
                config.data.data_dir = os.path.join(tmp, "tfds")
                config.data.image_size = 32
                config.data.channels = 3
                config.data.random_flip = args.random_flip
                config.data.num_workers = num_workers
                if read_threads is not None:
                    config.data.read_threads = read_threads
                config.training.batch_size = args.batch_size
                r = measure(config, args.warmup, args.batches, args.repeats)
                r.update(source=source, num_workers=num_workers, read_threads=config.data.read_threads)
                results.append(r)
                print(f"{source:7s} workers={num_workers} threads={config.data.read_threads}: "
                      f"{r['images_per_s']:9.0f} images/s", flush=True)

    print("\n| source | workers | read threads | images/s (median) | first batches (s) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['source']} 32x32 PNG | {r['num_workers']} | {r['read_threads']} | "
              f"{r['images_per_s']:.0f} | {r['warmup_s']:.2f} |")
    meta = {
        "benchmark": "input_pipeline",
        "num_images": args.num_images,
        "batch_size": args.batch_size,
        "warmup_batches": args.warmup,
        "timed_batches": args.batches,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "results": results,
    }
    if args.output:
        with open(args.output, "w") as f:
            json.dump(meta, f, indent=2)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

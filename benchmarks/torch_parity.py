"""diffax against PyTorch on the CPU, same UNet, same weights: `python -m benchmarks.torch_parity`.

A random diffusers UNet2DModel with the DDPM CIFAR-10 layout (Ho et al. 2020; 35.7M parameters;
`--small` for a small one) is built and saved by benchmarks/torch_side.py, which runs in a venv with
torch and diffusers (`--torch-python`, default /work/torchvenv/bin/python or $DIFFAX_TORCH_PYTHON) as a
child process; this process imports the saved folder with diffax's importer (diffax/models/diffusers.py,
what `diffax import-diffusers` uses) and times both sides on the same weights:

  train    diffax: the jitted train step as the trainer builds it (benchmarks/train_step.py `Bench`:
           eps MSE, gradients, global-norm clipping, Adam, EMA, donated state, diffax/compilation.py's
           compiler options); PyTorch: eager eps MSE, backward, clip_grad_norm_, Adam, EMA.
  sample   DDIM, eta 0, `--steps` network calls: diffax's sampler as `diffax sample` jits it
           (diffax/training/inference.py) against diffusers' DDIMScheduler loop under inference_mode.

Each setting runs in interleaved rounds (diffax then PyTorch, the order swapped every round) after one
warm-up call of each, and the speed ratio PyTorch seconds / diffax seconds is formed within each round,
so load from other users of a shared machine hits both sides alike; the table shows the median ratio
(> 1: diffax is faster). Both sides use `--threads` threads (torch.set_num_threads; XLA:CPU's pool is
sized by the cores it sees, so run on a machine or cpuset of that many cores).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import jax

from configs.default import get_config
from diffax import compilation, host_memory
from diffax.models.diffusers import load_diffusers_unet
from diffax.training import inference
from diffax.training.importing import merge

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TORCH_PYTHON = "/work/torchvenv/bin/python"


def torch_python() -> str | None:
    """The python of a venv with torch and diffusers, or None."""
    path = os.environ.get("DIFFAX_TORCH_PYTHON", DEFAULT_TORCH_PYTHON)
    return path if os.path.exists(path) else None


class TorchSide:
    """benchmarks/torch_side.py as a child process: one JSON command, one JSON answer."""

    def __init__(self, python: str, folder: str, small: bool, threads: int):
        cmd = [python, os.path.join(HERE, "torch_side.py"), "--folder", folder, "--threads", str(threads)]
        self.proc = subprocess.Popen(cmd + (["--small"] if small else []), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmarks/torch_side.py exited with code {self.proc.wait()}")
        return json.loads(line)

    def ask(self, **cmd: Any) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write('{"op": "quit"}\n')
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def imported_config(folder: str, batch: int, steps: int) -> tuple[Any, Any]:
    """(config, net params) of the diffusers folder as `diffax import-diffusers` makes them."""
    from flax import nnx

    overrides, model = load_diffusers_unet(folder)
    config = get_config()
    merge(config, overrides)
    config.training.batch_size = batch
    config.optimizer.learning_rate = 2e-4
    config.optimizer.warmup_steps = 0
    config.sampling.steps = steps
    config.sampling.eta = 0.0
    return config, nnx.split(model, nnx.Param, ...)[1]


class DiffaxSide:
    """The trainer's train step and `diffax sample`'s sampler for one batch size, on the imported weights."""

    def __init__(self, folder: str, batch: int, steps: int, compiler_options: Any = "config"):
        from benchmarks.train_step import Bench
        from diffax.training.step import init_state

        config, net = imported_config(folder, batch, steps)
        self.bench = Bench(config, compiler_options)
        diffusion = dataclasses.replace(self.bench.diffusion, params={**self.bench.diffusion.params, "net": net})
        self.bench.state = jax.device_put(init_state(diffusion, self.bench.tx), self.bench.state_shardings)
        self.compile_s = None  # the train step compiles on its first call
        sample = inference.make_sample_fn(diffusion, config, self.bench.mesh, self.bench.state_shardings.ema)
        if compiler_options != "config":  # a study: the sampler compiled with the same options
            sample = jax.jit(sample.__wrapped__, compiler_options=compiler_options)
        self.noise = jax.random.normal(jax.random.key(1), (batch, *diffusion.data_shape))
        self.labels = None
        self.sample_fn = sample

    def train(self) -> None:
        if self.bench.compiled is None:
            self.bench.compiled, self.compile_s = self.bench.compile_once()
        jax.block_until_ready(self.bench.step(self.bench.batch))

    def sample(self) -> None:
        jax.block_until_ready(self.sample_fn(self.bench.state.ema, self.noise, jax.random.key(2), self.labels))


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_ratios(diffax_fn: Callable[[], None], torch_fn: Callable[[], float], rounds: int) -> dict:
    """Seconds of each side per round (diffax first in even rounds, PyTorch first in odd ones) after a warm-up
    call of each, and the ratio torch / diffax within each round."""
    diffax_fn(), torch_fn()
    d, t = [], []
    for r in range(rounds):
        if r % 2 == 0:
            d.append(_timed(diffax_fn))
            t.append(torch_fn())
        else:
            t.append(torch_fn())
            d.append(_timed(diffax_fn))
    ratios = [b / a for a, b in zip(d, t)]
    return {"diffax_s": d, "torch_s": t, "ratios": ratios, "ratio": statistics.median(ratios),
            "diffax_median_s": statistics.median(d), "torch_median_s": statistics.median(t)}


def table(rows: list[dict]) -> str:
    out = ["| what | batch | diffax s (median) | PyTorch s (median) | speed ratio PyTorch s / diffax s: median "
           "[min, max] over rounds | rounds |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['what']} | {r['batch']} | {r['diffax_median_s']:.3f} | {r['torch_median_s']:.3f} | "
                   f"{r['ratio']:.3f} [{min(r['ratios']):.3f}, {max(r['ratios']):.3f}] | {len(r['ratios'])} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="a small UNet of the same block types (quick check)")
    p.add_argument("--batches", default="8,32", help="comma-separated batch sizes")
    p.add_argument("--what", default="train,sample", help="train, sample or both")
    p.add_argument("--train-rounds", type=int, default=7)
    p.add_argument("--sample-rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (network calls) per sample call")
    p.add_argument("--threads", type=int, default=2, help="PyTorch's intra-op threads")
    p.add_argument("--torch-python", default="", help="python of a venv with torch and diffusers")
    p.add_argument("--output", default="", help="write the rows and the environment as JSON")
    args = p.parse_args(argv)
    python = args.torch_python or torch_python()
    if python is None:
        raise SystemExit("no PyTorch venv: pass --torch-python or set DIFFAX_TORCH_PYTHON")
    what = [w for w in args.what.split(",") if w]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="diffax_parity_") as folder:
        side = TorchSide(python, folder, args.small, args.threads)
        try:
            for batch in [int(b) for b in args.batches.split(",") if b]:
                ours = DiffaxSide(folder, batch, args.steps)
                for kind in what:
                    if kind == "train":
                        r = interleaved_ratios(ours.train, lambda: side.ask(op="train", batch=batch)["seconds"],
                                               args.train_rounds)
                    elif kind == "sample":
                        r = interleaved_ratios(ours.sample, lambda: side.ask(
                            op="sample", batch=batch, steps=args.steps)["seconds"], args.sample_rounds)
                    else:
                        raise SystemExit(f"--what: unknown {kind!r} (train, sample)")
                    rows.append({"what": f"{kind} step" if kind == "train" else f"DDIM-{args.steps} sampling",
                                 "batch": batch, "compile_s": ours.compile_s, **r})
                    print(table(rows[-1:]).splitlines()[-1], flush=True)
        finally:
            side.close()
    env = {"jax": jax.__version__, "backend": jax.default_backend(), "python": platform.python_version(),
           "cpus": os.cpu_count(), "torch": side.info, "small": args.small,
           "compiler_options": compilation.compiler_options(get_config()),
           "load_average_1min": os.getloadavg()[0], "command": " ".join(["python -m benchmarks.torch_parity",
                                                                          *(argv if argv is not None else sys.argv[1:])])}
    print(table(rows))
    result = {"env": env, "rows": rows}
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    host_memory.keep_freed_memory()  # as the `diffax` command runs
    main()

"""The train step as the trainer runs it: throughput, FLOP/s, MFU, compile time, memory and input stall.

`Bench(config)` builds what `diffax.training.trainer.train` builds (mesh, model, optimizer, sharded
train state, the jitted step with donated state) and measures:

  * `throughput`: seconds per optimizer step on a fixed device batch, images/s, FLOPs per step (the
    matrix products of the step's jaxpr, a scanned body times its trip count; XLA's cost analysis of
    the compiled step beside it, which counts a loop body once), achieved FLOP/s = FLOPs / step time,
    and MFU against the device's dense bfloat16 peak (benchmarks/common.py; None where unknown, e.g. CPU);
  * `compile_time`: trace + lower + compile of a fresh jitted step;
  * `memory`: the device allocator's peak (`memory_stats()['peak_bytes_in_use']`) where the backend
    has one, else the compiled step's `memory_analysis()` (argument + output - alias + temp bytes);
  * `input_stall`: the real data iterator feeding the step for N steps, timing `next(iterator)`
    exactly as the trainer's `data_wait_fraction` does.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import jax
import numpy as np

from benchmarks.common import abstract, matmul_flops, median, peak_flops, xla_flops
from diffax import compilation, data, parallel
from diffax.models import count_params
from diffax.training.build import build
from diffax.training.state import learning_rate_schedule
from diffax.training.step import init_state, make_train_step, state_layout


def synthetic_tokens(diffusion: Any, n: int, rng: np.random.Generator) -> np.ndarray:
    """n captions' tokens [n, 2, L] shaped like the data pipeline's: random ids of the encoder's vocabulary,
    the mask on every position (no padding: the cost of the longest caption)."""
    length = np.asarray(diffusion.null_tokens).shape[-1]
    vocab = int(getattr(diffusion.tokenizer, "vocab_size", 0) or diffusion.config.text.vocab_size)
    ids = rng.integers(0, vocab, (n, length)).astype(np.int32)
    return np.stack([ids, np.ones_like(ids)], axis=1)


class Bench:
    """One config's train step, built the trainer's way, with a fixed synthetic batch on the devices."""

    def __init__(self, config: Any, compiler_options: dict | None | str = "config"):
        """compiler_options: "config" = what the trainer uses (diffax.compilation), else this dict or None."""
        t = config.training
        if int(t.steps_per_dispatch) != 1:
            config = config.copy_and_resolve_references()
            config.training.steps_per_dispatch = 1  # one optimizer step per call: the figure is per step
        self.config = config
        self.mesh = parallel.make_mesh(config.mesh)
        parallel.check_batch_size(config.training.batch_size, self.mesh)
        self.batch_size = int(config.training.batch_size)
        self.diffusion = build(config)
        self.tx, _, self.state_shardings = state_layout(self.diffusion, config, self.mesh)
        self.lr = learning_rate_schedule(config.optimizer, config.training.num_steps)
        self.batch_sharding = parallel.batch_sharding(self.mesh)
        self.state = jax.device_put(init_state(self.diffusion, self.tx, len(config.training.posthoc_ema)), self.state_shardings)
        self.num_params = count_params(self.state.params)
        self.batch = self._synthetic_batch()
        self.compiler_options = (
            compilation.compiler_options(config) if compiler_options == "config" else compiler_options
        )
        self.compiled = None  # the executable every measurement here runs

    def _synthetic_batch(self) -> dict[str, jax.Array]:
        """A batch shaped, typed and sharded like the data iterator's (images uniform in [-1, 1])."""
        local = self.batch_size // jax.process_count()
        rng = np.random.default_rng(0)
        n_classes = max(self.diffusion.num_classes, 1)
        host = {
            "image": rng.uniform(-1, 1, (local, *self.diffusion.data_shape)).astype(np.float32),
            "label": (np.arange(local) % n_classes).astype(np.int32),
        }
        if self.diffusion.null_tokens is not None:  # text models: captions as tokens [B, 2, L] (ids, mask)
            host["tokens"] = synthetic_tokens(self.diffusion, local, rng)
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in host.items()}

    def jitted_step(self) -> Callable:
        """A fresh jitted step (new closure, so nothing is reused from an earlier trace or compile)."""
        return jax.jit(
            make_train_step(self.diffusion, self.tx, self.lr, self.config),
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, parallel.replicated(self.mesh)),
            donate_argnums=0,
            compiler_options=self.compiler_options,
        )

    def compile_once(self) -> tuple[Any, float]:
        """(executable, seconds) for trace + lower + compile of a fresh step."""
        args = (abstract(self.state, self.state_shardings), abstract(self.batch))
        start = time.perf_counter()
        compiled = self.jitted_step().lower(*args).compile()
        return compiled, time.perf_counter() - start

    def compile_time(self, repeats: int) -> dict[str, Any]:
        """Median compile time of the step. The first compile (also the executable measured by
        `throughput`) is the warm-up; `repeats` fresh compiles after it are timed. With repeats=0
        (the smoke test) the figure is the first compile itself, one-time start-up costs included."""
        first_s = None
        if self.compiled is None:
            self.compiled, first_s = self.compile_once()
        runs = [self.compile_once()[1] for _ in range(repeats)]
        if not runs:
            if first_s is None:
                runs = [self.compile_once()[1]]
            else:
                runs = [first_s]
        return {"compile_s": median(runs), "runs_s": runs, "first_compile_s": first_s, "includes_warmup": repeats == 0}

    def step(self, batch: dict) -> dict:
        self.state, metrics = self.compiled(self.state, batch)
        return metrics

    def window(self, steps: int) -> tuple[float, float]:
        """(wall, process CPU) seconds per step over `steps` steps on the fixed batch, synchronised at the end."""
        w, c = time.perf_counter(), time.process_time()
        for _ in range(steps):
            metrics = self.step(self.batch)
        jax.block_until_ready((self.state, metrics))
        return (time.perf_counter() - w) / steps, (time.process_time() - c) / steps

    def throughput(self, repeats: int, steps_per_repeat: int) -> dict[str, Any]:
        """Step time (median over `repeats` windows of `steps_per_repeat` steps after a warm-up step),
        images/s, FLOPs per step, achieved FLOP/s and MFU."""
        if self.compiled is None:
            self.compiled, _ = self.compile_once()
        jax.block_until_ready(self.step(self.batch))  # warm-up
        windows = [self.window(steps_per_repeat) for _ in range(repeats)]
        wall, cpu = [w for w, _ in windows], [c for _, c in windows]
        step_s = median(wall)
        n_dev = jax.device_count()
        # Model FLOPs (matrix products, scans x trip count) drive FLOP/s and MFU; XLA's cost analysis
        # (one device's partition; a loop body counted once) is recorded beside them as a check.
        flops = matmul_flops(self.jitted_step(), abstract(self.state, self.state_shardings), abstract(self.batch))
        xla_device = xla_flops(self.compiled)
        flop_per_s = flops / step_s
        kind = jax.devices()[0].device_kind
        peak = peak_flops(kind)
        return {
            "step_time_s": step_s,
            "step_times_s": wall,
            "step_cpu_s": median(cpu),  # this process's CPU time: a check on a shared CPU host
            "images_per_s": self.batch_size / step_s,
            "flops_per_step": flops,
            "xla_flops_per_step": xla_device * n_dev,
            "xla_flops_per_step_per_device": xla_device,
            "flops_per_image": flops / self.batch_size,
            "flop_per_s": flop_per_s,
            "peak_flop_per_s": None if peak is None else peak * n_dev,
            "peak_source": None if peak is None else f"dense bfloat16 peak of {kind} x {n_dev}",
            "mfu": None if peak is None else flop_per_s / (peak * n_dev),
            "repeats": repeats,
            "steps_per_repeat": steps_per_repeat,
        }

    def memory(self) -> dict[str, Any]:
        """Peak device memory of training with this step (allocator statistics where they exist)."""
        analysis = self.compiled.memory_analysis()
        sizes = {}
        if analysis is not None:
            for name in ("argument", "output", "alias", "temp", "generated_code"):
                sizes[f"{name}_bytes"] = int(getattr(analysis, f"{name}_size_in_bytes", 0))
        stats = [d.memory_stats() for d in jax.local_devices()]
        if all(s and "peak_bytes_in_use" in s for s in stats):
            return {
                "peak_bytes": max(int(s["peak_bytes_in_use"]) for s in stats),
                "source": "device.memory_stats()['peak_bytes_in_use'] after the train-step runs "
                          "(the process's peak on the busiest device: weights, EMA, optimizer state, activations)",
                "memory_analysis": sizes,
            }
        if not sizes:
            return {"peak_bytes": None, "source": "unavailable: no allocator statistics and no memory_analysis()",
                    "memory_analysis": sizes}
        peak = sizes["argument_bytes"] + sizes["output_bytes"] - sizes["alias_bytes"] + sizes["temp_bytes"]
        return {
            "peak_bytes": peak,
            "source": "compiled.memory_analysis(): argument + output - alias + temp bytes of the train-step "
                      f"executable per device ({jax.devices()[0].platform} has no allocator statistics)",
            "memory_analysis": sizes,
        }

    def _tokenizer_for(self, data_config: Any) -> Callable | None:
        """Text models: what the trainer tokenizes captions with (a pretrained encoder's tokenizer, or the
        small encoder's built from the captions, here in a scratch folder); None otherwise."""
        if self.diffusion.null_tokens is None:
            return None
        if self.diffusion.tokenizer is not None:
            return lambda source: self.diffusion.tokenizer
        import tempfile

        from diffax.training import text

        return text.small_tokenizer_for_training(data_config, tempfile.mkdtemp(prefix="diffax_bench_"))

    def input_stall(self, data_config: Any, steps: int, repeats: int, warmup: int = 2) -> dict[str, Any]:
        """Fraction of the training loop's time spent in `next(iterator)`: the trainer's
        data_wait_fraction, as the median over `repeats` windows of `steps` steps after `warmup`
        steps (the first batches start the pipeline). Also the loop's images/s with real data."""
        iterator = data.make_iterator(data_config, sharding=self.batch_sharding,
                                      tokenizer_for=self._tokenizer_for(data_config))
        try:
            for _ in range(warmup):
                metrics = self.step(next(iterator))
            jax.block_until_ready((self.state, metrics))
            windows = []
            for _ in range(repeats):
                wait, start = 0.0, time.perf_counter()
                for _ in range(steps):
                    w = time.perf_counter()
                    batch = next(iterator)
                    wait += time.perf_counter() - w
                    metrics = self.step(batch)
                jax.block_until_ready((self.state, metrics))  # the trainer syncs when it logs
                elapsed = time.perf_counter() - start
                windows.append({"wait_fraction": wait / elapsed, "images_per_s": steps * self.batch_size / elapsed})
        finally:
            iterator.close()
        return {
            "wait_fraction": median([w["wait_fraction"] for w in windows]),
            "images_per_s": median([w["images_per_s"] for w in windows]),
            "windows": windows,
            "steps_per_window": steps,
            "source": str(data_config.data.name),
            "num_workers": int(data_config.data.num_workers),
        }

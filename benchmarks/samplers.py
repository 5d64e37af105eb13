"""Sampler efficiency and compile time: `python -m benchmarks.samplers [--output samplers.json]`.

efficiency = (network evaluations x time of one evaluation) / sampler time, for the default small UNet
(configs/default.py: 16x16x1, 32 channels, channel_mult (1, 2)) at 50 steps; 1.0 means the sampler adds
nothing to the network's cost (the loop, schedule maths and noise are free), > 1 means the in-loop call
is cheaper than a separately dispatched one. Compile time of the jitted sampler at 10 and 1000 steps:
a ratio near 1 shows that the step loop is on the device (lax.scan), not unrolled.
Timings are medians over --repeats interleaved rounds after a warm-up run (see efficiency_rounds), by the
wall clock and, on CPU, by process CPU time. On a shared CPU the wall clock measures the other users; run
with XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" and read the CPU-time column.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from configs.default import get_config
from diffax import compilation
from diffax.models import build_model
from diffax.parameterization import get_parameterization
from diffax.samplers import make_sampler
from diffax.schedules import get_schedule

NFE = {"ddpm": lambda n: n, "ddim": lambda n: n, "heun": lambda n: 2 * n - 1, "euler": lambda n: n,
       "dpm_solver": lambda n: n, "flow_euler": lambda n: n, "flow_heun": lambda n: 2 * n - 1}


def _time(fn, *args) -> tuple[float, float]:
    """(wall, process CPU) seconds of one blocking call."""
    w, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - w, time.process_time() - c


def efficiency_rounds(net, net_args, sampler, sampler_args, nfe: int, repeats: int, evals_per_call: int = 1,
                      net_calls: int = 5) -> dict:
    """Interleaved rounds (so a shared machine's load drifts hit both timings alike): each round times
    one network evaluation (median of `net_calls` calls) then the sampler once, by the wall clock and by
    this process's CPU time (immune to other users of a shared CPU; meaningful on CPU only, best with
    single-threaded XLA); medians over rounds. `net` may run `evals_per_call` chained evaluations in
    one program (benchmarks/run.py does, so that per-call dispatch does not count as network time)."""
    jax.block_until_ready(net(*net_args))  # warm-up and compile
    jax.block_until_ready(sampler(*sampler_args))
    out = {k: [] for k in ("nfe_time_s", "time_s", "efficiency", "nfe_cpu_s", "cpu_s", "efficiency_cpu")}
    for _ in range(repeats):
        nets = [_time(net, *net_args) for _ in range(net_calls)]
        t_net = statistics.median(w for w, _ in nets) / evals_per_call
        c_net = statistics.median(c for _, c in nets) / evals_per_call
        t_s, c_s = _time(sampler, *sampler_args)
        for k, v in zip(out, (t_net, t_s, nfe * t_net / t_s, c_net, c_s, nfe * c_net / c_s)):
            out[k].append(v)
    return {k: statistics.median(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samplers", default="ddpm,ddim,heun,flow_euler,flow_heun")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile_steps", default="10,1000")
    p.add_argument("--output", default="")
    args = p.parse_args(argv)

    config = get_config()
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    model = build_model(config.model, data_shape=shape, num_classes=0, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    schedule = get_schedule(config.diffusion, image_size=config.data.image_size)
    param = get_parameterization(config.diffusion)

    def apply_fn(state, z, c, labels):
        return nnx.merge(graphdef, state)(z, c, labels)

    noise = jax.random.normal(jax.random.PRNGKey(0), (args.batch, *shape))
    key = jax.random.PRNGKey(1)
    c_noise = jnp.full((args.batch,), 500.0)
    options = compilation.compiler_options(config)  # both sides compiled as diffax compiles its samplers
    net = jax.jit(lambda state, z, c: apply_fn(state, z, c, None), compiler_options=options)

    def make(name: str, steps: int):
        cfg = config.copy_and_resolve_references()
        cfg.sampling.sampler, cfg.sampling.steps = name, steps
        sampler = make_sampler(cfg)
        return jax.jit(
            lambda state, n, k: sampler(schedule, param, lambda *a: apply_fn(state, *a), n, k),
            compiler_options=options,
        )

    rows = []
    for name in args.samplers.split(","):
        nfe = NFE[name](args.steps)
        sampler = make(name, args.steps)
        r = efficiency_rounds(net, (state, noise, c_noise), sampler, (state, noise, key), nfe, args.repeats)
        rows.append(dict(sampler=name, steps=args.steps, nfe=nfe, **r))
    compile_s = {}
    for steps in (int(s) for s in args.compile_steps.split(",")):
        f = make("ddim", steps)
        t0 = time.perf_counter()
        f.lower(state, noise, key).compile()
        compile_s[steps] = time.perf_counter() - t0
    lo, hi = sorted(compile_s)[0], sorted(compile_s)[-1]

    print(f"\nSampler efficiency, {jax.devices()[0].platform} ({platform.processor() or platform.machine()}), "
          f"UNet {shape} batch {args.batch}\n")
    print("| sampler | steps | NFE | one NFE (ms) | sampler (s) | efficiency (wall) | efficiency (CPU time) |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {1e3 * r['nfe_time_s']:.2f} | {r['time_s']:.3f} "
              f"| {r['efficiency']:.3f} | {r['efficiency_cpu']:.3f} |")
    print(f"\n| ddim compile, {lo} steps (s) | {hi} steps (s) | ratio |\n|---|---|---|\n"
          f"| {compile_s[lo]:.2f} | {compile_s[hi]:.2f} | {compile_s[hi] / compile_s[lo]:.2f} |")
    result = dict(device=jax.devices()[0].platform, batch=args.batch, shape=shape, samplers=rows,
                  compile_s={str(k): v for k, v in compile_s.items()}, compile_ratio=compile_s[hi] / compile_s[lo])
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()

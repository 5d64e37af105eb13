"""The benchmark suite: `python -m benchmarks.run [--quick] [--config FILE[:ARG]] [--output R.json] [--markdown R.md]`.

Measures, on whatever devices JAX finds, for one config's model:

  train step        images/s, FLOPs (matrix products of the step's jaxpr, scans x trip count;
                    XLA's cost analysis of the compiled step beside it), achieved FLOP/s,
                    MFU against the device's dense bf16 peak (None where unknown, e.g. CPU),
                    compile time, peak device memory
  samplers          efficiency = NFE x (time of one network call) / (sampler time) for DDPM, DDIM
                    and Heun (benchmarks/samplers.py), and the compile time of the config's sampler
                    at 10 and 1000 steps with their ratio (~1 when the step loop is a lax.scan)
  input             the fraction of training-loop time spent waiting for the data iterator
                    (the trainer's data_wait_fraction) and the loop's images/s with real data

Every figure is a median over repeated runs after a warm-up; each ratio (efficiency, stall,
compile ratio) is formed within one run and then the median is taken.

Default model: the DDPM CIFAR-10 UNet of configs/cifar10_ddpm.py (35.7M parameters) at batch 128
in bfloat16, meant for a GPU or TPU. `--quick`: a CPU smoke run of a few minutes with the
configs/cifar10_ddpm.py:small sizes (float32, batch 8) reading the bundled digits (resized to
32x32x3) and few repeats. `--config FILE[:ARG]` benchmarks any config as it is; override fields
with `--config.section.field=value`. If the config's data set is not available (e.g. TFDS
cifar10 not prepared), the input-stall figure reads the bundled digits at the same image shape
and says so.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import samplers as sampler_bench
from benchmarks.common import environment, median
from benchmarks.train_step import Bench, synthetic_tokens
from diffax import compilation, host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "cifar10_ddpm.py")


@dataclasses.dataclass
class Options:
    """How much to measure (the suite's knobs; `--quick` and the defaults fill them)."""

    repeats: int = 10  # timing repeats (train step windows, sampler rounds, input windows)
    steps_per_repeat: int = 10  # train steps per timed window
    compile_repeats: int = 3  # fresh compiles timed after the warm-up compile (0: report the first compile)
    samplers: tuple[str, ...] = ("ddpm", "ddim", "heun")
    sampler_steps: int = 50
    sample_batch: int = 0  # 0: the training batch
    compile_steps: tuple[int, int] = (10, 1000)
    stall_steps: int = 50  # train steps per input-stall window


QUICK = Options(repeats=3, steps_per_repeat=2, compile_repeats=1, sampler_steps=10, stall_steps=10)


# ----------------------------------------------------------------------------- configs
def load_config(spec: str) -> Any:
    """`get_config(arg)` of a config file given as FILE or FILE:ARG (like `diffax train --config`)."""
    path, _, arg = spec.partition(":")
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--config {spec!r}: no file {path}")
    folder = os.path.dirname(path)  # make `from configs import default` work, as the diffax CLI does
    while not os.path.isdir(os.path.join(folder, "configs")) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    module_spec = importlib.util.spec_from_file_location(f"_bench_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def apply_overrides(config: Any, overrides: list[str]) -> list[str]:
    """Apply `--config.a.b=value` overrides (values parsed as Python literals, else kept as strings)."""
    applied = []
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise ValueError(f"unknown argument {item!r}: overrides look like --config.section.field=value")
        key, text = item[len("--config."):].split("=", 1)
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise ValueError(f"config.{key} is not a config field")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        old = node[leaf]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        node[leaf] = value
        applied.append(f"config.{key}={value!r}")
    return applied


def default_config() -> Any:
    """The DDPM CIFAR-10 UNet (Ho et al. 2020) at batch 128 in bfloat16: the accelerator benchmark."""
    config = load_config(DEFAULT_CONFIG)
    config.model.dtype = "bfloat16"
    config.training.batch_size = 128
    return config


def quick_config() -> Any:
    """configs/cifar10_ddpm.py:small (float32, batch 8) on the bundled digits resized to 32x32x3:
    no download, a few minutes on a CPU. No Grain worker processes (they would compete for the cores)."""
    config = load_config(DEFAULT_CONFIG + ":small")
    config.data.name = "digits"
    config.data.num_workers = 0
    return config


def stall_config(config: Any) -> tuple[Any, str | None]:
    """The config whose data the input-stall loop reads: the config's own data set if it opens,
    else the bundled digits at the same image shape (the reason is returned)."""
    from diffax import data

    try:
        data.get_source(config)
        return config, None
    except (FileNotFoundError, ValueError, ImportError, OSError) as e:
        if len(data.data_shape(config)) != 3:
            raise
        fallback = config.copy_and_resolve_references()
        fallback.data.name = "digits"
        fallback.data.split = "train"
        fallback.data.resize = "resize"
        return fallback, f"{config.data.name} unavailable ({type(e).__name__}: {str(e).splitlines()[0][:200]})"


# ----------------------------------------------------------------------------- samplers
def sampler_figures(bench: Bench, options: Options) -> dict[str, Any]:
    """Efficiency of each sampler (benchmarks.samplers.efficiency_rounds) and the compile time of the
    config's sampler at options.compile_steps, for the benchmarked model with its EMA weights."""
    from diffax.training.inference import make_sample_fn

    d, config, mesh = bench.diffusion, bench.config, bench.mesh
    params = bench.state.ema
    batch = int(options.sample_batch or bench.batch_size)
    rng = np.random.default_rng(1)
    put = lambda x: jax.make_array_from_process_local_data(bench.batch_sharding, x)  # noqa: E731
    local = batch // jax.process_count()
    noise = put(rng.standard_normal((local, *d.data_shape)).astype(np.float32))
    labels = put((np.arange(local) % d.num_classes).astype(np.int32)) if d.num_classes else None
    if d.null_tokens is not None:  # text models: the prompts' tokens are the condition
        labels = put(synthetic_tokens(d, local, rng))
    key = jax.random.PRNGKey(1)
    schedule = d.schedule(params)
    t_mid = put(np.full((local,), 0.5, np.float32))
    z_in, c_noise = jax.jit(lambda z, t: d.parameterization.model_inputs(z, t, schedule),
                            out_shardings=bench.batch_sharding)(noise, t_mid)
    param_shardings = bench.state_shardings.ema
    chains: dict[int, Any] = {}
    net_args = (params, z_in, c_noise, labels)
    guided = float(config.sampling.guidance_scale) != 1.0 and labels is not None
    if d.null_tokens is not None:  # the sampler encodes the prompts once, before its loop: the reference gets embeddings
        def condition(p, y):
            cond = d.encode_text(p, y)
            if not guided:
                return cond
            null = jax.tree.map(lambda x: x[0], d.encode_text(p, jnp.asarray(d.null_tokens, jnp.int32)[None]))
            return jax.tree.map(lambda u, n: jnp.concatenate([u, jnp.broadcast_to(n, u.shape)]), cond, null)

        text_labels = jax.jit(condition, out_shardings=bench.batch_sharding)(d.sampling_params(params), labels)
    if guided:  # the sampler evaluates the conditional and the null halves as one batch of 2B: so does the reference
        null = jnp.broadcast_to(jnp.asarray(d.null_label, jnp.int32), labels.shape)
        net_args = (params, *jax.jit(lambda z, c, y: (jnp.concatenate([z, z]), jnp.concatenate([c, c]),
                                                      jnp.concatenate([y, null])),
                                     out_shardings=bench.batch_sharding)(z_in, c_noise, labels))
    if d.null_tokens is not None:
        net_args = (*net_args[:3], text_labels)

    def net_chain(n: int):
        """`n` network evaluations in one program, each fed the last one's output and a noise level
        that changes with the step (so no part of it, not even the noise embedding, is hoisted out of
        the loop): with n = the sampler's NFE, both sides pay one host dispatch per call."""
        if n not in chains:
            def net(p, z, c, y):
                apply, channels = d.apply_fn(p), z.shape[-1]

                def body(i, x):
                    c_i = c * (1.0 - 0.5 * i.astype(c.dtype) / n)
                    return apply(x, c_i, y)[..., :channels].astype(x.dtype)

                return jax.lax.fori_loop(0, n, body, z)

            b = bench.batch_sharding  # laid out like the sampler (inference.make_sample_fn)
            chains[n] = jax.jit(net, in_shardings=(param_shardings, b, b, b), out_shardings=b,
                                compiler_options=compilation.compiler_options(config))  # as the sampler
        return chains[n]

    def sample_fn(name: str, steps: int):
        c = config.copy_and_resolve_references()
        c.sampling.sampler, c.sampling.steps = name, steps
        return make_sample_fn(d, c, mesh, param_shardings)

    rows = []
    for name in options.samplers:
        nfe = sampler_bench.NFE[name](options.sampler_steps)
        r = sampler_bench.efficiency_rounds(net_chain(nfe), net_args,
                                            sample_fn(name, options.sampler_steps), (params, noise, key, labels),
                                            nfe, options.repeats, evals_per_call=nfe, net_calls=1)
        rows.append({"sampler": name, "steps": options.sampler_steps, "nfe": nfe, "guided": guided, **r})

    name = str(config.sampling.sampler)
    lo, hi = options.compile_steps
    runs = []
    for _ in range(max(options.compile_repeats, 1)):  # the samplers above were the warm-up compiles
        times = {}
        for steps in (lo, hi):
            fn = sample_fn(name, steps)
            start = time.perf_counter()
            fn.lower(params, noise, key, labels).compile()
            times[steps] = time.perf_counter() - start
        runs.append(times)
    compile_s = {str(s): median([r[s] for r in runs]) for s in (lo, hi)}
    return {
        "batch": batch,
        "nfe_timing": "one network evaluation = time of NFE chained evaluations in one jitted program / NFE",
        "efficiency": rows,
        "compile": {
            "sampler": name,
            "compile_s": compile_s,
            "ratio": median([r[hi] / r[lo] for r in runs]),  # compile(hi steps) / compile(lo steps), per run
            "runs_s": [{str(k): v for k, v in r.items()} for r in runs],
        },
    }


# ----------------------------------------------------------------------------- compiler options
def versus_plain_xla(bench: Bench, options: Options) -> dict[str, Any] | None:
    """Where diffax compiles with its own options (diffax/compilation.py; on the CPU: YNNPACK off),
    the train step compiled with XLA's defaults, timed in windows interleaved with diffax's step;
    speed-up = plain step time / diffax step time, formed per round. None where diffax sets none."""
    if not bench.compiler_options:
        return None
    plain = Bench(bench.config, compiler_options=None)
    plain.compiled, _ = plain.compile_once()
    jax.block_until_ready(plain.step(plain.batch))  # warm-up (bench's step already ran)
    rounds = []
    for _ in range(options.repeats):
        (ours, ours_cpu), (base, base_cpu) = bench.window(options.steps_per_repeat), plain.window(options.steps_per_repeat)
        rounds.append({"diffax_s": ours, "plain_s": base, "speedup": base / ours, "speedup_cpu": base_cpu / ours_cpu})
    return {
        "compiler_options": bench.compiler_options,
        "diffax_step_time_s": median([r["diffax_s"] for r in rounds]),
        "plain_step_time_s": median([r["plain_s"] for r in rounds]),
        "speedup": median([r["speedup"] for r in rounds]),
        "speedup_cpu": median([r["speedup_cpu"] for r in rounds]),
        "rounds": rounds,
    }


# ----------------------------------------------------------------------------- the suite
def run(config: Any, options: Options, *, argv: list[str] | None = None, config_name: str = "") -> dict[str, Any]:
    """Measure every figure for `config` and return them as one JSON-ready dict."""
    env = environment(list(argv or []))
    bench = Bench(config)
    config = bench.config
    shape = bench.diffusion.data_shape
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[bench {time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    log(f"{config.model.name} {bench.num_params / 1e6:.2f}M parameters, data {shape}, batch {bench.batch_size}, "
        f"{config.model.dtype}, {env['device_count']} x {env['device_kind']}")

    compile_fig = bench.compile_time(options.compile_repeats)
    log(f"train-step compile {compile_fig['compile_s']:.2f} s")
    train = bench.throughput(options.repeats, options.steps_per_repeat)
    train["compile_s"] = compile_fig["compile_s"]
    train["compile_runs_s"] = compile_fig["runs_s"]
    train["first_compile_s"] = compile_fig["first_compile_s"]
    train["compile_includes_warmup"] = compile_fig["includes_warmup"]
    memory = bench.memory()  # right after the step ran, before anything else allocates
    log(f"train step {1e3 * train['step_time_s']:.1f} ms, {train['images_per_s']:.1f} images/s, "
        f"{train['flop_per_s'] / 1e9:.1f} GFLOP/s")

    plain = versus_plain_xla(bench, options)
    if plain:
        log(f"train step with XLA's default options {1e3 * plain['plain_step_time_s']:.1f} ms: diffax's options "
            f"{plain['compiler_options']} are {plain['speedup']:.2f}x its speed")

    data_config, fallback = stall_config(config)
    stall = bench.input_stall(data_config, options.stall_steps, options.repeats)
    stall["fallback"] = fallback
    log(f"input wait fraction {stall['wait_fraction']:.4f}")

    samplers = sampler_figures(bench, options)
    log("samplers " + ", ".join(f"{r['sampler']} {r['efficiency']:.3f}" for r in samplers["efficiency"])
        + f"; compile ratio {samplers['compile']['ratio']:.2f}")

    return {
        "meta": env,
        "config": {
            "name": config_name,
            "model": str(config.model.name),
            "params": bench.num_params,
            "data": str(config.data.name),
            "data_shape": list(shape),
            "batch_size": bench.batch_size,
            "dtype": str(config.model.dtype),
            "options": dataclasses.asdict(options),
        },
        "train_step": train,
        "versus_plain_xla": plain,
        "memory": memory,
        "samplers": samplers,
        "input": stall,
    }


def _si(x: float | None, unit: str) -> str:
    if x is None:
        return "n/a"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.2f} {unit}"


def markdown(result: dict[str, Any]) -> str:
    """The results as a markdown table (one figure per row) under a line naming the run."""
    m, c, t, mem, s, i = (result[k] for k in ("meta", "config", "train_step", "memory", "samplers", "input"))
    eff = s["efficiency"]
    comp = s["compile"]
    lo, hi = comp["compile_s"]
    cpu = m["platform"] == "cpu"
    mem_kind = "allocator peak" if "memory_stats" in mem["source"] else "executable: args + out - alias + temp"
    rows = [
        ("model", f"{c['model']} {c['params'] / 1e6:.2f}M params, {'x'.join(map(str, c['data_shape']))}, "
                  f"batch {c['batch_size']}, {c['dtype']}"),
        ("train step (ms)", f"{1e3 * t['step_time_s']:.1f}"
         + (f" (CPU time {1e3 * t['step_cpu_s']:.1f})" if cpu else "")),
        ("train images/s", f"{t['images_per_s']:.1f}"),
    ]
    plain = result.get("versus_plain_xla")
    if plain:
        opts = ", ".join(f"{k}={v!r}" for k, v in plain["compiler_options"].items())
        rows.append((f"train step speed-up of diffax's compiler options ({opts}) over XLA's defaults",
                     f"{plain['speedup']:.2f}x ({1e3 * plain['plain_step_time_s']:.1f} ms -> "
                     f"{1e3 * plain['diffax_step_time_s']:.1f} ms" + (f"; CPU time {plain['speedup_cpu']:.2f}x)" if cpu else ")")))
    rows += [
        ("FLOPs per step (matrix products in the jaxpr)", _si(t["flops_per_step"], "FLOP")),
        ("FLOPs per step (XLA cost analysis; a loop body once)", _si(t["xla_flops_per_step"], "FLOP")),
        ("achieved FLOP/s", _si(t["flop_per_s"], "FLOP/s")),
        ("MFU", "n/a (peak unknown)" if t["mfu"] is None
         else f"{100 * t['mfu']:.1f}% of {_si(t['peak_flop_per_s'], 'FLOP/s')} bf16 peak"),
        ("train-step compile (s)", f"{t['compile_s']:.2f}"),
        ("peak memory", f"{_si(mem['peak_bytes'], 'B')} ({mem_kind})"),
    ]
    for r in eff:
        extra = f" (CPU time {r['efficiency_cpu']:.3f})" if cpu else ""
        guided = " (guided: 2B per evaluation)" if r.get("guided") else ""
        rows.append((f"{r['sampler']} efficiency, {r['steps']} steps, {r['nfe']} NFE{guided}",
                     f"{r['efficiency']:.3f}{extra}"))
    rows.append((f"{comp['sampler']} compile {lo} / {hi} steps (s)",
                 f"{comp['compile_s'][lo]:.2f} / {comp['compile_s'][hi]:.2f} (ratio {comp['ratio']:.2f})"))
    src = i["source"] + (f", workers {i['num_workers']}" if i["num_workers"] else "")
    rows.append((f"input wait fraction ({src})", f"{100 * i['wait_fraction']:.2f}%"
                 + (" [fallback: " + i["fallback"] + "]" if i.get("fallback") else "")))
    rows.append(("train images/s with the data iterator", f"{i['images_per_s']:.1f}"))
    head = (f"diffax benchmarks, {m['date'][:10]}, {m['device_count']} x {m['device_kind']} ({m['platform']}), "
            f"jax {m['jax']}\n\n`{m['command']}`\n\n| figure | value |\n|---|---|\n")
    return head + "\n".join(f"| {a} | {b} |" for a, b in rows) + "\n"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0],
                                epilog="Override config fields with --config.section.field=value.")
    p.add_argument("--quick", action="store_true", help="CPU smoke run of a few minutes: configs/cifar10_ddpm.py:small "
                   "on the bundled digits, batch 8, few repeats (with --config: that config, few repeats)")
    p.add_argument("--config", default="", help="config file FILE or FILE:ARG (default: the DDPM CIFAR-10 UNet, "
                                                "batch 128, bfloat16; with --quick its :small variant)")
    p.add_argument("--output", default="", help="write the results as JSON here")
    p.add_argument("--markdown", default="", help="write the markdown table here")
    helps = {
        "repeats": "timed repeats of every figure (train-step windows, sampler rounds, input windows)",
        "steps_per_repeat": "train steps per timed window",
        "compile_repeats": "fresh compiles timed after the warm-up compile (0: report the first compile)",
        "samplers": "comma-separated samplers for the efficiency figure",
        "sampler_steps": "sampler steps for the efficiency figure",
        "sample_batch": "sampler batch (0: the training batch)",
        "compile_steps": "the two sampler step counts whose compile times are compared, e.g. 10,1000",
        "stall_steps": "train steps per input-stall window",
    }
    for f in dataclasses.fields(Options):
        text = lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else str(v)  # noqa: E731
        full, quick = text(getattr(Options(), f.name)), text(getattr(QUICK, f.name))
        default = full if full == quick else f"{full} ({quick} with --quick)"
        kind = None if f.name in ("samplers", "compile_steps") else int
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None,
                       help=f"{helps[f.name]}; default {default}")
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = parse_args(argv)
    if args.config:
        config, name = load_config(args.config), args.config
    elif args.quick:
        config, name = quick_config(), "configs/cifar10_ddpm.py:small (digits, quick)"
    else:
        config, name = default_config(), "configs/cifar10_ddpm.py (bfloat16, batch 128)"
    applied = apply_overrides(config, overrides)
    if applied:
        name += " with " + ", ".join(applied)
    options = dataclasses.replace(QUICK if args.quick else Options())
    for f in dataclasses.fields(Options):
        value = getattr(args, f.name)
        if value is None:
            continue
        if f.name == "samplers":
            value = tuple(v for v in value.split(",") if v)
            unknown = [v for v in value if v not in sampler_bench.NFE]
            if unknown:
                raise SystemExit(f"--samplers: unknown {unknown}; valid: {', '.join(sampler_bench.NFE)}")
        elif f.name == "compile_steps":
            value = tuple(int(v) for v in value.split(","))
            if len(value) != 2:
                raise SystemExit("--compile-steps takes two step counts, e.g. 10,1000")
        setattr(options, f.name, value)

    result = run(config, options, argv=argv, config_name=name)
    text = markdown(result)
    print(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(text)
    return result


if __name__ == "__main__":
    host_memory.keep_freed_memory()  # as the `diffax` command runs
    main()

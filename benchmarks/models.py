"""Network throughput and achieved FLOP/s: `python -m benchmarks.models [--output models.json]`.

For the DDPM CIFAR-10 UNet (Ho et al. 2020; 35.7M parameters, 32x32x3) and DiT-S/2
(Peebles & Xie 2023; 32x32x4 latents, 1000 classes, learned sigma): images/s of a jitted
forward pass and of a train step (eps-prediction MSE, gradient, Adam update, dropout on),
and the FLOP/s this achieves, counting the FLOPs of the matrix products in the program's
jaxpr (benchmarks/common.py `matmul_flops`; XLA's cost analysis counts DiT's scanned blocks
once). Times are medians over --repeats calls after a warm-up call, by the wall clock and, as
a check on a shared machine, by this process's CPU time. These rows are compiled as diffax
compiles (diffax/compilation.py: on the CPU, YNNPACK fusions off).

Study 1, convolution backward on XLA:CPU: a 6-layer 64-channel 3x3 conv stack (batch 16,
32x32), four ways interleaved in one run:
  xla             lax.conv_general_dilated differentiated by JAX (diffax's conv), XLA's default
                  options (the plain version the ratios are against);
  rows            the kernel gradient as one 1-D convolution over rows (benchmarks/conv_rows.py;
                  not a diffax option any more);
  xla + no-ynn    compiler_options {"xla_cpu_experimental_ynn_fusion_type": ""}: XLA's Eigen
                  convolutions instead of YNNPACK fusions (what diffax does on the CPU);
  rows + no-ynn   both;
and, where PyTorch is installed (pip install -e ".[torch]"), the same stack in PyTorch; then
the DDPM UNet train step with XLA's default options and with YNNPACK off.
Why: XLA writes the kernel gradient of a conv as a convolution of the input with the output
gradient whose window is the whole feature map (32x32) and whose contracted feature
dimension is only the batch; the YNNPACK kernels XLA:CPU uses by default run that shape on
about one core (process CPU time ~ wall time) and 2-3x slower than the Eigen path.

Study 2, DiT blocks: fwd+bwd of DiT-S/2's 12 blocks under one lax.scan (as diffax runs them)
against the same blocks unrolled, on which XLA:CPU fuses the backward pass into loops that
recompute earlier blocks.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.common import matmul_flops
from configs.default import get_config
from diffax import compilation, host_memory
from diffax.models import build_model, count_params
from diffax.models.dit import parse_preset, scan_blocks, stacked_blocks
from benchmarks.conv_rows import conv2d_rows
from diffax.models.layers import conv2d

NO_YNN = compilation.CPU_WITHOUT_YNNPACK
STUDY_VARIANTS = [("xla", None), ("rows", None), ("xla", NO_YNN), ("rows", NO_YNN)]  # (conv, compiler options)
CONVS = {"xla": conv2d, "rows": conv2d_rows}


def ddpm_cifar10_cfg(**kw):
    m = get_config().model
    m.update(dict(name="unet", channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                  attention_resolutions=(16,), dropout=0.1, norm_groups=32))  # fmt: skip
    m.update(kw)
    return m


def dit_s2_cfg(**kw):
    m = get_config().model
    m.update(dict(name="dit", preset="S/2", learn_sigma=True))
    m.update(kw)
    return m


MODELS = {
    "ddpm_cifar10": (ddpm_cifar10_cfg, (32, 32, 3), 0),
    "dit_s2": (dit_s2_cfg, (32, 32, 4), 1000),
}


def timed(fn: Callable, args: tuple, repeats: int) -> dict[str, float]:
    """Median wall and process-CPU seconds of fn(*args) over `repeats` calls after one warm-up call."""
    jax.block_until_ready(fn(*args))
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return {"time_s": statistics.median(wall), "cpu_s": statistics.median(cpu)}


def compile_timed(fn: Callable, args: tuple, options: dict | None) -> tuple[Any, float]:
    t = time.perf_counter()
    compiled = jax.jit(fn, compiler_options=options).lower(*args).compile()
    return compiled, time.perf_counter() - t


def _setup(name: str, batch: int, **cfg_kw):
    """(config, row base, forward fn + args, train-step fn + args) for one model configuration."""
    cfg_fn, shape, num_classes = MODELS[name]
    cfg = cfg_fn(**cfg_kw)
    model = build_model(cfg, data_shape=shape, num_classes=num_classes, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, *shape)), jnp.float32)
    eps = jnp.asarray(rng.standard_normal((batch, *shape)), jnp.float32)
    c_noise = jnp.asarray(rng.uniform(0, 999, batch), jnp.float32)
    labels = jnp.asarray(rng.integers(0, num_classes, batch), jnp.int32) if num_classes else None
    tx = optax.adam(1e-4)
    opt_state = tx.init(params)
    base = {"model": name, "batch": batch, "params": count_params(model), "variant": "xla"}

    def fwd(params, x, c, y):
        return nnx.merge(graphdef, params, rest)(x, c, y)

    def train_step(params, opt_state, x, c, y, eps, key):
        def loss(params):
            out = nnx.merge(graphdef, params, rest)(x, c, y, dropout_key=key).astype(jnp.float32)
            return jnp.mean((out[..., : shape[-1]] - eps) ** 2)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    train_args = (params, opt_state, x, c_noise, labels, eps, jax.random.PRNGKey(0))
    return base, (fwd, (params, x, c_noise, labels)), (train_step, train_args)


def _row(base: dict, kind: str, options, compile_s: float, t: dict, flops: float) -> dict:
    batch = base["batch"]
    return {**base, "kind": kind, "compiler_options": options or {}, "compile_s": compile_s, **t,
            "images_per_s": batch / t["time_s"], "gflops_per_image": flops / batch / 1e9,
            "achieved_gflops_s": flops / t["time_s"] / 1e9}  # fmt: skip


def bench_model(name: str, batch: int, repeats: int) -> list[dict]:
    """Forward and train-step rows for one model (default config, compiled as diffax compiles)."""
    base, (fwd, fwd_args), (step, step_args) = _setup(name, batch)
    options = compilation.compiler_options(get_config())
    rows = []
    for kind, fn, args in (("forward", fwd, fwd_args), ("train_step", step, step_args)):
        compiled, compile_s = compile_timed(fn, args, options)
        rows.append(_row(base, kind, options, compile_s, timed(compiled, args, repeats), matmul_flops(fn, *args)))
    return rows


def interleaved(fns: list[tuple[Callable, tuple]], repeats: int) -> list[dict[str, float]]:
    """Median wall / CPU seconds of each fn, timed in interleaved rounds after a warm-up call of each,
    so that load drifts on a shared machine hit all variants alike."""
    for fn, args in fns:
        jax.block_until_ready(fn(*args))
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, (fn, args) in enumerate(fns):
            w, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(*args))
            wall[i].append(time.perf_counter() - w)
            cpu[i].append(time.process_time() - c)
    return [{"time_s": statistics.median(w), "cpu_s": statistics.median(c)} for w, c in zip(wall, cpu)]


def train_step_variant_rows(name: str, batch: int, repeats: int) -> list[dict]:
    """The train step of `name` with XLA's default compiler options and with YNNPACK off, interleaved."""
    base, _, (step, args) = _setup(name, batch)
    flops = matmul_flops(step, *args)  # the same work in every variant
    built = [(options, *compile_timed(step, args, options)) for options in (None, NO_YNN)]
    times = interleaved([(c, args) for _, c, _ in built], repeats)
    return [{**_row({**base, "variant": _variant("xla", o)}, "train_step", o, cs, t, flops), "baseline": not o}
            for (o, _, cs), t in zip(built, times)]  # fmt: skip


def conv_stack_rows(repeats: int, *, batch: int = 16, size: int = 32, channels: int = 64, depth: int = 6) -> list[dict]:
    """fwd+bwd of a `depth`-layer 3x3 conv stack in each STUDY_VARIANTS (conv, compiler options)."""
    rng = np.random.default_rng(0)
    ks = [jnp.asarray(rng.standard_normal((3, 3, channels, channels)) * 0.05, jnp.float32) for _ in range(depth)]
    x = jnp.asarray(rng.standard_normal((batch, size, size, channels)), jnp.float32)

    def loss(ks, x, impl):
        for k in ks:
            x = jax.nn.relu(CONVS[impl](x, k, padding=((1, 1), (1, 1))))
        return jnp.sum(x**2)

    compiled = []
    for impl, options in STUDY_VARIANTS:
        grad = jax.grad(lambda ks, x, impl=impl: loss(ks, x, impl), argnums=(0, 1))
        compiled.append(compile_timed(grad, (ks, x), options)[0])
        if impl == "xla" and options is None:
            flops = matmul_flops(grad, ks, x)
    fns = [(fn, (ks, x)) for fn in compiled]
    torch_grad = _torch_conv_stack(ks, x)
    if torch_grad is not None:
        fns.append((torch_grad, ()))
    times = interleaved(fns, repeats)
    base = {"model": f"conv stack {depth}x{channels}ch {size}x{size}", "batch": batch}
    rows = [
        {**_row({**base, "variant": _variant(impl, options)}, "fwd+bwd", options, 0.0, t, flops),
         "baseline": impl == "xla" and not options}
        for (impl, options), t in zip(STUDY_VARIANTS, times)
    ]
    if torch_grad is not None:
        import torch

        rows.append({**_row({**base, "variant": f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads"},
                            "fwd+bwd", None, 0.0, times[-1], flops), "baseline": False})  # fmt: skip
    return rows


def _torch_conv_stack(ks: list, x) -> Callable | None:
    """The same conv stack's fwd+bwd in PyTorch (NCHW, same weights), or None without torch installed."""
    try:
        import torch
    except ImportError:
        return None
    weights = [torch.nn.Parameter(torch.from_numpy(np.asarray(k).transpose(3, 2, 0, 1).copy())) for k in ks]
    inp = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).requires_grad_(True)

    def grad():
        h = inp
        for w in weights:
            h = torch.relu(torch.nn.functional.conv2d(h, w, padding=1))
        return torch.autograd.grad((h**2).sum(), [*weights, inp])

    return grad


def dit_blocks_rows(repeats: int, *, batch: int = 8) -> list[dict]:
    """fwd+bwd of DiT-S/2's 12 blocks (256 tokens of width 384) under one lax.scan, as diffax runs them,
    and unrolled into a Python loop over the same stacked weights, interleaved."""
    depth, hidden, heads, _ = parse_preset("S/2")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, 256, hidden)), jnp.float32)
    cond = jnp.asarray(rng.standard_normal((batch, hidden)), jnp.float32)
    blocks = stacked_blocks(depth, hidden, heads, 4.0, dropout=0.0, dtype=jnp.float32, param_dtype=jnp.float32,
                            rngs=nnx.Rngs(0))  # fmt: skip
    block_def, stacked = nnx.split(blocks)
    stacked = jax.tree.map(lambda w: w + 0.01, stacked)  # adaLN-Zero starts at zero: make every block act

    def scanned(stacked, x):
        return jnp.mean(scan_blocks(nnx.merge(block_def, stacked), x, cond) ** 2)

    def unrolled(stacked, x):
        for i in range(depth):
            x = nnx.merge(block_def, jax.tree.map(lambda w: w[i], stacked))(x, cond)
        return jnp.mean(x**2)

    options = compilation.compiler_options(get_config())
    built = []
    for name, fn in (("scan", scanned), ("unrolled", unrolled)):
        grad = jax.grad(fn, argnums=(0, 1))
        compiled, compile_s = compile_timed(grad, (stacked, x), options)
        built.append((name, compiled, compile_s, matmul_flops(grad, stacked, x)))
    times = interleaved([(c, (stacked, x)) for _, c, _, _ in built], repeats)
    base = {"model": f"DiT-S/2 blocks ({depth})", "batch": batch}
    return [{**_row({**base, "variant": name}, "fwd+bwd", options, cs, t, flops), "baseline": name == "unrolled"}
            for (name, _, cs, flops), t in zip(built, times)]  # fmt: skip


def table(rows: list[dict]) -> str:
    head = "| model | kind | variant | compiler options | batch | ms | CPU ms | images/s | GFLOP/s |"
    out = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        opts = ",".join(f"{k}={v!r}" for k, v in r["compiler_options"].items()) or "-"
        out.append(
            f"| {r['model']} | {r['kind']} | {r['variant']} | {opts} | {r['batch']} | {1e3 * r['time_s']:.1f} | "
            f"{1e3 * r['cpu_s']:.1f} | {r['images_per_s']:.2f} | {r.get('achieved_gflops_s', 0.0):.1f} |"
        )
    return "\n".join(out)


def ratios(rows: list[dict]) -> list[str]:
    """Speed of each study variant relative to its study's baseline row (same interleaved run)."""
    lines = []
    study = [r for r in rows if "baseline" in r]
    for model in dict.fromkeys(r["model"] for r in study):
        rs = [r for r in study if r["model"] == model]
        base = next(r for r in rs if r["baseline"])
        for r in rs:
            if r is not base:
                lines.append(
                    f"{model} {r['kind']}: {r['variant']} is {base['time_s'] / r['time_s']:.2f}x the speed of "
                    f"{base['variant']} (wall clock; {base['cpu_s'] / r['cpu_s']:.2f}x by process CPU time)"
                )
    return lines


def _variant(impl: str, options: dict | None) -> str:
    return impl + (" + no-ynn" if options else "")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="ddpm_cifar10,dit_s2", help="comma-separated; '' for the study only")
    p.add_argument("--batch", type=int, default=0, help="0: 8 on CPU, 128 on accelerators")
    p.add_argument("--repeats", type=int, default=0, help="0: 3 on CPU, 20 on accelerators")
    p.add_argument("--conv-study", default="auto", choices=["auto", "none", "stack", "all"],
                   help="backward-pass study: stack = the 6-layer conv stack; all = also the DDPM UNet train step "
                        "with and without YNNPACK and DiT-S/2's blocks scanned vs unrolled; auto = all on CPU, "
                        "none elsewhere")  # fmt: skip
    p.add_argument("--output", default="", help="write the rows and the environment as JSON")
    args = p.parse_args(argv)
    cpu = jax.default_backend() == "cpu"
    batch = args.batch or (8 if cpu else 128)
    repeats = args.repeats or (3 if cpu else 20)
    study = args.conv_study if args.conv_study != "auto" else ("all" if cpu else "none")

    rows: list[dict] = []
    for name in [m for m in args.models.split(",") if m]:
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
        rows += bench_model(name, batch, repeats)
        print("\n".join(table(rows[-2:]).splitlines()[2:]), flush=True)
    if study != "none":
        print("conv backward study ...", flush=True)
    if study in ("stack", "all"):
        rows += conv_stack_rows(max(repeats, 5))
    if study == "all":
        rows += dit_blocks_rows(repeats)
        rows += train_step_variant_rows("ddpm_cifar10", batch, repeats)
    text = table(rows)
    print(text)
    for line in ratios(rows):
        print(line)
    env = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
           "python": platform.python_version(), "machine": platform.machine()}  # fmt: skip
    result = {"env": env, "rows": rows, "ratios": ratios(rows)}
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    host_memory.keep_freed_memory()  # as the `diffax` command runs
    main()

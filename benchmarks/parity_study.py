"""Candidate speed-ups of the CPU train step and sampler, measured: `python -m benchmarks.parity_study`.

Each variant (XLA:CPU compiler options, or another formulation of a layer patched in before tracing)
compiles the train step as the trainer does (benchmarks/torch_parity.py `DiffaxSide`) on the DDPM
CIFAR-10 UNet imported from a random diffusers model, and the variants run in interleaved rounds; the
speed of each relative to today's build is formed within each round (median shown). A variant is a
candidate only: diffax adopts one after tests show equal values and gradients (tests/test_cpu_speed.py).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks.torch_parity import DiffaxSide, TorchSide, torch_python
from diffax import compilation, host_memory
from diffax.models import layers


def groupnorm_unfolded(self, x):
    """GroupNorm as diffax computed it before the folded CPU form: normalise, then scale and shift."""
    b, c = x.shape[0], x.shape[-1]
    g = x.astype(jnp.float32).reshape(b, -1, self.groups, c // self.groups)
    mean = jnp.mean(g, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=(1, 3), keepdims=True)
    y = ((g - mean) * lax.rsqrt(var + self.eps)).reshape(x.shape)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


def groupnorm_onepass(self, x):
    """E[x^2] - E[x]^2 statistics in float32 and the affine folded into one scale and shift per channel."""
    b, c = x.shape[0], x.shape[-1]
    g = x.astype(jnp.float32).reshape(b, -1, self.groups, c // self.groups)
    mean = jnp.mean(g, axis=(1, 3))
    var = jnp.maximum(jnp.mean(jnp.square(g), axis=(1, 3)) - jnp.square(mean), 0.0)
    rstd = lax.rsqrt(var + self.eps)
    scale = jnp.repeat(rstd, c // self.groups, axis=-1) * self.scale[...].astype(jnp.float32)
    shift = self.bias[...].astype(jnp.float32) - jnp.repeat(mean, c // self.groups, axis=-1) * scale
    y = x.astype(jnp.float32) * scale[:, None, None, :] + shift[:, None, None, :]
    return y.astype(self.dtype)


def groupnorm_folded(self, x):
    """Today's two-pass statistics, the affine folded into one scale and shift per channel."""
    b, c = x.shape[0], x.shape[-1]
    g = x.astype(jnp.float32).reshape(b, -1, self.groups, c // self.groups)
    mean = jnp.mean(g, axis=(1, 3))
    var = jnp.mean(jnp.square(g - mean[:, None, :, None]), axis=(1, 3))
    rstd = lax.rsqrt(var + self.eps)
    scale = jnp.repeat(rstd, c // self.groups, axis=-1) * self.scale[...].astype(jnp.float32)
    shift = self.bias[...].astype(jnp.float32) - jnp.repeat(mean, c // self.groups, axis=-1) * scale
    y = x.astype(jnp.float32) * scale[:, None, None, :] + shift[:, None, None, :]
    return y.astype(self.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _group_norm(x, scale, bias, groups, eps):
    b, c = x.shape[0], x.shape[-1]
    g = x.reshape(b, -1, groups, c // groups)
    mean = jnp.mean(g, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=(1, 3), keepdims=True)
    return ((g - mean) * lax.rsqrt(var + eps)).reshape(x.shape) * scale + bias


@_group_norm.defjvp
def _group_norm_jvp(groups, eps, primals, tangents):
    x, scale, bias = primals
    dx, dscale, dbias = tangents
    b, c = x.shape[0], x.shape[-1]
    g = x.reshape(b, -1, groups, c // groups)
    mean = jnp.mean(g, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=(1, 3), keepdims=True)
    rstd = lax.rsqrt(var + eps)
    xhat = (g - mean) * rstd
    dg = dx.reshape(g.shape)
    dxhat = rstd * (dg - jnp.mean(dg, axis=(1, 3), keepdims=True)
                    - xhat * jnp.mean(dg * xhat, axis=(1, 3), keepdims=True))
    xhat, dxhat = xhat.reshape(x.shape), dxhat.reshape(x.shape)
    return xhat * scale + bias, dxhat * scale + xhat * dscale + dbias


def groupnorm_jvp(self, x):
    """Today's statistics with a closed-form JVP (its transpose is the backward pass)."""
    y = _group_norm(x.astype(jnp.float32), self.scale[...].astype(jnp.float32), self.bias[...].astype(jnp.float32),
                    self.groups, self.eps)
    return y.astype(self.dtype)


def dropout_barrier(x, rate, key):
    """layers.dropout with the mask behind an optimization barrier: XLA computes it once instead of
    fusing the threefry bits into (and recomputing them in) every consumer."""
    if key is None or rate == 0.0:
        return x
    keep = lax.optimization_barrier(jax.random.bernoulli(key, 1.0 - rate, x.shape))
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def no_dropout(x, rate, key):
    """Diagnostic only (changes the model): what dropout's random bits cost."""
    return x


def norm_silu_autodiff(norm, x, rate=0.0, key=None):
    """Before the closed-form CPU derivative (layers._norm_silu_cpu): the three layers differentiated by JAX."""
    return layers.dropout(jax.nn.silu(norm(x)), rate, key)


def norm_silu_barrier(norm, x, rate=0.0, key=None):
    """layers.norm_silu with dropout's mask behind an optimization barrier (values bit-identical): XLA computes
    the threefry bits once instead of in every fusion that reads the mask."""
    if key is None or rate == 0.0:
        return layers._norm_silu_cpu(x, norm.scale[...], norm.bias[...], None, norm.groups, norm.eps, 0.0)
    keep = lax.optimization_barrier(jax.random.bernoulli(key, 1.0 - rate, x.shape))
    y = layers._norm_silu_cpu(x, norm.scale[...], norm.bias[...], keep, norm.groups, norm.eps, float(rate))
    return y.astype(norm.dtype)


def dropout_rbg(x, rate, key):
    """Diagnostic (changes the random numbers): dropout's mask from XLA's RngBitGenerator (`rbg` keys)
    instead of threefry; the rbg key's data drawn from the threefry key."""
    if key is None or rate == 0.0:
        return x
    rbg = jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="rbg")
    keep = jax.random.bernoulli(rbg, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def norm_silu_rbg(norm, x, rate=0.0, key=None):
    """layers.norm_silu with dropout_rbg's mask (diagnostic: changes the random numbers)."""
    if key is None or rate == 0.0:
        return layers._norm_silu_cpu(x, norm.scale[...], norm.bias[...], None, norm.groups, norm.eps, 0.0)
    rbg = jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="rbg")
    keep = jax.random.bernoulli(rbg, 1.0 - rate, x.shape)
    y = layers._norm_silu_cpu(x, norm.scale[...], norm.bias[...], keep, norm.groups, norm.eps, float(rate))
    return y.astype(norm.dtype)


def add_bias_autodiff(y, bias):
    """Before layers.add_channel_bias's custom derivative: the conv bias gradient as XLA's reduce."""
    return layers._add_bias(y, bias)


def folded_stats_reduce(x, scale, bias, groups, eps):
    """layers.folded_group_norm with the statistics as XLA reduces (before the dots with ones)."""
    b, c = x.shape[0], x.shape[-1]
    per_group = c // groups
    x32 = x.astype(jnp.float32)
    g = x32.reshape(b, -1, groups, per_group)
    mean = jnp.mean(g, axis=(1, 3))
    var = jnp.mean(jnp.square(g - mean[:, None, :, None]), axis=(1, 3))
    rstd = lax.rsqrt(var + eps)
    a = jnp.repeat(rstd, per_group, axis=-1) * scale.astype(jnp.float32)
    shift = bias.astype(jnp.float32) - jnp.repeat(mean, per_group, axis=-1) * a
    return x32, mean, rstd, a, shift, (b,) + (1,) * (x.ndim - 2) + (c,)


def groupnorm_autodiff(self, x):
    """GroupNorm.__call__ on the CPU as adopted: folded_group_norm differentiated by JAX (measured against
    routing it through layers._norm_silu_cpu's closed-form derivative without the SiLU: no gain)."""
    x32, _, _, a, shift, per_example = layers.folded_group_norm(x, self.scale[...], self.bias[...], self.groups, self.eps)
    return (x32 * a.reshape(per_example) + shift.reshape(per_example)).astype(self.dtype)


def attention_einsum(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


PATCHES = {
    "groupnorm_unfolded": (layers.GroupNorm, "__call__", groupnorm_unfolded),
    "groupnorm_onepass": (layers.GroupNorm, "__call__", groupnorm_onepass),
    "groupnorm_folded": (layers.GroupNorm, "__call__", groupnorm_folded),
    "groupnorm_jvp": (layers.GroupNorm, "__call__", groupnorm_jvp),
    "attention_einsum": (layers, "attention", attention_einsum),
    "dropout_barrier": (layers, "dropout", dropout_barrier),
    "no_dropout": (layers, "dropout", no_dropout),
    "norm_silu_autodiff": (layers, "norm_silu", norm_silu_autodiff),
    "norm_silu_barrier": (layers, "norm_silu", norm_silu_barrier),
    "norm_silu_rbg": (layers, "norm_silu", norm_silu_rbg),
    "add_bias_autodiff": (layers, "add_channel_bias", add_bias_autodiff),
    "stats_reduce": (layers, "folded_group_norm", folded_stats_reduce),
    "groupnorm_autodiff": (layers.GroupNorm, "__call__", groupnorm_autodiff),
    # main before issue 21's second round: all of the CPU derivatives and the dot statistics off
    "before_dots": [(layers.GroupNorm, "__call__", groupnorm_autodiff), (layers, "norm_silu", norm_silu_autodiff),
                    (layers, "add_channel_bias", add_bias_autodiff), (layers, "folded_group_norm", folded_stats_reduce)],
    "scan_unroll2": (jax.lax, "scan", functools.partial(jax.lax.scan, unroll=2)),
}
OPTIONS = {
    "fast_math": {"xla_cpu_enable_fast_math": True},
    "concurrency_scheduler": {"xla_cpu_enable_concurrency_optimized_scheduler": True},
    "no_fusion_emitters": {"xla_cpu_use_fusion_emitters": False},
    "vector_512": {"xla_cpu_prefer_vector_width": 512},
    "ynnpack_on": None,  # XLA's defaults (YNNPACK convolutions): the choice compilation.py reverted
}


@contextlib.contextmanager
def patched(name: str):
    """The variant's patches (one (owner, attribute, replacement) or a list of them) applied while tracing."""
    found = PATCHES.get(name, [])
    found = found if isinstance(found, list) else [found]
    old = [getattr(owner, attr) for owner, attr, _ in found]
    for owner, attr, fn in found:
        setattr(owner, attr, fn)
    try:
        yield
    finally:
        for (owner, attr, _), fn in zip(found, old):
            setattr(owner, attr, fn)


def build(folder: str, name: str, batch: int, steps: int, what: str) -> DiffaxSide:
    base = compilation.CPU_WITHOUT_YNNPACK
    options = dict(base, **OPTIONS[name]) if OPTIONS.get(name) else (None if name in OPTIONS else "config")
    with patched(name):
        side = DiffaxSide(folder, batch, steps, options)
        getattr(side, what)()  # trace and compile (the sampler on its first call) inside the patch
    return side


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="groupnorm_onepass,attention_einsum")
    p.add_argument("--what", default="train", help="train or sample")
    p.add_argument("--small", action="store_true")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="DDIM steps per sampling call")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    names = ["today", *[v for v in args.variants.split(",") if v]]
    with tempfile.TemporaryDirectory(prefix="diffax_study_") as folder:
        TorchSide(torch_python(), folder, args.small, 1).close()  # only the random diffusers folder
        sides = {n: build(folder, n, args.batch, args.steps, args.what) for n in names}
        fns: dict[str, Callable[[], Any]] = {n: getattr(s, args.what) for n, s in sides.items()}
        times: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for n in order:
                start, c = time.perf_counter(), time.process_time()
                fns[n]()
                times[n].append(time.perf_counter() - start)
                cpu[n].append(time.process_time() - c)
    print(f"| variant ({args.what}, batch {args.batch}) | median s | process CPU s | speed vs today: median [min, max] "
          "over rounds |")
    print("|---|---|---|---|")
    for n in names:
        ratios = [a / b for a, b in zip(times["today"], times[n])]
        print(f"| {n} | {statistics.median(times[n]):.3f} | {statistics.median(cpu[n]):.3f} | "
              f"{statistics.median(ratios):.3f} "
              f"[{min(ratios):.3f}, {max(ratios):.3f}] |", flush=True)


if __name__ == "__main__":
    host_memory.keep_freed_memory()  # as the `diffax` command runs
    main()

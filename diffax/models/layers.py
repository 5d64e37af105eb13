"""Layers shared by the diffax denoisers: convolution, group norm, attention, residual blocks.

Conventions: activations NHWC in `dtype` (bfloat16 on accelerators), parameters in
`param_dtype`; normalisation statistics are always computed in float32 (as ADM's
GroupNorm32). Dropout is pure: it is applied only when a key is passed.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

Array = jax.Array

xavier_uniform = nnx.initializers.xavier_uniform()  # DDPM's default_init: variance scaling, fan_avg, uniform
zeros = nnx.initializers.zeros_init()


def dtype_of(name: str | jnp.dtype) -> jnp.dtype:
    """'float32' | 'bfloat16' | 'float16' (from config.model.dtype / param_dtype) -> a jnp dtype."""
    valid = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
    if isinstance(name, str):
        if name not in valid:
            raise ValueError(f"Unknown dtype {name!r} in config.model. Valid names: {', '.join(valid)}.")
        return jnp.dtype(valid[name])
    return jnp.dtype(name)


def dropout(x: Array, rate: float, key: Array | None) -> Array:
    """Inverted dropout (Srivastava et al. 2014): zero with probability `rate`, scale the rest by 1/(1-rate).

    Identity when key is None or rate == 0, so a call without a key is deterministic.
    """
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def fold_key(key: Array | None, index: int) -> Array | None:
    """A distinct dropout key per layer (None stays None)."""
    return None if key is None else jax.random.fold_in(key, index)


# --------------------------------------------------------------------------- convolution


def _conv_xla(x: Array, kernel: Array, stride: int, padding: Sequence[tuple[int, int]]) -> Array:
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), tuple(padding), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def conv2d(x: Array, kernel: Array, *, stride: int = 1, padding: Sequence[tuple[int, int]]) -> Array:
    """2-D convolution, NHWC x HWIO -> NHWC, with explicit ((top, bottom), (left, right)) padding."""
    return _conv_xla(x, kernel, stride, tuple((int(a), int(b)) for a, b in padding))


class Conv(nnx.Module):
    """Conv2D with kernel [kh, kw, in, out] and bias [out] (the parameter layout of nnx.Conv).

    padding: "same" (symmetric, k // 2) or explicit ((top, bottom), (left, right)).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        padding: str | Sequence[tuple[int, int]] = "same",
        zero_init: bool = False,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        shape = (kernel_size, kernel_size, in_features, out_features)
        init = zeros if zero_init else xavier_uniform
        self.kernel = nnx.Param(init(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype))
        if padding == "same":
            padding = ((kernel_size // 2, kernel_size // 2),) * 2
        self.padding = tuple((int(a), int(b)) for a, b in padding)
        self.stride = stride
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        y = conv2d(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            stride=self.stride,
            padding=self.padding,
        )
        return add_channel_bias(y, self.bias[...].astype(self.dtype))


def add_channel_bias(y: Array, bias: Array) -> Array:
    """y [B, ..., C] + bias [C] (a conv bias) or [B, C] (per example: the noise-level embedding). On the CPU
    with a derivative whose transpose sums the gradient over the positions as a dot with ones
    (`broadcast_by_dot`) instead of XLA:CPU's slower reduce; same values."""
    if jax.default_backend() != "cpu":
        return _add_bias(y, bias)
    return _add_bias_cpu(y, bias)


def _add_bias(y: Array, bias: Array) -> Array:
    return y + (bias if bias.ndim == 1 else bias.reshape((bias.shape[0],) + (1,) * (y.ndim - 2) + bias.shape[-1:]))


@jax.custom_jvp
def _add_bias_cpu(y: Array, bias: Array) -> Array:
    return _add_bias(y, bias)


@_add_bias_cpu.defjvp
def _add_bias_cpu_jvp(primals, tangents):
    (y, bias), (dy, dbias) = primals, tangents
    return _add_bias(y, bias), dy + broadcast_by_dot(dbias, y.shape)


def linear(
    din: int,
    dout: int,
    *,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
    rngs: nnx.Rngs,
    init=xavier_uniform,
) -> nnx.Linear:
    """nnx.Linear with diffax's defaults (xavier-uniform kernel, zero bias)."""
    return nnx.Linear(din, dout, dtype=dtype, param_dtype=param_dtype, kernel_init=init, rngs=rngs)


# --------------------------------------------------------------------------- normalisation


class GroupNorm(nnx.Module):
    """Group normalisation (Wu & He 2018), statistics in float32, output in `dtype`.

    Biased variance and eps inside the square root, as torch.nn.GroupNorm.
    """

    def __init__(
        self,
        channels: int,
        groups: int,
        eps: float = 1e-6,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        if channels % groups:
            raise ValueError(
                f"config.model.norm_groups={groups} does not divide a layer's {channels} channels"
            )
        self.scale = nnx.Param(jnp.ones((channels,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))
        self.groups = groups
        self.eps = float(eps)
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        scale, bias = self.scale[...].astype(jnp.float32), self.bias[...].astype(jnp.float32)
        if jax.default_backend() == "cpu":
            x32, _, _, a, shift, per_example = folded_group_norm(x, scale, bias, self.groups, self.eps)
            return (x32 * a.reshape(per_example) + shift.reshape(per_example)).astype(self.dtype)
        b, c = x.shape[0], x.shape[-1]
        g = x.astype(jnp.float32).reshape(b, -1, self.groups, c // self.groups)
        mean = jnp.mean(g, axis=(1, 3), keepdims=True)  # two passes: mean, then the variance around it
        var = jnp.mean(jnp.square(g - mean), axis=(1, 3), keepdims=True)
        y = ((g - mean) * lax.rsqrt(var + self.eps)).reshape(x.shape)
        return (y * scale + bias).astype(self.dtype)


def folded_group_norm(x: Array, scale: Array, bias: Array, groups: int, eps: float):
    """GroupNorm's CPU form: the same two-pass float32 statistics, the normalisation and the affine folded
    into one scale and shift per (example, channel), as PyTorch's CPU kernel applies them:
    y = x * a + (bias - mean * a), a = scale / std (DDPM UNet train step ~1.05x: benchmarks/torch_parity.md).
    The sums over positions are dots with ones (`sum_by_dot`; XLA:CPU's reduce is slower).

    Returns (x in float32, mean [B, groups], rstd [B, groups], a [B, C], shift [B, C], the shape that
    broadcasts a [B, C] over x)."""
    b, c = x.shape[0], x.shape[-1]
    per_group = c // groups
    n = x.size // (b * groups)
    x32 = x.astype(jnp.float32)
    per_example = (b,) + (1,) * (x.ndim - 2) + (c,)
    mean = group_sum(sum_by_dot(x32), groups) / n  # [B, groups]
    var = group_sum(sum_by_dot(jnp.square(x32 - jnp.repeat(mean, per_group, -1).reshape(per_example))), groups) / n
    rstd = lax.rsqrt(var + eps)
    a = jnp.repeat(rstd, per_group, axis=-1) * scale.astype(jnp.float32)
    shift = bias.astype(jnp.float32) - jnp.repeat(mean, per_group, axis=-1) * a
    return x32, mean, rstd, a, shift, per_example


def group_sum(t: Array, groups: int) -> Array:
    """[B, C] -> [B, groups]: the sum over each group's channels."""
    return t.reshape(t.shape[0], groups, -1).sum(-1)


def norm_silu(norm: GroupNorm, x: Array, rate: float = 0.0, key: Array | None = None) -> Array:
    """dropout(silu(norm(x)), rate, key): the UNet's GroupNorm -> SiLU (-> dropout) pairs.

    On the CPU through `_norm_silu_cpu`, whose closed-form derivative makes XLA:CPU compute the GroupNorm
    backward's sums once per (example, channel) (see there); other backends trace the three layers as written.
    """
    if jax.default_backend() != "cpu":
        return dropout(jax.nn.silu(norm(x)), rate, key)
    keep = None if key is None or rate == 0.0 else jax.random.bernoulli(key, 1.0 - rate, x.shape)
    y = _norm_silu_cpu(x, norm.scale[...], norm.bias[...], keep, norm.groups, norm.eps, float(rate))
    return y.astype(norm.dtype)


def _norm_silu_forward(x, scale, bias, keep, groups, eps, rate):
    """GroupNorm folded (`folded_group_norm`), SiLU, dropout's mask; float32 throughout."""
    x32, mean, rstd, a, shift, per_example = folded_group_norm(x, scale, bias, groups, eps)
    y = x32 * a.reshape(per_example) + shift.reshape(per_example)
    out = jax.nn.silu(y)
    if keep is not None:
        out = jnp.where(keep, out / (1.0 - rate), jnp.zeros_like(out))
    return out, (x32, y, mean, rstd, a, per_example)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6))
def _norm_silu_cpu(x, scale, bias, keep, groups, eps, rate):
    """GroupNorm -> SiLU [-> dropout with the mask `keep`] on the CPU (norm_silu). GroupNorm alone (the
    attention blocks') stays differentiated by JAX: this rule did not speed it up (benchmarks/torch_parity.md)."""
    return _norm_silu_forward(x, scale, bias, keep, groups, eps, rate)[0]


def broadcast_by_dot(t: Array, shape: tuple[int, ...]) -> Array:
    """t [B, C] broadcast over the positions of `shape` [B, *P, C] (t [C]: over all of B, *P) as an outer
    product with ones (a dot, in float32). Values are exact (1 * t); the point is the transpose: JAX
    differentiates it into a dot with ones, which XLA:CPU runs 3-4x faster than its reduce over the
    positions with the gradient's elementwise producer fused in (benchmarks/torch_parity.md)."""
    t32 = t.astype(jnp.float32)
    if t.ndim == 1:
        out = jnp.einsum("n,c->nc", jnp.ones((math.prod(shape[:-1]),), jnp.float32), t32)
    else:
        out = jnp.einsum("bp,bc->bpc", jnp.ones((shape[0], math.prod(shape[1:-1])), jnp.float32), t32)
    return out.reshape(shape).astype(t.dtype)


def sum_by_dot(t: Array) -> Array:
    """t [B, *P, C] summed over the positions P -> [B, C], as a batched dot with ones (XLA:CPU runs it faster
    than its reduce; the transpose is an outer product, `broadcast_by_dot`'s form)."""
    t = t.reshape(t.shape[0], -1, t.shape[-1])
    with jax.named_scope("sum_by_dot"):  # tests tell these float32 sums from the network's matmuls by it
        return jnp.einsum("bp,bpc->bc", jnp.ones(t.shape[:2], t.dtype), t)


@_norm_silu_cpu.defjvp
def _norm_silu_cpu_jvp(groups, eps, rate, primals, tangents):
    """Closed-form GroupNorm derivative (Wu & He 2018, eq. 1-2, differentiated as in Ioffe & Szegedy 2015,
    sec. 3): with xhat = (x - mean) * rstd per (example, group) of N values,

        d xhat = rstd * (dx - mean_g(dx) - xhat * mean_g(dx * xhat)),
        d y = scale * d xhat + xhat * dscale + dbias,   d out = silu'(y) * keep / (1 - rate) * d y,

    written through the per-(example, channel) sums over positions P1 = sum dx and P2 = sum dx * xhat and
    per-(example, channel) terms broadcast by `broadcast_by_dot`. JAX's transpose of this linear map is the
    backward PyTorch's CPU kernel runs: two sums per (example, channel) of the incoming gradient (alone and
    times xhat; dots with ones), which also give dscale and dbias, then one elementwise pass.
    """
    x, scale, bias, keep = primals
    dx, dscale, dbias = tangents[:3]
    out, (x32, y, mean, rstd, a, per_example) = _norm_silu_forward(x, scale, bias, keep, groups, eps, rate)
    b, c = x.shape[0], x.shape[-1]
    per_group = c // groups
    n = x32.size // (b * groups)  # values per (example, group)
    rep = lambda t: jnp.repeat(t, per_group, axis=-1)  # noqa: E731  [B, groups] -> [B, C]
    xhat = (x32 - rep(mean).reshape(per_example)) * rep(rstd).reshape(per_example)
    dx32 = dx.astype(jnp.float32)
    p1 = sum_by_dot(dx32)  # [B, C]
    p2 = sum_by_dot(dx32 * xhat)
    s32 = scale.astype(jnp.float32)
    k1 = rep(rstd * group_sum(p1, groups) / n) * s32  # [B, C]: scale * rstd * mean_g(dx)
    k2 = rep(rstd * group_sum(p2, groups) / n) * s32
    dscale_b = jnp.broadcast_to(dscale.astype(jnp.float32), (b, c)) - k2
    dbias_b = jnp.broadcast_to(dbias.astype(jnp.float32), (b, c)) - k1
    dy = dx32 * a.reshape(per_example) + xhat * broadcast_by_dot(dscale_b, x.shape) + broadcast_by_dot(dbias_b, x.shape)
    sig = jax.nn.sigmoid(y)
    dact = sig * (1.0 + y * (1.0 - sig))  # silu'(y)
    if keep is not None:
        dact = jnp.where(keep, dact / (1.0 - rate), jnp.zeros_like(dact))
    return out, dy * dact


def layer_norm(x: Array, eps: float = 1e-6) -> Array:
    """LayerNorm without affine parameters (DiT's norm before adaLN modulation), float32 statistics."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * lax.rsqrt(var + eps)).astype(x.dtype)


# --------------------------------------------------------------------------- attention


def attention(q: Array, k: Array, v: Array) -> Array:
    """Multi-head softmax attention, [B, T, heads, head_dim], scale 1/sqrt(head_dim) (Vaswani et al. 2017).

    Through jax.nn.dot_product_attention, so XLA / cuDNN pick the fused kernel.
    """
    return jax.nn.dot_product_attention(q, k, v)


class AttentionBlock(nnx.Module):
    """Spatial self-attention with a residual: x + proj(attn(norm(x))) (DDPM's AttnBlock; ADM's AttentionBlock).

    One qkv projection [C, 3C] laid out [q | k | v], each split into heads as
    [heads, head_dim]; proj is zero-initialised so the block starts as the identity.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        *,
        groups: int,
        eps: float,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        if channels % num_heads:
            raise ValueError(f"{num_heads} attention heads do not divide {channels} channels")
        self.norm = GroupNorm(channels, groups, eps, dtype=dtype, param_dtype=param_dtype)
        self.qkv = linear(channels, 3 * channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj = linear(channels, channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs, init=zeros)
        self.num_heads = num_heads

    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, h * w, c))
        q, k, v = (t.reshape(b, h * w, self.num_heads, c // self.num_heads) for t in jnp.split(qkv, 3, -1))
        out = attention(q, k, v).reshape(b, h * w, c)
        return x + self.proj(out).reshape(b, h, w, c)


# --------------------------------------------------------------------------- resampling


def downsample_avg(x: Array) -> Array:
    """2x2 average pooling (ADM's Downsample without conv)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def upsample_nearest(x: Array) -> Array:
    """Nearest-neighbour 2x upsampling."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Downsample(nnx.Module):
    """3x3 stride-2 convolution (DDPM / ADM). padding=1: one pixel each side (PyTorch, ADM);
    padding=0: only bottom/right, TensorFlow's 'SAME' as in the original DDPM code (diffusers'
    downsample_padding)."""

    def __init__(self, channels: int, *, padding: int, dtype, param_dtype, rngs: nnx.Rngs):
        if padding not in (0, 1):
            raise ValueError(f"config.model.downsample_padding must be 0 or 1, got {padding}")
        pad = ((1, 1), (1, 1)) if padding == 1 else ((0, 1), (0, 1))
        self.conv = Conv(
            channels, channels, 3, stride=2, padding=pad, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x: Array, emb: Array | None = None, dropout_key: Array | None = None) -> Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution (DDPM / ADM)."""

    def __init__(self, channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.conv = Conv(channels, channels, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array, emb: Array | None = None, dropout_key: Array | None = None) -> Array:
        return self.conv(upsample_nearest(x))


# --------------------------------------------------------------------------- residual block


class ResBlock(nnx.Module):
    """Residual block with noise-level conditioning (Ho et al. 2020, App. B; Dhariwal & Nichol 2021, sec. 3).

    h = conv1(silu(norm1(x)));  e = Linear(silu(emb))
    default:           h = silu(norm2(h + e))
    scale_shift_norm:  h = silu(norm2(h) * (1 + scale) + shift),  (scale, shift) = split(e)
    out = skip(x) + conv2(dropout(h)), conv2 zero-initialised; skip is a 1x1 conv when the
    width changes. emb_dim=None drops the conditioning (an autoencoder's block, diffusers'
    ResnetBlock2D with temb_channels=None): h = silu(norm2(h)). resample="down"/"up" makes it
    BigGAN's resampling block (ADM's resblock_updown): 2x2 average pooling / nearest upsampling of both paths after norm1.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int | None,
        *,
        dropout: float = 0.0,
        scale_shift_norm: bool = False,
        groups: int,
        eps: float,
        resample: str | None = None,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = GroupNorm(in_channels, groups, eps, **kw)
        self.conv1 = Conv(in_channels, out_channels, 3, rngs=rngs, **kw)
        self.temb = (
            None if emb_dim is None else linear(emb_dim, out_channels * (2 if scale_shift_norm else 1), rngs=rngs, **kw)
        )
        self.norm2 = GroupNorm(out_channels, groups, eps, **kw)
        self.conv2 = Conv(out_channels, out_channels, 3, zero_init=True, rngs=rngs, **kw)
        self.skip = Conv(in_channels, out_channels, 1, rngs=rngs, **kw) if in_channels != out_channels else None
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', got {resample!r}")
        self.resample = resample
        self.scale_shift_norm = bool(scale_shift_norm)
        self.dropout = float(dropout)

    def __call__(self, x: Array, emb: Array | None = None, dropout_key: Array | None = None) -> Array:
        h = norm_silu(self.norm1, x)
        if self.resample == "down":
            h, x = downsample_avg(h), downsample_avg(x)
        elif self.resample == "up":
            h, x = upsample_nearest(h), upsample_nearest(x)
        h = self.conv1(h)
        if self.scale_shift_norm and self.temb is not None:
            e = self.temb(jax.nn.silu(emb))[:, None, None, :]
            scale, shift = jnp.split(e, 2, axis=-1)
            h = dropout(jax.nn.silu(self.norm2(h) * (1 + scale) + shift), self.dropout, dropout_key)
        else:
            if self.temb is not None:
                h = add_channel_bias(h, self.temb(jax.nn.silu(emb)))
            h = norm_silu(self.norm2, h, self.dropout, dropout_key)
        h = self.conv2(h)
        if self.skip is not None:
            x = self.skip(x)
        return x.astype(h.dtype) + h


def call_block(block: nnx.Module, *args) -> Array:
    """block(*args); wrapped in nnx.remat when config.model.remat (recompute activations in the backward pass)."""
    return block(*args)


call_block_remat = nnx.remat(call_block)


# --------------------------------------------------------------------------- cross-attention transformer


class Attention(nnx.Module):
    """Multi-head attention from `x` [B, T, query_dim] to `context` [B, S, context_dim] (itself when None).

    diffusers' Attention layout: to_q, to_k, to_v without bias, to_out with bias (diffusers'
    to_out[0]), scale 1/sqrt(head_dim) (Vaswani et al. 2017). `context_mask` [B, S] (1 keep, 0
    drop) hides padding tokens from every query.
    """

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, head_dim: int, *, dtype, param_dtype,
                 rngs: nnx.Rngs, out_init=xavier_uniform):
        inner = heads * head_dim
        context_dim = query_dim if context_dim is None else context_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=xavier_uniform, use_bias=False, rngs=rngs)
        self.to_q = nnx.Linear(query_dim, inner, **kw)
        self.to_k = nnx.Linear(context_dim, inner, **kw)
        self.to_v = nnx.Linear(context_dim, inner, **kw)
        self.to_out = linear(inner, query_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs, init=out_init)
        self.heads, self.head_dim = int(heads), int(head_dim)

    def __call__(self, x: Array, context: Array | None = None, context_mask: Array | None = None) -> Array:
        context = x if context is None else context.astype(x.dtype)
        b, t, _ = x.shape
        s = context.shape[1]
        q = self.to_q(x).reshape(b, t, self.heads, self.head_dim)
        k = self.to_k(context).reshape(b, s, self.heads, self.head_dim)
        v = self.to_v(context).reshape(b, s, self.heads, self.head_dim)
        mask = None if context_mask is None else (jnp.asarray(context_mask)[:, None, None, :] > 0)
        return self.to_out(jax.nn.dot_product_attention(q, k, v, mask=mask).reshape(b, t, -1))


class GEGLUFeedForward(nnx.Module):
    """out(a * GELU(g)), (a, g) = split(geglu(x)): the GEGLU feed-forward (Shazeer 2020), width 4 x dim.

    diffusers' FeedForward(activation_fn="geglu"): net[0].proj -> geglu, net[2] -> out; exact (erf) GELU.
    """

    def __init__(self, dim: int, mult: int = 4, *, dtype, param_dtype, rngs: nnx.Rngs):
        inner = dim * mult
        self.geglu = linear(dim, 2 * inner, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.out = linear(inner, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        a, gate = jnp.split(self.geglu(x), 2, axis=-1)
        return self.out(a * jax.nn.gelu(gate, approximate=False))


class BasicTransformerBlock(nnx.Module):
    """Self-attention, cross-attention to the text, GEGLU feed-forward, each pre-LN with a residual.

    Rombach et al. (2022, App. E.2.1; LDM's BasicTransformerBlock), in diffusers' naming
    (norm1 / attn1, norm2 / attn2, norm3 / ff; LayerNorm eps 1e-5). With context_dim=None
    there is no cross-attention (norm2 / attn2 are absent).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None, *, dtype, param_dtype,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ln = lambda: nnx.LayerNorm(dim, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, rngs=rngs)  # noqa: E731
        self.norm1 = ln()
        self.attn1 = Attention(dim, None, heads, head_dim, **kw)
        self.norm2 = ln() if context_dim else None
        self.attn2 = Attention(dim, context_dim, heads, head_dim, **kw) if context_dim else None
        self.norm3 = ln()
        self.ff = GEGLUFeedForward(dim, **kw)

    def __call__(self, x: Array, context: Array | None = None, context_mask: Array | None = None) -> Array:
        x = x + self.attn1(self.norm1(x))
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), context, context_mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nnx.Module):
    """Transformer over the pixels of a feature map, attending to a text context (Rombach et al. 2022).

    diffusers' Transformer2DModel with continuous input: x + proj_out(blocks(proj_in(norm(x)))),
    GroupNorm (eps 1e-6), proj_in / proj_out 1x1 convolutions, or linear layers on the tokens
    with `linear_projection` (SD 2's use_linear_projection); `depth` BasicTransformerBlocks
    (transformer_layers_per_block). proj_out starts at zero here, so the block starts as the
    identity (LDM's zero_module), which only changes the initialisation.
    """

    def __init__(self, channels: int, heads: int, context_dim: int | None, *, depth: int = 1,
                 linear_projection: bool = False, groups: int, eps: float = 1e-6, dtype, param_dtype,
                 rngs: nnx.Rngs):
        if channels % heads:
            raise ValueError(f"{heads} attention heads do not divide {channels} channels")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = GroupNorm(channels, groups, eps, dtype=dtype, param_dtype=param_dtype)
        if linear_projection:
            self.proj_in = linear(channels, channels, **kw)
            self.proj_out = linear(channels, channels, init=zeros, **kw)
        else:
            self.proj_in = Conv(channels, channels, 1, **kw)
            self.proj_out = Conv(channels, channels, 1, zero_init=True, **kw)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(channels, heads, channels // heads, context_dim, **kw) for _ in range(int(depth))
        ])
        self.linear_projection = bool(linear_projection)

    def __call__(self, x: Array, context: Array | None = None, context_mask: Array | None = None) -> Array:
        b, h, w, c = x.shape
        y = self.norm(x)
        if self.linear_projection:
            y = self.proj_in(y.reshape(b, h * w, c))
        else:
            y = self.proj_in(y).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            y = block(y, context, context_mask)
        if self.linear_projection:
            y = self.proj_out(y).reshape(b, h, w, c)
        else:
            y = self.proj_out(y.reshape(b, h, w, c))
        return x + y.astype(x.dtype)

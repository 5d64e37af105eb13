"""A convolution whose kernel gradient is one 1-D convolution over rows: a CPU study, not a diffax layer.

With XLA:CPU's YNNPACK fusions on, XLA's own kernel gradient of a conv (a convolution whose
window is the whole feature map) ran slowly, and this form was faster. diffax now compiles
on the CPU with YNNPACK off (diffax/compilation.py), where XLA's form is faster, so diffax's
layers use plain `lax.conv_general_dilated`; this module keeps the alternative for the conv
stack study in benchmarks/models.py. Values and gradients equal diffax's conv2d to float
rounding (tests/test_benchmarks.py).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from diffax.models.layers import conv2d

Array = jax.Array


def _conv(x: Array, kernel: Array, stride: int, padding) -> Array:
    return conv2d(x, kernel, stride=stride, padding=padding)


def _kernel_grad_rows(x: Array, dy: Array, kernel_shape, stride: int, padding) -> Array:
    """dL/dkernel of a 2-D conv, computed as ONE 1-D convolution along the rows.

    dk[i, j, ci, co] = sum_{b, h, w} xp[b, s h + i, s w + j, ci] dy[b, h, w, co]. XLA writes this
    as a 2-D convolution whose window is the whole output map and whose contracted feature
    dimension is only the batch, a shape XLA:CPU's convolution kernels handle poorly. Here the
    kw column shifts are stacked into the batch dimension and (batch, width) become the
    contracted feature dimension, so the window is only the output height.
    """
    kh, kw, cin, cout = kernel_shape
    b, ho, wo, _ = dy.shape
    xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    hp = xp.shape[1]
    cols = jnp.stack([xp[:, :, j : j + stride * (wo - 1) + 1 : stride, :] for j in range(kw)])  # [kw,B,Hp,Wo,Cin]
    lhs = cols.transpose(0, 4, 2, 1, 3).reshape(kw * cin, hp, b * wo)
    rhs = dy.transpose(1, 0, 2, 3).reshape(ho, b * wo, cout)
    out = lax.conv_general_dilated(
        lhs, rhs, (1,), "VALID", rhs_dilation=(stride,), dimension_numbers=("NHC", "HIO", "NHC")
    )  # [kw * Cin, >= kh, Cout]
    return out[:, :kh].reshape(kw, cin, kh, cout).transpose(2, 0, 1, 3)


def _conv_rows_fwd(x, kernel, stride, padding):
    return _conv(x, kernel, stride, padding), (x, kernel)


def _conv_rows_bwd(stride, padding, res, dy):
    x, kernel = res
    _, vjp_x = jax.vjp(lambda x_: _conv(x_, kernel, stride, padding), x)
    (dx,) = vjp_x(dy)
    dk = _kernel_grad_rows(x, dy, kernel.shape, stride, padding)
    return dx, dk.astype(kernel.dtype)


_conv_rows = jax.custom_vjp(_conv, nondiff_argnums=(2, 3))
_conv_rows.defvjp(_conv_rows_fwd, _conv_rows_bwd)


def conv2d_rows(x: Array, kernel: Array, *, stride: int = 1, padding: Sequence[tuple[int, int]]) -> Array:
    """diffax's conv2d (NHWC x HWIO), differentiated with `_kernel_grad_rows` for the kernel."""
    return _conv_rows(x, kernel, stride, tuple((int(a), int(b)) for a, b in padding))

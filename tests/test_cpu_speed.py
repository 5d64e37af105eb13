"""CPU speed changes keep values and gradients: GroupNorm's folded CPU form (diffax/models/layers.py) against
the textbook formula (Wu & He 2018, eq. 1-2; torch.nn.GroupNorm: biased variance, eps inside the root)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffax.models import layers


def reference(x, scale, bias, groups, eps):
    """(x - mean) / sqrt(var + eps) * scale + bias per (example, group), in float64 numpy."""
    x = np.asarray(x, np.float64)
    b, c = x.shape[0], x.shape[-1]
    g = x.reshape(b, -1, groups, c // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)


def norm_with(scale, bias, groups=8, eps=1e-6):
    n = layers.GroupNorm(scale.shape[0], groups, eps)
    n.scale[...] = scale
    n.bias[...] = bias
    return n


@pytest.fixture(scope="module")
def data():
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (2, 6, 6, 32)) * 2.0 + 3.0  # a mean well away from 0: the folded form's worst case
    scale = 1.0 + 0.3 * jax.random.normal(k[1], (32,))
    bias = 0.3 * jax.random.normal(k[2], (32,))
    w = jax.random.normal(k[3], x.shape)
    return x, scale, bias, w


def test_values_equal_the_formula(data):
    x, scale, bias, _ = data
    y = norm_with(scale, bias)(x)
    np.testing.assert_allclose(np.asarray(y), reference(x, scale, bias, 8, 1e-6), rtol=0, atol=2e-5)
    # any rank with channels last (a sequence [B, T, C])
    seq = x.reshape(2, 36, 32)
    np.testing.assert_allclose(np.asarray(norm_with(scale, bias)(seq)), reference(seq, scale, bias, 8, 1e-6),
                               rtol=0, atol=2e-5)


def test_gradients_equal_the_formulas(data):
    """d/dx, d/dscale, d/dbias of sum(w * y) against the closed forms of the GroupNorm backward pass."""
    x, scale, bias, w = data
    graphdef, state = nnx.split(norm_with(scale, bias))

    def loss(state, x):
        return jnp.sum(nnx.merge(graphdef, state)(x) * w)

    gs, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(state, x)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    g = x64.reshape(2, -1, 8, 4)
    mean = g.mean(axis=(1, 3), keepdims=True)
    rstd = 1 / np.sqrt(((g - mean) ** 2).mean(axis=(1, 3), keepdims=True) + 1e-6)
    xhat = ((g - mean) * rstd).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(gs["bias"][...]), w64.sum(axis=(0, 1, 2)), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gs["scale"][...]), (w64 * xhat).sum(axis=(0, 1, 2)), rtol=1e-5, atol=1e-4)
    dxhat = (w64 * np.asarray(scale, np.float64)).reshape(g.shape)
    xh = xhat.reshape(g.shape)
    dx = rstd * (dxhat - dxhat.mean(axis=(1, 3), keepdims=True) - xh * (dxhat * xh).mean(axis=(1, 3), keepdims=True))
    np.testing.assert_allclose(np.asarray(gx), dx.reshape(x.shape), rtol=1e-4, atol=1e-4)


def test_forward_mode_works(data):
    """The likelihood (diffax/likelihood.py) differentiates the network forward: jvp equals finite differences."""
    x, scale, bias, w = data
    norm = norm_with(scale, bias)
    _, t = jax.jvp(norm, (x,), (w,))
    h = 1e-3
    fd = (reference(np.asarray(x, np.float64) + h * np.asarray(w, np.float64), scale, bias, 8, 1e-6)
          - reference(np.asarray(x, np.float64) - h * np.asarray(w, np.float64), scale, bias, 8, 1e-6)) / (2 * h)
    np.testing.assert_allclose(np.asarray(t), fd, rtol=0, atol=1e-4)


def test_bfloat16_activations(data):
    x, scale, bias, _ = data
    n = layers.GroupNorm(32, 8, 1e-6, dtype=jnp.bfloat16)
    n.scale[...], n.bias[...] = scale, bias
    y = n(x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), reference(x.astype(jnp.bfloat16), scale, bias, 8, 1e-6),
                               rtol=0, atol=3e-2)  # bfloat16 output: 8 bits of mantissa

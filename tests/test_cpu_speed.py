"""CPU speed changes keep values and gradients: GroupNorm's folded CPU form, the GroupNorm -> SiLU -> dropout
derivative and the conv bias gradient (diffax/models/layers.py) against
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


# ------------------------------------------------- GroupNorm -> SiLU -> dropout with a closed-form derivative


def silu64(y):
    return y / (1 + np.exp(-y))


def plain_group_norm(norm, x):
    """The textbook GroupNorm in float32 jnp, differentiated by JAX (no custom rule)."""
    b, c = x.shape[0], x.shape[-1]
    g = x.astype(jnp.float32).reshape(b, -1, norm.groups, c // norm.groups)
    mean = jnp.mean(g, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=(1, 3), keepdims=True)
    y = ((g - mean) * jax.lax.rsqrt(var + norm.eps)).reshape(x.shape) * norm.scale[...] + norm.bias[...]
    return y.astype(norm.dtype)


def autodiff_pair(norm, rate, key):
    """What the UNet traced before the CPU derivatives: the three layers differentiated by JAX."""
    return lambda x: layers.dropout(jax.nn.silu(plain_group_norm(norm, x)), rate, key)


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_norm_silu_values_and_gradients(data, rate):
    """layers.norm_silu against (a) the three layers differentiated by JAX, to float32 rounding (atol 2e-5 on
    gradients up to ~15), and (b) float64 closed forms: y = GroupNorm(x), out = silu(y) * keep / (1 - rate),
    d/dbias = sum(g), d/dscale = sum(g * xhat), d/dx as in test_gradients_equal_the_formulas, g = w *
    silu'(y) * keep / (1 - rate)."""
    x, scale, bias, w = data
    key = jax.random.key(7) if rate else None
    graphdef, state = nnx.split(norm_with(scale, bias))

    def loss(fn):
        return lambda state, x: jnp.sum(fn(nnx.merge(graphdef, state), x) * w)

    new = loss(lambda n, x: layers.norm_silu(n, x, rate, key))
    old = loss(lambda n, x: autodiff_pair(n, rate, key)(x))
    (v_new, g_new), (v_old, g_old) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(state, x) for f in (new, old))
    np.testing.assert_allclose(float(v_new), float(v_old), rtol=1e-5)  # float32 sums in another order
    for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_old)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-5)

    keep = np.ones(x.shape) if key is None else np.asarray(jax.random.bernoulli(key, 1 - rate, x.shape)) / (1 - rate)
    y = reference(x, scale, bias, 8, 1e-6)
    out = np.asarray(layers.norm_silu(norm_with(scale, bias), x, rate, key))
    np.testing.assert_allclose(out, silu64(y) * keep, rtol=0, atol=2e-5)
    s = 1 / (1 + np.exp(-y))
    gy = np.asarray(w, np.float64) * s * (1 + y * (1 - s)) * keep
    g = np.asarray(x, np.float64).reshape(2, -1, 8, 4)
    mean = g.mean(axis=(1, 3), keepdims=True)
    rstd = 1 / np.sqrt(((g - mean) ** 2).mean(axis=(1, 3), keepdims=True) + 1e-6)
    xh = (g - mean) * rstd
    gs, gx = g_new
    np.testing.assert_allclose(np.asarray(gs["bias"][...]), gy.sum(axis=(0, 1, 2)), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gs["scale"][...]), (gy * xh.reshape(x.shape)).sum(axis=(0, 1, 2)),
                               rtol=1e-5, atol=1e-4)
    u = (gy * np.asarray(scale, np.float64)).reshape(g.shape)
    dx = rstd * (u - u.mean(axis=(1, 3), keepdims=True) - xh * (u * xh).mean(axis=(1, 3), keepdims=True))
    np.testing.assert_allclose(np.asarray(gx), dx.reshape(x.shape), rtol=1e-4, atol=1e-4)


def test_norm_silu_forward_mode(data):
    """jax.jvp (the likelihood) through the custom derivative equals JAX's own jvp of the three layers, and on a
    sequence [B, T, C]."""
    x, scale, bias, w = data
    norm = norm_with(scale, bias)
    key = jax.random.key(3)
    for xs, ws in ((x, w), (x.reshape(2, 36, 32), w.reshape(2, 36, 32))):
        _, t_new = jax.jvp(lambda x: layers.norm_silu(norm, x, 0.3, key), (xs,), (ws,))
        _, t_old = jax.jvp(autodiff_pair(norm, 0.3, key), (xs,), (ws,))
        np.testing.assert_allclose(np.asarray(t_new), np.asarray(t_old), rtol=0, atol=1e-5)


def test_norm_silu_bfloat16(data):
    """bfloat16 activations: output and input gradient in bfloat16, equal to the three layers to bfloat16's
    8-bit mantissa (the fused form rounds once, at the end, instead of after the norm and after SiLU)."""
    x, scale, bias, w = data
    n = layers.GroupNorm(32, 8, 1e-6, dtype=jnp.bfloat16)
    n.scale[...], n.bias[...] = scale, bias
    xb = x.astype(jnp.bfloat16)
    y = layers.norm_silu(n, xb)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), silu64(reference(xb, scale, bias, 8, 1e-6)), rtol=0, atol=3e-2)
    grad = lambda f: jax.grad(lambda x: jnp.sum(f(x).astype(jnp.float32) * w))(xb)  # noqa: E731
    g_new, g_old = grad(lambda x: layers.norm_silu(n, x)), grad(autodiff_pair(n, 0.0, None))
    assert g_new.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g_new, np.float32), np.asarray(g_old, np.float32), rtol=0.05, atol=0.05)


# ------------------------------------------------- conv bias with its gradient as a dot


@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 0.1)])
def test_add_channel_bias(dtype, atol):
    """Values bit-equal to y + bias (bias [C], or [B, C]); d/dbias = the float64 sum of the cotangent over every other axis
    (bfloat16: accumulated in float32, so within bfloat16's rounding of the result, |sum| <~ 20); d/dy and
    the jvp are the identity / the broadcast tangent exactly."""
    k = jax.random.split(jax.random.key(1), 3)
    y = jax.random.normal(k[0], (2, 5, 5, 16)).astype(dtype)
    b = jax.random.normal(k[1], (16,)).astype(dtype)
    w = jax.random.normal(k[2], y.shape).astype(dtype)
    assert bool((layers.add_channel_bias(y, b) == y + b).all())
    gy, gb = jax.jit(jax.grad(lambda y, b: jnp.sum((layers.add_channel_bias(y, b) * w).astype(jnp.float32)), (0, 1)))(y, b)
    assert gb.dtype == dtype
    np.testing.assert_array_equal(np.asarray(gy, np.float32), np.asarray(w, np.float32))
    np.testing.assert_allclose(np.asarray(gb, np.float64), np.asarray(w, np.float64).sum(axis=(0, 1, 2)), rtol=0, atol=atol)
    _, t = jax.jvp(lambda b: layers.add_channel_bias(y, b), (b,), (w[0, 0, 0],))
    np.testing.assert_array_equal(np.asarray(t, np.float32), np.broadcast_to(np.asarray(w[0, 0, 0], np.float32), y.shape))
    # a bias per example [B, C] (the noise-level embedding): summed over the positions only
    e = b + jnp.asarray([[0.0], [1.0]], dtype)
    assert bool((layers.add_channel_bias(y, e) == y + e[:, None, None, :]).all())
    ge = jax.jit(jax.grad(lambda e: jnp.sum((layers.add_channel_bias(y, e) * w).astype(jnp.float32))))(e)
    np.testing.assert_allclose(np.asarray(ge, np.float64), np.asarray(w, np.float64).sum(axis=(1, 2)), rtol=0, atol=atol)


def test_resblock_gradients_equal_autodiff(monkeypatch):
    """The DDPM residual block with dropout (both norm -> SiLU pairs, the noise-level embedding and the conv
    biases): loss and gradients (parameters, input, embedding) with the CPU derivatives equal those of the
    plain layers differentiated by JAX (relative to the largest gradient of each, 1e-4)."""
    block = layers.ResBlock(8, 16, 12, dropout=0.1, groups=4, eps=1e-6, dtype=jnp.float32, param_dtype=jnp.float32,
                            rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(block)
    k = jax.random.split(jax.random.key(5), 4)
    # nonzero conv2 and biases; jitted: one compile instead of one per parameter shape
    state = jax.jit(lambda s: jax.tree.map(lambda p: p + 0.05 * jax.random.normal(k[0], p.shape), s))(state)
    x, emb = jax.random.normal(k[1], (2, 6, 6, 8)), jax.random.normal(k[2], (2, 12))

    def loss(state, x, emb):
        return jnp.sum(jnp.square(nnx.merge(graphdef, state)(x, emb, k[3])))

    v_new, g_new = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(state, x, emb)
    monkeypatch.setattr(layers, "norm_silu", lambda n, x, rate=0.0, key=None: autodiff_pair(n, rate, key)(x))
    monkeypatch.setattr(layers, "add_channel_bias", layers._add_bias)
    v_old, g_old = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(state, x, emb)  # a new function: traced again
    np.testing.assert_allclose(float(v_new), float(v_old), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_old)):
        scale = float(np.abs(np.asarray(b)).max()) or 1.0
        np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale, rtol=0, atol=1e-4)

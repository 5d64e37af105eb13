"""Tests for diffax/models: published parameter counts, initialisation, conditioning, dtype, remat, dropout.

Compile time dominates on CPU, so each architecture is initialised once per module
(fixtures), variants (remat, bfloat16, learn_sigma) reuse its parameters
through nnx.eval_shape, and everything is jitted at XLA backend optimisation level 0.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.default import get_config
from diffax.models import MODELS, build_model, count_params, layers
from diffax.models.dit import parse_preset
from diffax.models.embeddings import fourier_embedding, sincos_pos_embed_2d, timestep_embedding
from diffax.models.unet import add_label_embedding

FAST = {"xla_backend_optimization_level": 0}
SHAPE = (8, 8, 2)
NUM_CLASSES = 3
LABELS = jnp.array([0, 1, NUM_CLASSES])  # two classes and the null label, on identical inputs


def unet_cfg(**kw):
    """A tiny ADM-style UNet: scale-shift norm, BigGAN resampling, head_channels (2 heads at 4x4)."""
    m = get_config().model
    m.update(dict(name="unet", channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                  head_channels=4, norm_groups=4, scale_shift_norm=True, resblock_updown=True,
                  dropout=0.3))  # fmt: skip
    m.update(kw)
    return m


def dit_cfg(**kw):
    m = get_config().model
    m.update(dict(name="dit", preset="", hidden_size=16, depth=2, num_heads=2, patch_size=2, dropout=0.3))
    m.update(kw)
    return m


def mlp_cfg(**kw):
    m = get_config().model
    m.update(dict(name="mlp", hidden=16, layers=2, dropout=0.3))
    m.update(kw)
    return m


CFGS = {"unet": (unet_cfg, SHAPE), "dit": (dit_cfg, SHAPE), "mlp": (mlp_cfg, (2,))}


def _noisy(state, seed: int = 1):
    """Parameters + N(0, 0.1^2) noise (numpy: no XLA program to compile), so zero-initialised layers are live."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p + jnp.asarray(0.1 * rng.standard_normal(p.shape), p.dtype), state)


@functools.lru_cache(maxsize=None)
def _compiled_apply(graphdef):
    def f(state, x, c, labels, key):
        return nnx.merge(graphdef, state)(x, c, labels, dropout_key=key)

    return jax.jit(f, compiler_options=FAST)


def apply(model, x, c, labels=None, dropout_key=None):
    """model(...), compiled once per architecture and argument structure."""
    graphdef, state = nnx.split(model)
    return np.asarray(_compiled_apply(graphdef)(state, x, c, labels, dropout_key))


def variant(name: str, params, **kw) -> nnx.Module:
    """The model with config changes kw, holding `params` (no random initialisation is run)."""
    cfg_fn, shape = CFGS[name]
    model = nnx.eval_shape(
        lambda: build_model(cfg_fn(**kw), data_shape=shape, num_classes=NUM_CLASSES, rngs=nnx.Rngs(0))
    )
    nnx.update(model, params)
    return model


@pytest.fixture(scope="module", params=list(CFGS))
def net(request):
    """(name, freshly initialised model, perturbed parameters) for each architecture, built once."""
    cfg_fn, shape = CFGS[request.param]
    model = build_model(cfg_fn(), data_shape=shape, num_classes=NUM_CLASSES, rngs=nnx.Rngs(0))
    params = _noisy(nnx.state(model, nnx.Param))
    return request.param, model, params


def inputs(shape, batch=3):
    """Identical inputs and noise levels in every row, so rows differ only by their label."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    x = jnp.asarray(np.broadcast_to(x, (batch, *shape)))
    return x, jnp.full((batch,), 321.0)


def loss_and_grads(model, x, c):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params, rest)(x, c, LABELS) ** 2)

    return jax.jit(jax.value_and_grad(loss), compiler_options=FAST)(params)


# ----------------------------------------------------------------------------- published sizes


def test_ddpm_cifar10_param_count():
    """Ho et al. (2020), CIFAR-10 model: 35.7M parameters (eval_shape: nothing allocated)."""
    m = get_config().model
    m.update(dict(name="unet", channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                  attention_resolutions=(16,), dropout=0.1, norm_groups=32))  # fmt: skip
    n = count_params(nnx.eval_shape(lambda: build_model(m, data_shape=(32, 32, 3), num_classes=0, rngs=nnx.Rngs(0))))
    assert abs(n - 35.7e6) / 35.7e6 < 0.01, n
    assert n == 35_746_307  # the same count as diffusers' google/ddpm-cifar10-32


@pytest.mark.parametrize("name,millions", [("S", 33), ("B", 130), ("L", 458), ("XL", 675)])
def test_dit_param_counts_match_paper(name, millions):
    """Peebles & Xie (2023), Table 1: 256x256 images = 32x32x4 latents, 1000 classes, learned sigma."""
    m = get_config().model
    m.update(dict(name="dit", preset=f"{name}/2", learn_sigma=True))
    n = count_params(nnx.eval_shape(lambda: build_model(m, data_shape=(32, 32, 4), num_classes=1000,
                                                        rngs=nnx.Rngs(0))))
    assert abs(n - millions * 1e6) / (millions * 1e6) < 0.01, n


def test_dit_presets_and_registry_errors():
    assert parse_preset("XL/2") == (28, 1152, 16, 2)
    assert parse_preset("S/8") == (12, 384, 6, 8)
    with pytest.raises(ValueError, match="XXL/2"):
        parse_preset("XXL/2")
    with pytest.raises(ValueError, match="config.model.name.*unet"):
        build_model(unet_cfg(name="unnet"), data_shape=SHAPE, num_classes=0, rngs=nnx.Rngs(0))
    assert MODELS.names() == ["dit", "mlp", "mmdit", "unet"]


# ----------------------------------------------------------------------------- embeddings


def test_timestep_embedding_closed_form():
    """DDPM (Ho et al. 2020): freq_i = exp(-log(1e4) i / (d/2 - 1)), [sin, cos]; ADM / DiT: [cos, sin], shift 0."""
    t = np.array([0.0, 3.0, 999.0])
    d, half = 8, 4
    f = np.exp(-math.log(10000) * np.arange(half) / (half - 1))
    ref = np.concatenate([np.sin(t[:, None] * f), np.cos(t[:, None] * f)], 1)
    np.testing.assert_allclose(timestep_embedding(jnp.asarray(t), d), ref, rtol=1e-5, atol=1e-5)
    f0 = np.exp(-math.log(10000) * np.arange(half) / half)
    ref0 = np.concatenate([np.cos(t[:, None] * f0), np.sin(t[:, None] * f0)], 1)
    got = timestep_embedding(jnp.asarray(t), d, flip_sin_to_cos=True, freq_shift=0.0)
    np.testing.assert_allclose(got, ref0, rtol=1e-5, atol=1e-5)
    assert timestep_embedding(jnp.asarray(t), 7).shape == (3, 7)


def test_fourier_embedding_is_fixed_and_on_the_circle():
    c = jnp.array([-1.5, 0.0, 1.2])
    a, b = fourier_embedding(c, 16), fourier_embedding(c, 16)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a[1], np.r_[np.zeros(8), np.ones(8)], atol=1e-7)  # sin 0, cos 0 at c = 0
    np.testing.assert_allclose(np.sum(np.asarray(a).reshape(3, 2, 8) ** 2, axis=1), 1.0, rtol=1e-5)


def test_dit_pos_embed_matches_reference_code():
    """Against MAE / DiT get_2d_sincos_pos_embed (meshgrid(w, h); the first half embeds grid[0])."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    d, gs = 16, 4
    grid = np.stack(np.meshgrid(np.arange(gs, dtype=np.float32), np.arange(gs, dtype=np.float32)), 0)
    ref = np.concatenate([one_d(d // 2, grid[0]), one_d(d // 2, grid[1])], axis=1)
    np.testing.assert_allclose(sincos_pos_embed_2d(d, gs, gs), ref, rtol=1e-6, atol=1e-6)


def test_null_label_when_labels_missing():
    table = nnx.Embed(4, 5, rngs=nnx.Rngs(0))
    emb = jnp.zeros((2, 5))
    np.testing.assert_array_equal(
        add_label_embedding(emb, table, 3, None, 2), add_label_embedding(emb, table, 3, jnp.array([3, 3]), 2)
    )
    with pytest.raises(ValueError, match="num_classes=0"):
        add_label_embedding(emb, None, 0, jnp.array([0, 1]), 2)


# ----------------------------------------------------------------------------- one architecture at a time


def test_zero_init_output_then_conditioning(net):
    """Output layer zero-initialised (DDPM / ADM last conv; DiT adaLN-Zero): output exactly 0 at init.
    With live weights: classes give different outputs, the null label differs from a class, and
    the noise level changes the output."""
    name, model, params = net
    shape = CFGS[name][1]
    x, c = inputs(shape)
    assert model.label_embed.embedding.shape[0] == NUM_CLASSES + 1  # the last row is the null label
    assert np.all(apply(model, x, c, LABELS) == 0.0)
    live = variant(name, params)
    out = apply(live, x, c, LABELS)
    assert out.shape == x.shape and np.all(np.isfinite(out))
    scale = 1e-2 * np.abs(out).max()  # the exact outputs are checked against references below and in fixtures
    assert np.abs(out[0] - out[1]).max() > scale  # class 0 vs class 1
    assert np.abs(out[2] - out[0]).max() > scale  # null label vs class 0
    other = apply(live, x, c + 400.0, LABELS)
    assert np.abs(other - out).max() > scale


def test_dropout_only_with_key(net):
    name, _, params = net
    live = variant(name, params)
    x, c = inputs(CFGS[name][1])
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    no_key = apply(live, x, c, LABELS)
    a, a2, b = (apply(live, x, c, LABELS, k) for k in (k1, k1, k2))
    np.testing.assert_array_equal(a, a2)  # pure: the same key gives the same output
    assert np.abs(a - no_key).max() > 1e-4 and np.abs(a - b).max() > 1e-4
    rate0 = variant(name, params, dropout=0.0)
    np.testing.assert_array_equal(apply(rate0, x, c, LABELS), no_key)  # no key = dropout off


def test_learn_sigma_doubles_channels(net):
    """learn_sigma: 2C outputs, of which the first C are what the same net without it computes."""
    name, _, params = net
    if name == "mlp":
        pytest.skip("same code path as the UNet / DiT output layer")
    shape = CFGS[name][1]
    c_out = shape[-1]
    big = dict(nnx.to_flat_state(params))
    for path, var in list(big.items()):
        if path[0] in ("conv_out", "final_proj"):
            w = var[...]
            if path[0] == "final_proj":  # DiT: per token (p, p, C) -> (p, p, 2C)
                w = w.reshape(*w.shape[:-1], 2, 2, c_out)
                w = jnp.concatenate([w, jnp.ones_like(w)], -1).reshape(*w.shape[:-3], -1)
            else:
                w = jnp.concatenate([w, jnp.ones_like(w)], -1)
            big[path] = nnx.Param(w)
    both = variant(name, nnx.from_flat_state(big), learn_sigma=True)
    x, c = inputs(shape)
    out = apply(both, x, c, LABELS)
    assert out.shape == (*x.shape[:-1], 2 * c_out)
    np.testing.assert_allclose(out[..., :c_out], apply(variant(name, params), x, c, LABELS), rtol=1e-5, atol=1e-5)
    assert np.abs(out[..., c_out:]).max() > 1e-3


def test_bfloat16_activations_float32_params(net):
    name, _, params = net
    if name == "mlp":
        pytest.skip("same layers as the DiT")
    bf = variant(name, params, dtype="bfloat16")
    assert all(v.dtype == jnp.float32 for _, v in nnx.to_flat_state(nnx.state(bf, nnx.Param)))
    x, c = inputs(CFGS[name][1])
    jaxpr = jax.make_jaxpr(lambda x, c: bf(x, c, LABELS))(x, c)
    mm = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("conv_general_dilated", "dot_general")
          and "sum_by_dot" not in str(e.source_info.name_stack)]  # GroupNorm's float32 statistics on the CPU
    # every conv / matmul reads bf16 operands (attention logits may accumulate in f32)
    assert mm and all(v.aval.dtype == jnp.bfloat16 for e in mm for v in e.invars)
    graphdef, state = nnx.split(bf)
    out = jax.jit(lambda s: nnx.merge(graphdef, s)(x, c, LABELS), compiler_options=FAST)(state)
    assert out.dtype == jnp.bfloat16
    want = apply(variant(name, params), x, c, LABELS)
    err = np.abs(np.asarray(out, np.float32) - want).max() / np.abs(want).max()
    assert err < 0.05, err


@pytest.fixture(scope="module")
def plain_grads(net):
    name, _, params = net
    x, c = inputs(CFGS[name][1])
    return loss_and_grads(variant(name, params), x, c)


def test_remat_same_values_and_gradients(net, plain_grads):
    name, _, params = net
    if name == "mlp":
        pytest.skip("the MLP has no remat option")
    x, c = inputs(CFGS[name][1])
    l0, g0 = plain_grads
    l1, g1 = loss_and_grads(variant(name, params, remat=True), x, c)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):  # same math; float sums may be fused differently
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


# ----------------------------------------------------------------------------- independent references


def _np(v):
    return np.asarray(v[...], np.float64)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _sinusoidal(c, dim, freq_shift=1.0):
    """DDPM's embedding written out: [sin(c w_i), cos(c w_i)], w_i = 10000^(-i / (dim/2 - freq_shift))."""
    half = dim // 2
    w = 10000.0 ** (-np.arange(half) / (half - freq_shift))
    return np.concatenate([np.sin(c[:, None] * w), np.cos(c[:, None] * w)], axis=1)


def test_mlp_matches_a_numpy_forward(net):
    """The MLP (with class labels and live weights) against its formula written out in numpy, float64."""
    name, _, params = net
    if name != "mlp":
        pytest.skip("the MLP's reference")
    m = variant(name, params)
    x = np.random.default_rng(3).standard_normal((3, 2))
    c = np.array([5.0, 321.0, 900.0])
    lin = lambda layer, h: h @ _np(layer.kernel) + _np(layer.bias)  # noqa: E731
    emb = lin(m.time_mlp2, _silu(lin(m.time_mlp1, _sinusoidal(c, 16))))
    emb = _silu(emb + _np(m.label_embed.embedding)[np.asarray(LABELS)])
    h = lin(m.inp, x)
    for hid, temb, mix in zip(m.hid, m.temb, m.mix):
        h = h + lin(mix, _silu(lin(hid, h) + lin(temb, emb)))
    want = lin(m.out, _silu(h))
    got = apply(m, jnp.asarray(x, jnp.float32), jnp.asarray(c, jnp.float32), LABELS)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def _dit_block_numpy(w: dict, x: np.ndarray, cond: np.ndarray, heads: int) -> np.ndarray:
    """One DiT block with adaLN-Zero (Peebles & Xie 2023, Fig. 3; their `DiTBlock`), in numpy."""
    def ln(z):
        return (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-6)

    def gelu_tanh(z):
        return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))

    b, t, d = x.shape
    mod = _silu(cond) @ w["adaln.kernel"] + w["adaln.bias"]
    shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, None, :] for m in np.split(mod, 6, axis=-1))
    h = ln(x) * (1 + scale1) + shift1
    q, k, v = (z.reshape(b, t, heads, d // heads) for z in np.split(h @ w["qkv.kernel"] + w["qkv.bias"], 3, -1))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // heads)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    h = np.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, t, d) @ w["proj.kernel"] + w["proj.bias"]
    x = x + gate1 * h
    h = ln(x) * (1 + scale2) + shift2
    h = gelu_tanh(h @ w["fc1.kernel"] + w["fc1.bias"]) @ w["fc2.kernel"] + w["fc2.bias"]
    return x + gate2 * h


def test_dit_blocks_match_a_numpy_forward(net):
    """DiT's scanned, stacked blocks (live weights) against the block written out in numpy, applied in order."""
    name, _, params = net
    if name != "dit":
        pytest.skip("the DiT's reference")
    from diffax.models.dit import scan_blocks

    m = variant(name, params)
    rng = np.random.default_rng(4)
    x, cond = rng.standard_normal((3, 16, 16)), rng.standard_normal((3, 16))
    stacked = {".".join(map(str, k)): np.asarray(v[...], np.float64)
               for k, v in nnx.to_flat_state(nnx.state(m.blocks, nnx.Param))}  # fmt: skip
    want = x
    for i in range(2):
        want = _dit_block_numpy({k: v[i] for k, v in stacked.items()}, want, cond, heads=2)
    graphdef, state = nnx.split(m.blocks)
    got = jax.jit(lambda s, h, c: scan_blocks(nnx.merge(graphdef, s), h, c), compiler_options=FAST)(
        state, jnp.asarray(x, jnp.float32), jnp.asarray(cond, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# ----------------------------------------------------------------------------- layers


def test_dropout_layer_statistics():
    x = jnp.ones((20000,))
    y = np.asarray(layers.dropout(x, 0.25, jax.random.PRNGKey(0)))
    assert set(np.unique(y)) == {0.0, np.float32(1 / 0.75)}
    assert abs((y == 0).mean() - 0.25) < 0.02
    np.testing.assert_array_equal(layers.dropout(x, 0.25, None), x)


@pytest.mark.parametrize("conv", ["diffax", "rows"])
@pytest.mark.parametrize(
    "stride,padding,ksize", [(1, "same", 3), (2, ((0, 1), (0, 1)), 3), (2, ((1, 1), (1, 1)), 3), (1, "same", 1)]
)
def test_conv_matches_nnx_conv(stride, padding, ksize, conv):
    """diffax's conv2d, and the benchmarks' row-convolution kernel gradient (benchmarks/conv_rows.py),
    equal nnx.Conv in values and all gradients."""
    from benchmarks.conv_rows import conv2d_rows

    conv2d = layers.conv2d if conv == "diffax" else conv2d_rows
    conv = lambda: nnx.Conv(6, 5, (ksize, ksize), strides=stride, padding=padding, rngs=nnx.Rngs(0))  # noqa: E731
    ref = nnx.eval_shape(conv)
    rng = np.random.default_rng(0)
    shapes = [(ksize, ksize, 6, 5), (5,), (3, 8, 8, 6)]
    kernel, bias, x = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)
    pad = ((ksize // 2,) * 2,) * 2 if padding == "same" else padding

    def ours(kernel, bias, x):
        return conv2d(x, kernel, stride=stride, padding=pad) + bias

    graphdef = nnx.graphdef(ref)

    def theirs(kernel, bias, x):
        params = nnx.from_flat_state([(("bias",), nnx.Param(bias)), (("kernel",), nnx.Param(kernel))])
        return nnx.merge(graphdef, params)(x)

    w = jnp.asarray(rng.standard_normal(jax.eval_shape(theirs, kernel, bias, x).shape), jnp.float32)

    @functools.partial(jax.jit, static_argnums=0, compiler_options=FAST)
    def run(f, kernel, bias, x):
        return f(kernel, bias, x), jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(kernel, bias, x)

    y0, g0 = run(theirs, kernel, bias, x)
    y1, g1 = run(ours, kernel, bias, x)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)

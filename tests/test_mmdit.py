"""MMDiT (Esser et al. 2024): parity with diffusers' SD3Transformer2DModel on random weights, the import's
errors, the text mask, and a tiny text-to-image MMDiT that learns to read its caption.

The fixtures are made by tests/fixtures/make_diffusers_mmdit_fixture.py (torch venv).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import digits_text
from diffax import parallel
from diffax.errors import UserError
from diffax.models import build_model, count_params
from diffax.models.diffusers import UnsupportedDiffusersConfig
from diffax.models.diffusers_mmdit import (SD3_DEFAULTS, load_diffusers_sd3_transformer, load_sd3_weights,
                                          sd3_config_to_diffax)
from diffax.models.mmdit import sd3_pos_embed

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers_mmdit")


@pytest.fixture(scope="module", params=["sd3", "sd35"])
def imported(request):
    overrides, model = load_diffusers_sd3_transformer(os.path.join(FIXTURES, request.param))
    return request.param, overrides, model, dict(np.load(os.path.join(FIXTURES, f"{request.param}.npz")))


def run(model, f, key="", context=None, mask=None):
    """model(x, t, ...) as one small program per input shape (compiled at XLA:CPU level 0: it runs once)."""
    graph, state = nnx.split(model)
    forward = jax.jit(lambda state, *a: nnx.merge(graph, state)(*a[:2], context=a[2], pooled=a[3], context_mask=a[4]),
                      compiler_options={"xla_backend_optimization_level": 0})
    context = f[key + "context"] if context is None else context
    return np.asarray(forward(state, jnp.asarray(f[key + "x"].transpose(0, 2, 3, 1)), jnp.asarray(f[key + "t"]),
                              jnp.asarray(context), jnp.asarray(f[key + "pooled"]), mask))


@pytest.mark.parametrize("key", ["", "wide_"])  # an 8x8 latent (4x4 tokens) and a 4x8 one (a 2x4 crop of the grid)
def test_matches_diffusers_sd3_transformer(imported, key):
    """Same random weights, same inputs: diffax's output equals SD3Transformer2DModel's (NCHW -> NHWC)."""
    case, _, model, f = imported
    if case == "sd35" and key:
        pytest.skip("the crop is checked on sd3; sd35 differs in the qk norm only (one compile less)")
    want = f[key + "out"].transpose(0, 2, 3, 1)
    assert np.abs(want).max() > 1.0  # random adaLN / output weights: far from the zero-initialised output
    np.testing.assert_allclose(run(model, f, key), want, atol=1e-4, rtol=0)


def test_import_sets_the_run(imported):
    case, overrides, model, _ = imported
    assert overrides.model.name == "mmdit" and overrides.model.qk_norm == ("rms_norm" if case == "sd35" else "")
    assert (overrides.model.depth, overrides.model.hidden_size) == ((3 if case == "sd3" else 2), 24)
    assert dict(overrides.text_widths) == {"context_dim": 20, "pooled_dim": 16}
    # SD3's scheduler: rectified flow, velocity target, Euler on diffusers' shifted grid
    assert (overrides.diffusion.schedule, overrides.diffusion.prediction) == ("rectified_flow", "flow")
    assert (overrides.sampling.sampler, overrides.sampling.shift) == ("flow_euler", 3.0)


def test_text_mask_equals_dropping_the_masked_tokens(imported):
    """Masked text tokens are hidden as keys from every query: the output equals that of the shorter text,
    and differs from attending to all tokens (SD3's own behaviour, context_mask=None)."""
    case, _, model, f = imported
    if case == "sd35":
        pytest.skip("the mask is the same code with or without qk norm (two compiles less)")
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    masked = run(model, f, mask=jnp.asarray(mask))
    short = run(model, {**f, "x": f["x"][:1], "t": f["t"][:1], "pooled": f["pooled"][:1]},
                context=f["context"][:1, :3])
    np.testing.assert_allclose(masked[:1], short, atol=1e-5, rtol=0)
    np.testing.assert_allclose(masked[1:], f["out"][1:].transpose(0, 2, 3, 1), atol=1e-4, rtol=0)
    assert np.abs(masked[:1] - f["out"][:1].transpose(0, 2, 3, 1)).max() > 1e-2


def test_position_table_is_sd3s(imported):
    """The table diffax computes equals the buffer diffusers stored (pos_embed.pos_embed), crop included."""
    from safetensors.numpy import load_file

    case, _, model, _ = imported
    stored = load_file(os.path.join(FIXTURES, case, "transformer", "diffusion_pytorch_model.safetensors"))
    table = stored["pos_embed.pos_embed"][0].reshape(6, 6, 24)
    np.testing.assert_allclose(sd3_pos_embed(24, 2, 4, max_size=6, base_size=4), table[2:4, 1:5].reshape(8, 24),
                               atol=1e-6)


def test_every_tensor_is_used_and_the_stored_table_checked(imported):
    case, _, model, _ = imported
    from safetensors.numpy import load_file

    tensors = load_file(os.path.join(FIXTURES, case, "transformer", "diffusion_pytorch_model.safetensors"))
    depth = 3 if case == "sd3" else 2
    with pytest.raises(UnsupportedDiffusersConfig, match="extra.weight"):
        load_sd3_weights(model, {**tensors, "extra.weight": np.zeros(3, np.float32)}, depth=depth)
    bad = {**tensors, "pos_embed.pos_embed": tensors["pos_embed.pos_embed"] * 2}
    with pytest.raises(UnsupportedDiffusersConfig, match="pos_embed.pos_embed"):
        load_sd3_weights(model, bad, depth=depth)
    missing = {k: v for k, v in tensors.items() if k != "proj_out.bias"}
    with pytest.raises(UnsupportedDiffusersConfig, match="proj_out.bias"):
        load_sd3_weights(model, missing, depth=depth)


@pytest.mark.parametrize("option, value", [("dual_attention_layers", [0]), ("qk_norm", "layer_norm"),
                                           ("caption_projection_dim", 32), ("out_channels", 8), ("foo", 1)])
def test_unsupported_options_are_named(option, value):
    cfg = json.load(open(os.path.join(FIXTURES, "sd3", "transformer", "config.json")))
    with pytest.raises(UnsupportedDiffusersConfig, match=option):
        sd3_config_to_diffax({**cfg, option: value})


def test_sd3_medium_size():
    """SD3 Medium's transformer (diffusers' defaults but 24 layers of 24 heads, pos_embed_max_size 192):
    the parameter count diffusers' SD3Transformer2DModel has (recorded by the fixture script)."""
    cfg = {**SD3_DEFAULTS, "num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
           "pos_embed_max_size": 192}
    model, data, text = sd3_config_to_diffax(cfg)
    m = digits_text.get_config("mmdit").model
    m.update(model)
    n = count_params(nnx.eval_shape(lambda: build_model(m, data_shape=(128, 128, 16), num_classes=0,
                                                        rngs=nnx.Rngs(0), **text)))
    with open(os.path.join(FIXTURES, "sizes.json")) as f:
        assert n == json.load(f)["sd3_medium_parameters"]


def test_mmdit_needs_text():
    m = digits_text.get_config("mmdit").model
    with pytest.raises(UserError, match="config.text.encoder"):
        build_model(m, data_shape=(8, 8, 1), num_classes=0, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- learning

CAPTIONS = ["a bright square", "a dark square"]


@pytest.fixture(scope="module")
def trained():
    """configs/digits_text.py:mmdit made tiny, trained on +1 / -1 images that only the caption tells apart."""
    from diffax.models.text.small import WordTokenizer
    from diffax.training import text
    from diffax.training.build import build
    from diffax.training.state import learning_rate_schedule
    from diffax.training.step import init_state, make_train_step, state_layout

    config = digits_text.get_config("mmdit")
    config.data.image_size = 4
    config.model.hidden_size, config.model.depth, config.model.num_heads = 32, 2, 2
    config.text.width, config.text.depth, config.text.heads, config.text.max_length = 32, 1, 2, 5
    config.optimizer.learning_rate, config.optimizer.warmup_steps = 3e-3, 10
    config.training.batch_size = 32
    tok = WordTokenizer.build(CAPTIONS, 16, config.text.max_length)
    diffusion = build(config)
    tx, _, _ = state_layout(diffusion, config, parallel.make_mesh(config.mesh))
    step = jax.jit(make_train_step(diffusion, tx, learning_rate_schedule(config.optimizer, 200), config),
                   compiler_options={"xla_backend_optimization_level": 0})
    state = init_state(diffusion, tx)
    which = np.random.default_rng(0).integers(0, 2, 32)  # one fixed batch
    batch = {"image": jnp.asarray(np.where(which == 0, 1.0, -1.0)[:, None, None, None] * np.ones((1, 4, 4, 1)),
                                  jnp.float32),
             "label": jnp.zeros(32, jnp.int32), "tokens": jnp.asarray(text.tokens_of(tok, CAPTIONS)[which])}
    losses = []
    for _ in range(40):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return diffusion, state.params, tok, losses


def test_loss_falls(trained):
    *_, losses = trained
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.5 * first, (first, last)


def test_the_caption_is_read(trained):
    """At t = 0.9 the image is mostly noise; knowing the caption halves (at least) the error of x0."""
    from diffax.samplers.guidance import raw_denoiser
    from diffax.training import text

    diffusion, params, tok, _ = trained
    net = raw_denoiser(diffusion.apply_fn(params), diffusion.schedule(params), diffusion.parameterization)
    x = np.concatenate([np.ones((8, 4, 4, 1)), -np.ones((8, 4, 4, 1))]).astype(np.float32)
    cond = text.tokens_of(tok, [CAPTIONS[0]] * 8 + [CAPTIONS[1]] * 8)
    null = np.broadcast_to(diffusion.null_tokens, cond.shape)
    t = jnp.full((16,), 0.9)
    a, s = diffusion.schedule(params).alpha_sigma(t)
    z = a[:, None, None, None] * x + s[:, None, None, None] * jax.random.normal(jax.random.key(1), x.shape)
    x0 = jax.jit(lambda tokens: net(z, t, tokens).x0)
    err = lambda tokens: float(jnp.mean((x0(jnp.asarray(tokens)) - x) ** 2))  # noqa: E731
    cond_err, null_err = err(cond), err(null)
    assert cond_err < 0.5 * null_err, (cond_err, null_err)

"""Text conditioning learns, and guidance mixes the prompt's and the empty prompt's predictions.

A toy task a caption decides: "a bright square" is an image of +1s, "a dark square" of -1s. At
high noise the image is all but gone, so the best unconditional guess of x0 is the mean (0),
an error of about 1, while a model that reads the caption knows the sign. The whole
text path is trained (word tokenizer, small encoder, cross-attention DiT with the pooled text in its
conditioning, caption dropout)
through the library's own train step.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits_text
from diffax import parallel
from diffax.models.text.small import WordTokenizer
from diffax.samplers.guidance import make_denoiser, raw_denoiser
from diffax.training import text
from diffax.training.build import build
from diffax.training.state import learning_rate_schedule
from diffax.training.step import init_state, make_train_step, state_layout

CAPTIONS = ["a bright square", "a dark square"]


def tiny_config():
    config = digits_text.get_config()
    config.data.image_size = 4
    config.model.name = "dit"  # one scanned block to compile: the UNet's cross-attention is checked against diffusers
    config.model.hidden_size = 32
    config.model.depth = 2
    config.model.num_heads = 2
    config.model.patch_size = 2
    config.text.width = 32
    config.text.depth = 1
    config.text.heads = 2
    config.text.max_length = 5
    config.text.caption_dropout = 0.2
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 10
    config.training.batch_size = 32
    config.diffusion.prediction = "x0"  # well-conditioned at high noise, where the caption is all there is
    config.diffusion.weighting = "x0"
    return config


@pytest.fixture(scope="module")
def trained():
    config = tiny_config()
    tok = WordTokenizer.build(CAPTIONS, 16, config.text.max_length)
    diffusion = build(config)
    tx, _, _ = state_layout(diffusion, config, parallel.make_mesh(config.mesh))
    step = jax.jit(make_train_step(diffusion, tx, learning_rate_schedule(config.optimizer, 200), config),
                   compiler_options={"xla_backend_optimization_level": 0})  # compiles 2x faster; steps are tiny
    state = init_state(diffusion, tx)
    rng = np.random.default_rng(0)
    tokens = text.tokens_of(tok, CAPTIONS)
    for _ in range(120):
        which = rng.integers(0, 2, config.training.batch_size)
        images = np.where(which == 0, 1.0, -1.0)[:, None, None, None] * np.ones((1, 4, 4, 1))
        state, _ = step(state, {"image": jnp.asarray(images, jnp.float32), "label": jnp.zeros(32, jnp.int32),
                                "tokens": jnp.asarray(tokens[which])})
    return config, diffusion, state.params, tok


def test_the_caption_is_read(trained):
    config, diffusion, params, tok = trained
    net = raw_denoiser(diffusion.apply_fn(params), diffusion.schedule(params), diffusion.parameterization)
    x = np.concatenate([np.ones((8, 4, 4, 1)), -np.ones((8, 4, 4, 1))]).astype(np.float32)
    cond = text.tokens_of(tok, [CAPTIONS[0]] * 8 + [CAPTIONS[1]] * 8)
    null = np.broadcast_to(diffusion.null_tokens, cond.shape)
    t = jnp.full((16,), 0.9)
    z = jax.random.normal(jax.random.key(1), x.shape)
    sched = diffusion.schedule(params)
    a, s = sched.alpha_sigma(t)
    z = a[:, None, None, None] * x + s[:, None, None, None] * z
    x0 = jax.jit(lambda tokens: net(z, t, tokens).x0)  # one compile for both calls
    err = lambda tokens: float(jnp.mean((x0(jnp.asarray(tokens)) - x) ** 2))  # noqa: E731
    cond_err, null_err = err(cond), err(null)
    assert null_err > 0.5  # the unconditional model cannot know the sign
    assert cond_err < 0.25 * null_err, (cond_err, null_err)


def test_guidance_is_one_batched_mix_of_prompt_and_empty_prompt(trained):
    config, diffusion, params, tok = trained
    apply, sched = diffusion.apply_fn(params), diffusion.schedule(params)
    net = raw_denoiser(apply, sched, diffusion.parameterization)
    guided = make_denoiser(apply, sched, diffusion.parameterization, guidance_scale=3.0,
                           null_label=diffusion.null_tokens)
    cond = jnp.asarray(text.tokens_of(tok, CAPTIONS))
    z = jax.random.normal(jax.random.key(2), (2, 4, 4, 1))
    t = jnp.full((2,), 0.5)
    c, u = jax.jit(lambda: (net(z, t, cond), net(z, t, jnp.broadcast_to(diffusion.null_tokens, cond.shape))))()
    out = jax.jit(guided)(z, t, cond)
    np.testing.assert_allclose(out.eps, u.eps + 3.0 * (c.eps - u.eps), atol=1e-4)
    np.testing.assert_allclose(out.x0, u.x0 + 3.0 * (c.x0 - u.x0), atol=1e-4)


@pytest.mark.slow  # a second train-step compile: ~13 s; test_text_cache.py checks the cached step holds no encoder
def test_a_frozen_encoder_is_not_updated(trained):
    """text_trainable=False (a pretrained encoder's default): no gradient reaches it and the optimizer
    leaves it alone, while the network trains."""
    import dataclasses

    config, diffusion, params, tok = trained
    frozen = dataclasses.replace(diffusion, text_trainable=False, params=params)
    tx, _, _ = state_layout(frozen, config, parallel.make_mesh(config.mesh))
    state = init_state(frozen, tx)
    step = jax.jit(make_train_step(frozen, tx, learning_rate_schedule(config.optimizer, 200), config),
                   compiler_options={"xla_backend_optimization_level": 0})
    tokens = text.tokens_of(tok, CAPTIONS * 16)
    batch = {"image": jnp.ones((32, 4, 4, 1)), "label": jnp.zeros(32, jnp.int32), "tokens": jnp.asarray(tokens)}
    for _ in range(12):  # past the learning-rate warm-up's zero
        new, _ = step(state, batch)
        state = new
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), state.params["text"], params["text"])
    assert all(jax.tree.leaves(same))
    moved = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), state.params["net"], params["net"])
    assert not all(jax.tree.leaves(moved))

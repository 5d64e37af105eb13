"""Sampling a text model encodes its prompts once: the text encoder runs before the sampler's loop (once on
the prompts, once on the null prompt), not in every network evaluation, with the same samples.

The reference is the sampler fed tokens, which the network call encodes at every step (what diffax did
before): the same function of the same weights, so the two agree to float32 rounding (the encoder runs on
a batch of B prompts + 1 null prompt instead of the 2B rows of every guided step).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits_text
from diffax import parallel, samplers
from diffax.models.text.small import WordTokenizer
from diffax.training import text
from diffax.training.build import build
from diffax.training.inference import make_sample_fn
from diffax.training.step import state_layout
from tests.jaxprs import count_scope

PROMPTS = ["the digit three", "number 7", "", "a handwritten 1"]


@pytest.fixture(scope="module")
def model():
    config = digits_text.get_config()
    config.model.name = "dit"
    config.model.update(dict(hidden_size=32, depth=1, num_heads=2, patch_size=4))
    config.text.update(dict(width=16, depth=1, heads=2))
    config.sampling.update(dict(sampler="ddim", steps=3, guidance_scale=2.0))
    d = build(config)
    mesh = parallel.make_mesh(config.mesh)
    _, _, shardings = state_layout(d, config, mesh)
    tok = WordTokenizer.build(PROMPTS, int(config.text.vocab_size), int(config.text.max_length))
    tokens = jnp.asarray(text.tokens_of(tok, PROMPTS))
    noise = jax.random.normal(jax.random.key(0), (len(PROMPTS), *d.data_shape))
    return config, d, mesh, shardings.ema, tokens, noise


def per_step_encoding(config, d):
    """The sampler fed tokens: the network call encodes them (and the null prompt's) at every step."""
    def sample(params, noise, key, tokens):
        return samplers.make_sampler(config)(d.schedule(params), d.parameterization, d.apply_fn(params), noise, key,
                                             tokens, null_label=d.null_tokens)

    return sample


@pytest.mark.parametrize("interval", [(0.0, 1.0), (0.2, 0.7)])
def test_samples_equal_encoding_at_every_step(model, interval):
    config, d, mesh, shardings, tokens, noise = model
    config = config.copy_and_resolve_references()
    config.sampling.guidance_interval = interval  # (0.2, 0.7): guided and unguided steps (lax.cond)
    key = jax.random.key(1)
    once = make_sample_fn(d, config, mesh, shardings)(d.params, noise, key, tokens)
    every = jax.jit(per_step_encoding(config, d))(d.params, noise, key, tokens)
    np.testing.assert_allclose(np.asarray(once), np.asarray(every), atol=2e-5)
    assert float(jnp.std(once)) > 0.1  # real samples, not a constant


def test_the_encoder_is_outside_the_sampler_loop(model):
    """The operations under the encoder's name scope sit outside the sampler's lax.scan; the per-step
    reference has them inside it (so the check can fail)."""
    config, d, mesh, shardings, tokens, noise = model
    key = jax.random.key(1)
    once = make_sample_fn(d, config, mesh, shardings).trace(d.params, noise, key, tokens).jaxpr
    outside, inside = count_scope(once, "text_encoder")
    assert outside > 0 and inside == 0
    every = jax.make_jaxpr(per_step_encoding(config, d))(d.params, noise, key, tokens)
    assert count_scope(every, "text_encoder")[1] > 0

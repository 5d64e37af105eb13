"""Text-to-image: the small encoder and tokenizer, cross-attention against diffusers, captions, prompts.

The diffusers fixtures are made by tests/fixtures/make_diffusers_transformer_fixture.py (torch venv).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffax.errors import UserError
from diffax.models import layers
from diffax.models.diffusers import load_weights, transformer_source
from diffax.models.text.small import SmallTextEncoder, WordTokenizer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers_transformer")


def _fixture(name):
    with np.load(os.path.join(FIXTURES, f"{name}.npz")) as f:
        data = {k: f[k] for k in f.files}
    weights = {k[2:]: v for k, v in data.items() if k.startswith("w:")}
    return data, weights


def test_basic_transformer_block_matches_diffusers():
    data, weights = _fixture("basic_block")
    block = layers.BasicTransformerBlock(32, 2, 16, 24, dtype=jnp.float32, param_dtype=jnp.float32,
                                         rngs=nnx.Rngs(0))
    load_weights(block, weights, source=lambda p: transformer_source(p, linear_projection=True), what="block")
    out = block(jnp.asarray(data["x"]), jnp.asarray(data["context"]), jnp.asarray(data["mask"]))
    np.testing.assert_allclose(np.asarray(out), data["out"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("linear", [False, True])
def test_spatial_transformer_matches_diffusers_transformer2d(linear):
    data, weights = _fixture("transformer2d_linear" if linear else "transformer2d_conv")
    model = layers.SpatialTransformer(32, 2, 24, depth=2, linear_projection=linear, groups=8,
                                      dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    load_weights(model, weights, source=lambda p: transformer_source(p, linear_projection=linear), what="t2d")
    x = jnp.asarray(data["x"]).transpose(0, 2, 3, 1)  # NCHW -> NHWC
    out = model(x, jnp.asarray(data["context"]), jnp.asarray(data["mask"]))
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), data["out"], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- tokenizer


def test_word_tokenizer_vocabulary_padding_unknown_and_truncation(caplog):
    captions = ["A cat.", "a dog", "the cat", "a cat"]
    tok = WordTokenizer.build(captions, vocab_size=7, max_length=5)
    # counts: a 3, cat 3, dog 1, the 1, '.' 1 -> most frequent first, ties alphabetical; 3 slots
    assert tok.words == ("<pad>", "<unk>", "<bos>", "<eos>", "a", "cat", ".")
    assert WordTokenizer.build(list(reversed(captions)), 7, 5) == tok  # the order of captions does not matter
    ids, mask = tok(["a CAT", "", "the dog", "a cat a cat a"])
    np.testing.assert_array_equal(ids, [[2, 4, 5, 3, 0], [2, 3, 0, 0, 0], [2, 1, 1, 3, 0], [2, 4, 5, 4, 3]])
    np.testing.assert_array_equal(mask, ids != 0)
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    assert "truncated" in caplog.text


def test_word_tokenizer_round_trips_through_json(tmp_path):
    tok = WordTokenizer.build(["the digit one", "number 1"], 32, 8)
    tok.save(str(tmp_path / "tokenizer.json"))
    assert WordTokenizer.load(str(tmp_path / "tokenizer.json")) == tok
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="bad.json"):
        WordTokenizer.load(str(tmp_path / "bad.json"))


def test_small_encoder_ignores_padding_and_pools_the_masked_mean():
    enc = SmallTextEncoder(vocab_size=16, max_length=6, width=16, depth=2, heads=2, rngs=nnx.Rngs(0))
    ids = jnp.asarray([[2, 5, 6, 3, 0, 0], [2, 5, 6, 3, 9, 9]], jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]], jnp.int32)
    graphdef, state = nnx.split(enc)
    emb = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))(state, ids, mask)
    # what sits in the padding does not change the real tokens' states
    np.testing.assert_allclose(emb.hidden[0, :4], emb.hidden[1, :4], atol=1e-6)
    np.testing.assert_allclose(emb.pooled, emb.hidden[:, :4].mean(axis=1), atol=1e-6)
    assert emb.hidden.shape == (2, 6, 16)


# ----------------------------------------------------------------------------- networks with text


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_networks_read_the_unmasked_text_and_the_pooled_vector(name):
    """With every weight perturbed off its (zero) initialisation: the text at masked positions changes
    nothing, the text at real positions and the pooled vector change the output."""
    from configs import default
    from diffax import models

    cfg = default.get_config().model
    cfg.name = name
    cfg.update(dict(channels=8, channel_mult=(1, 2), attention_resolutions=(4,), norm_groups=4, num_heads=2,
                    hidden_size=16, depth=1, patch_size=4))
    net = models.build_model(cfg, data_shape=(8, 8, 1), num_classes=0, rngs=nnx.Rngs(0), context_dim=12,
                             pooled_dim=6)
    graphdef, params = nnx.split(net)
    r = np.random.default_rng(1)  # on the host: jax.random compiles a program per shape
    params = jax.tree.map(lambda p: p + np.float32(0.1) * r.standard_normal(p.shape, np.float32), params)
    g = jax.jit(lambda params, x, ctx, mask, pooled: nnx.merge(graphdef, params)(  # weights as an argument:
        x, jnp.full((2,), 0.3), context=ctx, context_mask=mask, pooled=pooled))  # no constant folding
    f = lambda *args: g(params, *args)  # noqa: E731
    r = np.random.default_rng(0)
    x = jnp.asarray(r.normal(size=(2, 8, 8, 1)), jnp.float32)
    ctx = r.normal(size=(2, 5, 12)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)
    pooled = r.normal(size=(2, 6)).astype(np.float32)
    base = np.asarray(f(x, ctx, mask, pooled))
    padded = ctx.copy()
    padded[0, 3:] += 5.0
    np.testing.assert_allclose(f(x, padded, mask, pooled)[0], base[0], atol=1e-5)
    real = ctx.copy()
    real[0, 1] += 1.0
    assert np.abs(np.asarray(f(x, real, mask, pooled))[0] - base[0]).max() > 1e-3
    assert np.abs(np.asarray(f(x, ctx, mask, pooled + 1.0)) - base).max() > 1e-3
    with pytest.raises(ValueError, match="needs `context`"):
        net(x, jnp.full((2,), 0.3), pooled=pooled)


def test_a_tokenizer_that_does_not_fit_its_encoder_is_refused():
    from diffax.training.text import check_tokenizer

    tok = WordTokenizer.build(["a b c d e"], 16, 8)
    check_tokenizer(tok, vocab_size=16, max_length=8, what="t")
    with pytest.raises(UserError, match="do not belong together"):
        check_tokenizer(tok, vocab_size=8, max_length=8, what="t")
    with pytest.raises(UserError, match="do not belong together"):
        check_tokenizer(tok, vocab_size=16, max_length=12, what="t")

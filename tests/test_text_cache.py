"""Text embeddings cached with the latents (`diffax encode-data --text_embeddings`): what is stored, that
training on them equals training with the encoder, and the refusals.

The frozen encoder is the tiny CLIP of tests/fixtures/text/clip (checked against transformers in
test_text_encoders.py), the autoencoder the SD-layout fixture of test_latent.py; the data are the 297
test digits at 8x8 RGB, each with its six captions.
"""
from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits_text
from diffax import data, parallel
from diffax.data import latents
from diffax.errors import UserError
from diffax.models.text.pretrained import load_text_encoder
from diffax.training import text as text_lib
from diffax.training.build import build
from diffax.training.encode_data import encode_data
from diffax.training.state import learning_rate_schedule
from diffax.training.step import init_state, make_train_step, state_layout
from tests.jaxprs import count_scope

HERE = os.path.dirname(os.path.abspath(__file__))
CLIP = os.path.join(HERE, "fixtures", "text", "clip")
CLIP_OTHER = os.path.join(HERE, "fixtures", "text", "clip_legacy")
SD = os.path.join(HERE, "fixtures", "diffusers_vae", "sd")


def config_for(name, encoder=CLIP):
    config = digits_text.get_config()
    config.data.update(dict(name=name, split="test", channels=3, shuffle=False))
    config.autoencoder.path = SD
    config.text.update(dict(encoder=encoder, caption_dropout=0.5))  # dropout on half the captions: both paths used
    config.model.name = "dit"
    config.model.update(dict(hidden_size=32, depth=1, num_heads=2, patch_size=2))
    config.training.batch_size = 8
    config.optimizer.warmup_steps = 0
    return config


def without_embeddings(cache, dest):
    shutil.copytree(cache, dest, ignore=lambda _, names: [n for n in names if n.startswith("text")])
    return dest


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cache") / "c")
    encode_data(config_for("digits"), out, shard_size=128, batch_size=64, progress=False, text_embeddings="float32")
    return out


def direct(texts):
    """The CLIP fixture's embeddings of `texts`, encoded here."""
    encoder, tok = load_text_encoder(CLIP)
    tokens = text_lib.tokens_of(tok, texts)
    out = encoder(jnp.asarray(tokens[:, 0]), jnp.asarray(tokens[:, 1]))
    return np.asarray(out.hidden), np.asarray(out.pooled), tokens[:, 1]


def test_the_cache_holds_every_captions_embedding_and_the_empty_prompts(cache):
    from diffax.data.sources import digit_captions
    from sklearn.datasets import load_digits

    meta = latents.read_text_meta(cache)
    assert meta["dtype"] == "float32" and meta["encoder"]["path"] == os.path.abspath(CLIP)
    assert meta["hidden_size"] == 24 and meta["pooled_size"] == 16  # the fixture's width and projection
    labels = load_digits().target[1500:]
    with np.load(latents.text_shard_path(cache, 2, 3)) as f:  # examples 256..296
        offsets, hidden, pooled, mask = f["offsets"], f["hidden"], f["pooled"], f["mask"]
    assert offsets.tolist() == list(range(0, 6 * 42, 6))
    texts = list(digit_captions(int(labels[256 + 3])))
    h, p, m = direct(texts)
    np.testing.assert_allclose(hidden[offsets[3]:offsets[4]], h, atol=1e-5)
    np.testing.assert_allclose(pooled[offsets[3]:offsets[4]], p, atol=1e-5)
    np.testing.assert_array_equal(mask[offsets[3]:offsets[4]], m)
    null = latents.read_null_embedding(cache)
    h, p, m = direct([""])
    np.testing.assert_allclose(null["hidden"], h[0], atol=1e-5)
    np.testing.assert_allclose(null["pooled"], p[0], atol=1e-5)
    np.testing.assert_array_equal(null["mask"], m[0])


def test_float16_embeddings_round_the_float32_ones(cache, tmp_path):
    """The same captions stored in float16 (latent shards reused: only the text is encoded again)."""
    half = without_embeddings(cache, str(tmp_path / "half"))
    encode_data(config_for("digits"), half, shard_size=128, batch_size=64, progress=False, text_embeddings="float16")
    assert latents.read_text_meta(half)["dtype"] == "float16"
    with np.load(latents.text_shard_path(cache, 0, 3)) as f32, np.load(latents.text_shard_path(half, 0, 3)) as f16:
        assert f16["hidden"].dtype == np.float16
        np.testing.assert_array_equal(f16["hidden"], f32["hidden"].astype(np.float16))
        np.testing.assert_allclose(f16["hidden"].astype(np.float32), f32["hidden"], rtol=2 ** -11, atol=1e-7)


def train_losses(config, *, cached, steps=3):
    d = build(config)
    tx, _, _ = state_layout(d, config, parallel.make_mesh(config.mesh))
    step = jax.jit(make_train_step(d, tx, learning_rate_schedule(config.optimizer, 100), config),
                   compiler_options={"xla_backend_optimization_level": 0})
    state = init_state(d, tx)
    it = data.make_iterator(config, process_index=0, process_count=1, text_embeddings=cached,
                            tokenizer_for=None if cached else (lambda source: d.tokenizer))
    batch = next(it)
    traced = step.trace(state, batch)  # one trace: its program is checked, its compilation run
    step = traced.lower().compile()
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        batch = next(it)
    it.close()
    return d, state, losses, traced.jaxpr


def test_training_on_cached_embeddings_equals_training_with_the_encoder(cache, tmp_path):
    """Three train steps (caption dropout 0.5, so the stored empty-prompt embedding is used) on the float32
    cache and on the same latents with the frozen encoder in the step: the same losses within 1e-5
    relative (float32 rounding: the encoder ran on other batch sizes). The cached run's state and train
    step hold no text encoder."""
    config = config_for(f"latents:{cache}")
    assert text_lib.cached_embeddings(config) == cache
    d_c, state_c, cached, program_c = train_losses(config, cached=True)
    plain = without_embeddings(cache, str(tmp_path / "plain"))
    d_u, state_u, uncached, program_u = train_losses(config_for(f"latents:{plain}"), cached=False)
    assert "text" not in state_c.params and d_c.frozen_text is not None
    assert "text" in state_u.params
    assert count_scope(program_c, "text_encoder") == (0, 0) and count_scope(program_u, "text_encoder")[0] > 0
    np.testing.assert_allclose(cached, uncached, rtol=1e-5)
    assert len(set(cached)) == 3  # three different batches and updates


def test_cache_refusals(cache, tmp_path):
    from diffax.training import trainer

    for encoder, trainable, match in (("small", False, "small encoder trains with the denoiser"),
                                      (CLIP, True, "config.text.trainable=True")):
        config = config_for("digits", encoder)
        config.text.trainable = trainable
        with pytest.raises(UserError, match=match):
            encode_data(config, str(tmp_path / "x"), progress=False, text_embeddings="float16")
    with pytest.raises(UserError, match="--text_embeddings='bfloat16'"):
        encode_data(config_for("digits"), str(tmp_path / "x"), progress=False, text_embeddings="bfloat16")
    other = config_for(f"latents:{cache}", CLIP_OTHER)  # another CLIP: its embeddings differ
    with pytest.raises(UserError, match="were made by the encoder"):
        trainer.train(other, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")
    with pytest.raises(UserError, match="another encoder or dtype"):  # adding other embeddings to a cache
        encode_data(config_for("digits", CLIP_OTHER), cache, shard_size=128, progress=False, text_embeddings="float32")
    run = str(tmp_path / "resumed")  # a run's state holds the encoder or not for good: no switching on resume
    with pytest.raises(UserError, match="trained with the text encoder in its train state"):
        text_lib.record_cached_embeddings(run, config_for(f"latents:{cache}"), cache, has_checkpoints=True)
    text_lib.record_cached_embeddings(run, config_for(f"latents:{cache}"), cache, has_checkpoints=False)
    assert text_lib.trained_on_cached_embeddings(run)
    with pytest.raises(UserError, match="trained on the text embeddings of a cache"):
        text_lib.record_cached_embeddings(run, config_for("latents:other"), "", has_checkpoints=True)
    with pytest.raises(UserError, match="holds no text embeddings"):
        data.make_iterator(config_for(f"latents:{without_embeddings(cache, str(tmp_path / 'p'))}"), process_index=0,
                           process_count=1, text_embeddings=True)


@pytest.mark.slow
def test_a_cached_run_trains_and_samples_with_its_encoder(cache, tmp_path):
    """`diffax train` on the cache (2 steps, the final grid drawn), then `inference.load` encodes prompts with the
    encoder loaded from config.text.encoder: the samples of a prompt equal those of the same run's weights with
    the encoder in params."""
    from diffax.training import inference, trainer

    config = config_for(f"latents:{cache}")
    config.training.update(dict(num_steps=2, log_every=2, checkpoint_every=2, sample_every=0, progress_bar=False))
    config.sampling.update(dict(steps=2, num_samples=2, batch_size=2))
    workdir = str(tmp_path / "run")
    trainer.train(config, workdir)
    assert os.path.exists(os.path.join(workdir, "samples", "step_00000002.png"))
    run = inference.load(workdir)
    assert "text" in run.params and run.diffusion.frozen_text is not None
    plain = config_for(f"latents:{without_embeddings(cache, str(tmp_path / 'plain'))}")
    plain.training.update(dict(num_steps=4, log_every=2, checkpoint_every=2, sample_every=0, progress_bar=False))
    with pytest.raises(UserError, match="trained on the text embeddings of a cache"):
        trainer.train(plain, workdir, force=True)
    tokens = run.prompt_tokens(["the digit three", "number 7"])
    images = run.draw(2, seed=0, labels=tokens, progress=False)["images"]
    assert images.shape == (2, 8, 8, 3)

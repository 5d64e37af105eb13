"""Stable Diffusion XL pipeline folders (Podell et al. 2023): the imported UNet (per-level transformer depths, added
text and time conditions) predicts what diffusers' UNet2DConditionModel does; the two CLIPs give the pipeline's
prompt embeddings; an imported run samples what StableDiffusionXLPipeline draws (Euler, DDIM, a negative prompt);
export writes the UNet back; unsupported SDXL variants are errors naming them.

Fixture: tests/fixtures/make_sdxl_pipeline_fixture.py (tiny random-weight SDXL pipeline, 1.1 MB).
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffax.errors import UserError
from diffax.models import diffusers_sd
from diffax.models.diffusers import UnsupportedDiffusersConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "sdxl_pipeline")
PIPELINE = os.path.join(FIXTURE, "pipeline")


@pytest.fixture(scope="module")
def expected():
    return np.load(os.path.join(FIXTURE, "expected.npz"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from configs.default import get_config
    from diffax.training import importing

    path = str(tmp_path_factory.mktemp("sdxl") / "run")
    importing.import_diffusers(PIPELINE, path, get_config())
    return path


def test_unet_matches_diffusers(expected):
    """DownBlock2D first, transformer depths (1, 1, 2) per level (the middle: 2), added text_embeds and time ids
    other than the defaults: within 1e-4 of diffusers (output std 0.25)."""
    fields, context_dim, data, model = diffusers_sd.load_cond_unet(os.path.join(PIPELINE, "unet"))
    assert context_dim == 48 and data == dict(image_size=8, channels=4)
    assert fields["transformer_depths"] == (1, 1, 2) and fields["addition_time_embed_dim"] == 8
    assert fields["attention_resolutions"] == (4, 2) and fields["num_heads"] == 4
    x = jnp.asarray(expected["unet_x"].transpose(0, 2, 3, 1))
    pooled = np.concatenate([expected["unet_text_embeds"], expected["unet_time_ids"]], axis=1)
    out = nnx.jit(lambda m, x, t, c, p: m(x, t, context=c, pooled=p))(
        model, x, jnp.asarray(expected["unet_t"], jnp.float32), jnp.asarray(expected["unet_context"]),
        jnp.asarray(pooled))
    ref = expected["unet_out"].transpose(0, 2, 3, 1)
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)


def test_text_conditioning_matches_encode_prompt(expected):
    """Both CLIPs' hidden_states[-2] concatenated, the second's projected text_embeds pooled (encode_prompt),
    the time ids (16, 16, 0, 0, 16, 16) after them; the null condition is zeros with the time ids kept."""
    from diffax.models.text import sdxl

    encoder, tok = sdxl.load_sdxl_conditioner(os.path.join(PIPELINE, "text_encoder"),
                                              os.path.join(PIPELINE, "text_encoder_2"), (16, 16, 0, 0, 16, 16))
    ids, mask = tok([str(p) for p in expected["prompts"]])
    null = tok.null()
    emb = nnx.jit(lambda e, i, m: e(i, m))(encoder, jnp.asarray(np.concatenate([ids, null[:1]])),
                                            jnp.asarray(np.concatenate([mask, null[1:]])))
    np.testing.assert_allclose(np.asarray(emb.hidden[:2]), expected["prompt_embeds"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(emb.pooled[:2, :16]), expected["pooled_embeds"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(emb.pooled[:, 16:]), [[16, 16, 0, 0, 16, 16]] * 3)
    assert not np.asarray(emb.hidden[2]).any() and not np.asarray(emb.pooled[2, :16]).any()


def test_import_writes_an_sdxl_run(workdir):
    from diffax import configuration

    config = configuration.load(os.path.join(workdir, "config.json"))
    assert config.text.encoder_2.endswith("text_encoder_2") and config.text.pooled and not config.text.mask_context
    assert config.data.image_size == 16 and config.sampling.guidance_scale == 5.0
    assert (config.sampling.sampler, config.sampling.spacing, config.sampling.steps_offset) == ("euler", "leading", 1)


def _sample(workdir, expected, scheduler_json=None, negative=""):
    from diffax import configuration
    from diffax.models.diffusers import scheduler_config_to_diffax
    from diffax.models.diffusers_sd import scheduler_options
    from diffax.training import inference

    config = configuration.load(os.path.join(workdir, "config.json"))
    if scheduler_json:
        diffusion, sampling = scheduler_config_to_diffax(scheduler_options(json.loads(scheduler_json)))
        config.diffusion.update(diffusion)
        config.sampling.update(sampling)
    config.sampling.steps, config.sampling.guidance_scale = int(expected["steps"]), float(expected["guidance_scale"])
    config.sampling.negative_prompt = negative
    run = inference.load(workdir, config=config)
    prompts = [str(p) for p in expected["prompts"]]
    noise = expected["latents"].transpose(0, 2, 3, 1)  # the pipeline's unit latents; diffax scales by init sigma
    images = np.asarray(run.sample_fn(jnp.asarray(noise), jax.random.key(0), jnp.asarray(run.prompt_tokens(prompts))))
    return np.clip(images / 2 + 0.5, 0, 1)


def test_sampling_matches_sdxl_pipeline_euler(workdir, expected):
    """StableDiffusionXLPipeline(2 prompts, latents, the folder's Euler scheduler, 4 steps, guidance 3, zeroed
    null) -> images in [0.21, 0.79]; tolerance 1e-5 absolute."""
    np.testing.assert_allclose(_sample(workdir, expected), expected["images_euler"], atol=1e-5, rtol=0)

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


@pytest.mark.slow  # the import and a sampler's compile take ~90 s each on a busy 2-core machine
def test_import_writes_an_sdxl_run(workdir):
    from diffax import configuration

    config = configuration.load(os.path.join(workdir, "config.json"))
    own = os.path.join(workdir, "pipeline")  # the run stands alone: its VAE, CLIPs, tokenizers beside it
    assert config.text.encoder_2 == os.path.join(own, "text_encoder_2") and config.text.pooled
    assert config.text.encoder == os.path.join(own, "text_encoder") and not config.text.mask_context
    assert sorted(os.listdir(own)) == ["model_index.json", "text_encoder", "text_encoder_2", "tokenizer",
                                       "tokenizer_2", "vae"]
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


@pytest.mark.slow
def test_sampling_matches_sdxl_pipeline_euler(workdir, expected):
    """StableDiffusionXLPipeline(2 prompts, latents, the folder's Euler scheduler, 4 steps, guidance 3, zeroed
    null) -> images in [0.21, 0.79]; tolerance 1e-5 absolute."""
    np.testing.assert_allclose(_sample(workdir, expected), expected["images_euler"], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_sampling_matches_sdxl_pipeline_ddim_and_negative_prompt(workdir, expected):
    """DDIMScheduler.from_config(clip_sample=False, set_alpha_to_one=False) (images in [0.21, 0.79], 7e-4 from
    Euler's) and Euler with a negative prompt, which the pipeline encodes instead of zeroing (the images differ
    from the zeroed null's by more than 1e-3): within 1e-5."""
    assert np.abs(expected["images_ddim"] - expected["images_euler"]).max() > 1e-4
    np.testing.assert_allclose(_sample(workdir, expected, str(expected["ddim_scheduler"])), expected["images_ddim"],
                               atol=1e-5, rtol=0)
    assert np.abs(expected["images_negative"] - expected["images_euler"]).max() > 1e-3
    got = _sample(workdir, expected, negative=str(expected["negative_prompt"]))
    np.testing.assert_allclose(got, expected["images_negative"], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_sample_command_and_export(workdir, expected, tmp_path):
    """`diffax sample --noise` gives the pipeline's images (uint8, within one level); `diffax export-diffusers`
    writes the SDXL folders and the UNet's tensors and config options as imported."""
    from safetensors.numpy import load_file

    from diffax import cli

    noise = expected["latents"].transpose(0, 2, 3, 1)
    np.save(tmp_path / "noise.npy", noise)
    argv = ["sample", "--workdir", workdir, "--output", str(tmp_path / "s"), "--noise", str(tmp_path / "noise.npy"),
            "--num_samples", "2", "--steps", str(int(expected["steps"])), "--guidance_scale",
            str(float(expected["guidance_scale"]))] + [a for p in expected["prompts"] for a in ("--prompt", str(p))]
    cli.run(["diffax", *argv])
    got = np.load(tmp_path / "s" / "samples.npz")["images"].astype(int)
    assert np.abs(got - np.round(expected["images_euler"] * 255)).max() <= 1

    out = tmp_path / "export"
    cli.run(["diffax", "export-diffusers", "--workdir", workdir, "--output", str(out)])
    assert sorted(os.listdir(out)) == ["model_index.json", "scheduler", "text_encoder", "text_encoder_2", "tokenizer",
                                       "tokenizer_2", "unet", "vae"]
    got = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    want = load_file(os.path.join(PIPELINE, "unet", "diffusion_pytorch_model.safetensors"))
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    with open(out / "unet" / "config.json") as f:
        cfg = json.load(f)
    with open(os.path.join(PIPELINE, "unet", "config.json")) as f:
        ref = json.load(f)
    for key in ("down_block_types", "up_block_types", "transformer_layers_per_block", "addition_embed_type",
                "addition_time_embed_dim", "projection_class_embeddings_input_dim", "cross_attention_dim",
                "block_out_channels", "use_linear_projection"):
        assert cfg[key] == ref[key], key
    # the exported folder imports again, to the same run
    config, _ = diffusers_sd.load_sd_pipeline(str(out))
    assert tuple(config.model.transformer_depths) == (1, 1, 2)


# --------------------------------------------------------------------------- unsupported variants


def _copy(tmp_path, without: str = "") -> str:
    dst = str(tmp_path / "pipe")
    shutil.copytree(PIPELINE, dst, ignore=shutil.ignore_patterns(without) if without else None)
    return dst


def _edit_json(path: str, **changes) -> None:
    with open(path) as f:
        data = json.load(f)
    data.update(changes)
    with open(path, "w") as f:
        json.dump(data, f)


def test_refiner_is_refused(tmp_path):
    src = _copy(tmp_path)
    _edit_json(os.path.join(src, "model_index.json"), requires_aesthetics_score=True,
               _class_name="StableDiffusionXLImg2ImgPipeline")
    with pytest.raises(UnsupportedDiffusersConfig, match="refiner"):
        diffusers_sd.load_sd_pipeline(src)


def test_missing_second_encoder_is_named(tmp_path):
    with pytest.raises(UserError, match="no text_encoder_2/ folder"):
        diffusers_sd.load_sd_pipeline(_copy(tmp_path, "text_encoder_2"))


@pytest.mark.parametrize("changes,message", [
    (dict(addition_embed_type="image"), "no SDXL added conditions"),
    (dict(transformer_layers_per_block=[[1], [1], [2, 2]]), "transformer_layers_per_block"),
    (dict(projection_class_embeddings_input_dim=70),
     "shape mismatch for pooled_embed/linear_1/kernel \\(from add_embedding.linear_1\\)"),
])
def test_unsupported_unet_options_are_named(tmp_path, changes, message):
    src = _copy(tmp_path)
    _edit_json(os.path.join(src, "unet", "config.json"), **changes)
    with pytest.raises(UnsupportedDiffusersConfig, match=message):
        diffusers_sd.load_sd_pipeline(src)


def test_other_added_embedding_is_named():
    with open(os.path.join(PIPELINE, "unet", "config.json")) as f:
        cfg = json.load(f)
    with pytest.raises(UnsupportedDiffusersConfig, match="addition_embed_type='text_image'"):
        diffusers_sd.cond_unet_config_to_diffax({**cfg, "addition_embed_type": "text_image"})


def test_force_zeros_false_is_refused(tmp_path):
    src = _copy(tmp_path)
    _edit_json(os.path.join(src, "model_index.json"), force_zeros_for_empty_prompt=False)
    with pytest.raises(UnsupportedDiffusersConfig, match="force_zeros_for_empty_prompt"):
        diffusers_sd.load_sd_pipeline(src)


def test_sdxl_text_embeddings_are_not_cached():
    from configs.default import get_config
    from diffax.training import text

    config = get_config()
    config.text.encoder = os.path.join(PIPELINE, "text_encoder")
    config.text.encoder_2 = os.path.join(PIPELINE, "text_encoder_2")
    with pytest.raises(UserError, match="SDXL run.*not cached"):
        text.encoder_identity(config)


def test_size_ids_are_diffusers_crop_coordinates():
    """As train_text_to_image_sdxl: the original size before the resize (shorter side to the resolution), the
    centre crop's top-left in resized pixels (24x16 -> 24x16: rows 4..20; 16x20 -> 16x20: columns 2..18)."""
    from diffax.data.pipeline import size_ids

    np.testing.assert_array_equal(size_ids(24, 16, 16, "resize"), [24, 16, 4, 0])
    np.testing.assert_array_equal(size_ids(16, 20, 16, "resize"), [16, 20, 0, 2])
    np.testing.assert_array_equal(size_ids(32, 32, 16, "resize"), [32, 32, 0, 0])
    np.testing.assert_array_equal(size_ids(8, 8, 16, "pad"), [8, 8, 0, 0])


def test_size_ids_replace_the_original_size_and_crop():
    from diffax.models.text.sdxl import with_size_ids

    pooled = np.array([[0.5, -1.0, 16, 16, 0, 0, 16, 16]], np.float32)
    got = with_size_ids(pooled, np.array([[24, 16, 4, 0]], np.float32))
    np.testing.assert_array_equal(np.asarray(got), [[0.5, -1.0, 24, 16, 4, 0, 16, 16]])

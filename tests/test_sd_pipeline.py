"""Stable Diffusion pipeline folders: the imported UNet predicts what diffusers' UNet2DConditionModel does, and bad
folders are errors naming what is wrong (sampling parity: tests/test_sd_sampling.py).

Fixtures: tests/fixtures/make_sd_pipeline_fixture.py (tiny random-weight SD 1.x pipeline and SD 2.x-style UNet).
"""
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffax.errors import UserError
from diffax.models import diffusers_sd
from diffax.models.diffusers import UnsupportedDiffusersConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "sd_pipeline")
PIPELINE = os.path.join(FIXTURE, "pipeline")


@pytest.fixture(scope="module")
def expected():
    return np.load(os.path.join(FIXTURE, "expected.npz"))


@pytest.mark.parametrize("prefix,folder", [("unet", "pipeline/unet"), ("unet_sd2", "unet_sd2")])
def test_unet_matches_diffusers(expected, prefix, folder):
    """SD 1.x layout (8-style head count, conv projections) and SD 2.x layout (heads per level, linear
    projections, two transformer layers, cross-attention up blocks): within 1e-4 of diffusers."""
    model_fields, context_dim, data_fields, model = diffusers_sd.load_cond_unet(os.path.join(FIXTURE, folder))
    assert context_dim == 32 and data_fields == dict(image_size=8, channels=4)
    if prefix == "unet_sd2":
        assert model_fields["head_channels"] == 4 and model_fields["transformer_depth"] == 2
        assert model_fields["use_linear_projection"]
    x = jnp.asarray(expected[f"{prefix}_x"].transpose(0, 2, 3, 1))
    out = nnx.jit(lambda m, x, t, c: m(x, t, context=c))(
        model, x, jnp.asarray(expected[f"{prefix}_t"], jnp.float32), jnp.asarray(expected[f"{prefix}_context"]))
    ref = expected[f"{prefix}_out"].transpose(0, 2, 3, 1)
    assert np.abs(ref).max() > 0.1  # the comparison is not against ~0
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- bad input


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


def test_missing_component_is_named(tmp_path):
    with pytest.raises(UserError, match="no vae/ folder"):
        diffusers_sd.load_sd_pipeline(_copy(tmp_path, "vae"))


def test_unsupported_component_class_is_named(tmp_path):
    src = _copy(tmp_path)
    _edit_json(os.path.join(src, "model_index.json"), text_encoder=["transformers", "T5EncoderModel"])
    with pytest.raises(UnsupportedDiffusersConfig, match="text_encoder is a T5EncoderModel"):
        diffusers_sd.load_sd_pipeline(src)
    src2 = str(tmp_path / "b")
    shutil.copytree(PIPELINE, src2)
    _edit_json(os.path.join(src2, "scheduler", "scheduler_config.json"), _class_name="LMSDiscreteScheduler")
    with pytest.raises(UnsupportedDiffusersConfig, match="LMSDiscreteScheduler"):
        diffusers_sd.load_sd_pipeline(src2)


@pytest.mark.parametrize("key,value,message", [
    ("addition_embed_type", "image", "addition_embed_type='image'"),
    ("addition_embed_type", "text_time", "text_time' needs addition_time_embed_dim"),
    ("class_embed_type", "timestep", "class_embed_type"),
    ("down_block_types", ["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"], "SimpleCrossAttnDownBlock2D"),
    ("only_cross_attention", True, "only_cross_attention"),
    ("transformer_layers_per_block", [[1, 1], [2]], "transformer_layers_per_block.*not per layer"),
])
def test_unsupported_options_are_named(key, value, message):
    with open(os.path.join(PIPELINE, "unet", "config.json")) as f:
        cfg = json.load(f)
    with pytest.raises(UnsupportedDiffusersConfig, match=message):
        diffusers_sd.cond_unet_config_to_diffax({**cfg, key: value})


def test_weights_not_matching_config_are_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    src = _copy(tmp_path)
    unet = os.path.join(src, "unet")
    _edit_json(os.path.join(unet, "config.json"), layers_per_block=2)
    with pytest.raises(UnsupportedDiffusersConfig, match="does not match.*lacks tensor"):
        diffusers_sd.load_cond_unet(unet)
    _edit_json(os.path.join(unet, "config.json"), layers_per_block=1, cross_attention_dim=24)
    with pytest.raises(UnsupportedDiffusersConfig, match="shape mismatch.*attn2.to_k"):
        diffusers_sd.load_cond_unet(unet)
    _edit_json(os.path.join(unet, "config.json"), cross_attention_dim=32)
    weights = os.path.join(unet, "diffusion_pytorch_model.safetensors")
    tensors = load_file(weights)
    save_file({**tensors, "extra.weight": np.zeros(3, np.float32)}, weights)
    with pytest.raises(UnsupportedDiffusersConfig, match="no place.*extra.weight"):
        diffusers_sd.load_cond_unet(unet)
    with open(weights, "wb") as f:
        f.write(b"\x00" * 10)
    with pytest.raises(UserError, match="cannot be read as safetensors"):
        diffusers_sd.load_cond_unet(unet)


def test_text_encoder_width_must_match_cross_attention(tmp_path):
    src = _copy(tmp_path)
    _edit_json(os.path.join(src, "unet", "config.json"), cross_attention_dim=24)
    with pytest.raises(UnsupportedDiffusersConfig):
        diffusers_sd.load_sd_pipeline(src)


def test_prompt_for_an_unconditional_model_is_an_error():
    from types import SimpleNamespace

    from diffax.training.inference import Inference

    run = Inference(config=None, step=0, diffusion=SimpleNamespace(null_tokens=None), params=None, mesh=None,
                    _sample=None)
    with pytest.raises(UserError, match="not a text-to-image model"):
        run.prompt_tokens(["a cat"])


def test_pndm_scheduler_imports_as_pndm():
    """SD 1.x ships PNDMScheduler (PLMS): imported as diffax's pndm sampler with its betas, spacing, offset, final
    alpha and skip_prk_steps; DDIM's clip_sample that SD's file carries is another class's option and dropped;
    v-prediction (which diffusers' PNDM combines as raw outputs) is an error naming it."""
    from diffax.models.diffusers import scheduler_config_to_diffax

    pndm = dict(_class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                trained_betas=None, clip_sample=False)
    diffusion, sampling = scheduler_config_to_diffax(diffusers_sd.scheduler_options(pndm))
    assert diffusion["schedule"] == "scaled_linear" and diffusion["num_steps"] == 1000
    assert sampling == dict(sampler="pndm", final_alpha_one=False, skip_prk_steps=True, spacing="leading",
                            steps_offset=1)
    with pytest.raises(UnsupportedDiffusersConfig, match="PNDMScheduler prediction_type='v_prediction'"):
        scheduler_config_to_diffax(dict(diffusers_sd.scheduler_options(pndm), prediction_type="v_prediction"))


def test_pndm_run_exports_a_pndm_scheduler():
    """export-diffusers' scheduler_config.json of a pndm run reads back as the same sampling fields."""
    from configs.default import get_config
    from diffax.models.diffusers import scheduler_config_to_diffax

    c = get_config()
    c.diffusion.update(schedule="scaled_linear", num_steps=1000, prediction="eps")
    c.sampling.update(sampler="pndm", spacing="leading", steps_offset=1, final_alpha_one=False, skip_prk_steps=False)
    cfg = diffusers_sd.scheduler_to_diffusers_config(c)
    assert cfg["_class_name"] == "PNDMScheduler" and "rescale_betas_zero_snr" not in cfg
    _, sampling = scheduler_config_to_diffax(cfg)
    assert sampling == dict(sampler="pndm", final_alpha_one=False, skip_prk_steps=False, spacing="leading",
                            steps_offset=1)
    c.diffusion.zero_terminal_snr = True
    with pytest.raises(UserError, match="PNDMScheduler has no rescale_betas_zero_snr"):
        diffusers_sd.scheduler_to_diffusers_config(c)

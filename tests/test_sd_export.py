"""`diffax export-diffusers`: diffax UNets written in diffusers' format (UNet2DConditionModel for text runs,
UNet2DModel otherwise) carry exactly the tensor names, shapes and values of the diffusers checkpoints they were
imported from, their config.json maps back to the same diffax model, and the scheduler config to the same
schedule and sampler. (That diffusers itself loads an export and predicts the same was checked with
tests/fixtures/make_sd_pipeline_fixture.py's venv; see the README.)
"""
import json
import os

import ml_collections
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from configs.default import get_config
from diffax.models import diffusers_sd
from diffax.models.diffusers import load_diffusers_unet, scheduler_config_to_diffax, unet_config_to_diffax
from diffax.training.importing import merge

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD = os.path.join(ROOT, "tests", "fixtures", "sd_pipeline")
UNET2D = os.path.join(ROOT, "tests", "fixtures", "diffusers_unet")


def _config(overrides) -> ml_collections.ConfigDict:
    config = get_config()
    merge(config, ml_collections.ConfigDict(overrides))
    return config


def _same_tensors(exported: str, original: str) -> None:
    got, want = load_file(exported), load_file(original)
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value.astype(np.float32), err_msg=name)


def _json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def test_sd_pipeline_unet_round_trip(tmp_path):
    overrides, model = diffusers_sd.load_sd_pipeline(os.path.join(SD, "pipeline"))
    config = _config(overrides.to_dict())
    diffusers_sd.export_unet(model, config, str(tmp_path), context_dim=32)
    unet = os.path.join(SD, "pipeline", "unet")
    _same_tensors(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"),
                  os.path.join(unet, "diffusion_pytorch_model.safetensors"))
    exported = _json(str(tmp_path / "unet" / "config.json"))
    assert diffusers_sd.cond_unet_config_to_diffax(exported) == diffusers_sd.cond_unet_config_to_diffax(
        _json(os.path.join(unet, "config.json")))
    assert exported["down_block_types"] == ["CrossAttnDownBlock2D", "DownBlock2D"]
    scheduler = _json(str(tmp_path / "scheduler" / "scheduler_config.json"))
    assert scheduler["_class_name"] == "DDIMScheduler"
    assert scheduler_config_to_diffax(scheduler) == scheduler_config_to_diffax(
        _json(os.path.join(SD, "pipeline", "scheduler", "scheduler_config.json")))


def test_sd2_unet_round_trip(tmp_path):
    model_fields, context_dim, data_fields, model = diffusers_sd.load_cond_unet(os.path.join(SD, "unet_sd2"))
    config = _config(dict(model=model_fields, text=dict(encoder="clip"), diffusion=dict(schedule="scaled_linear")))
    cfg = diffusers_sd.export_unet(model, config, str(tmp_path), context_dim=context_dim, data_shape=(8, 8, 4))
    _same_tensors(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"),
                  os.path.join(SD, "unet_sd2", "diffusion_pytorch_model.safetensors"))
    assert cfg["attention_head_dim"] == [2, 4] and cfg["use_linear_projection"]
    assert diffusers_sd.cond_unet_config_to_diffax(cfg) == (model_fields, context_dim, data_fields)


@pytest.mark.parametrize("name", ["ddpm", "adm"])
def test_unet2d_round_trip(tmp_path, name):
    """UNet2DModel runs (DDPM layout; ADM layout with scale-shift norm, resnet resampling, learned sigma)."""
    overrides, model = load_diffusers_unet(os.path.join(UNET2D, name))
    config = _config(overrides.to_dict())
    cfg = diffusers_sd.export_unet(model, config, str(tmp_path))
    _same_tensors(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"),
                  os.path.join(UNET2D, name, "diffusion_pytorch_model.safetensors"))
    assert unet_config_to_diffax(cfg) == unet_config_to_diffax(_json(os.path.join(UNET2D, name, "config.json")))
    if "diffusion" in overrides:
        assert scheduler_config_to_diffax(_json(str(tmp_path / "scheduler" / "scheduler_config.json"))) == (
            overrides.diffusion.to_dict(), overrides.sampling.to_dict())


def test_fresh_diffax_unet_round_trip(tmp_path):
    """A UNet trained in diffax (the default config: DDPM embedding order, eps 1e-6) exports and imports back to
    the same parameters."""
    from diffax.models import build_model

    config = get_config()
    model = build_model(config.model, data_shape=(16, 16, 1), num_classes=0, rngs=nnx.Rngs(3))
    diffusers_sd.export_unet(model, config, str(tmp_path))
    overrides, back = load_diffusers_unet(str(tmp_path))
    for key in ("channels", "channel_mult", "num_res_blocks", "attention_resolutions", "norm_groups", "norm_eps",
                "flip_sin_to_cos", "freq_shift"):
        assert overrides.model[key] == config.model[key], key
    a, b = nnx.state(model, nnx.Param), nnx.state(back, nnx.Param)
    for (path, x), (_, y) in zip(sorted(nnx.to_flat_state(a)), sorted(nnx.to_flat_state(b))):
        np.testing.assert_array_equal(np.asarray(x[...]), np.asarray(y[...]), err_msg=str(path))

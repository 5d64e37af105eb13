"""Import of diffusers UNet2DModel checkpoints: predictions equal diffusers' (saved fixtures, no torch).

The fixtures in tests/fixtures/diffusers_unet/ were written once by
tests/fixtures/make_diffusers_fixture.py with torch + diffusers: a DDPM-layout model
(google/ddpm-cifar10-32 scaled down) and an ADM-like one (BigGAN resampling, scale-shift
norm, multi-head attention, learned sigma, asymmetric attention).
"""
from __future__ import annotations

import copy
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from configs.default import get_config
from diffax.models import build_model
from diffax.models.diffusers import (
    UnsupportedDiffusersConfig,
    load_diffusers_unet,
    load_unet_weights,
    scheduler_config_to_diffax,
    unet_config_to_diffax,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers_unet")
FAST = {"xla_backend_optimization_level": 0}


@functools.lru_cache(maxsize=None)
def imported(case: str):
    return load_diffusers_unet(os.path.join(FIXTURES, case))


def predict(model, x_nchw: np.ndarray, t: np.ndarray) -> np.ndarray:
    """diffax model on diffusers-layout inputs: NCHW -> NHWC -> model -> NCHW."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, x, c: nnx.merge(graphdef, s)(x, c), compiler_options=FAST)
    out = fn(state, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)), jnp.asarray(t))
    return np.asarray(out).transpose(0, 3, 1, 2)


def config_json(case: str) -> dict:
    with open(os.path.join(FIXTURES, case, "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("case", ["ddpm", "adm"])
def test_predictions_equal_diffusers(case):
    """max |diffax - diffusers| < 1e-4 in float32; the timestep is diffusers' step index = c_noise."""
    _, model = imported(case)
    io = np.load(os.path.join(FIXTURES, case, "io.npz"))
    out = predict(model, io["sample"], io["timestep"])
    assert out.shape == io["output"].shape
    assert np.abs(io["output"]).max() > 0.5  # a live network, not zeros
    assert np.abs(out - io["output"]).max() < 1e-4


def test_overrides():
    ov, _ = imported("ddpm")
    assert ov.model.channels == 8 and tuple(ov.model.channel_mult) == (1, 2)
    assert tuple(ov.model.attention_resolutions) == (4,) and ov.model.up_attention_resolutions is None
    assert ov.model.downsample_padding == 0 and not ov.model.flip_sin_to_cos and ov.model.freq_shift == 1.0
    assert ov.model.head_channels == -1 and ov.model.num_heads == 1 and ov.model.norm_eps == 1e-6
    assert (ov.diffusion.schedule, ov.diffusion.num_steps, ov.diffusion.prediction) == ("linear", 1000, "eps")
    assert ov.sampling.variance == "large" and ov.data.image_size == 8 and ov.data.channels == 3
    ov, _ = imported("adm")
    assert ov.model.resblock_updown and ov.model.scale_shift_norm and ov.model.learn_sigma
    assert ov.model.head_channels == 4 and sorted(ov.model.up_attention_resolutions) == [4, 8]
    assert (ov.diffusion.schedule, ov.diffusion.num_steps, ov.diffusion.prediction) == ("cosine", 500, "v")
    assert ov.sampling.sampler == "ddim" and ov.sampling.spacing == "trailing"


@pytest.mark.parametrize("case", ["ddpm", "adm"])
def test_overrides_rebuild_the_same_model(case):
    """config = default + overrides; build_model gives the imported model's parameter tree."""
    ov, model = imported(case)
    cfg = get_config()
    cfg.model.update(ov.model.to_dict())
    shape = (ov.data.image_size, ov.data.image_size, ov.data.channels)
    rebuilt = nnx.eval_shape(lambda: build_model(cfg.model, data_shape=shape, num_classes=0, rngs=nnx.Rngs(0)))
    want = {p: v.shape for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    got = {p: v.shape for p, v in nnx.to_flat_state(nnx.state(rebuilt, nnx.Param))}
    assert got == want


def test_legacy_attention_names_load_the_same():
    """Old checkpoints name the attention projections query / key / value / proj_attn."""
    _, model = imported("ddpm")
    tensors = load_file(os.path.join(FIXTURES, "ddpm", "diffusion_pytorch_model.safetensors"))
    legacy = {}
    for k, v in tensors.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f".{new}.", f".{old}.")
        legacy[k] = v
    assert any(".proj_attn." in k for k in legacy)
    before = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    other = copy.deepcopy(model)
    load_unet_weights(other, legacy)
    for p, v in nnx.to_flat_state(nnx.state(other, nnx.Param)):
        np.testing.assert_array_equal(np.asarray(v[...]), before[p])


def test_every_tensor_must_be_consumed_and_present():
    _, model = imported("ddpm")
    tensors = load_file(os.path.join(FIXTURES, "ddpm", "diffusion_pytorch_model.safetensors"))
    extra = dict(tensors, **{"down_blocks.0.resnets.0.extra_gain": np.ones(3, np.float32)})
    with pytest.raises(UnsupportedDiffusersConfig, match="extra_gain"):
        load_unet_weights(copy.deepcopy(model), extra)
    missing = {k: v for k, v in tensors.items() if k != "mid_block.attentions.0.to_k.weight"}
    with pytest.raises(UnsupportedDiffusersConfig, match="mid_block.attentions.0.to_k.weight"):
        load_unet_weights(copy.deepcopy(model), missing)


@pytest.mark.parametrize(
    "change,named",
    [
        (dict(down_block_types=["CrossAttnDownBlock2D", "AttnDownBlock2D"]), "CrossAttnDownBlock2D"),
        (dict(up_block_types=["AttnUpBlock2D", "SkipUpBlock2D"]), "SkipUpBlock2D"),
        (dict(_class_name="UNet2DConditionModel"), "UNet2DConditionModel"),
        (dict(num_class_embeds=10), "num_class_embeds"),
        (dict(time_embedding_type="fourier"), "time_embedding_type"),
        (dict(resnet_time_scale_shift="spatial"), "resnet_time_scale_shift"),
        (dict(mid_block_scale_factor=1.414), "mid_block_scale_factor"),
        (dict(some_new_option=True), "some_new_option"),
        (dict(down_block_types=["AttnDownBlock2D"] * 2, downsample_type="resnet"), "mixed conv and resnet"),
    ],
)
def test_unmappable_configs_raise_naming_the_option(change, named):
    cfg = dict(config_json("ddpm"), **change)
    with pytest.raises(UnsupportedDiffusersConfig, match=named):
        unet_config_to_diffax(cfg)


def test_scheduler_mapping_and_errors():
    diffusion, _ = scheduler_config_to_diffax(
        {"_class_name": "DDPMScheduler", "num_train_timesteps": 2000, "beta_start": 2e-4, "beta_end": 0.04}
    )
    assert diffusion["schedule"] == "vp" and diffusion["num_steps"] == 2000
    assert np.isclose(diffusion["beta_min"], 0.4) and np.isclose(diffusion["beta_max"], 80.0)
    with pytest.raises(UnsupportedDiffusersConfig, match="sigmoid"):
        scheduler_config_to_diffax({"_class_name": "DDPMScheduler", "beta_schedule": "sigmoid"})
    with pytest.raises(UnsupportedDiffusersConfig, match="LMSDiscreteScheduler"):
        scheduler_config_to_diffax({"_class_name": "LMSDiscreteScheduler"})
    with pytest.raises(UnsupportedDiffusersConfig, match="use_exponential_sigmas=True"):
        scheduler_config_to_diffax({"_class_name": "EulerDiscreteScheduler", "use_exponential_sigmas": True})
    with pytest.raises(UnsupportedDiffusersConfig, match="algorithm_type='dpmsolver'"):
        scheduler_config_to_diffax({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver"})
    with pytest.raises(UnsupportedDiffusersConfig, match="image tokens"):
        scheduler_config_to_diffax({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True})
    # missing keys take the constructor's defaults: DDIM's spacing is leading (not trailing), Euler's linspace
    _, sampling = scheduler_config_to_diffax({"_class_name": "DDIMScheduler"})
    assert (sampling["spacing"], sampling["steps_offset"], sampling["final_alpha_one"]) == ("leading", 0, True)
    assert scheduler_config_to_diffax({"_class_name": "EulerDiscreteScheduler"})[1]["spacing"] == "linspace"
    with pytest.raises(UnsupportedDiffusersConfig, match="prediction_type='flow'"):
        scheduler_config_to_diffax({"_class_name": "DDPMScheduler", "prediction_type": "flow"})


def test_missing_files_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_diffusers_unet(str(tmp_path))

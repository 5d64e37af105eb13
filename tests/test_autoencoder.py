"""AutoencoderKL: diffusers parity (saved fixtures, no torch), export round trip, latent scaling, bad folders.

The fixtures in tests/fixtures/diffusers_vae/ were written once by
tests/fixtures/make_diffusers_vae_fixture.py with torch + diffusers: an SD-layout VAE
(4 channels, quant convs) and an SD3/Flux-layout one (16 channels, no quant convs, shift).
"""
from __future__ import annotations

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from diffax.models.autoencoder import LatentScaling, kl_to_standard_normal
from diffax.models.diffusers import UnsupportedDiffusersConfig
from diffax.models.diffusers_vae import (
    autoencoder_config_to_diffax,
    load_diffusers_autoencoder,
    save_diffusers_autoencoder,
    weights_sha256,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers_vae")


@functools.lru_cache(maxsize=None)
def imported(case: str):
    return load_diffusers_autoencoder(os.path.join(FIXTURES, case))


def nhwc(x: np.ndarray) -> jax.Array:
    return jnp.asarray(x.transpose(0, 2, 3, 1))


def nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("case", ["sd", "flux"])
def test_encoder_and_decoder_equal_diffusers(case):
    """Posterior mean, log-variance and decoding within 1e-4 of diffusers' AutoencoderKL in float32."""
    model, _ = imported(case)
    io = np.load(os.path.join(FIXTURES, case, "io.npz"))
    mean, logvar = jax.jit(lambda x: model.encode(x))(nhwc(io["image"]))
    decoded = jax.jit(lambda z: model.decode(z))(nhwc(io["latent"]))
    assert np.abs(io["mean"]).max() > 0.5 and np.abs(io["decoded"]).max() > 0.5  # live networks
    assert np.abs(nchw(mean) - io["mean"]).max() < 1e-4
    assert np.abs(nchw(logvar) - io["logvar"]).max() < 1e-4
    assert np.abs(nchw(decoded) - io["decoded"]).max() < 1e-4


def test_layouts_and_scaling():
    sd, sd_scale = imported("sd")
    flux, flux_scale = imported("flux")
    assert sd.quant_conv is not None and sd.latent_channels == 4 and sd.downsampling == 2
    assert flux.quant_conv is None and flux.post_quant_conv is None and flux.latent_channels == 16
    assert flux.downsampling == 4
    assert sd_scale == LatentScaling(0.18215, 0.0) and flux_scale == LatentScaling(0.3611, 0.1159)
    z = jnp.linspace(-2.0, 3.0, 7)
    np.testing.assert_allclose(flux_scale.to_latent(z), (z - 0.1159) * 0.3611, rtol=1e-6)
    np.testing.assert_allclose(flux_scale.from_latent(flux_scale.to_latent(z)), z, rtol=1e-6, atol=1e-6)


def test_kl_closed_form():
    """KL(N(m, s^2) || N(0, 1)) = log(1/s) + (s^2 + m^2)/2 - 1/2 per element, summed."""
    mean = jnp.array([[0.3, -1.2]])
    logvar = jnp.array([[np.log(0.25), np.log(4.0)]])
    s2 = np.array([0.25, 4.0])
    expected = np.sum(-0.5 * np.log(s2) + (s2 + np.array([0.09, 1.44])) / 2 - 0.5)
    np.testing.assert_allclose(kl_to_standard_normal(mean, logvar), [expected], rtol=1e-6)


@pytest.mark.parametrize("case", ["sd", "flux"])
def test_export_writes_the_same_tensors_and_config(case, tmp_path):
    """save_diffusers_autoencoder reproduces diffusers' own file: same names, shapes and values, same config."""
    model, scaling = imported(case)
    with open(os.path.join(FIXTURES, case, "config.json")) as f:
        cfg = json.load(f)
    kwargs, _ = autoencoder_config_to_diffax(cfg)
    save_diffusers_autoencoder(model, kwargs, scaling, str(tmp_path))
    ours = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    theirs = load_file(os.path.join(FIXTURES, case, "diffusion_pytorch_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    with open(tmp_path / "config.json") as f:
        exported = json.load(f)
    assert autoencoder_config_to_diffax(exported) == autoencoder_config_to_diffax(cfg)
    assert weights_sha256(str(tmp_path)) != weights_sha256(os.path.join(FIXTURES, "flux" if case == "sd" else "sd"))


def _copy(tmp_path, case="sd"):
    dst = tmp_path / "vae"
    shutil.copytree(os.path.join(FIXTURES, case), dst)
    return dst


def _edit_config(path, **changes):
    with open(path / "config.json") as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path / "config.json", "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize(
    "changes, named",
    [
        (dict(_class_name="AutoencoderTiny"), "AutoencoderTiny"),
        (dict(latents_mean=[0.0] * 4), "latents_mean"),
        (dict(down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]), "down_block_types"),
        (dict(act_fn="gelu"), "act_fn"),
        (dict(new_option=1), "new_option"),
    ],
)
def test_unsupported_configs_name_the_key(tmp_path, changes, named):
    vae = _copy(tmp_path)
    _edit_config(vae, **changes)
    with pytest.raises(UnsupportedDiffusersConfig, match=named):
        load_diffusers_autoencoder(str(vae))


def test_every_tensor_is_used_and_present(tmp_path):
    vae = _copy(tmp_path)
    weights = vae / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    save_file({**tensors, "encoder.extra.weight": np.zeros(3, np.float32)}, str(weights))
    with pytest.raises(UnsupportedDiffusersConfig, match="encoder.extra.weight"):
        load_diffusers_autoencoder(str(vae))
    del tensors["decoder.mid_block.attentions.0.to_k.weight"]
    save_file(tensors, str(weights))
    with pytest.raises(UnsupportedDiffusersConfig, match="to_k.weight"):
        load_diffusers_autoencoder(str(vae))


def test_pipeline_folder_and_missing_weights(tmp_path):
    pipe = tmp_path / "pipe"
    shutil.copytree(os.path.join(FIXTURES, "sd"), pipe / "vae")
    model, _ = load_diffusers_autoencoder(str(pipe))
    assert model.latent_channels == 4
    os.remove(pipe / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_diffusers_autoencoder(str(pipe))

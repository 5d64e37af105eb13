"""DINOv2 (FD-DINOv2's feature net) against transformers' Dinov2Model, without torch at test time.

tests/fixtures/dinov2/make_dinov2_fixture.py (run once with torch + transformers) saved a tiny
random-weight Dinov2Model folder and its outputs, including the features of uint8 images through
EDM2's DINOv2 preprocessing.
"""
import functools
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from diffax.evaluation import dinov2

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "dinov2")
TINY = os.path.join(FIXTURES, "tiny")


@pytest.fixture(scope="module")
def reference():
    with np.load(os.path.join(FIXTURES, "reference.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def model():
    return dinov2.load_dinov2(TINY)


@functools.partial(jax.jit, static_argnums=(0,))
def _forward(graphdef, state, pixels):
    return nnx.merge(graphdef, state)(pixels)


def run(model, pixels):
    return _forward(*nnx.split(model), pixels)


@pytest.mark.parametrize("size", ["56", "70x56"])  # trained grid 4x4; 5x4 interpolates the positions
def test_outputs_match_transformers(model, reference, size):
    pooled, hidden = run(model, reference[f"pixels_{size}"])
    np.testing.assert_allclose(np.asarray(hidden), reference[f"hidden_{size}"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(pooled), reference[f"pooled_{size}"], rtol=0, atol=1e-4)
    assert np.abs(reference[f"pooled_{size}"]).max() > 1.0  # not a near-zero output that any net would match


def test_uint8_features_match_edm2_preprocessing(model, reference):
    got = dinov2.make_feature_fn(model)(reference["images_uint8"])["features"]
    np.testing.assert_allclose(got, reference["features_uint8"], rtol=0, atol=1e-4)
    assert dinov2.extractor_name(model) == "dinov2-32x2-p14/cls"


def test_position_interpolation_is_torch_bicubic():
    np.testing.assert_allclose(dinov2.torch_bicubic_matrix(4, 4), np.eye(4), atol=1e-7)
    m = dinov2.torch_bicubic_matrix(4, 8)  # upsampling x2: src = (dst + 0.5) / 2 - 0.5
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6)
    # dst 3 -> src 1.25: Keys (A = -0.75) weights at t = 0.25 on indices 0..3.
    t, a = 0.25, -0.75
    want = [((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a, ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * (1 - t) - (a + 3)) * (1 - t) ** 2 + 1, ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a]
    np.testing.assert_allclose(m[3], want, atol=1e-6)


def test_transformers_v5_names_and_bad_folders(tmp_path, reference):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(os.path.join(TINY, "model.safetensors"))
    v5 = {k.replace("attention.attention.query", "attention.q_proj").replace("attention.output.dense", "attention.o_proj"): v
          for k, v in tensors.items()}
    folder = tmp_path / "v5"
    folder.mkdir()
    shutil.copy(os.path.join(TINY, "config.json"), folder / "config.json")
    save_file({f"dinov2.{k}": v for k, v in v5.items()}, str(folder / "model.safetensors"))
    pooled, _ = run(dinov2.load_dinov2(str(folder)), reference["pixels_56"])
    np.testing.assert_allclose(np.asarray(pooled), reference["pooled_56"], rtol=0, atol=1e-4)

    with pytest.raises(FileNotFoundError, match="config.json and model.safetensors"):
        dinov2.load_dinov2(str(tmp_path / "nowhere"))
    save_file({**tensors, "encoder.layer.2.norm1.weight": tensors["layernorm.weight"]}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected weights.*encoder.layer.2"):
        dinov2.load_dinov2(str(folder))

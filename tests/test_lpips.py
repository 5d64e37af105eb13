"""LPIPS (Zhang et al. 2018, VGG16 v0.1) against the `lpips` package on the same random weights.

Fixtures from tests/fixtures/make_lpips_fixture.py: a narrow VGG16 and its lin layers saved by
torch.save (read here without torch), and VGG16 at its real widths whose 14.7M random weights
both sides draw from numpy with the same seed (written here to a safetensors file).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.errors import UserError
from diffax.models.lpips import load_lpips
from fixtures.lpips_weights import random_weights

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "lpips")
VGG_NARROW, LIN_NARROW = (os.path.join(FIXTURES, f) for f in ("vgg16_narrow.pth", "lin_narrow.pth"))


@pytest.fixture(scope="module")
def io():
    return dict(np.load(os.path.join(FIXTURES, "io.npz")))


@pytest.fixture(scope="module")
def narrow():
    return load_lpips(VGG_NARROW, LIN_NARROW)


def test_narrow_vgg_from_torch_pth_files_matches_lpips(io, narrow):
    got = np.asarray(jax.jit(narrow.__call__)(io["x"], io["y"]))
    np.testing.assert_allclose(got, io["narrow"], rtol=1e-5)


def test_vgg16_widths_from_safetensors_match_lpips(io, tmp_path):
    from safetensors.numpy import save_file

    path = str(tmp_path / "vgg16_and_lins.safetensors")  # one file holding both state dicts
    save_file(random_weights((64, 128, 256, 512, 512), 2), path)
    model = load_lpips(path, path)
    assert model.kernels[-1].shape == (3, 3, 512, 512)
    got = np.asarray(jax.jit(model.__call__)(io["x"], io["y"]))
    np.testing.assert_allclose(got, io["vgg16"], rtol=1e-5)


def test_identical_images_are_at_distance_zero_and_grey_is_rgb(io, narrow):
    @jax.jit
    def distances(x, grey_x, grey_y):
        return narrow(x, x), narrow(grey_x, grey_y), narrow(jnp.tile(grey_x, 3), jnp.tile(grey_y, 3))

    same, grey, tiled = distances(io["x"][:, :16, :24], io["x"][:, :16, :24, :1], io["y"][:, :16, :24, :1])
    assert np.all(np.asarray(same) == 0.0)
    np.testing.assert_allclose(grey, tiled, rtol=1e-6)
    assert np.all(np.asarray(grey) > 0)


def test_bad_weight_files_and_small_images_are_errors(tmp_path, narrow):
    with pytest.raises(UserError, match="lpips' v0.1 vgg.pth"):
        load_lpips(VGG_NARROW, VGG_NARROW)  # the VGG file given for the lins
    with pytest.raises(UserError, match="torchvision's VGG16 state dict"):
        load_lpips(LIN_NARROW, LIN_NARROW)
    from safetensors.numpy import save_file

    wide = random_weights((4, 8, 16, 16, 32), 0)
    save_file({k: v for k, v in wide.items() if k.startswith("lin")}, str(tmp_path / "lin.safetensors"))
    with pytest.raises(UserError, match=r"lin4.model.1.weight has shape \(1, 32, 1, 1\).*16 channels"):
        load_lpips(VGG_NARROW, str(tmp_path / "lin.safetensors"))
    (tmp_path / "broken.pth").write_bytes(b"<html>not found</html>")
    with pytest.raises(UserError, match="broken.pth is not a readable PyTorch state dict"):
        load_lpips(str(tmp_path / "broken.pth"), LIN_NARROW)
    with pytest.raises(UserError, match="no such file"):
        load_lpips(str(tmp_path / "missing.pth"), LIN_NARROW)
    with pytest.raises(ValueError, match="at least 16x16"):
        narrow(jnp.zeros((1, 8, 16, 3)), jnp.zeros((1, 8, 16, 3)))

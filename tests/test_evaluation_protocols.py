"""The FID protocols (tf / pytorch_fid / clean) against the reference code, and recorded statistics.

tests/fixtures/inception/make_protocol_fixtures.py (run once with torch, Pillow and
clean-fid) recorded NVIDIA's TorchScript resize preamble, clean-fid's own resizer,
torch's antialiased bicubic, and each protocol's full preprocessing of uint8 images.
"""
import os

import jax.numpy as jnp
import numpy as np
import pytest

from diffax.evaluation import protocols, statistics

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "inception")


@pytest.fixture(scope="module")
def fx():
    with np.load(os.path.join(FIXTURES, "protocols.npz")) as f:
        return {k: f[k] for k in f.files}


def _cases(fx, prefix):
    i = 0
    while f"{prefix}{i}_in" in fx:
        yield i, fx[f"{prefix}{i}_in"], fx[f"{prefix}{i}_out"]
        i += 1
    assert i >= 5


def test_tf_resize_matches_nvidias_port(fx):
    for i, x, y in _cases(fx, "tf_resize"):
        got = np.asarray(protocols.resize(jnp.asarray(x), y.shape[1:3], "tf"))
        # NVIDIA's grid_sample computes its sampling grid in float32 (~1e-5 pixel); values are on [0, 255].
        np.testing.assert_allclose(got, y, rtol=0, atol=1e-2, err_msg=f"case {i}: {x.shape} -> {y.shape}")
        # torch's half-pixel rule is a different resize: it must not pass the same check.
        if y.shape[1] != x.shape[1]:
            other = np.asarray(protocols.resize(jnp.asarray(x), y.shape[1:3], "pytorch_fid"))
            assert np.abs(other - y).max() > 1.0, i


def test_tf_matrix_is_tf1_resize_bilinear_semantics():
    # 4 -> 3: src = dst * 4 / 3 = 0, 1.333, 2.667; the upper neighbour of 2.667 is index 3 (in range).
    m = protocols.tf_bilinear_matrix(4, 3)
    np.testing.assert_allclose(m, [[1, 0, 0, 0], [0, 2 / 3, 1 / 3, 0], [0, 0, 1 / 3, 2 / 3]], atol=1e-7)
    # 2 -> 4 (upsampling): src = 0, 0.5, 1, 1.5; at 1.5 the upper neighbour is clamped to the border.
    m = protocols.tf_bilinear_matrix(2, 4)
    np.testing.assert_allclose(m, [[1, 0], [0.5, 0.5], [0, 1], [0, 1]], atol=1e-7)


def test_clean_resize_matches_clean_fid(fx):
    for i, x, y in _cases(fx, "clean_resize"):
        got = np.asarray(protocols.resize(jnp.asarray(x.astype(np.float32)), y.shape[1:3], "clean"))
        got = np.clip(got, 0, 255)  # clean-fid clips after PIL's resize
        np.testing.assert_allclose(got, y, rtol=0, atol=2e-3, err_msg=f"case {i}: {x.shape} -> {y.shape}")


def test_antialiased_bicubic_matches_torch(fx):
    for i, x, y in _cases(fx, "aa_bicubic"):
        got = np.asarray(protocols.resize(jnp.asarray(x), y.shape[1:3], "clean"))
        # torch computes the kernel weights in float32 (PIL in float64): 2e-5 relative at 300 -> 299.
        np.testing.assert_allclose(got, y, rtol=0, atol=5e-3, err_msg=f"case {i}: {x.shape} -> {y.shape}")


def test_antialiasing_widens_the_kernel_when_downsampling():
    m = protocols.antialiased_bicubic_matrix(40, 10)  # scale 4: support 8 input pixels each side
    taps = np.count_nonzero(m, axis=1)
    assert (taps[2:-2] == 16).all() and taps[0] == 10  # 4 x bicubic's 4 taps; clipped at the border
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(protocols.antialiased_bicubic_matrix(7, 7), np.eye(7), atol=1e-7)


@pytest.mark.parametrize("protocol", protocols.PROTOCOLS)
def test_full_preprocessing_matches_the_reference(fx, protocol):
    with np.load(os.path.join(FIXTURES, "reference.npz")) as f:
        images = {"small": f["images_small"], "large": f["images_large"]}
    for name, imgs in images.items():
        got = np.asarray(protocols.preprocess(imgs, protocol))
        assert got.shape == (len(imgs), 299, 299, 3)
        want = fx[f"preprocess_{protocol}_{name}"]
        np.testing.assert_allclose(got[:, ::7, ::7, :], want, rtol=0, atol=1e-4, err_msg=(protocol, name))
        for other in set(protocols.PROTOCOLS) - {protocol}:  # the protocols really differ
            assert np.abs(fx[f"preprocess_{other}_{name}"] - want).max() > 1e-3, (protocol, other, name)


def test_normalisations():
    img = np.full((1, 5, 5, 1), 51, np.uint8)
    np.testing.assert_allclose(protocols.preprocess(img, "tf"), (51 - 128) / 128, atol=1e-6)
    np.testing.assert_allclose(protocols.preprocess(img, "clean"), (51 - 128) / 128, atol=1e-6)
    np.testing.assert_allclose(protocols.preprocess(img, "pytorch_fid"), 2 * 51 / 255 - 1, atol=1e-6)
    with pytest.raises(ValueError, match="valid: tf, pytorch_fid, clean"):
        protocols.check_protocol("legacy_tensorflow")


# ----------------------------------------------------------------------------- recorded statistics


def test_statistics_round_trip_records_extractor_and_protocol(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((50, 6))
    acc = statistics.FeatureStats(6, keep=10)
    acc.update(feats)
    path = str(tmp_path / "s.npz")
    statistics.save_stats(path, acc.mu, acc.sigma, features=acc.features, feature_space="inception-2015-12-05/pool3",
                          protocol="clean", num_images=acc.n)
    ref = statistics.load_stats(path)
    np.testing.assert_array_equal(ref["mu"], acc.mu)
    np.testing.assert_array_equal(ref["sigma"], acc.sigma)
    np.testing.assert_array_equal(ref["features"], acc.features)
    np.testing.assert_allclose(ref["sigma"], np.cov(feats, rowvar=False), rtol=1e-12)
    assert (ref["feature_space"], ref["protocol"], ref["num_images"]) == ("inception-2015-12-05/pool3", "clean", 50)
    statistics.check_comparable(ref, path, protocol="clean")
    with pytest.raises(ValueError, match=r"'clean' protocol.*'tf'"):
        statistics.check_comparable(ref, path, protocol="tf")
    with pytest.raises(ValueError, match=r"records protocol 'clean'.*reference_protocol='tf'"):
        statistics.check_comparable(ref, path, protocol="clean", stated_protocol="tf")


def test_foreign_statistics_need_a_stated_protocol(tmp_path):
    path = str(tmp_path / "cifar10-32x32.npz")  # as EDM / pytorch-fid / clean-fid write them: mu, sigma only
    np.savez(path, mu=np.zeros(3), sigma=np.eye(3))
    ref = statistics.load_stats(path)
    assert ref["protocol"] == "" and ref["feature_space"] == ""
    with pytest.raises(ValueError, match="does not record the FID protocol.*reference_protocol"):
        statistics.check_comparable(ref, path, protocol="tf")
    statistics.check_comparable(ref, path, protocol="tf", stated_protocol="tf")
    with pytest.raises(ValueError, match=r"'pytorch_fid' protocol.*'tf'"):
        statistics.check_comparable(ref, path, protocol="tf", stated_protocol="pytorch_fid")


def test_statistics_diffax_wrote_before_protocols_read_as_pytorch_fid(tmp_path):
    path = str(tmp_path / "old.npz")
    np.savez(path, mu=np.zeros(3), sigma=np.eye(3), feature_space=np.asarray("fid_inception_v3_pool3"))
    ref = statistics.load_stats(path, feature_space="inception-2015-12-05/pool3")
    assert (ref["feature_space"], ref["protocol"]) == ("inception-2015-12-05/pool3", "pytorch_fid")
    with pytest.raises(ValueError, match=r"'pytorch_fid' protocol.*'tf'"):
        statistics.check_comparable(ref, path, protocol="tf")

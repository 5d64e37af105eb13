"""The FID InceptionV3 against pytorch-fid itself, without torch at test time.

tests/fixtures/inception/make_fixtures.py (run once with torch + pytorch-fid)
recorded pytorch-fid's state-dict layout, its exact parameter count, and its
outputs with deterministic random weights that `fid_random_weights.py`
regenerates here from a seed (the real weights are not needed, nor stored).
"""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffax.evaluation import convert, inception

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "inception")
_spec = importlib.util.spec_from_file_location("fid_random_weights", os.path.join(FIXTURES, "fid_random_weights.py"))
frw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(frw)


@pytest.fixture(scope="module")
def spec():
    return frw.load_spec()


@pytest.fixture(scope="module")
def reference():
    with np.load(os.path.join(FIXTURES, "reference.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def abstract_model():
    return nnx.eval_shape(lambda: inception.InceptionV3(rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def weights_file(spec, tmp_path_factory):
    """pytorch-fid-layout random weights -> diffax's converter -> an .npz on disk."""
    weights = convert.convert_state_dict(frw.random_state_dict(spec["entries"]))
    path = str(tmp_path_factory.mktemp("inception") / "fid_random.npz")
    np.savez(path, **weights)
    return path


def test_structure_and_exact_parameter_count(spec, abstract_model):
    params, stats = inception.count_params(abstract_model)
    assert params == spec["num_params"] == 23_850_960  # pytorch-fid's sum(p.numel() for p in parameters())
    assert stats == spec["num_bn_stats"]
    convs = [p for p, v in nnx.iter_graph(abstract_model) if isinstance(v, nnx.Param) and p[-1] == "kernel"]
    assert len(convs) == spec["num_conv_layers"] + 1  # + the 1008-way fc
    assert abstract_model.fc.kernel.shape == (2048, 1008)
    assert (abstract_model.Mixed_7b.pool, abstract_model.Mixed_7c.pool) == ("avg", "max")  # FIDInceptionE_1 / _2


def test_converter_maps_every_pytorch_fid_entry(spec, abstract_model):
    sd = {name: np.zeros(shape, np.int64 if dtype == "int64" else np.float32) for name, shape, dtype in spec["entries"]}
    w = convert.convert_state_dict(sd)
    model_vars = {"/".join(map(str, p)): v for p, v in nnx.iter_graph(abstract_model) if isinstance(v, nnx.Variable)}
    assert set(w) == set(model_vars)
    for k, v in w.items():
        assert v.shape == model_vars[k].shape and v.dtype == np.float32, k
    # Layout: torch [O, I, kh, kw] -> [kh, kw, I, O]; linear [O, I] -> [I, O]; BN names.
    rng = np.random.default_rng(0)
    conv = rng.standard_normal((192, 160, 7, 1)).astype(np.float32)
    fc = rng.standard_normal((1008, 2048)).astype(np.float32)
    out = convert.convert_state_dict({"Mixed_6c.branch7x7_3.conv.weight": conv, "fc.weight": fc,
                                      "Mixed_6c.branch7x7_3.bn.running_var": np.arange(192.0)})
    np.testing.assert_array_equal(out["Mixed_6c/branch7x7_3/conv/kernel"][3, 0, 17, 5], conv[5, 17, 3, 0])
    np.testing.assert_array_equal(out["fc/kernel"], fc.T)
    np.testing.assert_array_equal(out["Mixed_6c/branch7x7_3/bn/var"], np.arange(192.0))
    with pytest.raises(ValueError, match="AuxLogits"):
        convert.convert_state_dict({"AuxLogits.fc.weight": fc})


def test_features_match_pytorch_fid(weights_file, reference):
    # load_inception reads the converted file; make_feature_fn is the production path.
    model = inception.load_inception(weights_file)
    features = inception.make_feature_fn(model)
    for name in ("small", "large"):  # 16x16 upsampled; 331x317 downsampled without antialiasing
        images = reference[f"images_{name}"]
        n = len(images)
        out = features(np.concatenate([images] * (2 // n)))  # batch of 2 both times: the net compiles once
        out = {k: v[:n] for k, v in out.items()}
        for ref in (reference[f"pool3_{name}"], reference[f"pool3_{name}_f64"]):  # torch float32 / float64
            rel = np.abs(out["features"] - ref).max() / np.abs(ref).max()
            assert rel < 1e-4, (name, rel)
        ref_l = reference[f"logits_unbiased_{name}"]
        assert np.abs(out["logits"] - ref_l).max() / np.abs(ref_l).max() < 1e-4
        # The classifier with its bias (pytorch-fid's fc.bias converted too).
        logits = out["features"] @ np.asarray(model.fc.kernel[...]) + np.asarray(model.fc.bias[...])
        ref_b = reference[f"logits_{name}"]
        assert np.abs(logits - ref_b).max() / np.abs(ref_b).max() < 1e-4


def test_resize_matches_torch_interpolate(reference):
    i = 0
    while f"resize{i}_in" in reference:
        x, y = reference[f"resize{i}_in"], reference[f"resize{i}_out"]
        got = np.asarray(inception.resize_bilinear(jnp.asarray(x), y.shape[1:3]))
        np.testing.assert_allclose(got, y, rtol=0, atol=5e-7, err_msg=f"case {i}: {x.shape} -> {y.shape}")
        i += 1
    assert i >= 4
    # jax.image.resize's default (antialiased) bilinear is NOT torch's when downsampling.
    x, y = reference["resize3_in"], reference["resize3_out"]
    aa = np.asarray(jax.image.resize(x, (1, 13, 11, 2), "bilinear"))
    assert np.abs(aa - y).max() > 1e-2


def test_preprocess_scaling_and_gray():
    # A constant image stays constant through the resize: uint8 v -> 2 v / 255 - 1.
    img = np.full((1, 8, 8, 1), 51, np.uint8)
    out = np.asarray(inception.preprocess(img))
    assert out.shape == (1, 299, 299, 3)
    np.testing.assert_allclose(out, 2 * 51 / 255 - 1, atol=1e-6)


def test_pools_match_hand_computation():
    x = jnp.arange(9.0).reshape(1, 3, 3, 1)
    avg = np.asarray(inception.avg_pool_exclude_pad(x))[0, :, :, 0]
    assert avg[0, 0] == pytest.approx((0 + 1 + 3 + 4) / 4)  # corner: 4 valid inputs, not 9
    assert avg[1, 1] == pytest.approx(4.0)
    assert avg[0, 1] == pytest.approx((0 + 1 + 2 + 3 + 4 + 5) / 6)
    mx = np.asarray(inception.max_pool(-x, 3, 1, padding=1))[0, :, :, 0]
    assert mx[2, 2] == -4.0  # padding is -inf, not 0


def test_missing_weights_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv(inception.ENV_VAR, raising=False)
    missing = str(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError) as e:
        inception.load_inception(missing)
    msg = str(e.value)
    assert missing in msg
    url = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
    assert url in msg
    assert f"diffax convert-inception pt_inception-2015-12-05-6726825d.pth {missing}" in msg
    assert "DIFFAX_INCEPTION_WEIGHTS" in msg and "config.eval.inception_weights" in msg
    # The environment variable is used when the config names no file.
    monkeypatch.setenv(inception.ENV_VAR, missing)
    assert inception.resolve_weights_path("") == missing
    assert not inception.weights_available("")


def test_convert_command_without_torch_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch":
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    src = tmp_path / "w.pth"
    src.write_bytes(b"not a real file")
    with pytest.raises(ImportError, match="pip install torch"):
        convert.convert_inception(str(src), str(tmp_path / "w.npz"))
    # A file whose name carries a hash prefix that its content does not match is refused first.
    bad = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    bad.write_bytes(b"truncated")
    with pytest.raises(ValueError, match="6726825d"):
        convert.convert_inception(str(bad), str(tmp_path / "w.npz"))

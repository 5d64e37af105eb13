"""The eval job: dataset pass, the offline digits feature net, resume, watch, records, reference stats."""
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from diffax import data, samplers
from diffax.evaluation import digits_features, dinov2, job, statistics


def _config(**eval_overrides):
    c = default.get_config()
    c.eval.num_samples = 100
    c.eval.batch_size = 50
    c.eval.kid_subsets = 5
    c.eval.kid_subset_size = 50
    c.eval.watch_interval = 0.0
    c.eval.inception_weights = "/nonexistent/inception.npz"  # the offline digits path
    for k, v in eval_overrides.items():
        setattr(c.eval, k, v)
    return c


def _digits_uint8():
    from sklearn.datasets import load_digits

    d = load_digits()
    img = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return np.pad(img, ((0, 0), (4, 4), (4, 4)))[..., None], d.target.astype(np.int32)


def test_dataset_pass_covers_each_training_image_once():
    images, labels = zip(*job.dataset_images(_config(), 64))
    images, labels = np.concatenate(images), np.concatenate(labels)
    want, want_labels = _digits_uint8()
    assert images.dtype == np.uint8 and images.shape == (1500, 16, 16, 1)  # the "train" split, 8x8 padded to 16
    np.testing.assert_array_equal(images, want[:1500])
    np.testing.assert_array_equal(labels, want_labels[:1500])


def test_digits_net_is_accurate_and_deterministic():
    x, y = _digits_uint8()
    net, train_acc = digits_features.train_digits_net(x[:1500], y[:1500], steps=200)
    out = digits_features.make_feature_fn(net)(x[1500:])
    held_out = np.mean(out["logits"].argmax(-1) == y[1500:])
    assert train_acc > 0.93 and held_out > 0.85, (train_acc, held_out)  # 0.957 / 0.882 on CPU
    assert out["features"].shape == (297, digits_features.FEATURE_DIM)
    a, _ = digits_features.train_digits_net(x[:300], y[:300], steps=20, seed=3)
    b, _ = digits_features.train_digits_net(x[:300], y[:300], steps=20, seed=3)
    assert digits_features.feature_space_name(a) == digits_features.feature_space_name(b)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A fake run: checkpoints 100 (noise 'samples') and 200 (real training images as samples)."""
    workdir = str(tmp_path_factory.mktemp("run"))
    real, _ = _digits_uint8()
    pool = jnp.asarray(real[:1500].astype(np.float32) / 127.5 - 1.0)
    state = {"steps": [100, 200], "loads": [], "fail_at": None}

    def load(w, step, use_ema=True, config=None):
        assert w == workdir and use_ema is True
        state["loads"].append(step)
        if step == state["fail_at"]:
            raise RuntimeError("preempted")

        @jax.jit
        def sample_fn(noise, key, labels):
            if step >= 200:
                return pool[jax.random.choice(key, len(pool), (noise.shape[0],), replace=False)]
            return jnp.clip(noise, -1.0, 1.0)

        shape = tuple(data.data_shape(config))

        def draw(num_samples, seed, batch_size=None, progress=True):
            return samplers.draw_samples(sample_fn, num_samples, batch_size, shape, seed, progress=False)

        return types.SimpleNamespace(sample_fn=sample_fn, step=step, draw=draw,
                                     diffusion=types.SimpleNamespace(data_shape=shape))

    mp = pytest.MonkeyPatch()
    mp.setattr("diffax.training.checkpoint.all_steps", lambda w: list(state["steps"]))
    mp.setattr("diffax.training.inference.load", load)
    mp.setattr(digits_features, "TRAIN_STEPS", 150)
    yield workdir, state
    mp.undo()


def test_run_eval_records_resumes_and_plots(run):
    workdir, state = run
    cfg = _config()
    state["fail_at"] = 200  # preempted while evaluating step 200
    with pytest.raises(RuntimeError, match="preempted"):
        job.run_eval(cfg, workdir)
    assert [r["step"] for r in job.read_results(workdir)] == [100]
    with open(os.path.join(workdir, "eval", job.RESULTS), "a") as f:
        f.write('{"step": 150, "trunc')  # a torn line from a crash is ignored
    state["fail_at"], state["loads"] = None, []
    records = job.run_eval(cfg, workdir)
    assert state["loads"] == [200] and [r["step"] for r in records] == [200]  # resumed, 100 not redone
    by_step = {r["step"]: r for r in job.read_results(workdir)}
    r100, r200 = by_step[100], by_step[200]
    assert r200["sampler"] == "ddim" and r200["steps"] == 50 and r200["num_samples"] == 100
    assert r200["feature_space"].startswith("digits-cnn-v1/") and r200["wall_time_s"] > 0
    assert set(r200["metrics"]) == {"fd_digits", "kd_digits", "kd_digits_std", "is_digits", "is_digits_std"}
    assert not any("fid" in k for k in r200["metrics"])  # never called FID
    # Real images score far better than noise.
    assert r200["metrics"]["fd_digits"] < r100["metrics"]["fd_digits"] / 20
    assert abs(r200["metrics"]["kd_digits"]) < 0.05 * r100["metrics"]["kd_digits"]
    assert r200["metrics"]["is_digits"] > 2 * r100["metrics"]["is_digits"]
    edir = os.path.join(workdir, "eval")
    with open(os.path.join(edir, "metrics.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(edir, "tb")))
    ref = statistics.load_stats(os.path.join(edir, "reference_stats_digits.npz"))
    assert ref["num_images"] == 1500 and ref["feature_space"] == r200["feature_space"]
    # A third call has nothing left to do; "latest" and "step" modes also skip what is recorded.
    state["loads"] = []
    assert job.run_eval(cfg, workdir) == [] and job.run_eval(cfg, workdir, step=100) == []
    assert state["loads"] == []
    with pytest.raises(ValueError, match="available steps"):
        job.run_eval(cfg, workdir, step=7)


def test_reference_stats_command_matches_a_direct_pass(run, tmp_path):
    workdir, _ = run
    cfg = _config()
    out = str(tmp_path / "digits_ref.npz")
    # Reuse the run's cached digits net: same data, so the same feature space.
    os.link(os.path.join(workdir, "eval", "digits_features.npz"), tmp_path / "digits_features.npz")
    ref = job.compute_reference_stats(cfg, out)
    space = job.feature_space(cfg, str(tmp_path))
    feats = space.feature_fn(_digits_uint8()[0][:1500])["features"].astype(np.float64)
    assert ref["num_images"] == 1500 and ref["feature_space"] == space.name
    assert ref["protocol"] == space.protocol == job.DIGITS_PROTOCOL
    np.testing.assert_allclose(ref["mu"], feats.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref["sigma"], np.cov(feats, rowvar=False), rtol=1e-4, atol=1e-4)
    cached = statistics.load_stats(os.path.join(workdir, "eval", "reference_stats_digits.npz"))
    np.testing.assert_allclose(ref["mu"], cached["mu"], rtol=1e-12)


def test_watch_polls_until_the_final_step(run):
    workdir, state = run
    cfg = _config(num_samples=20, batch_size=20)  # other settings than the records above: evaluated afresh
    cfg.training.num_steps = 300
    polls = iter([[100], [100], [100, 200], [100, 200, 300]])
    state["loads"] = []
    state_steps = state["steps"]
    try:
        import diffax.training.checkpoint as ckpt

        orig = ckpt.all_steps
        ckpt.all_steps = lambda w: next(polls)
        records = job.run_eval(cfg, workdir, watch=True)
    finally:
        ckpt.all_steps = orig
        state["steps"] = state_steps
    assert [r["step"] for r in records] == [100, 200, 300] and state["loads"] == [100, 200, 300]
    assert all(r["num_samples"] == 20 for r in records)


def test_missing_weights_outside_digits_is_an_error(tmp_path):
    cfg = _config()
    cfg.data.name = "npz:/somewhere/images.npz"
    with pytest.raises(FileNotFoundError, match="diffax convert-inception"):
        job.feature_space(cfg, str(tmp_path))
    with pytest.raises(ValueError, match="Unknown metric"):
        job.score(np.zeros((4, 16, 16, 1), np.uint8), types.SimpleNamespace(), {}, _config(metrics=("fid", "lpips")))


def test_fd_dinov2_is_reported_when_configured(run, monkeypatch):
    workdir, state = run
    tiny = os.path.join(os.path.dirname(__file__), "fixtures", "dinov2", "tiny")  # random weights
    cfg = _config(num_samples=60, batch_size=30, metrics=("fid",), dinov2_weights=tiny)
    all_images = job.dataset_images

    def first_150(config, batch_size):  # DINOv2 runs at 224x224: its reference uses 150 training images here
        for i, batch in enumerate(all_images(config, batch_size)):
            if i * batch_size >= 150:
                return
            yield batch

    monkeypatch.setattr(job, "dataset_images", first_150)
    state["loads"] = []
    by_step = {r["step"]: r for r in job.run_eval(cfg, workdir)}
    assert state["loads"] == [100, 200]  # other settings (dinov2) than the records above: evaluated afresh
    r100, r200 = by_step[100], by_step[200]
    assert r200["dinov2"] == "dinov2-32x2-p14/cls" and set(r200["metrics"]) == {"fd_digits", "fd_dinov2"}
    assert r200["metrics"]["fd_dinov2"] < r100["metrics"]["fd_dinov2"] / 2  # real digits beat noise
    ref = statistics.load_stats(os.path.join(workdir, "eval", "reference_stats_dinov2.npz"))
    assert (ref["feature_space"], ref["protocol"], ref["num_images"]) == ("dinov2-32x2-p14/cls", dinov2.PROTOCOL, 150)


def test_foreign_reference_stats_need_their_protocol(tmp_path):
    space = job.FeatureSpace(job.INCEPTION_SPACE, "tf", None, 3, {"fid": "fid"}, "reference_stats_tf.npz")
    edm = str(tmp_path / "cifar10-32x32.npz")  # EDM's reference files hold mu and sigma only
    np.savez(edm, mu=np.zeros(3), sigma=np.eye(3))
    cfg = _config(reference_stats=edm)
    with pytest.raises(ValueError, match="does not record the FID protocol"):
        job.reference_stats(cfg, str(tmp_path), space)
    cfg.eval.reference_protocol = "tf"
    np.testing.assert_array_equal(job.reference_stats(cfg, str(tmp_path), space)["sigma"], np.eye(3))
    cfg.eval.reference_protocol = "clean"
    with pytest.raises(ValueError, match=r"'clean' protocol.*'tf'"):
        job.reference_stats(cfg, str(tmp_path), space)
    cfg.eval.reference_protocol = "edm"
    with pytest.raises(ValueError, match="config.eval.reference_protocol='edm'.*valid: tf, pytorch_fid, clean"):
        job.reference_stats(cfg, str(tmp_path), space)


@pytest.mark.slow
def test_end_to_end_with_the_real_trainer(tmp_path):
    """Train the default digits config for 4 steps, then `run_eval` through inference.load."""
    from diffax.training import trainer

    cfg = _config()
    t = cfg.training
    t.num_steps, t.checkpoint_every, t.batch_size, t.log_every, t.sample_every, t.progress_bar = 4, 2, 16, 2, 0, False
    cfg.model.channels, cfg.model.channel_mult, cfg.model.attention_resolutions, cfg.model.norm_groups = 8, (1,), (), 4
    cfg.sampling.steps = 4
    workdir = str(tmp_path / "w")
    trainer.train(cfg, workdir)
    records = job.run_eval(cfg, workdir, watch=True)
    assert [r["step"] for r in records] == [2, 4]
    lines = [json.loads(x) for x in open(os.path.join(workdir, "eval", job.RESULTS))]
    assert [x["step"] for x in lines] == [2, 4]
    names = {"fd_digits", "kd_digits", "kd_digits_std", "is_digits", "is_digits_std"}
    assert all(set(r["metrics"]) == names for r in records)
    assert records[0]["metrics"] != records[1]["metrics"]  # each record scores its own checkpoint
    # The record is what sampling that checkpoint and scoring the samples gives by hand.
    from diffax.training import inference

    space, edir = job.feature_space(cfg, job.eval_dir(workdir)), job.eval_dir(workdir)
    ref = job.reference_stats(cfg, workdir, space)
    images = inference.load(workdir, 4, config=cfg).draw(cfg.eval.num_samples, job._eval_seed(cfg),
                                                          batch_size=cfg.eval.batch_size, progress=False)["images"]
    by_hand = job.score(images, space, ref, cfg)
    for name in names:
        assert records[1]["metrics"][name] == pytest.approx(by_hand[name], rel=1e-6), name
    # A 4-step model's samples are far from the data: held-out digits score much better.
    real = job.score(_digits_uint8()[0][1500:1600], space, ref, cfg)
    assert records[1]["metrics"]["fd_digits"] > 5 * real["fd_digits"]
    assert records[1]["metrics"]["is_digits"] < real["is_digits"]
    assert os.path.isfile(os.path.join(edir, "reference_stats_digits.npz"))

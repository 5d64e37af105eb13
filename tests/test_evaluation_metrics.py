"""Frechet distance, KID, IS and the feature statistics, checked against closed forms and naive loops."""
import os
import pickle

import numpy as np
import pytest
import scipy.linalg

from diffax.evaluation import metrics, statistics


def _random_cov(rng, d, scale=1.0):
    a = rng.standard_normal((d, d)) * scale
    return a @ a.T / d + 0.1 * np.eye(d)


def _fd_sqrtm(mu1, s1, mu2, s2):
    """pytorch-fid's formula (scipy.linalg.sqrtm of the product)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_frechet_matches_scipy_sqrtm_formula():
    rng = np.random.default_rng(0)
    for d in (1, 5, 32):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = _random_cov(rng, d), _random_cov(rng, d, 2.0)
        got = metrics.frechet_distance(mu1, s1, mu2, s2)
        np.testing.assert_allclose(got, _fd_sqrtm(mu1, s1, mu2, s2), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(got, metrics.frechet_distance(mu2, s2, mu1, s1), rtol=1e-9)  # symmetric


def test_frechet_closed_form_diagonal():
    # For diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3, 10), rng.uniform(0.1, 3, 10)
    mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # Scalar case: 1-D Gaussians N(0, 4) vs N(3, 1): 9 + (2 - 1)^2 = 10.
    np.testing.assert_allclose(metrics.frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]), 10.0, rtol=1e-12)


def test_frechet_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 64)) @ rng.standard_normal((64, 64)) + 3.0
    s = statistics.FeatureStats(64)
    s.update(x)
    fd = metrics.frechet_distance(s.mu, s.sigma, s.mu, s.sigma)
    assert abs(fd) < 1e-8 * np.trace(s.sigma)


def test_frechet_rank_deficient_stays_real_and_finite():
    # Fewer samples than features: both covariances singular (rank 19 of 64).
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((20, 64)), rng.standard_normal((20, 64)) + 0.5
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    got = metrics.frechet_distance(x.mean(0), s1, y.mean(0), s2)
    assert np.isfinite(got) and isinstance(got, float) and got > 0
    # Same value from the eigenvalues of S1 S2 computed independently.
    ev = np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)
    diff = x.mean(0) - y.mean(0)
    want = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev).sum()
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # A zero covariance (a single repeated point) works too: FD = |mu|^2 + tr(S2).
    z = np.zeros((64, 64))
    np.testing.assert_allclose(metrics.frechet_distance(np.zeros(64), z, y.mean(0), s2),
                               y.mean(0) @ y.mean(0) + np.trace(s2), rtol=1e-10)


def _naive_mmd2(x, y):
    d, m, n = x.shape[1], len(x), len(y)
    k = lambda a, b: (np.dot(a, b) / d + 1) ** 3  # noqa: E731
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return sxx + syy - 2 * sxy


def test_kid_matches_naive_loops():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((12, 5)), rng.standard_normal((9, 5)) * 1.3 + 0.2
    np.testing.assert_allclose(metrics.polynomial_mmd2(x, y), _naive_mmd2(x, y), rtol=1e-10)
    # Subsets: re-draw the same indices and average the naive value.
    mean, std = metrics.kernel_distance(x, y, num_subsets=4, subset_size=6, seed=7)
    r = np.random.default_rng(7)
    vals = [_naive_mmd2(x[r.choice(12, 6, replace=False)], y[r.choice(9, 6, replace=False)]) for _ in range(4)]
    np.testing.assert_allclose([mean, std], [np.mean(vals), np.std(vals)], rtol=1e-10)
    # Unbiased: same distribution gives a KID near 0, shifted one clearly positive.
    a, b = rng.standard_normal((400, 8)), rng.standard_normal((400, 8))
    assert abs(metrics.kernel_distance(a, b, num_subsets=10, subset_size=200)[0]) < 0.05
    assert metrics.kernel_distance(a, b + 1.0, num_subsets=10, subset_size=200)[0] > 0.5


def test_inception_score_matches_naive_loops():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((40, 7)) * 3
    got, got_std = metrics.inception_score(logits, splits=4)
    scores = []
    for k in range(4):
        part = logits[k * 10:(k + 1) * 10]
        p = np.exp(part) / np.exp(part).sum(1, keepdims=True)
        py = p.mean(0)
        kl = [sum(p[i, c] * (np.log(p[i, c]) - np.log(py[c])) for c in range(7)) for i in range(10)]
        scores.append(np.exp(np.mean(kl)))
    np.testing.assert_allclose([got, got_std], [np.mean(scores), np.std(scores)], rtol=1e-10)
    # Extremes: one confident class each, classes balanced -> IS = number of classes; all identical -> 1.
    onehot = np.eye(5)[np.arange(50) % 5] * 100.0
    np.testing.assert_allclose(metrics.inception_score(onehot, splits=1)[0], 5.0, rtol=1e-6)
    np.testing.assert_allclose(metrics.inception_score(np.zeros((20, 5)), splits=2)[0], 1.0, rtol=1e-12)


def test_streaming_stats_equal_numpy_on_concatenation():
    rng = np.random.default_rng(6)
    chunks = [rng.standard_normal((n, 6)).astype(np.float32) * 2 + 1000.0 for n in (1, 7, 30, 2, 64)]
    s = statistics.FeatureStats(6, keep=10, seed=0)
    for c in chunks:
        s.update(c)
    x = np.concatenate(chunks).astype(np.float64)
    assert s.n == len(x)
    np.testing.assert_allclose(s.mu, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(s.sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    kept = s.features
    assert kept.shape == (10, 6)
    rows = {tuple(r) for r in np.concatenate(chunks)}
    assert all(tuple(r) in rows for r in kept) and len({tuple(r) for r in kept}) == 10


def test_feature_subset_is_uniform():
    # Every row of 20 kept with probability keep/n = 5/20 over seeds.
    counts = np.zeros(20)
    for seed in range(400):
        s = statistics.FeatureStats(1, keep=5, seed=seed)
        for i in range(0, 20, 3):
            s.update(np.arange(i, min(i + 3, 20), dtype=np.float64)[:, None])
        counts[s.features[:, 0].astype(int)] += 1
    np.testing.assert_allclose(counts / 400, 0.25, atol=0.08)


def test_to_uint8_is_png_quantisation():
    x = np.array([-1.5, -1.0, -0.9961, 0.0, 0.00393, 0.5, 1.0, 2.0], np.float32)
    np.testing.assert_array_equal(statistics.to_uint8(x), [0, 0, 0, 128, 128, 191, 255, 255])
    # Round trip of every uint8 level through [-1, 1].
    v = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(statistics.to_uint8(v / 127.5 - 1.0), v)


def test_stats_files_round_trip_and_formats(tmp_path):
    rng = np.random.default_rng(8)
    mu, sigma, feats = rng.standard_normal(4), _random_cov(rng, 4), rng.standard_normal((9, 4))
    p = str(tmp_path / "ref.npz")
    statistics.save_stats(p, mu, sigma, features=feats, feature_space="space-a", num_images=9)
    r = statistics.load_stats(p, feature_space="space-a")
    np.testing.assert_array_equal(r["mu"], mu)
    np.testing.assert_array_equal(r["sigma"], sigma)
    np.testing.assert_allclose(r["features"], feats.astype(np.float32))
    assert (r["feature_space"], r["num_images"]) == ("space-a", 9)
    with pytest.raises(ValueError, match="space-a"):
        statistics.load_stats(p, feature_space="space-b")
    # pytorch-fid / clean-fid style: just mu and sigma.
    np.savez(tmp_path / "pf.npz", mu=mu, sigma=sigma)
    r = statistics.load_stats(str(tmp_path / "pf.npz"), feature_space="anything")
    assert r["features"] is None and r["feature_space"] == ""
    # EDM2's dataset-refs pickle: {num_images, fid: {mu, sigma}, fd_dinov2: {mu, sigma}}.
    with open(tmp_path / "edm.pkl", "wb") as f:
        pickle.dump({"num_images": 50000, "fid": {"mu": mu, "sigma": sigma}, "fd_dinov2": {"mu": mu[:2]}}, f)
    np.testing.assert_array_equal(statistics.load_stats(str(tmp_path / "edm.pkl"))["sigma"], sigma)
    # A pickle that would run code is refused, and the code does not run.
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"fid": {"mu": mu, "sigma": sigma}, "x": os.system}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        statistics.load_stats(str(tmp_path / "evil.pkl"))
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match="mu"):
        statistics.load_stats(str(tmp_path / "bad.npz"))
    assert not any(n.endswith(".tmp.npz") for n in os.listdir(tmp_path))


def test_accumulate_rebatches_with_padding():
    calls = []

    def fn(images):
        calls.append(images.shape)
        f = images.reshape(len(images), -1)[:, :3].astype(np.float64)
        return {"features": f, "logits": f}

    imgs = np.random.default_rng(9).integers(0, 256, (23, 2, 2, 1), dtype=np.uint8)
    stats, logits = statistics.accumulate(fn, [imgs[:5], imgs[5:6], imgs[6:]], batch_size=8, dim=3,
                                          keep_logits=True)
    assert set(calls) == {(8, 2, 2, 1)} and len(calls) == 3
    want = imgs.reshape(23, -1)[:, :3].astype(np.float64)
    np.testing.assert_array_equal(logits, want)
    np.testing.assert_allclose(stats.sigma, np.cov(want, rowvar=False), rtol=1e-12)
    with pytest.raises(TypeError, match="uint8"):
        statistics.accumulate(fn, [imgs.astype(np.float32)], batch_size=8, dim=3)

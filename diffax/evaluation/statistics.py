"""Feature statistics: streaming float64 mean/covariance, reference-stats files, uint8 quantisation.

A statistics file is an .npz with `mu` [D] and `sigma` [D, D], the format of
pytorch-fid, clean-fid and EDM reference files (Heusel et al. 2017), so theirs
load here and ours load there. diffax adds optional keys: `features` (a random
subset of the feature vectors, for KID), `num_images` and `feature_space` (which
extractor made them, checked on use so Inception and digits statistics never mix).
EDM2-style pickles ({'mu', 'sigma'} or {'fid': {...}}) are read too.
"""
from __future__ import annotations

import os
import pickle
from typing import Callable, Iterable, Iterator

import numpy as np

from diffax.visualize import to_uint8  # noqa: F401 (FID takes 8-bit images, as a saved PNG holds them)


class FeatureStats:
    """Streaming mean and covariance in float64, merged batch by batch (Chan et al. 1979).

    `update(features [B, D])` folds a batch in with the pairwise update
    M2 += M2_b + delta delta^T n n_b / (n + n_b), which is exact in float64 and,
    unlike sum(x x^T) - n mu mu^T, does not cancel when the mean is large.
    `sigma` is the unbiased covariance (np.cov's ddof=1), as pytorch-fid.
    With `keep > 0` it also keeps a uniform random subset of `keep` feature rows
    (priority sampling: each row gets a seeded uniform key, the smallest keys stay).
    """

    def __init__(self, dim: int, *, keep: int = 0, seed: int = 0):
        self.dim = int(dim)
        self.n = 0
        self._mean = np.zeros(self.dim, np.float64)
        self._m2 = np.zeros((self.dim, self.dim), np.float64)
        self.keep = int(keep)
        self._rng = np.random.default_rng(seed)
        self._keys = np.zeros((0,), np.float64)
        self._kept = np.zeros((0, self.dim), np.float32)

    def update(self, features: np.ndarray) -> None:
        x = np.asarray(features, np.float64).reshape(-1, self.dim)
        nb = len(x)
        if nb == 0:
            return
        mean_b = x.mean(axis=0)
        xc = x - mean_b
        m2_b = xc.T @ xc
        delta = mean_b - self._mean
        n = self.n + nb
        self._m2 += m2_b + np.outer(delta, delta) * (self.n * nb / n)
        self._mean += delta * (nb / n)
        self.n = n
        if self.keep:
            keys = np.concatenate([self._keys, self._rng.random(nb)])
            kept = np.concatenate([self._kept, x.astype(np.float32)])
            if len(keys) > self.keep:
                idx = np.argpartition(keys, self.keep)[: self.keep]
                keys, kept = keys[idx], kept[idx]
            self._keys, self._kept = keys, kept

    @property
    def mu(self) -> np.ndarray:
        return self._mean.copy()

    @property
    def sigma(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"covariance needs at least 2 feature vectors, got {self.n}")
        return self._m2 / (self.n - 1)

    @property
    def features(self) -> np.ndarray | None:
        """The kept random subset of rows (float32), or None when keep == 0."""
        return self._kept.copy() if self.keep else None


def save_stats(
    path: str,
    mu: np.ndarray,
    sigma: np.ndarray,
    *,
    features: np.ndarray | None = None,
    feature_space: str = "",
    num_images: int = 0,
) -> None:
    """Write a statistics .npz (keys mu, sigma [+ features, feature_space, num_images]) atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
    if features is not None:
        arrays["features"] = np.asarray(features, np.float32)
    if feature_space:
        arrays["feature_space"] = np.asarray(feature_space)
    if num_images:
        arrays["num_images"] = np.asarray(num_images, np.int64)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_stats(path: str, *, feature_space: str = "") -> dict[str, np.ndarray | str | int | None]:
    """Read a statistics file: .npz (pytorch-fid / clean-fid / EDM / diffax) or an EDM2-style .pkl.

    Returns {'mu', 'sigma', 'features' (or None), 'feature_space' ('' if unknown),
    'num_images' (0 if unknown)}. If both the file and `feature_space` name a
    feature space and they differ, that is an error.
    """
    if path.endswith((".pkl", ".pickle")):
        with open(path, "rb") as f:
            data = pickle.load(f)  # a local file the user named; pickles can run code
        if "mu" not in data and "fid" in data:
            data = data["fid"]
        data = {k: np.asarray(v) for k, v in data.items()}
    else:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    if "mu" not in data or "sigma" not in data:
        raise ValueError(f"{path}: a statistics file needs keys 'mu' and 'sigma', found {sorted(data)}")
    out = {
        "mu": np.asarray(data["mu"], np.float64),
        "sigma": np.asarray(data["sigma"], np.float64),
        "features": data.get("features"),
        "feature_space": str(data["feature_space"]) if "feature_space" in data else "",
        "num_images": int(data["num_images"]) if "num_images" in data else 0,
    }
    if feature_space and out["feature_space"] and out["feature_space"] != feature_space:
        raise ValueError(
            f"{path} holds statistics of {out['feature_space']!r} features, but {feature_space!r} "
            "features are being compared: point config.eval.reference_stats at a matching file or delete it."
        )
    return out


def rebatch(batches: Iterable[np.ndarray], batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """Re-cut a stream of arrays into fixed-size batches; the last one is padded by repeating its
    final row. Yields (batch, number of real rows), so a jitted extractor compiles once."""
    buf, size = [], 0
    for b in batches:
        b = np.asarray(b)
        while len(b):
            take = min(batch_size - size, len(b))
            buf.append(b[:take])
            size += take
            b = b[take:]
            if size == batch_size:
                yield np.concatenate(buf), batch_size
                buf, size = [], 0
    if size:
        x = np.concatenate(buf)
        pad = np.repeat(x[-1:], batch_size - size, axis=0)
        yield np.concatenate([x, pad]), size


def accumulate(
    feature_fn: Callable[[np.ndarray], dict[str, np.ndarray]],
    images: Iterable[np.ndarray],
    *,
    batch_size: int,
    dim: int,
    keep_features: int = 0,
    keep_logits: bool = False,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> tuple[FeatureStats, np.ndarray | None]:
    """Run `feature_fn` (uint8 NHWC -> {'features', 'logits'}) over a stream of uint8 image batches.

    Returns the FeatureStats of 'features' (keeping `keep_features` rows for KID)
    and, with `keep_logits`, all 'logits' rows in order (for the Inception Score).
    """
    stats = FeatureStats(dim, keep=keep_features, seed=seed)
    logits = []
    for batch, n in rebatch(images, batch_size):
        if batch.dtype != np.uint8:
            raise TypeError(f"feature extractors take uint8 images, got {batch.dtype}")
        out = feature_fn(batch)
        stats.update(np.asarray(out["features"])[:n])
        if keep_logits:
            logits.append(np.asarray(out["logits"])[:n])
        if progress is not None:
            progress(n)
    return stats, (np.concatenate(logits) if keep_logits and logits else None)

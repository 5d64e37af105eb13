"""Feature statistics: streaming float64 mean/covariance, reference-stats files, uint8 quantisation.

A statistics file is an .npz with `mu` [D] and `sigma` [D, D], the format of
pytorch-fid, clean-fid and EDM reference files (Heusel et al. 2017), so theirs
load here and ours load there. diffax adds keys: `feature_space` (the extractor,
e.g. "inception-2015-12-05/pool3") and `protocol` (how images were resized and
scaled for it, e.g. "tf"; see `protocols.py`), both checked on use by
`check_comparable`, plus optional `features` (a random subset of the feature
vectors, for KID) and `num_images`. EDM2-style pickles ({'mu', 'sigma'} or
{'fid': {...}}) are read too. Files from elsewhere record no protocol: they are
accepted only when the user states theirs (config.eval.reference_protocol).
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Callable, Iterable

import numpy as np

from diffax.visualize import to_uint8  # noqa: F401 (FID takes 8-bit images, as a saved PNG holds them)

_LEGACY_INCEPTION_SPACE = "fid_inception_v3_pool3"  # what diffax recorded before protocols (pytorch-fid's)
_INCEPTION_EXTRACTOR = "inception-2015-12-05/pool3"


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
        self._keys: list[np.ndarray] = []  # appended per batch, cut to `keep` rows when twice that
        self._kept: list[np.ndarray] = []

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
            self._keys.append(self._rng.random(nb))
            self._kept.append(x.astype(np.float32))
            if sum(len(k) for k in self._keys) >= 2 * self.keep:  # amortised: no copy of all rows per batch
                self._compact()

    def _compact(self) -> None:
        keys = np.concatenate(self._keys) if self._keys else np.zeros((0,))
        kept = np.concatenate(self._kept) if self._kept else np.zeros((0, self.dim), np.float32)
        if len(keys) > self.keep:
            idx = np.argpartition(keys, self.keep)[: self.keep]
            keys, kept = keys[idx], kept[idx]
        self._keys, self._kept = [keys], [kept]

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
        if not self.keep:
            return None
        self._compact()
        return self._kept[0].copy()


def save_stats(
    path: str,
    mu: np.ndarray,
    sigma: np.ndarray,
    *,
    features: np.ndarray | None = None,
    feature_space: str = "",
    protocol: str = "",
    num_images: int = 0,
) -> None:
    """Write a statistics .npz (keys mu, sigma [+ features, feature_space, protocol, num_images]) atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
    if features is not None:
        arrays["features"] = np.asarray(features, np.float32)
    if feature_space:
        arrays["feature_space"] = np.asarray(feature_space)
    if protocol:
        arrays["protocol"] = np.asarray(protocol)
    if num_images:
        arrays["num_images"] = np.asarray(num_images, np.int64)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


class _ArraysOnly(pickle.Unpickler):
    """Reads pickles of dicts of numpy arrays (EDM2's dataset-refs/*.pkl); refuses any other global, so no
    code from the file runs."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict")}

    def __init__(self, file: Any, path: str):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{self._path}: refusing to load {module}.{name}; a statistics pickle holds "
                                     "only dicts of numpy arrays (as EDM2's dataset-refs/*.pkl do).")


def load_stats(path: str, *, feature_space: str = "") -> dict[str, np.ndarray | str | int | None]:
    """Read a statistics file: .npz (pytorch-fid / clean-fid / EDM / diffax) or an EDM2-style .pkl.

    Returns {'mu', 'sigma', 'features' (or None), 'feature_space' ('' if unknown),
    'protocol' ('' if unknown), 'num_images' (0 if unknown)}. If both the file and
    `feature_space` name a feature space and they differ, that is an error.
    Files diffax wrote before it recorded protocols ('fid_inception_v3_pool3') were
    made with pytorch-fid's protocol and read as such.
    """
    if path.endswith((".pkl", ".pickle")):
        with open(path, "rb") as f:
            data = _ArraysOnly(f, path).load()
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
        "protocol": str(data["protocol"]) if "protocol" in data else "",
        "num_images": int(data["num_images"]) if "num_images" in data else 0,
    }
    if out["feature_space"] == _LEGACY_INCEPTION_SPACE and not out["protocol"]:
        out["feature_space"], out["protocol"] = _INCEPTION_EXTRACTOR, "pytorch_fid"
    if feature_space and out["feature_space"] and out["feature_space"] != feature_space:
        raise ValueError(
            f"{path} holds statistics of {out['feature_space']!r} features, but {feature_space!r} "
            "features are being compared: point config.eval.reference_stats at a matching file or delete it."
        )
    return out


def check_comparable(ref: dict, path: str, *, protocol: str, stated_protocol: str = "",
                     field: str = "config.eval.reference_protocol") -> None:
    """Refuse to compare features made with `protocol` against statistics `ref` (read from `path`) of another.

    A file that records its protocol must match `protocol` (and `stated_protocol`,
    if the user stated one). A file that records none (EDM's cifar10-32x32.npz,
    clean-fid's or pytorch-fid's statistics) is accepted only when the user states
    its protocol (`field`) and it matches. Each error names both protocols.
    """
    recorded = ref.get("protocol", "")
    if recorded and stated_protocol and recorded != stated_protocol:
        raise ValueError(f"{path} records protocol {recorded!r}, but {field}={stated_protocol!r}; "
                         "fix or clear the field.")
    known = recorded or stated_protocol
    if not known:
        raise ValueError(
            f"{path} does not record the FID protocol its statistics were made with (files from EDM, "
            f"StyleGAN, clean-fid and pytorch-fid do not). State it with --{field}=... (or in the config): "
            "'tf' for EDM / StyleGAN / TTUR files and clean-fid's legacy_tensorflow mode, 'pytorch_fid' for "
            "pytorch-fid's, 'clean' for clean-fid's clean mode."
        )
    if known != protocol:
        raise ValueError(
            f"{path} holds statistics made with the {known!r} protocol, but the features being compared are made "
            f"with {protocol!r} (config.eval.protocol): FID across protocols is meaningless. Set "
            f"config.eval.protocol={known!r}, or point config.eval.reference_stats at {protocol!r} statistics."
        )


class Accumulator:
    """Push uint8 image batches of any size through a feature extractor; keep only their statistics.

    `add(images)` runs every full `batch_size` batch at once and buffers the
    remainder (fewer than `batch_size` images), so the extractor always sees one
    shape and compiles once; `finish()` pads the remainder by repeating its last
    image, drops the padding's features, and returns (FeatureStats of 'features',
    all 'logits' rows in order or None). Host memory: one batch of images, the
    D x D statistics, and the kept features / logits (for KID / IS).
    """

    def __init__(self, feature_fn: Callable[[np.ndarray], dict[str, np.ndarray]], *, batch_size: int, dim: int,
                 keep_features: int = 0, keep_logits: bool = False, seed: int = 0,
                 progress: Callable[[int], None] | None = None):
        self.feature_fn, self.batch_size, self.progress = feature_fn, int(batch_size), progress
        self.stats = FeatureStats(dim, keep=keep_features, seed=seed)
        self.logits: list[np.ndarray] | None = [] if keep_logits else None
        self._buffer: np.ndarray | None = None

    def _run(self, batch: np.ndarray, n: int) -> None:
        out = self.feature_fn(batch)
        self.stats.update(np.asarray(out["features"])[:n])
        if self.logits is not None:
            self.logits.append(np.asarray(out["logits"])[:n])
        if self.progress is not None:
            self.progress(n)

    def add(self, images: np.ndarray) -> None:
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise TypeError(f"feature extractors take uint8 images, got {images.dtype}")
        if self._buffer is not None and len(self._buffer):
            images = np.concatenate([self._buffer, images])
        full = len(images) - len(images) % self.batch_size
        for lo in range(0, full, self.batch_size):
            self._run(images[lo:lo + self.batch_size], self.batch_size)
        self._buffer = images[full:].copy()

    def finish(self) -> tuple[FeatureStats, np.ndarray | None]:
        rest = self._buffer
        if rest is not None and len(rest):
            pad = np.repeat(rest[-1:], self.batch_size - len(rest), axis=0)
            self._run(np.concatenate([rest, pad]), len(rest))
        self._buffer = None
        logits = np.concatenate(self.logits) if self.logits else None
        return self.stats, logits


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
    The stream is consumed batch by batch (see `Accumulator`).
    """
    acc = Accumulator(feature_fn, batch_size=batch_size, dim=dim, keep_features=keep_features,
                      keep_logits=keep_logits, seed=seed, progress=progress)
    for batch in images:
        acc.add(batch)
    return acc.finish()

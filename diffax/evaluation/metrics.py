"""Sample-quality metrics on feature vectors: Frechet distance, KID, Inception Score.

All in float64 numpy on the host. The feature extractor (Inception pool3, or the
offline digits classifier) is the caller's choice, so the same functions give
FID and the digits-space "fd_digits".
"""
from __future__ import annotations

import numpy as np


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root by eigen-decomposition, negative eigenvalues (round-off) clipped."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^{1/2}) for PSD matrices, real and finite even when both are singular.

    Uses tr((S1 S2)^{1/2}) = tr((S1^{1/2} S2 S1^{1/2})^{1/2}): S1 S2 is similar to the
    symmetric PSD matrix S1^{1/2} S2 S1^{1/2}, so its eigenvalues are real and >= 0 and
    `eigvalsh` replaces scipy.linalg.sqrtm's Schur iteration (which can return complex
    values or NaN for rank-deficient covariances, hence pytorch-fid's eps fallback).
    """
    r = _psd_sqrt(np.asarray(sigma1, np.float64))
    m = r @ np.asarray(sigma2, np.float64) @ r
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(ev, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2})
    (Dowson & Landau 1982; FID of Heusel et al. 2017, Eq. 6, on Inception pool3
    features). Computed in float64 with `trace_sqrt_product`, so it stays real and
    finite when there are fewer samples than feature dimensions.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased squared MMD with the cubic kernel k(a, b) = (a.b / d + 1)^3.

    The U-statistic of Gretton et al. (2012, Lemma 6) with the kernel of
    Binkowski et al. (2018, KID): diagonal terms of k(X, X) and k(Y, Y) excluded.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    d, m, n = x.shape[1], x.shape[0], y.shape[0]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2.0 * kxy.mean()
    )


def kernel_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    *,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): (mean, std) of `polynomial_mmd2` over subsets.

    Each of `num_subsets` rounds draws min(subset_size, n1, n2) rows without
    replacement from each set (as clean-fid / torch-fidelity); seeded, so
    deterministic.
    """
    f1, f2 = np.asarray(features1), np.asarray(features2)
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(f1)} and {len(f2)}")
    rng = np.random.default_rng(seed)
    vals = np.array([
        polynomial_mmd2(f1[rng.choice(len(f1), m, replace=False)], f2[rng.choice(len(f2), m, replace=False)])
        for _ in range(num_subsets)
    ])
    return float(vals.mean()), float(vals.std())


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016), (mean, std) over splits.

    p(y|x) = softmax(logits) over the 1008 classes of the FID Inception graph; the
    samples are cut into `splits` consecutive parts (no shuffling) and p(y) is the
    mean over each part, as the original TF code does.
    """
    logits = np.asarray(logits)
    n = len(logits)
    if n < splits:
        raise ValueError(f"Inception Score with {splits} splits needs at least {splits} samples, got {n}")
    scores = []
    for k in range(splits):  # one split at a time in float64: 50,000 x 1008 logits need no float64 copy
        part = np.asarray(logits[k * n // splits:(k + 1) * n // splits], np.float64)
        logp = part - part.max(axis=1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
        p = np.exp(logp)
        log_py = np.log(p.mean(axis=0))
        scores.append(np.exp(np.mean(np.sum(p * (logp - log_py), axis=1))))
    return float(np.mean(scores)), float(np.std(scores))

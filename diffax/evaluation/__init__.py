"""Evaluation: the FID InceptionV3, feature statistics, FID / KID / IS and the eval job.

    inception.py        InceptionV3 in pytorch-fid's FID variant (Flax NNX, NHWC), torch-exact resize
    convert.py          `diffax convert-inception SRC.pth DST.npz` (PyTorch for this command only)
    statistics.py       streaming float64 mean / covariance, reference-stats files, uint8 quantisation
    metrics.py          Frechet distance, KID, Inception Score
    digits_features.py  the offline feature net for the digits default ("fd_digits", never FID)
    job.py              `diffax eval` (run_eval) and `diffax stats` (compute_reference_stats)

Submodules are imported on first use, so `convert` runs where only numpy and torch are installed.
"""
import importlib

_SUBMODULES = ("convert", "digits_features", "inception", "job", "metrics", "statistics")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"diffax.evaluation.{name}")
    raise AttributeError(f"module 'diffax.evaluation' has no attribute {name!r}")


__all__ = list(_SUBMODULES)

"""Evaluation: the FID InceptionV3, its protocols, FD-DINOv2, feature statistics, FID / KID / IS and the eval job.

    inception.py        InceptionV3 of the FID TF graph (Flax NNX, NHWC); weights lookup and fetch
    protocols.py        FID preprocessing: "tf" (TTUR / NVIDIA / EDM), "pytorch_fid", "clean" (clean-fid)
    dinov2.py           DINOv2 ViT for FD-DINOv2, read from a transformers Dinov2Model folder
    convert.py          `diffax convert-inception SRC DST.npz` (NVIDIA's .pt or pytorch-fid's .pth)
    torch_archive.py    PyTorch .pth / TorchScript .pt files read with the standard library and numpy
    download.py         fetch a file once with a sha256 check
    statistics.py       streaming float64 mean / covariance, reference-stats files (extractor + protocol)
    metrics.py          Frechet distance, KID, Inception Score
    digits_features.py  the offline feature net for the digits default ("fd_digits", never FID)
    job.py              `diffax eval` (run_eval) and `diffax stats` (compute_reference_stats)

Submodules are imported on first use, so `convert` runs where only numpy is installed.
"""
import importlib

_SUBMODULES = ("convert", "digits_features", "dinov2", "download", "inception", "job", "metrics", "protocols",
               "statistics", "torch_archive")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"diffax.evaluation.{name}")
    raise AttributeError(f"module 'diffax.evaluation' has no attribute {name!r}")


__all__ = list(_SUBMODULES)

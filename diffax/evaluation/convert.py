"""`diffax convert-inception SRC DST`: pytorch-fid's Inception weights -> diffax's .npz.

SRC is pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (Seitzer 2020; the TF
FID graph of Heusel et al. 2017 ported to PyTorch). DST is a flat .npz of float32
numpy arrays keyed by the NNX variable path of `inception.InceptionV3`
(`Mixed_5b/branch1x1/conv/kernel`, ...), readable without PyTorch.

Only reading the .pth needs PyTorch, imported lazily here; this module imports
no JAX either, so it runs in a torch-only environment.
"""
from __future__ import annotations

import hashlib
import os
import re

import numpy as np

FORMAT = "diffax-fid-inception-v1"
_SUFFIX = {
    "conv.weight": ("conv", "kernel"),
    "bn.weight": ("bn", "scale"),
    "bn.bias": ("bn", "bias"),
    "bn.running_mean": ("bn", "mean"),
    "bn.running_var": ("bn", "var"),
}


def convert_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map pytorch-fid's state dict (numpy arrays) to diffax's flat NNX layout.

    Conv kernels go from torch's [out, in, kh, kw] to [kh, kw, in, out], the dense
    kernel from [out, in] to [in, out]; batch-norm weight/bias/running_mean/running_var
    become scale/bias/mean/var; `num_batches_tracked` is dropped (eval mode only).
    An unknown name (e.g. torchvision's AuxLogits) is an error.
    """
    out = {}
    for name, value in state_dict.items():
        arr = np.asarray(value)
        if name.endswith("num_batches_tracked"):
            continue
        if name == "fc.weight":
            out["fc/kernel"] = arr.T
            continue
        if name == "fc.bias":
            out["fc/bias"] = arr
            continue
        parts = name.split(".")
        suffix = ".".join(parts[-2:])
        if suffix not in _SUFFIX or len(parts) < 3:
            raise ValueError(
                f"Unexpected entry {name!r} in the Inception state dict (is this pytorch-fid's FID model?)"
            )
        if suffix == "conv.weight":
            arr = arr.transpose(2, 3, 1, 0)
        out["/".join(parts[:-2] + list(_SUFFIX[suffix]))] = arr
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def read_pth(path: str) -> dict[str, np.ndarray]:
    """Load a PyTorch state dict (.pth) as numpy arrays; needs PyTorch (imported here only)."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "`diffax convert-inception` reads a PyTorch .pth file and needs PyTorch for this one "
            "command: `pip install torch` (the CPU wheel is enough), then run it again."
        ) from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def sha256(path: str) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_inception(src: str, dst: str) -> dict[str, np.ndarray]:
    """Convert pytorch-fid's .pth at `src` into diffax's .npz at `dst`; returns the arrays.

    If the file name carries torch hub's hash prefix (`...-6726825d.pth`), the
    file's sha256 must start with it, so a truncated download is caught here.
    The source's sha256 is stored in the output (`__source_sha256__`).
    """
    digest = sha256(src)
    m = re.search(r"-([0-9a-f]{8,64})\.pth$", os.path.basename(src))
    if m and not digest.startswith(m.group(1)):
        raise ValueError(
            f"{src}: sha256 {digest[:16]}... does not start with {m.group(1)} from its name; "
            "the file is corrupt or incomplete, download it again."
        )
    weights = convert_state_dict(read_pth(src))
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = dst + ".tmp.npz"
    np.savez(tmp, __format__=np.asarray(FORMAT), __source_sha256__=np.asarray(digest), **weights)
    os.replace(tmp, dst)
    return weights


def main(argv: list[str]) -> None:
    """CLI entry: `diffax convert-inception SRC DST`."""
    if len(argv) != 2:
        raise SystemExit("usage: diffax convert-inception SRC.pth DST.npz")
    weights = convert_inception(argv[0], argv[1])
    n = sum(int(v.size) for v in weights.values())
    print(f"wrote {argv[1]}: {len(weights)} arrays, {n:,} values")

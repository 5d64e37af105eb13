"""LPIPS, the learned perceptual distance of Zhang et al. 2018 ("The Unreasonable Effectiveness of Deep
Features as a Perceptual Metric"), version 0.1 with the VGG16 trunk: the `lpips` package's
`LPIPS(net="vgg")`, the perceptual loss of taming-transformers and latent-diffusion (Rombach et al. 2022).

    d(x, y) = sum_l mean_{h,w} sum_c w_lc (f_l(x) / (||f_l(x)|| + eps) - f_l(y) / (||f_l(y)|| + eps))^2_{hwc}

x, y in [-1, 1] are first shifted and scaled per RGB channel (lpips' ScalingLayer), f_l are
VGG16's activations (Simonyan & Zisserman 2015) at relu1_2, relu2_2, relu3_3, relu4_3 and
relu5_3, normalised to unit length over channels (eps 1e-10, added to the norm), and w_l the
non-negative weights of the 1x1 "lin" layers (no bias) fitted to human judgements. A
single-channel image is compared as the grey RGB image (its channel repeated).

Weights are read, without PyTorch, from the files a user gives: torchvision's VGG16 state dict
(vgg16-397923af.pth; keys `features.N.weight` / `features.N.bias`, only the convolutions are
used) and lpips' v0.1 vgg.pth (keys `linK.model.1.weight`, K = 0..4), or safetensors files with
the same keys. The channel widths are read from the files, so narrower test networks load too.
Nothing downloads.
"""
from __future__ import annotations

import os
import pickle
import struct
import zipfile
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffax.errors import UserError

# torchvision's vgg16().features: 13 3x3 convs (each followed by a ReLU) in 5 blocks, a 2x2 max pool
# between blocks; LPIPS reads the ReLU after each block's last conv.
BLOCKS = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
SHIFT = (-0.030, -0.088, -0.188)  # lpips' ScalingLayer
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10
MIN_SIZE = 16  # relu5_3 is after 4 halvings: smaller images have no pixels left there


class LPIPS(nnx.Module):
    """LPIPS v0.1 on VGG16 from explicit weights: `convs` = 13 (kernel [3, 3, in, out], bias [out]) in
    torchvision's order, `lins` = 5 non-negative weight vectors, one per tapped layer.

    `__call__(x, y)` takes NHWC images in [-1, 1] with 1 or 3 channels and returns one distance per example.
    """

    def __init__(self, convs: Sequence[tuple[np.ndarray, np.ndarray]], lins: Sequence[np.ndarray]):
        if len(convs) != sum(len(b) for b in BLOCKS) or len(lins) != len(BLOCKS):
            raise ValueError(f"LPIPS needs 13 VGG16 convs and 5 lin layers, got {len(convs)} and {len(lins)}")
        self.kernels = nnx.List([nnx.Param(jnp.asarray(k, jnp.float32)) for k, _ in convs])
        self.biases = nnx.List([nnx.Param(jnp.asarray(b, jnp.float32)) for _, b in convs])
        self.lins = nnx.List([nnx.Param(jnp.asarray(w, jnp.float32)) for w in lins])

    def features(self, x: jax.Array) -> list[jax.Array]:
        """VGG16's relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of scaled RGB images (NHWC)."""
        taps, h, n = [], x, 0
        for b, block in enumerate(BLOCKS):
            if b:  # 2x2 max pool, stride 2, odd edges dropped (PyTorch's MaxPool2d(2, 2))
                h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
            for _ in block:
                h = jax.lax.conv_general_dilated(h, self.kernels[n][...], (1, 1), ((1, 1), (1, 1)),
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
                h = jax.nn.relu(h + self.biases[n][...])
                n += 1
            taps.append(h)
        return taps

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"LPIPS compares two NHWC batches of 1 or 3 channels, got {x.shape} and {y.shape}")
        if min(x.shape[1:3]) < MIN_SIZE:
            raise ValueError(f"LPIPS needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels (VGG16 halves them "
                             f"4 times before relu5_3), got {x.shape[1]}x{x.shape[2]}")
        # x and y go through the network separately (as in lpips), so d(x, x) is exactly 0: in one
        # concatenated batch XLA may round the two halves differently.
        fx, fy = (self.features(self.scale(v)) for v in (x, y))
        total = jnp.zeros((x.shape[0],), jnp.float32)
        for a, b, w in zip(fx, fy, self.lins):
            diff = jnp.square(unit_normalise(a) - unit_normalise(b))
            total = total + jnp.mean(diff @ w[...], axis=(1, 2))
        return total

    @staticmethod
    def scale(x: jax.Array) -> jax.Array:
        """Images in [-1, 1] (grey repeated to RGB) shifted and scaled per channel (lpips' ScalingLayer)."""
        x = jnp.broadcast_to(x.astype(jnp.float32), x.shape[:3] + (3,))
        return (x - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)


def unit_normalise(f: jax.Array) -> jax.Array:
    """f / (||f|| + eps) over channels (lpips' normalize_tensor)."""
    return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + EPS)


def read_weights(path: str, what: str) -> dict[str, np.ndarray]:
    """{name: array} of a PyTorch .pth state dict or a .safetensors file; `what` names the file in errors."""
    if not path or not os.path.isfile(path):
        raise UserError(f"{what}: no such file {path!r}.")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return load_file(path)
    from diffax.evaluation import torch_archive

    try:
        return torch_archive.read_tensors(path)
    except (ValueError, KeyError, EOFError, pickle.UnpicklingError, struct.error, zipfile.BadZipFile) as error:
        # a truncated download, an HTML page saved as .pth, a file of another kind
        raise UserError(f"{what}: {path} is not a readable PyTorch state dict ({error}).") from error


def convs_from_state_dict(tensors: dict[str, np.ndarray], where: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The 13 convs of a torchvision VGG16 state dict as (kernel HWIO, bias), widths checked to chain."""
    convs, width = [], 3
    for index in (i for block in BLOCKS for i in block):
        names = (f"features.{index}.weight", f"features.{index}.bias")
        missing = [k for k in names if k not in tensors]
        if missing:
            raise UserError(f"{where} has no {missing[0]!r}: expected torchvision's VGG16 state dict "
                            "(vgg16-397923af.pth, keys features.N.weight / features.N.bias).")
        kernel, bias = (np.asarray(tensors[k], np.float32) for k in names)
        if kernel.ndim != 4 or kernel.shape[1:] != (width, 3, 3) or bias.shape != kernel.shape[:1]:
            raise UserError(f"{where}: {names[0]} has shape {kernel.shape} (bias {bias.shape}); a VGG16 conv "
                            f"here takes {width} channels with a 3x3 kernel.")
        convs.append((kernel.transpose(2, 3, 1, 0), bias))  # OIHW -> HWIO
        width = kernel.shape[0]
    return convs


def lins_from_state_dict(tensors: dict[str, np.ndarray], widths: Sequence[int], where: str) -> list[np.ndarray]:
    """lpips' 1x1 lin layers (`linK.model.1.weight`, [1, C, 1, 1]) as C-vectors, checked against the VGG's widths."""
    lins = []
    for k, width in enumerate(widths):
        name = f"lin{k}.model.1.weight"
        if name not in tensors:
            raise UserError(f"{where} has no {name!r}: expected lpips' v0.1 vgg.pth (keys linK.model.1.weight).")
        w = np.asarray(tensors[name], np.float32)
        if w.shape != (1, width, 1, 1):
            raise UserError(f"{where}: {name} has shape {w.shape}, but the VGG16 weights give {width} channels "
                            f"at that layer (expected (1, {width}, 1, 1)).")
        lins.append(w.reshape(width))
    return lins


def load_lpips(vgg_path: str, lin_path: str, *, vgg_what: str = "VGG16 weights",
               lin_what: str = "LPIPS lin weights") -> LPIPS:
    """LPIPS from torchvision's VGG16 state dict and lpips' vgg.pth (.pth or .safetensors), read without PyTorch."""
    convs = convs_from_state_dict(read_weights(vgg_path, vgg_what), f"{vgg_what} ({vgg_path})")
    ends = np.cumsum([len(b) for b in BLOCKS]) - 1
    widths = [convs[e][0].shape[-1] for e in ends]
    lins = lins_from_state_dict(read_weights(lin_path, lin_what), widths, f"{lin_what} ({lin_path})")
    return LPIPS(convs, lins)

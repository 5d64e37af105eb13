"""FID preprocessing protocols: how uint8 images become the Inception's 299x299 input.

The Inception network is the same in every FID implementation (the TF graph
`inception-2015-12-05` of Heusel et al. 2017); what differs is the resize to
299x299 and the scaling to [-1, 1], and those alone move FID by a few percent
(Parmar et al. 2022, "On Aliased Resizing and Surprising Subtleties in GAN
Evaluation"). So a statistics file is only comparable with features made by the
same protocol, and diffax records it (see `statistics.py`).

    tf           The TTUR graph (Heusel et al. 2017) and NVIDIA's TorchScript port used by
                 StyleGAN2-ADA, StyleGAN3, EDM and EDM2 (clean-fid's "legacy_tensorflow"):
                 TF1 `resize_bilinear(align_corners=False)`, whose source pixel is
                 dst * in / out with the upper neighbour clamped at the border, on [0, 255];
                 then (x - 128) / 128. What nearly every published diffusion FID uses.
    pytorch_fid  pytorch-fid (Seitzer 2020): x / 255, torch's bilinear resize with source
                 pixel (dst + 0.5) * in / out - 0.5, then 2 x - 1.
    clean        clean-fid (Parmar et al. 2022): PIL's bicubic resize with antialiasing on
                 float32 [0, 255] images, clipped to [0, 255]; then (x - 128) / 128.

Each resize is separable: a fixed [out, in] matrix per axis, applied with two
einsums at HIGHEST precision, so the whole preprocessing jits into the feature step.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

PROTOCOLS = ("tf", "pytorch_fid", "clean")
DEFAULT = "tf"
_HIGHEST = jax.lax.Precision.HIGHEST


def check_protocol(protocol: str, field: str = "config.eval.protocol") -> str:
    """`protocol` if it is one of PROTOCOLS, else a ValueError naming `field` and the valid names."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"{field}={protocol!r} is not an FID protocol; valid: {', '.join(PROTOCOLS)}.")
    return protocol


# ----------------------------------------------------------------------------- resize matrices
def _matrix(lo: np.ndarray, weights: np.ndarray, in_size: int) -> np.ndarray:
    out = np.zeros((len(lo), in_size), np.float64)
    for j in range(weights.shape[1]):
        np.add.at(out, (np.arange(len(lo)), np.clip(lo + j, 0, in_size - 1)), weights[:, j])
    return out


@functools.lru_cache(maxsize=64)
def tf_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] matrix of TF1's `resize_bilinear(align_corners=False, half_pixel_centers=False)`.

    src = dst * in / out; lower neighbour floor(src), upper min(floor(src) + 1, in - 1)
    (tensorflow/core/kernels/image/resize_bilinear_op.cc, legacy scaler); no
    antialiasing. NVIDIA's port reaches the same sampling points through
    affine_grid + grid_sample(padding_mode='border').
    """
    src = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
    lo = np.floor(src).astype(np.int64)
    frac = src - lo
    mat = _matrix(lo, np.stack([1.0 - frac, frac], axis=1), in_size)
    return mat.astype(np.float32)


@functools.lru_cache(maxsize=64)
def torch_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] matrix of torch's `F.interpolate(mode='bilinear', align_corners=False)`.

    Source coordinate src = (dst + 0.5) * in / out - 0.5, clamped below at 0; the
    lower neighbour is floor(src), the upper min(floor(src) + 1, in - 1); no
    antialiasing when downsampling (aten/src/ATen/native/UpSample.h). torch computes
    src in float32 with a fused multiply-add (one rounding); at src ~ 300 a float32
    ulp is 3e-5, so the rounding shows: we round the exact value once, as FMA does.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float64)
    src = (np.float64(scale) * (dst + 0.5) - 0.5).astype(np.float32)  # exact in float64, one rounding
    src = np.maximum(src, np.float32(0.0))
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    w_hi = (src - lo).astype(np.float32)
    w_lo = np.float32(1.0) - w_hi
    mat = np.zeros((out_size, in_size), np.float32)
    np.add.at(mat, (np.arange(out_size), lo), w_lo)
    np.add.at(mat, (np.arange(out_size), np.minimum(lo + 1, in_size - 1)), w_hi)
    return mat


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel (Keys 1981) with a = -0.5, PIL's and torch's antialiased bicubic."""
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


@functools.lru_cache(maxsize=64)
def antialiased_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] matrix of PIL's bicubic `Image.resize` (and torch's bicubic with antialias=True).

    For output pixel i the kernel is centred at (i + 0.5) * in / out and, when
    downsampling, widened by in / out (support 2 * in / out), so every input pixel
    contributes (the antialiasing clean-fid is about); the taps run over
    [int(centre - support + 0.5), int(centre + support + 0.5)) clipped to the image,
    and are normalised to sum to 1 (Pillow src/libImaging/Resample.c, precompute_coeffs).
    """
    scale = in_size / out_size
    fscale = max(scale, 1.0)
    support = 2.0 * fscale
    centre = (np.arange(out_size) + 0.5) * scale
    lo = np.maximum((centre - support + 0.5).astype(np.int64), 0)
    hi = np.minimum((centre + support + 0.5).astype(np.int64), in_size)
    taps = int((hi - lo).max())
    j = np.arange(taps)[None, :]
    w = _cubic((lo[:, None] + j - centre[:, None] + 0.5) / fscale)
    w = np.where(lo[:, None] + j < hi[:, None], w, 0.0)
    w = w / w.sum(axis=1, keepdims=True)
    return _matrix(lo, w, in_size).astype(np.float32)


_MATRICES = {"tf": tf_bilinear_matrix, "pytorch_fid": torch_bilinear_matrix, "clean": antialiased_bicubic_matrix}


def resize(x: jax.Array, size: tuple[int, int], kind: str) -> jax.Array:
    """Resize float NHWC images with the separable matrices of `kind` ('tf', 'pytorch_fid', 'clean').

    Rows first, then columns (PIL resamples columns first; the two orders agree to
    float32 rounding). Same size in and out is the identity, as in every reference.
    """
    h, w = x.shape[1], x.shape[2]
    if (h, w) == tuple(size):
        return x
    mh = jnp.asarray(_MATRICES[kind](h, size[0]))
    mw = jnp.asarray(_MATRICES[kind](w, size[1]))
    x = jnp.einsum("oh,nhwc->nowc", mh, x, precision=_HIGHEST)
    return jnp.einsum("pw,nowc->nopc", mw, x, precision=_HIGHEST)


def preprocess(images: jax.Array, protocol: str = DEFAULT, size: int = 299) -> jax.Array:
    """uint8 NHWC images (1 or 3 channels, any size) -> float32 Inception input at size x size x 3.

    `protocol` is one of PROTOCOLS (module docstring). Grayscale images are
    repeated to RGB as PIL's `convert('RGB')` does.
    """
    check_protocol(protocol, "protocol")
    x = jnp.asarray(images)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if x.shape[-1] != 3:
        raise ValueError(f"Inception needs 1 or 3 channels, got images of shape {x.shape}")
    x = x.astype(jnp.float32)
    if protocol == "pytorch_fid":
        return 2.0 * resize(x / 255.0, (size, size), "pytorch_fid") - 1.0
    x = resize(x, (size, size), protocol)
    if protocol == "clean":
        x = jnp.clip(x, 0.0, 255.0)
    return (x - 128.0) / 128.0

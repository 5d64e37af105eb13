"""Embeddings of the noise level c_noise and of 2-D positions.

The network only ever sees c_noise as a float (see diffax/parameterization.py):
1000 t in continuous time, the step index for a discrete schedule, or EDM's
log(sigma) / 4. These functions embed that float; they hold no parameters.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array


def timestep_embedding(
    c_noise: Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    freq_shift: float = 1.0,
    max_period: float = 10000.0,
) -> Array:
    """Sinusoidal embedding of a scalar per example (Vaswani et al. 2017, sec. 3.5; Ho et al. 2020, App. B).

    Frequencies are max_period ** (-i / (dim / 2 - freq_shift)) for i < dim / 2 and the
    result is [sin, cos] ([cos, sin] when flip_sin_to_cos). freq_shift = 1 with sin first is
    the DDPM / diffusers-DDPM embedding; freq_shift = 0 with cos first is ADM's and DiT's.
    These two knobs are exactly diffusers' `Timesteps(flip_sin_to_cos, downscale_freq_shift)`.
    c_noise: [B] float; returns float32 [B, dim] (zero-padded when dim is odd).
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(c_noise, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
    emb = jnp.concatenate(emb, axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def fourier_embedding(
    c_noise: Array, dim: int, *, scale: float = 16.0, flip_sin_to_cos: bool = False, seed: int = 0
) -> Array:
    """Gaussian random Fourier features of a scalar (Tancik et al. 2020; Song et al. 2021, NCSN++).

    [sin(2 pi c W), cos(2 pi c W)] with W ~ N(0, scale^2) of size dim / 2, fixed (drawn from a
    constant seed, so it needs no state and is identical across runs and checkpoints). Suits a
    continuous c_noise such as EDM's log(sigma) / 4. Returns float32 [B, dim].
    """
    w = jax.random.normal(jax.random.PRNGKey(seed), (dim // 2,), jnp.float32) * scale
    args = 2 * jnp.pi * jnp.asarray(c_noise, jnp.float32)[:, None] * w[None, :]
    emb = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
    emb = jnp.concatenate(emb, axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class NoiseEmbedding(nnx.Module):
    """c_noise [B] -> float32 [B, dim] by `config.model.embedding` (sinusoidal | fourier).

    No parameters: the learned part (the MLP after it) lives in each network.
    """

    def __init__(
        self,
        kind: str,
        dim: int,
        *,
        flip_sin_to_cos: bool = False,
        freq_shift: float = 1.0,
        fourier_scale: float = 16.0,
    ):
        if kind not in ("sinusoidal", "fourier"):
            raise ValueError(
                f"Unknown embedding {kind!r} in config.model.embedding. Valid names: fourier, sinusoidal."
            )
        self.kind = kind
        self.dim = dim
        self.flip_sin_to_cos = bool(flip_sin_to_cos)
        self.freq_shift = float(freq_shift)
        self.fourier_scale = float(fourier_scale)

    def __call__(self, c_noise: Array) -> Array:
        if self.kind == "fourier":
            return fourier_embedding(
                c_noise, self.dim, scale=self.fourier_scale, flip_sin_to_cos=self.flip_sin_to_cos
            )
        return timestep_embedding(
            c_noise, self.dim, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift
        )


@functools.lru_cache(maxsize=16)
def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, scale: float = 1.0) -> np.ndarray:
    """Fixed 2-D sine-cosine position embedding, [grid_h * grid_w, dim] (Peebles & Xie 2023; MAE, He et al. 2022).

    Half the channels embed the column index and half the row index, each as
    [sin(pos * omega), cos(pos * omega)] with omega_i = 10000^(-i / (dim / 4)): the
    `get_2d_sincos_pos_embed` of the DiT / MAE reference code, token order row-major. Positions
    are the indices times `scale` (SD3's grids: base size / grid size, diffax/models/mmdit.py).
    """
    if dim % 4:
        raise ValueError(f"the 2-D position embedding needs a width divisible by 4, got {dim}")

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64) * scale, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    emb = np.concatenate([one_d(dim // 2, cols), one_d(dim // 2, rows)], axis=1)
    return emb.astype(np.float32)

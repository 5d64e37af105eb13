"""A small MLP denoiser for low-dimensional (2-D toy) data."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diffax.models import layers as nn_layers
from diffax.models.embeddings import NoiseEmbedding
from diffax.models.unet import add_label_embedding

Array = jax.Array


class MLP(nnx.Module):
    """MLP denoiser: model(x [B, D], c_noise [B], labels, *, dropout_key) -> [B, D] ([B, 2D] with learn_sigma).

    h = Linear(x); layers x h = h + Linear(silu(Linear(h) + Linear(emb))) (residual, with the
    noise-level embedding of Ho et al. 2020 injected in every layer); out = zero-initialised
    Linear(silu(h)). Width `hidden`, depth `layers`.
    """

    def __init__(
        self,
        *,
        data_shape: tuple[int, ...],  # (D,) of the data points
        num_classes: int = 0,  # 0: unconditional; else a class table of num_classes + 1 rows (the last: null label)
        hidden: int = 256,  # width of every layer
        layers: int = 4,  # residual layers
        dropout: float = 0.0,  # dropout rate inside the residual layers
        learn_sigma: bool = False,  # also output the variance interpolation (2D outputs)
        embedding: str = "sinusoidal",  # noise-level embedding: sinusoidal | fourier
        flip_sin_to_cos: bool = False,  # sinusoidal order: False [sin, cos], True [cos, sin]
        freq_shift: float = 1.0,  # frequencies 10000^(-i / (dim/2 - freq_shift))
        fourier_scale: float = 16.0,  # std of the Gaussian Fourier features (embedding = fourier)
        dtype: str = "float32",  # activations
        param_dtype: str = "float32",  # parameters
        rngs: nnx.Rngs,
    ):
        if len(data_shape) != 1:
            raise ValueError(f"the mlp needs flat data (D,), got data_shape={data_shape}")
        (dim,) = data_shape
        hidden, depth = int(hidden), int(layers)
        dtype = nn_layers.dtype_of(dtype)
        kw = dict(dtype=dtype, param_dtype=nn_layers.dtype_of(param_dtype), rngs=rngs)
        self.embed = NoiseEmbedding(embedding, hidden, flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift,
                                    fourier_scale=fourier_scale)
        self.time_mlp1 = nn_layers.linear(hidden, hidden, **kw)
        self.time_mlp2 = nn_layers.linear(hidden, hidden, **kw)
        self.num_classes = int(num_classes)
        self.label_embed = (
            nnx.Embed(num_classes + 1, hidden, param_dtype=kw["param_dtype"], rngs=rngs) if num_classes > 0 else None
        )
        self.inp = nn_layers.linear(dim, hidden, **kw)
        self.hid = nnx.List([nn_layers.linear(hidden, hidden, **kw) for _ in range(depth)])
        self.temb = nnx.List([nn_layers.linear(hidden, hidden, **kw) for _ in range(depth)])
        self.mix = nnx.List([nn_layers.linear(hidden, hidden, **kw) for _ in range(depth)])
        self.out = nn_layers.linear(hidden, dim * (2 if learn_sigma else 1), init=nn_layers.zeros, **kw)
        self.dropout = float(dropout)
        self.dtype = dtype

    def __call__(
        self, x: Array, c_noise: Array, labels: Array | None = None, *, dropout_key: Array | None = None
    ) -> Array:
        b = x.shape[0]
        c_noise = jnp.broadcast_to(jnp.asarray(c_noise, jnp.float32), (b,))
        emb = self.time_mlp2(jax.nn.silu(self.time_mlp1(self.embed(c_noise).astype(self.dtype))))
        emb = jax.nn.silu(add_label_embedding(emb, self.label_embed, self.num_classes, labels, b))
        h = self.inp(x.astype(self.dtype))
        for i, (lin, tproj, mix) in enumerate(zip(self.hid, self.temb, self.mix)):
            z = jax.nn.silu(lin(h) + tproj(emb))
            h = h + mix(nn_layers.dropout(z, self.dropout, nn_layers.fold_key(dropout_key, i)))
        return self.out(jax.nn.silu(h))

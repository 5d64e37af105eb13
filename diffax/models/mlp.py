"""A small MLP denoiser for low-dimensional (2-D toy) data."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diffax.models import layers
from diffax.models.embeddings import NoiseEmbedding
from diffax.models.unet import add_label_embedding

Array = jax.Array


class MLP(nnx.Module):
    """MLP denoiser: model(x [B, D], c_noise [B], labels, *, dropout_key) -> [B, D] ([B, 2D] with learn_sigma).

    h = Linear(x); layers x h = h + Linear(silu(Linear(h) + Linear(emb))) (residual, with the
    noise-level embedding of Ho et al. 2020 injected in every layer); out = zero-initialised
    Linear(silu(h)). Widths: config.model.hidden, depth: config.model.layers.
    """

    def __init__(self, cfg, *, data_shape: tuple[int, ...], num_classes: int, rngs: nnx.Rngs):
        if len(data_shape) != 1:
            raise ValueError(f"the mlp needs flat data (D,), got data_shape={data_shape}")
        (dim,) = data_shape
        hidden = int(cfg.hidden)
        dtype = layers.dtype_of(cfg.dtype)
        kw = dict(dtype=dtype, param_dtype=layers.dtype_of(cfg.param_dtype), rngs=rngs)
        self.embed = NoiseEmbedding.from_config(cfg, hidden)
        self.time_mlp1 = layers.linear(hidden, hidden, **kw)
        self.time_mlp2 = layers.linear(hidden, hidden, **kw)
        self.num_classes = int(num_classes)
        self.label_embed = (
            nnx.Embed(num_classes + 1, hidden, param_dtype=kw["param_dtype"], rngs=rngs) if num_classes > 0 else None
        )
        self.inp = layers.linear(dim, hidden, **kw)
        n = int(cfg.layers)
        self.hid = nnx.List([layers.linear(hidden, hidden, **kw) for _ in range(n)])
        self.temb = nnx.List([layers.linear(hidden, hidden, **kw) for _ in range(n)])
        self.mix = nnx.List([layers.linear(hidden, hidden, **kw) for _ in range(n)])
        self.out = layers.linear(hidden, dim * (2 if cfg.learn_sigma else 1), init=layers.zeros, **kw)
        self.dropout = float(cfg.dropout)
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
            h = h + mix(layers.dropout(z, self.dropout, layers.fold_key(dropout_key, i)))
        return self.out(jax.nn.silu(h))

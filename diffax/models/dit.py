"""Diffusion Transformer, DiT (Peebles & Xie 2023).

Patchify -> + fixed 2-D sin-cos position embedding -> depth x DiT block with adaLN-Zero
conditioning on (noise-level + class) embedding -> adaLN final layer -> unpatchify.
Presets (Table 1 of the paper; parameters at 256x256 images, i.e. 32x32x4 latents, 1000
classes, learned sigma): S 33M, B 130M, L 458M, XL 675M; patch size 2, 4 or 8, e.g.
config.model.preset = "XL/2".

Text models (context_dim > 0): the text states are projected to the token width once
(SD3's context_embedder) and every block cross-attends to them after its self-attention
(PixArt-alpha, Chen et al. 2023); with pooled_dim > 0 the pooled text vector goes through a
two-layer MLP into the conditioning vector (SD3, Esser et al. 2024, sec. 4; SDXL).

The blocks' weights are stacked on a leading depth axis (`blocks.qkv.kernel` is
[depth, hidden, 3 hidden]) and the blocks run under one `lax.scan`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diffax.models import layers
from diffax.models.embeddings import NoiseEmbedding, sincos_pos_embed_2d
from diffax.models.unet import PooledEmbedding, add_label_embedding, add_pooled_embedding, check_context, heads_for

Array = jax.Array

# name -> (depth, hidden_size, num_heads), Peebles & Xie (2023), Table 1.
PRESETS = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
FREQUENCY_DIM = 256  # width of the sinusoidal noise-level embedding before the MLP (DiT's TimestepEmbedder)

normal_002 = nnx.initializers.normal(0.02)


def parse_preset(preset: str) -> tuple[int, int, int, int]:
    """'XL/2' -> (depth, hidden_size, num_heads, patch_size)."""
    try:
        name, patch = preset.split("/")
        depth, hidden, heads = PRESETS[name]
        patch = int(patch)
    except (ValueError, KeyError):
        raise ValueError(
            f"Unknown DiT preset {preset!r} in config.model.preset. Valid: "
            f"{', '.join(f'{n}/{p}' for n in PRESETS for p in (2, 4, 8))}."
        ) from None
    return depth, hidden, heads, patch


def modulate(x: Array, shift: Array, scale: Array) -> Array:
    """adaLN modulation x * (1 + scale) + shift, per example (Peebles & Xie 2023, sec. 3.2)."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def patchify(x: Array, p: int) -> Array:
    """[B, H, W, C] -> [B, (H / p) (W / p), p p C]: non-overlapping p x p patches as tokens, row-major."""
    b, height, width, c = x.shape
    gh, gw = height // p, width // p
    return x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * c)


def unpatchify(tokens: Array, p: int, height: int, width: int) -> Array:
    """The inverse of `patchify`: [B, (H / p) (W / p), p p C] -> [B, H, W, C]."""
    b, c = tokens.shape[0], tokens.shape[-1] // (p * p)
    out = tokens.reshape(b, height // p, width // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return out.reshape(b, height, width, c)


class DiTBlock(nnx.Module):
    """Transformer block with adaLN-Zero: the modulation (shift, scale, gate) x 2 is regressed from the
    conditioning and zero-initialised, so every block starts as the identity."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, *, dropout: float, dtype, param_dtype, rngs,
                 cross_attention: bool = False):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # text models: cross-attention to the (projected) text states after self-attention, its output
        # projection zero-initialised, as PixArt-alpha (Chen et al. 2023, sec. 2.3)
        self.cross_attn = (layers.Attention(hidden, hidden, heads, hidden // heads, out_init=layers.zeros, **kw)
                           if cross_attention else None)
        mlp_hidden = int(hidden * mlp_ratio)
        self.qkv = layers.linear(hidden, 3 * hidden, **kw)
        self.proj = layers.linear(hidden, hidden, **kw)
        self.fc1 = layers.linear(hidden, mlp_hidden, **kw)
        self.fc2 = layers.linear(mlp_hidden, hidden, **kw)
        self.adaln = layers.linear(hidden, 6 * hidden, init=layers.zeros, **kw)
        self.heads = heads
        self.dropout = float(dropout)

    def __call__(self, x: Array, c: Array, dropout_key: Array | None = None, context: Array | None = None,
                 context_mask: Array | None = None) -> Array:
        b, t, d = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.adaln(jax.nn.silu(c)), 6, axis=-1)
        h = modulate(layers.layer_norm(x), shift1, scale1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads) for z in jnp.split(self.qkv(h), 3, -1))
        h = self.proj(layers.attention(q, k, v).reshape(b, t, d))
        x = x + gate1[:, None, :] * layers.dropout(h, self.dropout, layers.fold_key(dropout_key, 0))
        if self.cross_attn is not None:
            x = x + self.cross_attn(layers.layer_norm(x), context, context_mask)
        h = modulate(layers.layer_norm(x), shift2, scale2)
        h = self.fc2(jax.nn.gelu(self.fc1(h), approximate=True))
        return x + gate2[:, None, :] * layers.dropout(h, self.dropout, layers.fold_key(dropout_key, 1))


def stacked_blocks(
    depth: int, hidden: int, heads: int, mlp_ratio: float, *, dropout: float, dtype, param_dtype, rngs: nnx.Rngs,
    cross_attention: bool = False,
) -> DiTBlock:
    """`depth` DiT blocks as one module whose weights carry a leading depth axis, for `scan_blocks`."""

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs: nnx.Rngs) -> DiTBlock:
        return DiTBlock(hidden, heads, mlp_ratio, dropout=dropout, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                        cross_attention=cross_attention)

    return make(rngs)


def scan_blocks(blocks: DiTBlock, h: Array, cond: Array, dropout_key: Array | None = None, *, remat: bool = False,
                context: Array | None = None, context_mask: Array | None = None):
    """Run `stacked_blocks` in order under one lax.scan, block i with dropout key fold_in(key, i).

    One block to compile whatever the depth, and no fusion across blocks: XLA:CPU fused the
    unrolled backward pass into loops that recompute earlier blocks (2x slower at depth 12,
    benchmarks/models.py). remat: recompute each block in the backward pass (jax.checkpoint).
    """
    block_def, stacked = nnx.split(blocks)
    depth = jax.tree.leaves(stacked)[0].shape[0]

    def one_block(h, layer):
        state, i = layer
        return nnx.merge(block_def, state)(h, cond, layers.fold_key(dropout_key, i), context, context_mask), None

    h, _ = jax.lax.scan(jax.checkpoint(one_block) if remat else one_block, h, (stacked, jnp.arange(depth)))
    return h


class DiT(nnx.Module):
    """DiT denoiser: model(x [B,H,W,C], c_noise [B], labels, *, context, context_mask, pooled, dropout_key)
    -> [B,H,W,C or 2C].

    Peebles & Xie (2023): patch embedding (a p x p stride-p conv, here the equivalent matmul on
    flattened patches), fixed sin-cos position embedding (not a parameter), noise-level MLP on
    a 256-wide sinusoidal embedding, class table with num_classes + 1 rows (the last the null
    label), adaLN-Zero blocks, zero-initialised final layer.
    """

    def __init__(
        self,
        *,
        data_shape: tuple[int, ...],  # (H, W, C) of the images (or latents)
        num_classes: int = 0,  # 0: unconditional; else a class table of num_classes + 1 rows (the last: null label)
        preset: str = "",  # e.g. "S/2", "XL/2" (Table 1): sets depth, hidden_size, heads and patch_size
        depth: int = 12,  # DiT blocks (without a preset)
        hidden_size: int = 384,  # token width (without a preset)
        num_heads: int = 6,  # attention heads (without a preset; when head_channels <= 0)
        head_channels: int = -1,  # channels per head instead of num_heads when > 0
        patch_size: int = 2,  # side of the square patches (without a preset)
        mlp_ratio: float = 4.0,  # MLP width / hidden_size
        dropout: float = 0.0,  # dropout rate after attention and MLP
        learn_sigma: bool = False,  # also output the variance interpolation (2C channels)
        embedding: str = "sinusoidal",  # noise-level embedding: sinusoidal | fourier
        flip_sin_to_cos: bool = False,  # sinusoidal order: False [sin, cos], True [cos, sin] (DiT's own)
        freq_shift: float = 1.0,  # frequencies 10000^(-i / (dim/2 - freq_shift)): 0 in DiT's own code
        fourier_scale: float = 16.0,  # std of the Gaussian Fourier features (embedding = fourier)
        dtype: str = "float32",  # activations (bfloat16 on accelerators)
        param_dtype: str = "float32",  # parameters
        remat: bool = False,  # recompute every block in the backward pass to save memory
        context_dim: int = 0,  # text models: width of the text states; > 0 adds cross-attention to every block
        pooled_dim: int = 0,  # > 0: a pooled text vector of this width is added to the timestep embedding (SD3)
        rngs: nnx.Rngs,
    ):
        if len(data_shape) != 3:
            raise ValueError(f"dit needs image data (H, W, C), got data_shape={data_shape}")
        if preset:
            depth, hidden, heads, patch = parse_preset(preset)
        else:
            depth, hidden, patch = int(depth), int(hidden_size), int(patch_size)
            heads = heads_for(hidden, num_heads, head_channels)
        height, width, in_ch = data_shape
        if height % patch or width % patch:
            raise ValueError(f"patch size {patch} does not divide the {height}x{width} input")
        dtype = layers.dtype_of(dtype)
        kw = dict(dtype=dtype, param_dtype=layers.dtype_of(param_dtype), rngs=rngs)
        out_ch = in_ch * (2 if learn_sigma else 1)

        self.patch_embed = layers.linear(patch * patch * in_ch, hidden, **kw)
        self.embed = NoiseEmbedding(embedding, FREQUENCY_DIM, flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift,
                                    fourier_scale=fourier_scale)
        self.time_mlp1 = layers.linear(FREQUENCY_DIM, hidden, init=normal_002, **kw)
        self.time_mlp2 = layers.linear(hidden, hidden, init=normal_002, **kw)
        self.num_classes = int(num_classes)
        self.label_embed = (
            nnx.Embed(num_classes + 1, hidden, param_dtype=kw["param_dtype"], embedding_init=normal_002, rngs=rngs)
            if num_classes > 0
            else None
        )
        self.context_dim = int(context_dim)
        # the text states projected to the token width once (SD3's context_embedder)
        self.context_embedder = layers.linear(self.context_dim, hidden, **kw) if self.context_dim else None
        self.pooled_embed = PooledEmbedding(int(pooled_dim), hidden, **kw) if pooled_dim else None
        self.blocks = stacked_blocks(depth, hidden, heads, float(mlp_ratio), dropout=float(dropout),
                                     cross_attention=self.context_dim > 0, **kw)
        self.final_adaln = layers.linear(hidden, 2 * hidden, init=layers.zeros, **kw)
        self.final_proj = layers.linear(hidden, patch * patch * out_ch, init=layers.zeros, **kw)
        self.patch = patch
        self.hidden = hidden
        self.remat = bool(remat)
        self.dtype = dtype

    def __call__(
        self, x: Array, c_noise: Array, labels: Array | None = None, *, context: Array | None = None,
        context_mask: Array | None = None, pooled: Array | None = None, dropout_key: Array | None = None
    ) -> Array:
        """context [B, S, context_dim], context_mask [B, S], pooled [B, pooled_dim]: a text model's text embedding."""
        check_context(self.context_dim, context)
        b, height, width, _ = x.shape
        pos = jnp.asarray(sincos_pos_embed_2d(self.hidden, height // self.patch, width // self.patch))
        h = self.patch_embed(patchify(x, self.patch).astype(self.dtype)) + pos.astype(self.dtype)

        c_noise = jnp.broadcast_to(jnp.asarray(c_noise, jnp.float32), (b,))
        cond = self.time_mlp2(jax.nn.silu(self.time_mlp1(self.embed(c_noise).astype(self.dtype))))
        cond = add_pooled_embedding(cond, self.pooled_embed, pooled)
        cond = add_label_embedding(cond, self.label_embed, self.num_classes, labels, b)
        if context is not None:
            context = self.context_embedder(jnp.asarray(context, self.dtype))

        h = scan_blocks(self.blocks, h, cond, dropout_key, remat=self.remat, context=context, context_mask=context_mask)
        shift, scale = jnp.split(self.final_adaln(jax.nn.silu(cond)), 2, axis=-1)
        return unpatchify(self.final_proj(modulate(layers.layer_norm(h), shift, scale)), self.patch, height, width)

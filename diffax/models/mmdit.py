"""Multimodal Diffusion Transformer, MMDiT (Esser et al. 2024, "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis", sec. 4 and Fig. 2: Stable Diffusion 3).

Two token streams, text and image, each with its own adaLN-Zero modulation, qkv, output
projection and MLP; one attention over the concatenation of both streams' tokens, so text
and image attend to each other in every block. Computed as diffusers' `SD3Transformer2DModel`
/ `JointTransformerBlock` / `JointAttnProcessor2_0` compute it (diffusers 0.42):

- patch embedding (a p x p stride-p conv, here a matmul on flattened patches) + a fixed 2-D
  sin-cos position embedding of a pos_embed_max_size^2 grid, positions scaled by
  (sample_size / patch) / pos_embed_max_size and centre-cropped to the image's grid (PatchEmbed);
- text states -> context_embedder (Linear) -> the text stream;
- conditioning c = MLP(sinusoidal(c_noise)) + MLP(pooled text) (CombinedTimestepTextProjEmbeddings;
  256 frequencies, cos first, no frequency shift);
- attention over [image ; text] (diffusers' order), optional RMSNorm of q and k per head
  (qk_norm="rms_norm", SD3.5); the last block is context_pre_only: its text stream only feeds
  keys and values (AdaLayerNormContinuous on the text, no text output);
- AdaLayerNormContinuous (scale, then shift) + proj_out, unpatchify.

Text mask: SD3 attends to every text token (its T5 / CLIP states include the padding). Here a
`context_mask` [B, S] hides masked text tokens as keys from every query (image and text);
config.text.mask_context=False passes none and reproduces SD3. No dropout (SD3 has none).

The blocks but the last are stacked on a leading depth axis and run under one `lax.scan`
(as the DiT); the context_pre_only block is a separate module.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from diffax.errors import UserError
from diffax.models import layers
from diffax.models.dit import modulate, patchify, unpatchify
from diffax.models.embeddings import sincos_pos_embed_2d, timestep_embedding
from diffax.models.unet import PooledEmbedding, add_pooled_embedding, check_context, heads_for

Array = jax.Array
FREQUENCY_DIM = 256  # diffusers' Timesteps(256) in CombinedTimestepTextProjEmbeddings
EPS = 1e-6  # every LayerNorm and RMSNorm of SD3


def rms_norm(x: Array, scale: Array) -> Array:
    """RMSNorm over the last axis (Zhang & Sennrich 2019), float32 statistics, learned scale."""
    x32 = x.astype(jnp.float32)
    y = x32 * lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + EPS)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def sd3_pos_embed(dim: int, grid_h: int, grid_w: int, *, max_size: int, base_size: int) -> np.ndarray:
    """SD3's position embedding of a grid_h x grid_w token grid, [grid_h * grid_w, dim].

    diffusers' PatchEmbed(pos_embed_max_size): the sin-cos embedding of a max_size^2 grid whose
    positions are i * base_size / max_size, centre-cropped to the image's grid.
    """
    if grid_h > max_size or grid_w > max_size:
        raise ValueError(f"a {grid_h}x{grid_w} token grid exceeds config.model.pos_embed_max_size={max_size}")
    full = sincos_pos_embed_2d(dim, max_size, max_size, scale=base_size / max_size).reshape(max_size, max_size, dim)
    top, left = (max_size - grid_h) // 2, (max_size - grid_w) // 2
    return full[top:top + grid_h, left:left + grid_w].reshape(grid_h * grid_w, dim)


class Stream(nnx.Module):
    """One stream's weights in a joint block: adaLN (6 vectors, or 2 for a context_pre_only text stream),
    qkv, and unless pre_only the attention output projection and the MLP."""

    def __init__(self, hidden: int, head_dim: int, mlp_ratio: float, *, pre_only: bool, qk_norm: bool, kw: dict):
        # adaLN-Zero: the modulation starts at zero, so every block starts as the identity (Peebles & Xie 2023)
        self.adaln = layers.linear(hidden, (2 if pre_only else 6) * hidden, init=layers.zeros, **kw)
        self.qkv = layers.linear(hidden, 3 * hidden, **kw)
        self.norm_q = nnx.Param(jnp.ones((head_dim,), kw["param_dtype"])) if qk_norm else None
        self.norm_k = nnx.Param(jnp.ones((head_dim,), kw["param_dtype"])) if qk_norm else None
        if pre_only:
            self.proj = self.fc1 = self.fc2 = None
        else:
            mlp = int(hidden * mlp_ratio)
            self.proj = layers.linear(hidden, hidden, **kw)
            self.fc1 = layers.linear(hidden, mlp, **kw)
            self.fc2 = layers.linear(mlp, hidden, **kw)

    def qkv_heads(self, h: Array, heads: int) -> tuple[Array, Array, Array]:
        b, t, d = h.shape
        q, k, v = (z.reshape(b, t, heads, d // heads) for z in jnp.split(self.qkv(h), 3, axis=-1))
        if self.norm_q is not None:
            q, k = rms_norm(q, self.norm_q[...]), rms_norm(k, self.norm_k[...])
        return q, k, v

    def finish(self, x: Array, attn: Array, mod: list[Array]) -> Array:
        """x + gate_msa * proj(attn), then the gated MLP on the re-normalised, modulated result."""
        _, _, gate1, shift2, scale2, gate2 = mod
        x = x + gate1[:, None, :] * self.proj(attn)
        h = self.fc2(jax.nn.gelu(self.fc1(modulate(layers.layer_norm(x, EPS), shift2, scale2)), approximate=True))
        return x + gate2[:, None, :] * h


class JointBlock(nnx.Module):
    """An MMDiT block (Esser et al. 2024, Fig. 2b; diffusers' JointTransformerBlock): per-stream
    adaLN-Zero, one softmax attention over [image ; text] tokens, per-stream output and MLP."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, *, context_pre_only: bool, qk_norm: bool,
                 dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.image = Stream(hidden, hidden // heads, mlp_ratio, pre_only=False, qk_norm=qk_norm, kw=kw)
        self.text = Stream(hidden, hidden // heads, mlp_ratio, pre_only=context_pre_only, qk_norm=qk_norm, kw=kw)
        self.heads = heads
        self.context_pre_only = bool(context_pre_only)

    def __call__(self, x: Array, ctx: Array, cond: Array, mask: Array | None) -> tuple[Array, Array]:
        """x [B, T, D] image tokens, ctx [B, S, D] text tokens, cond [B, D], mask [B, 1, 1, T + S] or None."""
        silu = jax.nn.silu(cond)
        mod_x = jnp.split(self.image.adaln(silu), 6, axis=-1)
        h = modulate(layers.layer_norm(x, EPS), mod_x[0], mod_x[1])
        if self.context_pre_only:  # AdaLayerNormContinuous: (scale, shift), in that order
            scale, shift = jnp.split(self.text.adaln(silu), 2, axis=-1)
            mod_c = None
            hc = modulate(layers.layer_norm(ctx, EPS), shift, scale)
        else:
            mod_c = jnp.split(self.text.adaln(silu), 6, axis=-1)
            hc = modulate(layers.layer_norm(ctx, EPS), mod_c[0], mod_c[1])
        q, k, v = (jnp.concatenate(pair, axis=1) for pair in zip(self.image.qkv_heads(h, self.heads),
                                                                  self.text.qkv_heads(hc, self.heads)))
        out = jax.nn.dot_product_attention(q, k, v, mask=mask)
        b, t, d = x.shape
        out = out.reshape(b, out.shape[1], d)
        x = self.image.finish(x, out[:, :t], mod_x)
        if self.context_pre_only:
            return x, ctx  # the text stream ends here; its tokens are not read again
        return x, self.text.finish(ctx, out[:, t:], mod_c)


class MMDiT(nnx.Module):
    """MMDiT denoiser: model(x [B,H,W,C], c_noise [B], labels=None, *, context [B,S,context_dim],
    context_mask [B,S], pooled [B,pooled_dim], dropout_key) -> [B,H,W,C].

    Esser et al. (2024), in the layout of diffusers' SD3Transformer2DModel (see the module
    docstring). A text model only (context_dim > 0); class-conditional and unconditional
    transformers are config.model.name='dit'.
    """

    def __init__(
        self,
        *,
        data_shape: tuple[int, ...],  # (H, W, C) of the images (or latents)
        num_classes: int = 0,  # must be 0: conditioning is text
        depth: int = 12,  # joint blocks (the last one context_pre_only)
        hidden_size: int = 384,  # token width of both streams
        num_heads: int = 6,  # attention heads (when head_channels <= 0)
        head_channels: int = -1,  # channels per head instead of num_heads when > 0 (SD3: 64)
        patch_size: int = 2,
        mlp_ratio: float = 4.0,
        qk_norm: str = "",  # "" | "rms_norm" (SD3.5: RMSNorm of q and k per head)
        pos_embed_max_size: int = 0,  # > 0: SD3's cropped position grid of this side; 0: the image's grid
        sample_size: int = 0,  # with pos_embed_max_size: the side whose grid positions are 0, 1, ... (0: data's)
        dtype: str = "float32",
        param_dtype: str = "float32",
        remat: bool = False,  # recompute every block in the backward pass to save memory
        context_dim: int = 0,  # width of the text states (set by the text encoder)
        pooled_dim: int = 0,  # > 0: the pooled text vector's width, added to the timestep embedding
        rngs: nnx.Rngs,
    ):
        if not context_dim or num_classes:
            raise UserError("config.model.name='mmdit' is a text-to-image network: set config.text.encoder (and "
                            "config.data.conditional=False); for class-conditional or unconditional transformers "
                            "use config.model.name='dit'.")
        if len(data_shape) != 3:
            raise UserError(f"config.model.name='mmdit' needs image data (H, W, C), got data_shape={data_shape}")
        if qk_norm not in ("", "rms_norm"):
            raise UserError(f"config.model.qk_norm={qk_norm!r}: valid values are '' and 'rms_norm'")
        height, width, in_ch = data_shape
        hidden, patch, depth = int(hidden_size), int(patch_size), int(depth)
        heads = heads_for(hidden, num_heads, head_channels)
        if height % patch or width % patch:
            raise UserError(f"config.model.patch_size={patch} does not divide the {height}x{width} input")
        if hidden % heads or depth < 1:
            raise UserError(f"config.model: {heads} heads must divide hidden_size={hidden}, depth={depth} must be >= 1")
        dtype = layers.dtype_of(dtype)
        kw = dict(dtype=dtype, param_dtype=layers.dtype_of(param_dtype), rngs=rngs)
        block_kw = dict(qk_norm=qk_norm == "rms_norm", **kw)

        self.patch_embed = layers.linear(patch * patch * in_ch, hidden, **kw)
        self.time_mlp1 = layers.linear(FREQUENCY_DIM, hidden, **kw)
        self.time_mlp2 = layers.linear(hidden, hidden, **kw)
        self.pooled_embed = PooledEmbedding(int(pooled_dim), hidden, **kw) if pooled_dim else None
        self.context_embedder = layers.linear(int(context_dim), hidden, **kw)

        @nnx.split_rngs(splits=depth - 1)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked(rngs: nnx.Rngs) -> JointBlock:
            return JointBlock(hidden, heads, float(mlp_ratio), context_pre_only=False, **{**block_kw, "rngs": rngs})

        self.blocks = stacked(rngs) if depth > 1 else None
        self.last_block = JointBlock(hidden, heads, float(mlp_ratio), context_pre_only=True, **block_kw)
        self.final_adaln = layers.linear(hidden, 2 * hidden, init=layers.zeros, **kw)
        self.final_proj = layers.linear(hidden, patch * patch * in_ch, init=layers.zeros, **kw)
        self.patch, self.hidden = patch, hidden
        max_size = int(pos_embed_max_size) or max(height, width) // patch
        base = (int(sample_size) or max(height, width)) // patch
        self.pos_embed_args = (max_size, base)
        self.context_dim = int(context_dim)
        self.remat = bool(remat)
        self.dtype = dtype

    def __call__(
        self, x: Array, c_noise: Array, labels: Array | None = None, *, context: Array | None = None,
        context_mask: Array | None = None, pooled: Array | None = None, dropout_key: Array | None = None
    ) -> Array:
        del dropout_key  # no dropout in MMDiT
        if labels is not None:
            raise ValueError("labels were passed to an MMDiT, which is conditioned on text only")
        check_context(self.context_dim, context)
        b, height, width, _ = x.shape
        gh, gw = height // self.patch, width // self.patch
        max_size, base = self.pos_embed_args
        pos = jnp.asarray(sd3_pos_embed(self.hidden, gh, gw, max_size=max_size, base_size=base))
        h = self.patch_embed(patchify(x, self.patch).astype(self.dtype)) + pos.astype(self.dtype)

        c_noise = jnp.broadcast_to(jnp.asarray(c_noise, jnp.float32), (b,))
        freq = timestep_embedding(c_noise, FREQUENCY_DIM, flip_sin_to_cos=True, freq_shift=0.0)
        cond = self.time_mlp2(jax.nn.silu(self.time_mlp1(freq.astype(self.dtype))))
        cond = add_pooled_embedding(cond, self.pooled_embed, pooled)
        ctx = self.context_embedder(jnp.asarray(context, self.dtype))

        mask = None
        if context_mask is not None:  # image tokens are always visible; masked text tokens are not (as keys)
            keep = jnp.concatenate([jnp.ones((b, gh * gw), bool), jnp.asarray(context_mask) > 0], axis=1)
            mask = keep[:, None, None, :]
        h, ctx = self._blocks(h, ctx, cond, mask)

        scale, shift = jnp.split(self.final_adaln(jax.nn.silu(cond)), 2, axis=-1)  # AdaLayerNormContinuous
        out = self.final_proj(modulate(layers.layer_norm(h, EPS), shift, scale))
        return unpatchify(out, self.patch, height, width)

    def _blocks(self, h: Array, ctx: Array, cond: Array, mask: Array | None) -> tuple[Array, Array]:
        """The stacked blocks under one lax.scan (one block to compile whatever the depth), then the last."""
        if self.blocks is not None:
            block_def, stacked = nnx.split(self.blocks)

            def one_block(carry, state):
                return nnx.merge(block_def, state)(*carry, cond, mask), None

            (h, ctx), _ = lax.scan(jax.checkpoint(one_block) if self.remat else one_block, (h, ctx), stacked)
        return self.last_block(h, ctx, cond, mask)

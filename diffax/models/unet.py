"""The DDPM / ADM UNet (Ho et al. 2020; Nichol & Dhariwal 2021; Dhariwal & Nichol 2021).

Layout (per level of `channel_mult`, resolution r = H / 2**level):
  down[level]: num_res_blocks x (ResBlock [+ attention if r in attention_resolutions]),
               then a downsample (conv, or a BigGAN ResBlock when resblock_updown) except at the last level
  mid:         ResBlock, attention (if mid_attention), ResBlock
  up[i]:       levels in reverse; num_res_blocks + 1 x (concat skip, ResBlock [+ attention if
               r in up_attention_resolutions]), then an upsample except at the top level
  out:         GroupNorm, SiLU, zero-initialised 3x3 conv -> C (2C when learn_sigma)
This is exactly diffusers' UNet2DModel with DownBlock2D / AttnDownBlock2D / UpBlock2D /
AttnUpBlock2D / UNetMidBlock2D, so diffax/models/diffusers.py maps its weights one to one.

DDPM CIFAR-10 (35.7M parameters): channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
attention_resolutions=(16,), dropout=0.1. ADM: scale_shift_norm=True, resblock_updown=True,
head_channels=64, attention at (32, 16, 8), num_classes > 0.

Text models (context_dim > 0): every attention layer is instead a cross-attention transformer
(layers.SpatialTransformer, diffusers' Transformer2DModel; Rombach et al. 2022) attending to the
text states passed as `context`; with pooled_dim > 0 a pooled text vector is added to the
timestep embedding (SDXL's add_embedding, Podell et al. 2023). With addition_time_embed_dim > 0
the pooled vector's last 6 entries are SDXL's micro-conditioning (original size, crop top-left,
target size), each embedded sinusoidally (diffusers' add_time_proj) before the add_embedding MLP.
transformer_depths gives the transformer blocks per level (SDXL: 0, 2, 10; the middle takes the
last level's).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from diffax.models import layers
from diffax.models.embeddings import NoiseEmbedding

Array = jax.Array


def heads_for(channels: int, num_heads: int, head_channels: int) -> int:
    """ADM's rule: head_channels > 0 fixes the width per head, otherwise num_heads heads."""
    if head_channels and head_channels > 0:
        if channels % head_channels:
            raise ValueError(f"head_channels={head_channels} (config.model.head_channels) does not divide "
                             f"{channels} channels")
        return channels // head_channels
    return int(num_heads)


class Level(nnx.Module):
    """One resolution of the UNet: residual blocks, optional attention after each, optional resampler."""

    def __init__(self, res: list, attn: list, resample: nnx.Module | None):
        self.res = nnx.List(res)
        self.attn = nnx.List(attn)
        self.resample = resample


class UNet(nnx.Module):
    """UNet denoiser: model(x [B,H,W,C], c_noise [B], labels [B] | None, *, context, context_mask, pooled,
    dropout_key) -> [B,H,W,C or 2C].

    Implements Ho et al. (2020, App. B) and the ADM improvements of Dhariwal & Nichol (2021,
    sec. 3): adaptive group norm (scale_shift_norm), multi-head attention at several
    resolutions (num_heads or head_channels), BigGAN up/down residual blocks, class
    embedding added to the noise-level embedding (num_classes + 1 rows, the last the null
    label). Returns the network dtype; the diffusion math casts to float32.
    """

    def __init__(
        self,
        *,
        data_shape: tuple[int, ...],  # (H, W, C) of the images
        num_classes: int = 0,  # 0: unconditional; else a class table of num_classes + 1 rows (the last: null label)
        channels: int = 128,  # base channels (DDPM CIFAR-10: 128)
        channel_mult: Sequence[int] = (1, 2, 2, 2),  # channels = channels * mult at each resolution level
        num_res_blocks: int = 2,  # residual blocks per level (one more per level in the up path)
        attention_resolutions: Sequence[int] = (16,),  # feature-map sides with self-attention
        up_attention_resolutions: Sequence[int] | None = None,  # sides with attention going up; None: as down
        mid_attention: bool = True,  # self-attention between the two middle residual blocks
        num_heads: int = 1,  # attention heads (when head_channels <= 0)
        head_channels: int = -1,  # ADM: channels per head instead of num_heads when > 0
        dropout: float = 0.0,  # dropout rate in the residual blocks
        resblock_updown: bool = False,  # ADM / BigGAN up/down-sampling residual blocks instead of convs
        scale_shift_norm: bool = False,  # ADM adaptive group norm
        norm_groups: int = 32,  # GroupNorm groups
        norm_eps: float = 1e-6,  # GroupNorm epsilon (DDPM's TF code 1e-6; ADM / diffusers 1e-5)
        downsample_padding: int = 1,  # stride-2 conv padding: 1 each side; 0 bottom/right only (TF 'SAME')
        learn_sigma: bool = False,  # also output the variance interpolation (2C channels)
        embedding: str = "sinusoidal",  # noise-level embedding: sinusoidal | fourier
        flip_sin_to_cos: bool = False,  # sinusoidal order: False [sin, cos] (DDPM), True [cos, sin] (ADM)
        freq_shift: float = 1.0,  # frequencies 10000^(-i / (dim/2 - freq_shift)): 1 DDPM, 0 ADM
        fourier_scale: float = 16.0,  # std of the Gaussian Fourier features (embedding = fourier)
        dtype: str = "float32",  # activations (bfloat16 on accelerators)
        param_dtype: str = "float32",  # parameters
        remat: bool = False,  # rematerialise every block in the backward pass to save memory
        context_dim: int = 0,  # text models: width of the text states; > 0 makes every attention a cross-attention transformer
        transformer_depth: int = 1,  # BasicTransformerBlocks per cross-attention transformer (transformer_layers_per_block)
        use_linear_projection: bool = False,  # SD 2: linear proj_in / proj_out instead of 1x1 convolutions
        pooled_dim: int = 0,  # > 0: a pooled text vector of this width is added to the timestep embedding (SDXL)
        transformer_depths: Sequence[int] = (),  # per level (middle: the last's); () = transformer_depth
        addition_time_embed_dim: int = 0,  # SDXL: > 0: pooled ends with 6 time ids, each embedded this wide
        rngs: nnx.Rngs,
    ):
        if len(data_shape) != 3:
            raise ValueError(f"the unet needs image data (H, W, C), got data_shape={data_shape}")
        height, _, in_ch = data_shape
        dtype = layers.dtype_of(dtype)
        pdt = layers.dtype_of(param_dtype)
        kw = dict(dtype=dtype, param_dtype=pdt)
        ch = int(channels)
        mult = tuple(channel_mult)
        emb_dim = 4 * ch
        attn_down = set(attention_resolutions)
        attn_up = attn_down if up_attention_resolutions is None else set(up_attention_resolutions)
        nheads = lambda c: heads_for(c, num_heads, head_channels)  # noqa: E731

        res_kw = dict(dropout=float(dropout), scale_shift_norm=bool(scale_shift_norm), groups=int(norm_groups),
                      eps=float(norm_eps), **kw)
        attn_kw = dict(groups=int(norm_groups), eps=float(norm_eps), **kw)
        context_dim = int(context_dim)

        depths = tuple(int(d) for d in transformer_depths) or (int(transformer_depth),) * len(channel_mult)
        if len(depths) != len(channel_mult):
            raise ValueError(f"transformer_depths={depths} needs one entry per level of channel_mult={channel_mult}")

        def attention(c: int, level: int) -> nnx.Module:  # self-attention, or a text cross-attention transformer
            if context_dim > 0:
                return layers.SpatialTransformer(c, nheads(c), context_dim, depth=depths[level],
                                                 linear_projection=bool(use_linear_projection),
                                                 groups=int(norm_groups), rngs=rngs, **kw)
            return layers.AttentionBlock(c, nheads(c), rngs=rngs, **attn_kw)

        self.embed = NoiseEmbedding(embedding, ch, flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift,
                                    fourier_scale=fourier_scale)
        self.time_mlp1 = layers.linear(ch, emb_dim, rngs=rngs, **kw)
        self.time_mlp2 = layers.linear(emb_dim, emb_dim, rngs=rngs, **kw)
        self.num_classes = int(num_classes)
        self.label_embed = (
            nnx.Embed(num_classes + 1, emb_dim, param_dtype=pdt, rngs=rngs) if num_classes > 0 else None
        )
        self.time_ids_dim = int(addition_time_embed_dim)
        self.flip_sin_to_cos, self.freq_shift = bool(flip_sin_to_cos), float(freq_shift)
        added = int(pooled_dim) + (NUM_TIME_IDS * (self.time_ids_dim - 1) if self.time_ids_dim else 0)
        self.pooled_embed = PooledEmbedding(added, emb_dim, rngs=rngs, **kw) if pooled_dim else None
        self.context_dim = context_dim
        self.conv_in = layers.Conv(in_ch, ch, 3, rngs=rngs, **kw)

        down, skips, cur, res = [], [ch], ch, height
        for level, m in enumerate(mult):
            out = ch * m
            blocks, attns = [], []
            for _ in range(int(num_res_blocks)):
                blocks.append(layers.ResBlock(cur, out, emb_dim, rngs=rngs, **res_kw))
                attns.append(attention(out, level) if res in attn_down else None)
                cur = out
                skips.append(cur)
            resample = None
            if level != len(mult) - 1:
                if resblock_updown:
                    resample = layers.ResBlock(cur, cur, emb_dim, resample="down", rngs=rngs, **res_kw)
                else:
                    resample = layers.Downsample(cur, padding=int(downsample_padding), rngs=rngs, **kw)
                skips.append(cur)
                res //= 2
            down.append(Level(blocks, attns, resample))
        self.down = nnx.List(down)

        self.mid_res1 = layers.ResBlock(cur, cur, emb_dim, rngs=rngs, **res_kw)
        self.mid_attn = attention(cur, len(mult) - 1) if mid_attention else None
        self.mid_res2 = layers.ResBlock(cur, cur, emb_dim, rngs=rngs, **res_kw)

        up = []
        for level, m in reversed(list(enumerate(mult))):
            out = ch * m
            blocks, attns = [], []
            for _ in range(int(num_res_blocks) + 1):
                blocks.append(layers.ResBlock(cur + skips.pop(), out, emb_dim, rngs=rngs, **res_kw))
                attns.append(attention(out, level) if res in attn_up else None)
                cur = out
            resample = None
            if level != 0:
                if resblock_updown:
                    resample = layers.ResBlock(cur, cur, emb_dim, resample="up", rngs=rngs, **res_kw)
                else:
                    resample = layers.Upsample(cur, rngs=rngs, **kw)
                res *= 2
            up.append(Level(blocks, attns, resample))
        self.up = nnx.List(up)

        self.norm_out = layers.GroupNorm(cur, int(norm_groups), float(norm_eps), **kw)
        out_ch = in_ch * (2 if learn_sigma else 1)
        self.conv_out = layers.Conv(cur, out_ch, 3, zero_init=True, rngs=rngs, **kw)
        self.remat = bool(remat)
        self.dtype = dtype

    def embed_noise(self, c_noise: Array, labels: Array | None, batch: int, pooled: Array | None = None) -> Array:
        """Noise-level (and class, and pooled text) embedding [B, 4 * channels]."""
        c_noise = jnp.broadcast_to(jnp.asarray(c_noise, jnp.float32), (batch,))
        emb = self.time_mlp2(jax.nn.silu(self.time_mlp1(self.embed(c_noise).astype(self.dtype))))
        if self.time_ids_dim and pooled is not None:
            pooled = embed_time_ids(pooled, self.time_ids_dim, self.flip_sin_to_cos, self.freq_shift)
        emb = add_pooled_embedding(emb, self.pooled_embed, pooled)
        return add_label_embedding(emb, self.label_embed, self.num_classes, labels, batch)

    def __call__(
        self, x: Array, c_noise: Array, labels: Array | None = None, *, context: Array | None = None,
        context_mask: Array | None = None, pooled: Array | None = None, dropout_key: Array | None = None
    ) -> Array:
        """context [B, S, context_dim], context_mask [B, S] (1 token, 0 padding), pooled [B, pooled_dim]:
        the text embedding of a text model (diffax/models/text), None otherwise."""
        run = layers.call_block_remat if self.remat else layers.call_block
        emb = self.embed_noise(c_noise, labels, x.shape[0], pooled)
        check_context(self.context_dim, context)
        attend = (lambda attn, h: run(attn, h, context, context_mask)) if self.context_dim else run  # noqa: E731
        counter = iter(range(1 << 20))  # one dropout key per residual block
        key = lambda: layers.fold_key(dropout_key, next(counter))  # noqa: E731

        h = self.conv_in(x)
        hs = [h]
        for level in self.down:
            for block, attn in zip(level.res, level.attn):
                h = run(block, h, emb, key())
                if attn is not None:
                    h = attend(attn, h)
                hs.append(h)
            if level.resample is not None:
                h = run(level.resample, h, emb, key())
                hs.append(h)
        h = run(self.mid_res1, h, emb, key())
        if self.mid_attn is not None:
            h = attend(self.mid_attn, h)
        h = run(self.mid_res2, h, emb, key())
        for level in self.up:
            for block, attn in zip(level.res, level.attn):
                h = run(block, jnp.concatenate([h, hs.pop().astype(h.dtype)], axis=-1), emb, key())
                if attn is not None:
                    h = attend(attn, h)
            if level.resample is not None:
                h = run(level.resample, h, emb, key())
        return self.conv_out(layers.norm_silu(self.norm_out, h))


def add_label_embedding(
    emb: Array, table: nnx.Embed | None, num_classes: int, labels: Array | None, batch: int
) -> Array:
    """emb + table[labels]; labels None means the null label num_classes (classifier-free guidance,
    Ho & Salimans 2022). Labels for an unconditional model (num_classes = 0) are an error."""
    if table is None:
        if labels is not None:
            raise ValueError("labels were passed to a model built with num_classes=0 (unconditional)")
        return emb
    if labels is None:
        labels = jnp.full((batch,), num_classes, jnp.int32)
    return emb + table(jnp.asarray(labels, jnp.int32)).astype(emb.dtype)


class PooledEmbedding(nnx.Module):
    """Linear, SiLU, linear: a pooled text vector -> the width of the timestep embedding, added to it
    (SDXL's add_embedding, Podell et al. 2023; SD3's text_embedder, Esser et al. 2024)."""

    def __init__(self, pooled_dim: int, emb_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = layers.linear(pooled_dim, emb_dim, **kw)
        self.linear_2 = layers.linear(emb_dim, emb_dim, **kw)

    def __call__(self, pooled: Array) -> Array:
        return self.linear_2(jax.nn.silu(self.linear_1(pooled)))


NUM_TIME_IDS = 6  # SDXL's micro-conditioning: original (h, w), crop (top, left), target (h, w)


def embed_time_ids(pooled: Array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> Array:
    """[B, P + 6] (pooled text, then SDXL's time ids) -> [B, P + 6 * dim]: each id embedded sinusoidally,
    as diffusers' add_time_proj (Timesteps with the UNet's flip_sin_to_cos / freq_shift), then flattened."""
    from diffax.models.embeddings import timestep_embedding

    text, ids = pooled[:, :-NUM_TIME_IDS], pooled[:, -NUM_TIME_IDS:].astype(jnp.float32)
    emb = timestep_embedding(ids.reshape(-1), dim, flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift)
    return jnp.concatenate([text.astype(jnp.float32), emb.reshape(ids.shape[0], -1)], axis=-1)


def add_pooled_embedding(emb: Array, table: PooledEmbedding | None, pooled: Array | None) -> Array:
    """emb + MLP(pooled) for a model built with pooled_dim > 0 (which then needs `pooled`)."""
    if table is None:
        if pooled is not None:
            raise ValueError("a pooled text embedding was passed to a model built with pooled_dim=0")
        return emb
    if pooled is None:
        raise ValueError("this model was built with pooled_dim > 0 (a text model) and needs `pooled`")
    return emb + table(jnp.asarray(pooled, emb.dtype)).astype(emb.dtype)


def check_context(context_dim: int, context: Array | None) -> None:
    """A text model needs its context, and a model without cross-attention must not silently ignore one."""
    if context_dim and context is None:
        raise ValueError("this model has cross-attention (context_dim > 0) and needs `context`: the text states")
    if not context_dim and context is not None:
        raise ValueError("text `context` was passed to a model built without cross-attention (context_dim=0)")
    if context is not None and context.shape[-1] != context_dim:
        raise ValueError(f"the text states are {context.shape[-1]} wide but the model's context_dim is {context_dim}")

"""Stable Diffusion XL's text conditioning (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models
for High-Resolution Image Synthesis", sec. 2.1-2.2), as diffusers' StableDiffusionXLPipeline builds it.

Two CLIP encoders read the prompt, each with its own tokenizer (SDXL's second pads with "!"):
  hidden = concat(enc1.hidden_states[-2], enc2.hidden_states[-2]) along features (no final norm)
  pooled = concat(enc2's projected text_embeds, time ids)
where the time ids are the micro-conditioning (original_size, crops_coords_top_left, target_size),
fixed per run here; the UNet embeds them (diffax/models/unet.py, addition_time_embed_dim).

Tokens: the pair tokenizer returns the ids of both tokenizers side by side ([N, 2L]); the encoder
splits them. The null condition of guidance is the pipeline's force_zeros_for_empty_prompt: zero text
states and zero pooled text (the time ids kept); it is written as tokens whose mask is all zero,
which no prompt tokenizes to (every prompt has its start and end tokens). A negative prompt is
encoded as any prompt, as the pipeline does.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffax.models.text.base import TextEmbedding


class PairTokenizer:
    """Two tokenizers as one: strings -> (ids [N, L1 + L2], mask [N, L1 + L2])."""

    def __init__(self, first, second):
        self.first, self.second = first, second
        self.max_length = int(first.max_length) + int(second.max_length)
        self.vocab_size = max(int(first.vocab_size), int(second.vocab_size))
        self.source = f"{first.source} + {second.source}"

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        (i1, m1), (i2, m2) = self.first(texts), self.second(texts)
        return np.concatenate([i1, i2], axis=1), np.concatenate([m1, m2], axis=1)

    def null(self) -> np.ndarray:
        """int32 [2, L1 + L2]: the empty prompt's ids with an all-zero mask, the zeroed null condition."""
        ids, _ = self(([""]))
        return np.stack([ids[0], np.zeros_like(ids[0])]).astype(np.int32)


class SDXLTextConditioner(nnx.Module):
    """encoder(ids [B, L1 + L2], mask [B, L1 + L2]) -> TextEmbedding(hidden [B, L, D1 + D2], pooled [B, P + 6]).

    first / second: CLIPTextEncoders built with layer=-2, final_norm=False (second with its projection);
    time_ids: (original h, w, crop top, left, target h, w). Rows whose mask is all zero get zero states and
    zero pooled text (force_zeros_for_empty_prompt).
    """

    def __init__(self, first: nnx.Module, second: nnx.Module, length_1: int, time_ids: Sequence[float]):
        self.first, self.second = first, second
        self.length_1 = int(length_1)
        self.time_ids = tuple(float(v) for v in time_ids)
        self.hidden_size = int(first.hidden_size) + int(second.hidden_size)
        self.pooled_size = int(second.pooled_size) + len(self.time_ids)

    def __call__(self, ids, mask=None) -> TextEmbedding:
        n = self.length_1
        ids = jnp.asarray(ids, jnp.int32)
        a, b = self.first(ids[:, :n]), self.second(ids[:, n:])
        hidden = jnp.concatenate([a.hidden, b.hidden.astype(a.hidden.dtype)], axis=-1)
        pooled = b.pooled.astype(jnp.float32)
        if mask is not None:
            keep = jnp.any(jnp.asarray(mask) > 0, axis=-1)  # all-zero mask: the null condition
            hidden = jnp.where(keep[:, None, None], hidden, 0).astype(hidden.dtype)
            pooled = jnp.where(keep[:, None], pooled, 0)
        ids_row = jnp.broadcast_to(jnp.asarray(self.time_ids, jnp.float32), (ids.shape[0], len(self.time_ids)))
        return TextEmbedding(hidden=hidden, pooled=jnp.concatenate([pooled, ids_row], axis=-1))


def with_size_ids(pooled, sizes):
    """pooled [B, P + 6] (pooled text, then the 6 time ids) with the first four time ids (original h, w, crop top,
    left) replaced by each training image's `sizes` [B, 4] (diffax/data/pipeline.py's size_ids); the target size
    stays (the training size)."""
    sizes = jnp.asarray(sizes).astype(pooled.dtype)
    return jnp.concatenate([pooled[:, :-6], sizes, pooled[:, -2:]], axis=-1)


def time_ids_of(text_config, image_size: int) -> tuple[float, ...]:
    """config.text's original_size, crop_top_left, target_size (() = the image size) -> the 6 time ids."""
    from diffax.errors import UserError

    def pair(name: str, default: tuple) -> tuple:
        value = tuple(text_config.get(name, ()) or default)
        if len(value) != 2:
            raise UserError(f"config.text.{name}={value}: give two numbers (height, width) or (top, left)")
        return tuple(float(v) for v in value)

    size = (image_size, image_size)
    return pair("original_size", size) + pair("crop_top_left", (0, 0)) + pair("target_size", size)


def load_sdxl_conditioner(path_1: str, path_2: str, time_ids: Sequence[float]) -> tuple[SDXLTextConditioner,
                                                                                        PairTokenizer]:
    """SDXL's two CLIP folders (text_encoder/, text_encoder_2/ with their sibling tokenizers) -> (conditioner,
    pair tokenizer). The second must be a CLIPTextModelWithProjection (its projected pooled vector)."""
    from diffax.errors import UserError
    from diffax.models.text.clip import CLIPTextEncoder
    from diffax.models.text.pretrained import load_text_encoder

    first, tok1 = load_text_encoder(path_1, layer=-2, final_norm=False, use_mask=False)
    second, tok2 = load_text_encoder(path_2, layer=-2, final_norm=False, use_mask=False)
    for path, enc in ((path_1, first), (path_2, second)):
        if not isinstance(enc, CLIPTextEncoder):
            raise UserError(f"config.text.encoder(_2)={path!r}: SDXL's text encoders are CLIP text models")
    if second.projection is None:
        raise UserError(f"config.text.encoder_2={path_2!r} has no text projection: SDXL's second encoder is a "
                        "CLIPTextModelWithProjection (its projected text_embeds are the pooled vector)")
    if int(tok1.max_length) != int(tok2.max_length):
        raise UserError(f"the tokenizers of {path_1} and {path_2} pad to {tok1.max_length} and {tok2.max_length} "
                        "tokens: SDXL concatenates the two encoders' states token by token, which needs one length")
    return SDXLTextConditioner(first, second, tok1.max_length, time_ids), PairTokenizer(tok1, tok2)

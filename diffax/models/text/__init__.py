"""Text encoders for text-to-image models: pretrained CLIP / T5 read from transformers folders,
and a small encoder trained from scratch with the denoiser.

Every encoder is an nnx.Module called as encoder(ids [B, L] int32, mask [B, L] int32) ->
TextEmbedding(hidden [B, L, D], pooled [B, P] or None); every tokenizer maps a list of
strings to (ids, mask) padded / truncated to its max_length. See base.py.

`make_encoder` is the one place a text encoder is chosen (config.text.encoder, read by
diffax/training/build.py): "small" builds `small.SmallTextEncoder`; any other value is the path
of a transformers folder, read by `pretrained.load_text_encoder`.
"""
from __future__ import annotations

from typing import Any

from flax import nnx

from diffax.errors import UserError
from diffax.models.text.base import TextEmbedding, Tokenizer
from diffax.models.text.small import SmallTextEncoder, WordTokenizer


def make_encoder(encoder: str, *, vocab_size: int, max_length: int, width: int, depth: int, heads: int,
                 rngs: nnx.Rngs) -> tuple[nnx.Module, Any]:
    """(encoder module, tokenizer or None) for config.text.encoder.

    "small": a fresh `SmallTextEncoder` (its tokenizer is built from the training captions and
    kept in the workdir, so None here). A path: the pretrained encoder and its own tokenizer.
    """
    if encoder == "small":
        from diffax.models import construct  # initialised in one jitted program, as the networks

        return construct(lambda r: SmallTextEncoder(vocab_size=vocab_size, max_length=max_length, width=width,
                                                    depth=depth, heads=heads, rngs=r), rngs), None
    try:
        from diffax.models.text.pretrained import load_text_encoder
    except ImportError as e:
        raise UserError(f"config.text.encoder={encoder!r} names a pretrained encoder folder, but this diffax has no "
                        f"pretrained text encoders (diffax.models.text.pretrained: {e}). Use "
                        "config.text.encoder='small'.") from None
    return load_text_encoder(encoder)


__all__ = ["TextEmbedding", "Tokenizer", "SmallTextEncoder", "WordTokenizer", "make_encoder"]

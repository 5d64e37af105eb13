"""Text encoders for text-to-image models: pretrained CLIP / T5 read from transformers folders,
and a small encoder trained from scratch with the denoiser.

Every encoder is an nnx.Module called as encoder(ids [B, L] int32, mask [B, L] int32) ->
TextEmbedding(hidden [B, L, D], pooled [B, P] or None); every tokenizer maps a list of
strings to (ids, mask) padded / truncated to its max_length. See base.py.
"""
from diffax.models.text.base import TextEmbedding, Tokenizer

__all__ = ["TextEmbedding", "Tokenizer"]

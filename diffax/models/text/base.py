"""The interface every text encoder and tokenizer in diffax.models.text follows."""
from __future__ import annotations

from typing import NamedTuple, Protocol, Sequence

import jax
import numpy as np


class TextEmbedding(NamedTuple):
    """What a text encoder returns: per-token states and an optional pooled vector.

    hidden: [B, L, D] float, the states the denoiser cross-attends to (the last layer, or the
    layer a clip-skip option picks). pooled: [B, P] or None, the sentence vector SDXL / SD3 add
    to the timestep embedding.
    """
    hidden: jax.Array
    pooled: jax.Array | None


class Tokenizer(Protocol):
    """Strings -> (ids [B, max_length] int32, mask [B, max_length] int32: 1 on tokens, 0 on padding)."""
    max_length: int
    vocab_size: int

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]: ...

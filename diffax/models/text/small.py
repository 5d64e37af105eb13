"""A small text encoder trained from scratch with the denoiser, and its word-level tokenizer.

For small captioned data sets and the offline default (configs/digits_text.py), where a
pretrained CLIP / T5 is neither available nor needed. The encoder is a pre-LN transformer
(Vaswani et al. 2017, with the normalisation before each sub-layer as in GPT-2 / Xiong et
al. 2020) over learned token and position embeddings; it is trained jointly with the
denoiser, the way GLIDE (Nichol et al. 2022) trains its text transformer. Imagen (Saharia et
al. 2022, sec. 4.4) found that the text encoder matters more than the denoiser's size: for
real captions use a pretrained encoder (config.text.encoder = a transformers folder).

Tokenizer: lower-cased words and punctuation marks; the vocabulary is built once from the
training captions (the `vocab_size - 4` most frequent words, ties broken alphabetically, so
the same captions always give the same vocabulary) and saved in the run's workdir
(`tokenizer.json`), so sampling tokenizes prompts exactly as training did.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import re
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffax.errors import UserError
from diffax.models import layers
from diffax.models.text.base import TextEmbedding

Array = jax.Array
log = logging.getLogger(__name__)

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIALS = (PAD, UNK, BOS, EOS)  # ids 0..3
TOKENIZER_FILE = "tokenizer.json"
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def split_words(text: str) -> list[str]:
    """Lower-cased words (runs of letters and digits) and single punctuation marks."""
    return _WORD.findall(str(text).lower())


class WordTokenizer:
    """Word-level tokenizer: texts -> (ids [B, max_length], mask [B, max_length]) int32.

    Every text becomes <bos> words... <eos>, padded with <pad> (id 0, mask 0) to max_length;
    unknown words map to <unk>. The empty prompt is <bos> <eos> (two real tokens, so attention
    always has a key). A longer text is truncated to max_length (keeping <eos> last), with a
    warning naming it.
    """

    def __init__(self, words: Sequence[str], max_length: int):
        self.words = tuple(words)
        if self.words[: len(SPECIALS)] != SPECIALS:
            raise UserError(f"a word tokenizer's vocabulary must start with {SPECIALS}; got {self.words[:4]}")
        if max_length < 3:
            raise UserError(f"config.text.max_length={max_length} must be at least 3 (<bos>, a word, <eos>)")
        self.max_length = int(max_length)
        self.index = {w: i for i, w in enumerate(self.words)}
        self._warned = False

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    @classmethod
    def build(cls, captions: Iterable[str], vocab_size: int, max_length: int) -> "WordTokenizer":
        """The vocabulary of `captions`: the vocab_size - 4 most frequent words, ties alphabetical."""
        counts = collections.Counter(w for c in captions for w in split_words(c))
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        keep = [w for w, _ in ranked[: max(int(vocab_size) - len(SPECIALS), 0)]]
        if len(ranked) > len(keep):
            log.warning("The captions have %d distinct words; config.text.vocab_size=%d keeps the %d most "
                        "frequent, the rest become <unk>.", len(ranked), vocab_size, len(keep))
        return cls(SPECIALS + tuple(keep), max_length)

    def encode(self, text: str) -> list[int]:
        ids = [self.index.get(w, 1) for w in split_words(text)]
        if len(ids) + 2 > self.max_length:
            if not self._warned:
                log.warning("Text %r has %d words, more than config.text.max_length=%d allows; truncated "
                            "(further truncations are not reported).", text, len(ids), self.max_length - 2)
                self._warned = True
            ids = ids[: self.max_length - 2]
        return [2] + ids + [3]

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(texts, str):
            texts = [texts]
        ids = np.zeros((len(texts), self.max_length), np.int32)
        for row, text in enumerate(texts):
            tokens = self.encode(text)
            ids[row, : len(tokens)] = tokens
        return ids, (ids != 0).astype(np.int32)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump({"kind": "word", "max_length": self.max_length, "words": list(self.words)}, f, indent=0)

    @classmethod
    def load(cls, path: str) -> "WordTokenizer":
        try:
            with open(path) as f:
                spec = json.load(f)
            return cls(spec["words"], spec["max_length"])
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"Cannot read the word tokenizer {path} ({type(e).__name__}: {e}); it is written by "
                            "`diffax train` in the run's workdir: train again or restore the file.") from None

    def __eq__(self, other) -> bool:
        return isinstance(other, WordTokenizer) and (self.words, self.max_length) == (other.words, other.max_length)

    def __getstate__(self):  # picklable for Grain worker processes
        return {"words": self.words, "max_length": self.max_length}

    def __setstate__(self, state):
        self.__init__(state["words"], state["max_length"])


class EncoderLayer(nnx.Module):
    """Pre-LN transformer layer: x + attn(LN(x)), then x + MLP(LN(x)) (GELU, 4x width)."""

    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
        kw = dict(dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
        self.norm1 = nnx.LayerNorm(width, epsilon=1e-5, rngs=rngs)
        self.qkv = layers.linear(width, 3 * width, **kw)
        self.proj = layers.linear(width, width, **kw)
        self.norm2 = nnx.LayerNorm(width, epsilon=1e-5, rngs=rngs)
        self.fc1 = layers.linear(width, 4 * width, **kw)
        self.fc2 = layers.linear(4 * width, width, **kw)
        self.heads = heads

    def __call__(self, x: Array, mask: Array) -> Array:
        b, n, d = x.shape
        q, k, v = (z.reshape(b, n, self.heads, d // self.heads) for z in jnp.split(self.qkv(self.norm1(x)), 3, -1))
        keep = (mask[:, None, None, :] > 0)  # [B, 1, 1, L]: no query attends to padding
        x = x + self.proj(jax.nn.dot_product_attention(q, k, v, mask=keep).reshape(b, n, d))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False))


class SmallTextEncoder(nnx.Module):
    """encoder(ids [B, L], mask [B, L]) -> TextEmbedding(hidden [B, L, width], pooled [B, width]).

    Token embedding + learned position embedding (Vaswani et al. 2017, sec. 3.5 notes learned
    positions work as well as sinusoids), `depth` pre-LN layers, a final LayerNorm. pooled is
    the mean of the final states over the real tokens (mask 1): a sentence vector for the
    networks that add one to the timestep embedding (DiT here, as SDXL / SD3).
    """

    def __init__(self, *, vocab_size: int, max_length: int, width: int = 128, depth: int = 2, heads: int = 4,
                 rngs: nnx.Rngs):
        if width % heads:
            raise UserError(f"config.text.heads={heads} does not divide config.text.width={width}")
        init = nnx.initializers.normal(0.02)
        self.token_embed = nnx.Embed(vocab_size, width, embedding_init=init, rngs=rngs)
        self.pos_embed = nnx.Param(init(rngs.params(), (max_length, width), jnp.float32))
        self.layers = nnx.List([EncoderLayer(width, heads, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(width, epsilon=1e-5, rngs=rngs)
        self.vocab_size, self.max_length, self.width = int(vocab_size), int(max_length), int(width)

    @property
    def hidden_dim(self) -> int:
        return self.width

    @property
    def pooled_dim(self) -> int:
        return self.width

    def __call__(self, ids: Array, mask: Array) -> TextEmbedding:
        ids = jnp.asarray(ids, jnp.int32)
        mask = jnp.asarray(mask, jnp.int32)
        h = self.token_embed(ids) + self.pos_embed[...][: ids.shape[1]]
        for layer in self.layers:
            h = layer(h, mask)
        h = self.norm(h)
        m = mask[..., None].astype(h.dtype)
        pooled = jnp.sum(h * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
        return TextEmbedding(hidden=h, pooled=pooled)


def tokenizer_path(workdir: str) -> str:
    return os.path.join(workdir, TOKENIZER_FILE)

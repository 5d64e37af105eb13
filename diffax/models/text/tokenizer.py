"""Tokenizers of pretrained text encoders, read from a transformers folder through the `tokenizers` library.

tokenizer.json (what transformers writes for every fast tokenizer: CLIP's byte-level BPE, T5's
Unigram) is read as it is; a CLIP folder with only vocab.json + merges.txt (older SD checkpoints)
gets CLIP's BPE pipeline built around them (Radford et al. 2021: lower-cased, NFC, whitespace
collapsed, CLIP's word pattern, byte-level BPE with </w> word ends, <|startoftext|> ... <|endoftext|>).
Padding and truncation follow transformers' `tokenizer(texts, padding="max_length",
truncation=True, max_length=L)`: special tokens are kept (a truncated CLIP prompt still ends
with <|endoftext|>, a T5 prompt with </s>), padding on the right with the folder's pad token.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any, Sequence

import numpy as np

from diffax.errors import UserError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's word pattern (OpenAI's simple_tokenizer): special tokens, English contractions, letter runs,
# single digits, runs of other non-space characters.
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# transformers writes this for "no limit" (VERY_LARGE_INTEGER) in tokenizer_config.json
_UNLIMITED = 1e20


class TextTokenizer:
    """Strings -> (ids [B, max_length] int32, mask [B, max_length] int32), diffax's Tokenizer protocol.

    Wraps a `tokenizers.Tokenizer` with padding to max_length with pad_token and truncation to
    max_length (special tokens kept); a prompt that does not fit is truncated with a warning that
    names it. vocab_size counts added tokens (T5's sentinels, CLIP's specials).
    """

    def __init__(self, tokenizer, *, max_length: int, pad_token: str, source: str):
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise UserError(f"{source}: the pad token {pad_token!r} is not in the vocabulary")
        self._tokenizer = tokenizer
        self._tokenizer.enable_truncation(max_length=int(max_length))
        self._tokenizer.enable_padding(length=int(max_length), pad_id=pad_id, pad_token=pad_token)
        self.max_length = int(max_length)
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        self.pad_id = int(pad_id)
        self.source = source

    def token_id(self, token: str) -> int | None:
        """The id of `token` (e.g. "<|endoftext|>"), None when it is not in the vocabulary."""
        return self._tokenizer.token_to_id(token)

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(texts, str):
            texts = [texts]
        encodings = self._tokenizer.encode_batch(list(texts))
        for text, enc in zip(texts, encodings):
            if enc.overflowing:
                warnings.warn(f"prompt {text!r} is longer than the {self.max_length} tokens of {self.source}; "
                              "it was truncated", stacklevel=2)
        ids = np.asarray([enc.ids for enc in encodings], np.int32).reshape(len(encodings), self.max_length)
        mask = np.asarray([enc.attention_mask for enc in encodings], np.int32).reshape(ids.shape)
        return ids, mask


def _token(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def read_tokenizer_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, TOKENIZER_CONFIG)
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); restore it from the model's original files") from None


def clip_bpe(folder: str, bos: str = CLIP_BOS, eos: str = CLIP_EOS, unk: str = CLIP_EOS):
    """CLIP's tokenizer built from vocab.json + merges.txt (the files OpenAI's BPE ships as)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    for token in (bos, eos, unk):
        if token not in vocab:
            raise UserError(f"{os.path.join(folder, 'vocab.json')} lacks CLIP's special token {token!r}")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, continuing_subword_prefix="",
                               end_of_word_suffix="</w>", fuse_unk=False))  # fmt: skip
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])  # fmt: skip
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),  # keep the matches only
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([bos, eos])  # never split, whatever the normalizer does
    tok.post_processor = processors.RobertaProcessing((eos, vocab[eos]), (bos, vocab[bos]), trim_offsets=False,
                                                      add_prefix_space=False)  # fmt: skip
    return tok


def load_tokenizer(folder: str, *, kind: str, max_length: int | None = None,
                   max_positions: int | None = None) -> TextTokenizer:  # fmt: skip
    """The tokenizer of a transformers folder for a `kind` ("clip" | "t5") encoder.

    max_length: tokens per prompt. Default for CLIP: tokenizer_config.json's model_max_length,
    else max_positions (77 for every released CLIP); for T5: 77 (T5 has no fixed length; SD3
    pads T5 to 256, Flux to 512, Imagen to 128: pass the one your model was trained with).
    max_positions: the encoder's position table size, which max_length may not exceed (CLIP).
    """
    from tokenizers import Tokenizer

    config = read_tokenizer_config(folder)
    json_path = os.path.join(folder, TOKENIZER_FILE)
    if os.path.exists(json_path):
        try:
            tok = Tokenizer.from_file(json_path)
        except Exception as e:  # the tokenizers library raises bare Exceptions on a bad file
            raise UserError(f"{json_path} could not be read by the tokenizers library: {e}") from None
        source = json_path
    elif kind == "clip" and all(os.path.exists(os.path.join(folder, n)) for n in ("vocab.json", "merges.txt")):
        tok = clip_bpe(folder, _token(config.get("bos_token")) or CLIP_BOS, _token(config.get("eos_token")) or CLIP_EOS,
                       _token(config.get("unk_token")) or CLIP_EOS)  # fmt: skip
        source = os.path.join(folder, "vocab.json")
    else:
        others = " or vocab.json + merges.txt" if kind == "clip" else ""
        raise UserError(
            f"{folder}: no {TOKENIZER_FILE}{others}. Write one once with transformers: "
            f"AutoTokenizer.from_pretrained({folder!r}).save_pretrained({folder!r}), or pass the folder that "
            "holds the encoder's tokenizer"
        )
    if max_length is None:
        if kind == "clip":
            limit = config.get("model_max_length")
            max_length = int(limit) if limit is not None and float(limit) < _UNLIMITED else max_positions or 77
        else:
            max_length = 77
    if max_positions is not None and max_length > max_positions:
        raise UserError(f"{source}: max_length {max_length} exceeds the encoder's {max_positions} positions")
    if max_length < 2:
        raise UserError(f"{source}: max_length must be at least 2 (start / end tokens), got {max_length}")
    default_pad = CLIP_EOS if kind == "clip" else "<pad>"
    pad = _token(config.get("pad_token")) or default_pad
    return TextTokenizer(tok, max_length=max_length, pad_token=pad, source=source)

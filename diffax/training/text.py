"""Text-to-image runs: the config.text section read once, tokenizers, prompts and the null prompt.

A text model's conditioning travels through the data pipeline, the train step and the
samplers as int32 tokens [B, 2, max_length] (the ids and the mask of one caption each), in
the place class labels take in a class-conditional run; the network call encodes them
(diffax/training/build.py). The null condition of classifier-free guidance and of caption
dropout is the empty prompt's tokens (or a negative prompt's).

The small encoder's word tokenizer is built from the training captions on the first run and
saved as <workdir>/tokenizer.json; a resumed run and `diffax sample` read it back.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

import numpy as np

from diffax.errors import UserError

log = logging.getLogger(__name__)


def enabled(config: Any) -> bool:
    """Is config a text-to-image run (config.text.encoder set)?"""
    return "text" in config and bool(config.text.encoder)


def tokens_of(tokenizer: Callable, texts: Sequence[str]) -> np.ndarray:
    """int32 [N, 2, max_length]: the (ids, mask) of each text."""
    ids, mask = tokenizer(list(texts))
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
    if ids.shape != mask.shape or ids.ndim != 2:
        raise UserError(f"the tokenizer returned ids {ids.shape} and mask {mask.shape}; expected two [N, L] arrays")
    return np.stack([ids, mask], axis=1)


def check_tokenizer(tokenizer: Any, vocab_size: int, max_length: int, what: str) -> None:
    """A tokenizer that does not match its encoder (more ids than embedding rows, another length) is an error."""
    if int(tokenizer.vocab_size) > int(vocab_size) or int(tokenizer.max_length) != int(max_length):
        raise UserError(f"The tokenizer {what} has {tokenizer.vocab_size} words and length {tokenizer.max_length}, "
                        f"but the text encoder has {vocab_size} embedding rows and length {max_length} "
                        "(config.text.vocab_size / max_length): they do not belong together. Train in a new "
                        "--workdir, or set those fields back.")


def small_tokenizer_for_training(config: Any, workdir: str) -> Callable:
    """source -> the small encoder's word tokenizer: read from the workdir, else built from the source's
    captions (every caption of every record) and saved there."""
    from diffax.models.text.small import WordTokenizer, tokenizer_path

    t = config.text
    path = tokenizer_path(workdir)

    def make(source) -> WordTokenizer:
        if os.path.exists(path):
            tok = WordTokenizer.load(path)
        else:
            captions = (c for record in source.records for c in source.captions(record))
            tok = WordTokenizer.build(captions, int(t.vocab_size), int(t.max_length))
            os.makedirs(workdir, exist_ok=True)
            tok.save(path)
            log.info("Built a %d-word tokenizer from the captions of %s: %s", tok.vocab_size, source.name, path)
        check_tokenizer(tok, t.vocab_size, t.max_length, path)
        return tok

    return make


def load_tokenizer(config: Any, workdir: str | None, diffusion: Any = None) -> Callable:
    """The tokenizer of a trained text run: the workdir's tokenizer.json (small encoder), or the
    pretrained encoder's own (held by `diffusion`)."""
    if config.text.encoder != "small":
        if diffusion is None or diffusion.tokenizer is None:
            raise UserError(f"No tokenizer for the text encoder {config.text.encoder!r}.")
        return diffusion.tokenizer
    from diffax.models.text.small import WordTokenizer, tokenizer_path

    path = tokenizer_path(workdir or "")
    if not workdir or not os.path.exists(path):
        raise UserError(f"No {os.path.basename(path)} in {workdir!r}: the small text encoder's tokenizer is written "
                        "by `diffax train` in the run's workdir; point --workdir at the run.")
    tok = WordTokenizer.load(path)
    check_tokenizer(tok, config.text.vocab_size, config.text.max_length, path)
    return tok


def read_prompts(prompts: Sequence[str], prompts_file: str = "") -> list[str]:
    """--prompt values then the lines of --prompts FILE (blank lines skipped)."""
    out = [str(p) for p in prompts]
    if prompts_file:
        try:
            with open(prompts_file, encoding="utf-8") as f:
                out += [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise UserError(f"--prompts={prompts_file}: cannot read it ({e}).") from None
    return out


def preview_prompts(config: Any, source: Any = None) -> list[str]:
    """The prompts of the grids written during training: config.sampling.prompts, cycled to
    config.sampling.num_samples; without them the first caption of each of the first records."""
    n = int(config.sampling.num_samples)
    prompts = [str(p) for p in config.sampling.get("prompts", ())]
    if not prompts and source is not None and source.captions is not None and source.records is not None:
        prompts = [source.captions(source.records[i])[0] for i in range(min(n, len(source.records)))]
    if not prompts:
        prompts = [""]
    return [prompts[i % len(prompts)] for i in range(n)]

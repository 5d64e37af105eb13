"""Text-to-image runs: the config.text section read once, tokenizers, prompts and the null prompt.

A text model's conditioning travels through the data pipeline as int32 tokens [B, 2, max_length]
(the ids and the mask of one caption each), in the place class labels take in a class-conditional
run. The text encoder runs once per batch (`Diffusion.encode_text`, diffax/training/build.py): in
the train step before the loss, and in sampling before the sampler's loop (once for the prompts,
once for the null prompt), so the network evaluations receive embeddings {"hidden", "mask",
"pooled"}. With a frozen pretrained encoder, `diffax encode-data --text_embeddings` can store every
caption's embedding in a latent cache (diffax/data/latents.py); a run on that cache reads them from
the data and holds no encoder in its train step (`cached_embeddings`). The null condition of
classifier-free guidance and of caption dropout is the empty prompt's tokens (or a negative
prompt's), or its embedding stored once in the cache.

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


def frozen(config: Any) -> bool:
    """Is the text encoder frozen (a pretrained one, config.text.trainable False)? The small one trains."""
    return str(config.text.encoder) != "small" and not bool(config.text.trainable)


def cached_embeddings(config: Any) -> str:
    """The latent cache whose stored text embeddings a run trains on ("" when it encodes its captions): a
    text run with a frozen encoder on `latents:DIR` where DIR holds embeddings (diffax/data/latents.py).
    A trainable encoder changes with the denoiser, so its run tokenizes the cached captions instead."""
    from diffax.data import latents, sources

    if not enabled(config) or not frozen(config) or config.training.task != "diffusion":
        return ""
    kind, cache_dir = sources.split_name(config.data.name)
    if kind != "latents" or not os.path.exists(os.path.join(cache_dir, latents.TEXT_META_NAME)):
        return ""
    return cache_dir


RECORD_NAME = "text_embeddings.json"


def trained_on_cached_embeddings(workdir: str) -> bool:
    """Did the run in `workdir` train on a cache's text embeddings (its state holds no encoder)? Its
    <workdir>/text_embeddings.json says so, whatever the cache holds now."""
    return os.path.exists(os.path.join(workdir, RECORD_NAME))


def record_cached_embeddings(workdir: str, config: Any, cache: str, has_checkpoints: bool) -> None:
    """A run's train state holds the frozen encoder or not, for good: refuse to resume it the other way (a
    cache that gained or lost its embeddings), and record a run on cached embeddings in its workdir."""
    import json

    import jax

    recorded = trained_on_cached_embeddings(workdir)
    if has_checkpoints and recorded != bool(cache):
        before, now = ("on the text embeddings of a cache", "encodes its captions") if recorded else (
            "with the text encoder in its train state", f"would read the text embeddings stored in {cache}")
        raise UserError(f"The run in {workdir} was trained {before}, and this config {now} "
                        f"(config.data.name={config.data.name!r}): its checkpoints do not fit. Resume it with the "
                        "data it was trained on, or train in a new --workdir.")
    if not cache and recorded and not has_checkpoints and jax.process_index() == 0:  # a start that saved nothing
        os.remove(os.path.join(workdir, RECORD_NAME))
    if cache and not recorded and jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, RECORD_NAME), "w", encoding="utf-8") as f:
            json.dump({"cache": os.path.abspath(cache), "encoder": str(config.text.encoder)}, f, indent=2)


def _sha256(paths: Sequence[str]) -> str:
    import hashlib

    h = hashlib.sha256()
    for path in paths:
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def encoder_identity(config: Any) -> dict[str, Any]:
    """What makes a frozen encoder's embeddings what they are: its folder, the sha256 of its weights and of
    its tokenizer files, and max_length. Stored with cached embeddings and compared by the run that reads them.
    A trainable encoder (the small one, or config.text.trainable) has no fixed embeddings: an error."""
    from diffax.models.text import pretrained

    t = config.text
    if not enabled(config):
        raise UserError("config.text.encoder is empty: there is no text encoder whose embeddings could be cached.")
    if not frozen(config):
        what = ("the small encoder trains with the denoiser" if str(t.encoder) == "small"
                else "config.text.trainable=True trains the encoder with the denoiser")
        raise UserError(f"Text embeddings can be cached only for a frozen pretrained encoder, but {what} "
                        f"(config.text.encoder={t.encoder!r}): its embeddings change every step. Drop "
                        "--text_embeddings (the cache keeps the captions, which such a run tokenizes), or use a "
                        "frozen transformers CLIP / T5 folder.")
    if t.get("encoder_2", ""):
        raise UserError("Text embeddings of an SDXL run (config.text.encoder_2) are not cached: its pooled vector "
                        "carries each image's size ids. Drop --text_embeddings (the cache keeps the captions).")
    folder = str(t.encoder)
    index = os.path.join(folder, pretrained.WEIGHTS_INDEX)
    if os.path.exists(os.path.join(folder, pretrained.WEIGHTS_FILE)):
        weights = [os.path.join(folder, pretrained.WEIGHTS_FILE)]
    elif os.path.exists(index):
        import json

        with open(index, encoding="utf-8") as f:
            weights = [index] + [os.path.join(folder, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
    else:
        raise UserError(f"config.text.encoder={folder!r}: no {pretrained.WEIGHTS_FILE} there (a transformers folder).")
    tok_dir = pretrained._tokenizer_folder(folder)
    tok_files = [os.path.join(tok_dir, n) for n in ("tokenizer.json", "vocab.json", "merges.txt")
                 if os.path.exists(os.path.join(tok_dir, n))]
    return {"path": os.path.abspath(folder), "sha256": _sha256(weights), "tokenizer_sha256": _sha256(tok_files)}


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

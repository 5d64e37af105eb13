"""Prompt fidelity of a text-to-image model on the captioned digits: does "the digit three" draw a 3?

Samples are drawn from prompts that name each digit (every phrasing of the training captions,
`data.sources.digit_captions`, cycled), and the offline digits classifier of
`digits_features.py` (trained on the real digits, cached beside the eval results) labels them;
the score is its accuracy against the digit each prompt names, at several classifier-free
guidance scales (Ho & Salimans 2022). Chance is 10%. This is the CLIP-score idea (Hessel et
al. 2021; Imagen's "image-text alignment", Saharia et al. 2022) with a classifier in place
of CLIP, on a data set where the text has one meaning that a classifier can check.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

SCALES = (1.0, 2.0, 4.0)


def digit_prompts(per_digit: int) -> tuple[list[str], np.ndarray]:
    """(prompts, the digit each names): per_digit prompts for each of 0..9, cycling the caption phrasings."""
    from diffax.data.sources import digit_captions

    prompts, digits = [], []
    for d in range(10):
        phrasings = digit_captions(d)
        prompts += [phrasings[i % len(phrasings)] for i in range(per_digit)]
        digits += [d] * per_digit
    return prompts, np.asarray(digits, np.int32)


def accuracy(predicted: np.ndarray, digits: np.ndarray) -> float:
    """Fraction of samples the classifier labels with the digit their prompt names."""
    return float(np.mean(np.asarray(predicted) == np.asarray(digits)))


def prompt_fidelity(draw: Callable[[float, np.ndarray, int], np.ndarray],
                    classify: Callable[[np.ndarray], np.ndarray] | None,
                    tokens_of: Callable[[Sequence[str]], np.ndarray], *, per_digit: int, seed: int,
                    scales: Sequence[float] = SCALES) -> dict[str, float]:
    """{"prompt_fidelity_w1": acc, "prompt_fidelity_w2": ..., ...}.

    draw(guidance_scale, tokens [N, 2, L], seed) -> uint8 images; classify(images) -> predicted
    digits; tokens_of(prompts) tokenizes. The same seed (so the same noise) at every scale.
    classify=None (processes other than 0 of a multi-process job): only draw, since sampling is
    one computation over every process's devices; returns {}.
    """
    prompts, digits = digit_prompts(per_digit)
    tokens = tokens_of(prompts)
    out = {}
    for w in scales:
        images = draw(float(w), tokens, seed)
        if classify is not None:
            out[f"prompt_fidelity_w{float(w):g}"] = accuracy(classify(images), digits)
    return out


def evaluate(workdir: str, step: int, config: Any, classify: Callable[[np.ndarray], np.ndarray] | None, *,
             per_digit: int, seed: int, scales: Sequence[float] = SCALES) -> dict[str, float]:
    """`prompt_fidelity` of the checkpoint at `step` of a digits text run, with config.sampling's sampler
    (called by every process of a job; classify only on process 0)."""
    from diffax.training import inference

    runs: dict[float, Any] = {}

    def draw(w: float, tokens: np.ndarray, seed: int) -> np.ndarray:
        if w not in runs:
            cfg = config.copy_and_resolve_references()
            with cfg.unlocked():
                cfg.sampling.guidance_scale = w
            runs[w] = inference.load(workdir, step, use_ema=bool(config.sampling.use_ema), config=cfg)
        return runs[w].draw(len(tokens), seed, labels=tokens, batch_size=int(config.eval.batch_size),
                            progress=False)["images"]

    def tokens_of(prompts):
        if not runs:
            draw_any = inference.load(workdir, step, use_ema=bool(config.sampling.use_ema), config=config)
            return draw_any.prompt_tokens(list(prompts))
        return next(iter(runs.values())).prompt_tokens(list(prompts))

    return prompt_fidelity(draw, classify, tokens_of, per_digit=per_digit, seed=seed, scales=scales)


def digits_classifier(config: Any, cache_dir: str) -> Callable[[np.ndarray], np.ndarray]:
    """The offline digits classifier (digits_features.py, cached in cache_dir): uint8 images -> digits."""
    import os

    from diffax.evaluation import digits_features, job

    def data_fn():
        batches = list(job.dataset_images(config, 4096))
        return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])

    net = digits_features.load_or_train(os.path.join(cache_dir, "digits_features.npz"),
                                        job._digits_fingerprint(config), data_fn)
    features = digits_features.make_feature_fn(net)
    return lambda images: np.argmax(features(images)["logits"], axis=-1)


def applies(config: Any) -> bool:
    """Prompt fidelity is defined for text models trained on the captioned digits."""
    from diffax.training import text

    return text.enabled(config) and str(config.data.name) == "digits"


__all__ = ["SCALES", "accuracy", "applies", "digit_prompts", "digits_classifier", "evaluate", "prompt_fidelity"]

"""A text-to-image run end to end: `diffax train` on captioned digits with the small encoder writes its
tokenizer and the preview prompts, resumes bit-exactly, and `diffax sample` takes prompts; the prompt
errors; prompt fidelity's bookkeeping."""
import os

import numpy as np
import pytest

from configs import digits_text
from diffax import cli
from diffax.errors import UserError
from diffax.evaluation import prompt_fidelity
from diffax.training import inference, trainer
from tests import runs


def tiny_config(num_steps):
    config = digits_text.get_config()
    config.model.name = "dit"
    config.model.update(dict(hidden_size=32, depth=1, num_heads=2, patch_size=4))
    config.text.update(dict(width=16, depth=1, heads=2))
    config.training.update(dict(num_steps=num_steps, batch_size=8, log_every=2, checkpoint_every=2,
                                sample_every=0, progress_bar=False))
    config.sampling.update(dict(steps=2, num_samples=10, batch_size=10))
    return config


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A 4-step run."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    trainer.train(tiny_config(4), workdir)
    return workdir


def test_the_run_keeps_its_tokenizer_and_prompts(straight):
    from diffax.models.text.small import WordTokenizer

    tok = WordTokenizer.load(os.path.join(straight, "tokenizer.json"))
    assert {"digit", "seven", "7", "handwritten"} <= set(tok.words)
    with open(os.path.join(straight, "samples", "prompts.txt")) as f:
        assert f.read().splitlines()[:2] == ["the digit zero", "the digit one"]


@pytest.mark.slow
def test_resume_is_bit_exact(straight, tmp_path):
    """Stopped at step 2 and resumed to 4: the same state as 4 steps straight (tokens come from the
    checkpointed data position, and the caption dropout from the step's key)."""
    resumed = str(tmp_path / "resumed")
    trainer.train(tiny_config(2), resumed)
    trainer.train(tiny_config(4), resumed, force=True)
    runs.assert_same_state(runs.final_state(straight), runs.final_state(resumed))


def test_sample_with_prompts_and_without(straight, tmp_path):
    out = str(tmp_path / "out")
    cli.run(["diffax", "sample", f"--workdir={straight}", f"--output={out}", "--num_samples=3", "--prompt=number 7",
             "--prompt=the digit one", "--guidance_scale=2", "--negative_prompt=number 1"])
    with open(os.path.join(out, "prompts.txt")) as f:
        assert f.read().splitlines() == ["number 7", "the digit one", "number 7"]
    with np.load(os.path.join(out, "samples.npz")) as f:
        assert f["images"].shape == (3, 8, 8, 1) and list(f["prompts"]) == ["number 7", "the digit one", "number 7"]
    inf = inference.load(straight)
    with pytest.raises(UserError, match="give prompts"):
        inf.draw(2, 0)
    # samples.npz keeps each sample's tokens (that prompts change the images is test_text_learning.py's)
    tokens = inf.prompt_tokens(["number 7", "the digit one", "number 7"])
    with np.load(os.path.join(out, "samples.npz")) as f:
        assert f["labels"].shape == (3, 2, tokens.shape[-1])
        np.testing.assert_array_equal(f["labels"], tokens)


def test_prompt_fidelity_scores_the_digit_each_prompt_names():
    prompts, digits = prompt_fidelity.digit_prompts(4)
    assert prompts[4 * 7] == "a handwritten 7" and prompts[4 * 7 + 1] == "the digit seven" and digits[4 * 7] == 7

    def tokens_of(texts):  # the "image" of a prompt is its digit
        return np.asarray([[int(digits[prompts.index(t)])] for t in texts])

    def draw(w, tokens, seed):  # w = 1 draws the right digit half the time, w > 1 always
        right = tokens[:, 0]
        return right if w > 1 else np.where(np.arange(len(right)) % 2 == 0, right, (right + 1) % 10)

    out = prompt_fidelity.prompt_fidelity(draw, lambda images: images, tokens_of, per_digit=4, seed=0)
    assert out == {"prompt_fidelity_w1": 0.5, "prompt_fidelity_w2": 1.0, "prompt_fidelity_w4": 1.0}


def test_prompts_to_a_model_without_text_are_an_error():
    import types

    inf = inference.Inference(config=None, step=0, diffusion=types.SimpleNamespace(null_tokens=None), params=None,
                              mesh=None, _sample=None)
    with pytest.raises(UserError, match="not a text-to-image model"):
        inf.prompt_tokens(["the digit one"])

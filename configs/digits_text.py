"""Text-to-image on the bundled digits: captions generated from the labels ("a handwritten 7",
"the digit seven", "number 7", ...), the small text encoder trained with a cross-attention UNet.

Offline, and trains on a 2-core CPU in a few minutes:
    diffax train --config configs/digits_text.py --workdir runs/digits_text
    diffax sample --workdir runs/digits_text --prompt "the digit three" --guidance_scale 2 --output out
    diffax eval --workdir runs/digits_text     (reports prompt fidelity at guidance scales 1, 2, 4)
"""
from configs import digits


def get_config(variant: str = ""):
    config = digits.get_config(variant)
    config.text.encoder = "small"
    config.text.max_length = 8  # <bos> + up to 6 words + <eos>: every digit caption fits
    config.text.vocab_size = 64
    config.text.width = 64
    config.text.depth = 2
    config.text.heads = 4
    config.text.caption_dropout = 0.1
    config.model.attention_resolutions = (4,)  # cross-attention transformers at 4x4 and in the middle
    config.model.num_heads = 4
    config.sampling.prompts = tuple(f"the digit {w}" for w in (
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))
    config.sampling.guidance_scale = 2.0
    config.training.num_steps = 3000
    return config

"""Text-to-image on the bundled digits: captions generated from the labels ("a handwritten 7",
"the digit seven", "number 7", ...), the small text encoder trained with a cross-attention UNet.

Offline, and trains on a 2-core CPU in a few minutes:
    diffax train --config configs/digits_text.py --workdir runs/digits_text
    diffax sample --workdir runs/digits_text --prompt "the digit three" --guidance_scale 2 --output out
    diffax eval --workdir runs/digits_text     (reports prompt fidelity at guidance scales 1, 2, 4)
The same task with an MMDiT (SD3's joint-attention transformer, Esser et al. 2024) trained by rectified flow:
    diffax train --config configs/digits_text.py:mmdit --workdir runs/digits_mmdit
"""
from configs import digits


def get_config(variant: str = ""):
    if variant not in ("", "flow", "mmdit"):
        raise ValueError(f"configs/digits_text.py:{variant}: the variants are 'flow' and 'mmdit'.")
    config = digits.get_config("flow" if variant == "mmdit" else variant)  # SD3's recipe: rectified flow
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
    if variant == "mmdit":  # 16 image tokens (2x2 patches of 8x8) and 8 text tokens in every attention
        m = config.model
        m.name, m.hidden_size, m.depth, m.num_heads, m.patch_size = "mmdit", 64, 4, 4, 2
    return config

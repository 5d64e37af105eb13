"""The offline latent default, step 2: a small UNet on the 4x4x4 latents of the digits autoencoder.

After `configs/digits_autoencoder.py` has trained (it writes runs/digits_ae/autoencoder/):
    diffax encode-data --config configs/digits_latent.py --output runs/digits_latents
    diffax train --config configs/digits_latent.py:train --workdir runs/digits_latent
The default variant describes the 16x16 digits as the autoencoder saw them (what encode-data
reads); `:train` reads the cache, config.data.name="latents:runs/digits_latents". Samples,
`diffax sample` and `diffax eval` (fd_digits) are decoded 16x16 images.
`:pixel` is the same network, steps and batch on the 16x16 pixels themselves: the baseline whose
fd_digits the README gives beside the latent model's.
"""
from configs import default

CACHE = "runs/digits_latents"


def get_config(variant: str = "encode"):
    config = default.get_config()
    config.data.name = f"latents:{CACHE}" if variant == "train" else "digits"
    config.data.image_size = 16
    config.data.resize = "resize"
    config.data.channels = 1
    config.autoencoder.path = "" if variant == "pixel" else "runs/digits_ae/autoencoder"
    config.model.channels = 32
    config.model.channel_mult = (1, 2)
    config.model.attention_resolutions = (2,) if variant != "pixel" else (8,)  # the second level: 2x2 latents, 8x8 pixels
    config.training.batch_size = 64
    config.training.num_steps = 1000
    config.training.log_every = 200
    config.training.checkpoint_every = 500
    config.training.sample_every = 500
    if variant not in ("encode", "train", "pixel"):
        raise ValueError(f"configs/digits_latent.py variants: encode, train, pixel (got {variant!r})")
    return config

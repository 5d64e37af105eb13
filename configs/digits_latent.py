"""The offline latent default, step 2: a small UNet on the 4x4x4 latents of the digits autoencoder.

After `configs/digits_autoencoder.py` has trained (it writes runs/digits_ae/autoencoder/):
    diffax encode-data --config configs/digits_latent.py --output runs/digits_latents
    diffax train --config configs/digits_latent.py:train --workdir runs/digits_latent
The default variant describes the 16x16 digits as the autoencoder saw them (what encode-data
reads); `:train` reads the cache, config.data.name="latents:runs/digits_latents". Samples,
`diffax sample` and `diffax eval` (fd_digits) are decoded 16x16 images.
"""
from configs import default

CACHE = "runs/digits_latents"


def get_config(variant: str = "encode"):
    config = default.get_config()
    config.data.name = "digits" if variant == "encode" else f"latents:{CACHE}"
    config.data.image_size = 16
    config.data.resize = "resize"
    config.data.channels = 1
    config.autoencoder.path = "runs/digits_ae/autoencoder"
    config.model.channels = 32
    config.model.channel_mult = (1, 2)
    config.model.attention_resolutions = (2,)  # the 2x2 level of the 4x4 latents
    config.training.batch_size = 64
    config.training.num_steps = 1000
    config.training.log_every = 200
    config.training.checkpoint_every = 500
    config.training.sample_every = 500
    if variant not in ("encode", "train"):
        raise ValueError(f"configs/digits_latent.py variants: encode, train (got {variant!r})")
    return config

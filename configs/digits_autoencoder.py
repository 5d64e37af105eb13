"""The offline latent default, step 1: a KL autoencoder (Rombach et al. 2022) on the bundled digits upscaled to 16x16.

16x16x1 images -> 4x4x4 latents (downsampling factor 4). Trains on a CPU in minutes:
    diffax train --config configs/digits_autoencoder.py --workdir runs/digits_ae
and writes runs/digits_ae/autoencoder/ (a diffusers AutoencoderKL folder) for
configs/digits_latent.py.
"""
from configs import default


def get_config():
    config = default.get_config()
    config.data.name = "digits"
    config.data.image_size = 16
    config.data.resize = "resize"  # bicubic upscaling of the 8x8 digits
    config.data.channels = 1
    config.training.task = "autoencoder"
    a = config.autoencoder
    a.block_out_channels = (16, 32, 32)
    a.layers_per_block = 1
    a.latent_channels = 4
    a.norm_groups = 8
    a.recon_loss = "l1"
    a.kl_weight = 1e-6
    a.disc_weight = 0.0
    config.optimizer.learning_rate = 1e-3
    config.training.batch_size = 64
    config.training.num_steps = 500
    config.training.log_every = 100
    config.training.checkpoint_every = 250
    config.training.sample_every = 250
    config.sampling.num_samples = 32  # held-out test digits in the reconstruction grid
    return config

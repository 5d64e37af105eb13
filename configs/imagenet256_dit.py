"""Peebles & Xie 2023 (DiT): class-conditional DiT-XL/2 on the 32x32x4 latents of 256x256 ImageNet.

SD's autoencoder (e.g. stabilityai/sd-vae-ft-ema as a diffusers folder, scaling 0.18215), ADM's
linear schedule with 1000 steps, epsilon prediction with learned variances (the hybrid loss of
Nichol & Dhariwal 2021), AdamW 1e-4 without weight decay or warm-up, batch 256, EMA 0.9999,
labels dropped 10% of the time for classifier-free guidance; FID-50K with 250 DDPM steps
(guidance 1.5 for their best FID). DiT trains on horizontally flipped images too; diffax's
caches do not hold flips (see README), so this trains on unflipped latents.

First encode the data once, then train on the cache:
    diffax encode-data --config configs/imagenet256_dit.py --output caches/imagenet256 \\
        --config.autoencoder.path=PATH/sd-vae-ft-ema
    diffax train --config configs/imagenet256_dit.py --workdir runs/dit \\
        --config.autoencoder.path=PATH/sd-vae-ft-ema --config.data.name=latents:caches/imagenet256

The argument picks a variant:
    configs/imagenet256_dit.py         the paper's setup (needs the prepared TFDS imagenet2012 and SD's VAE)
    configs/imagenet256_dit.py:small   a tiny DiT on the bundled digits at 32x32 RGB with the random-weight
                                       test autoencoder (tests/fixtures/diffusers_vae/sd): a CPU smoke test
"""
import os

from configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(variant: str = "paper"):
    config = default.get_config()
    d = config.data
    d.name = "tfds:imagenet2012"  # encode-data reads the images; training reads latents:DIR
    d.image_size = 256
    d.resize = "resize"
    d.channels = 3
    d.random_flip = False
    d.conditional = True
    d.num_classes = 1000
    d.num_workers = 4

    config.autoencoder.path = ""  # set to SD's AutoencoderKL folder

    m = config.model
    m.name = "dit"
    m.preset = "XL/2"
    m.learn_sigma = True

    df = config.diffusion
    df.schedule = "linear"
    df.num_steps = 1000
    df.prediction = "eps"
    df.weighting = "simple"
    df.time_sampling = "discrete"
    df.label_dropout = 0.1

    o = config.optimizer
    o.name = "adamw"
    o.learning_rate = 1e-4
    o.weight_decay = 0.0
    o.warmup_steps = 0
    o.decay = "constant"
    o.grad_clip = 0.0

    t = config.training
    t.num_steps = 400_000
    t.batch_size = 256
    t.ema_decay = 0.9999
    t.ema_warmup = False
    t.log_every = 100
    t.checkpoint_every = 50_000
    t.sample_every = 50_000

    s = config.sampling
    s.sampler = "ddpm"
    s.steps = 250
    s.variance = "learned"
    s.guidance_scale = 1.5
    config.eval.num_samples = 50_000

    if variant == "small":
        d.name = "digits"
        d.image_size = 32
        d.num_classes = 10
        d.num_workers = 0
        config.autoencoder.path = os.path.join(ROOT, "tests", "fixtures", "diffusers_vae", "sd")
        m.preset = ""
        m.patch_size, m.hidden_size, m.depth, m.num_heads = 2, 32, 2, 2
        t.num_steps, t.batch_size, t.log_every, t.checkpoint_every, t.sample_every = 20, 16, 10, 20, 20
        s.steps, s.num_samples, s.batch_size = 10, 8, 8
        config.eval.num_samples, config.eval.batch_size = 16, 16
    elif variant != "paper":
        raise ValueError(f"configs/imagenet256_dit.py variants: paper, small (got {variant!r})")
    return config

"""Ho et al. 2020 on CIFAR-10: the 35.7M-parameter UNet, linear betas, epsilon loss.

Adam 2e-4 with 5000 warm-up steps, batch 128, EMA 0.9999, gradient clipping 1,
dropout 0.1, random horizontal flips, 800k steps. Needs the TFDS cifar10 data
set prepared once (`diffax prepare-data --config configs/cifar10_ddpm.py`).

The argument picks a variant:
    configs/cifar10_ddpm.py            the paper's setup
    configs/cifar10_ddpm.py:small      a tiny UNet for smoke tests on a CPU
"""
from configs import default


def get_config(variant: str = "paper"):
    config = default.get_config()
    config.data.name = "tfds:cifar10"
    config.data.image_size = 32
    config.data.resize = "resize"
    config.data.channels = 3
    config.data.random_flip = True
    config.data.num_workers = 2

    m = config.model
    m.name = "unet"
    m.channels = 128
    m.channel_mult = (1, 2, 2, 2)
    m.num_res_blocks = 2
    m.attention_resolutions = (16,)
    m.num_heads = 1
    m.dropout = 0.1
    m.norm_groups = 32

    config.diffusion.schedule = "linear"
    config.diffusion.num_steps = 1000
    config.diffusion.prediction = "eps"
    config.diffusion.weighting = "simple"
    config.diffusion.time_sampling = "discrete"

    o = config.optimizer
    o.name = "adam"
    o.learning_rate = 2e-4
    o.warmup_steps = 5000
    o.decay = "constant"
    o.grad_clip = 1.0

    t = config.training
    t.num_steps = 800_000
    t.batch_size = 128
    t.ema_decay = 0.9999
    t.ema_warmup = False
    t.log_every = 1000
    t.checkpoint_every = 10_000
    t.sample_every = 10_000

    config.sampling.sampler = "ddpm"
    config.sampling.steps = 1000
    config.eval.num_samples = 50_000

    if variant == "small":
        m.channels = 32
        m.channel_mult = (1, 2)
        m.num_res_blocks = 1
        m.norm_groups = 8
        t.batch_size = 8
        t.num_steps = 2
        t.log_every = 1
        t.checkpoint_every = 2
        config.sampling.steps = 10
        config.sampling.num_samples = 8
    elif variant != "paper":
        raise ValueError(f"Unknown variant {variant!r} of configs/cifar10_ddpm.py: use 'paper' or 'small'.")
    return config

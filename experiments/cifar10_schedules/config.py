"""Which noise schedule and which prediction target train the best DDPM on CIFAR-10?

Six trials: the linear (Ho et al. 2020) and cosine (Nichol & Dhariwal 2021)
schedules crossed with predicting the noise eps (Ho et al. 2020), the velocity
v (Salimans & Ho 2022) or the clean image x0. Everything else is the DDPM
setup of configs/cifar10_ddpm.py (35.7M-parameter UNet, 1000 discrete steps,
simple MSE loss), trained for 200k steps instead of 800k, with DDIM-100
samples for a cheaper FID. See README.md next to this file for the launch
command; the results table goes in results.md.

    diffax sweep --config experiments/cifar10_schedules/config.py --workdir runs/cifar10_schedules
    diffax sweep --config experiments/cifar10_schedules/config.py:small ...   (a CPU smoke test)
"""
from configs import cifar10_ddpm
from diffax.sweep import product, sweep


def get_config(variant: str = "paper"):
    config = cifar10_ddpm.get_config(variant)
    if variant == "paper":
        config.training.num_steps = 200_000
        config.training.checkpoint_every = 25_000
        config.training.sample_every = 25_000
        config.training.keep_checkpoints = 8  # keep every checkpoint for FID against steps
        config.sampling.sampler = "ddim"
        config.sampling.steps = 100
        config.eval.num_samples = 10_000  # FID-10k per checkpoint; rerun the best with 50k
    return config


def get_sweep(variant: str = "paper"):
    del variant  # the same six trials at every size
    return product(
        sweep("config.diffusion.schedule", ["linear", "cosine"]),
        sweep("config.diffusion.prediction", ["eps", "v", "x0"]),
    )

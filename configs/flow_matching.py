"""The flow-matching recipe shared by `configs/toy2d.py:flow` and `configs/digits.py:flow` (not a config file itself).

Rectified flow (Liu et al. 2023; Lipman et al. 2023) as Stable Diffusion 3 trains it (Esser et al. 2024):
the network predicts the velocity eps - x of z_t = (1 - t) x + t eps, the loss is the velocity MSE, and
training times are logit-normal. DDIM with eta = 0 on this schedule is exactly the flow's Euler step.

`image_tokens` adds Flux's resolution shift: s = e^mu with mu linear in the number of image tokens
(`diffax.schedules.flux_shift`, diffusers' FluxPipeline defaults), applied to the training times
(config.diffusion.time_shift) and to the flow samplers' grids (config.sampling.shift) alike. Flux counts
the 2x2 patches of its latents: (H / 16) * (W / 16) tokens for an H x W image.
"""


def rectified_flow(config, image_tokens: int = 0):
    """Switch `config` (any image or toy config) to flow matching; returns it. image_tokens > 0: Flux's shift."""
    d = config.diffusion
    d.schedule = "rectified_flow"
    d.num_steps = 0  # continuous time: the network sees c_noise = 1000 t, as SD3's timestep = 1000 sigma
    d.prediction = "flow"
    d.weighting = "flow"
    d.time_sampling = "logit_normal"
    d.logit_mean, d.logit_std = 0.0, 1.0
    if image_tokens > 0:
        from diffax.schedules import flux_shift

        d.time_shift = config.sampling.shift = float(flux_shift(image_tokens))
    return config

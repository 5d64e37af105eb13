"""Samplers: ddpm ddim euler heun dpm_solver pc ode, chosen by config.sampling.sampler.

`sample` runs one batch (pure, jit it); `draw_samples` streams many; `make_denoiser` is the
network -> (x0, eps) view every sampler uses. Adding a sampler: one function registered with
`@SAMPLERS.register(name)` taking (denoise, schedule, noise, key, sampling_cfg, diffusion_cfg).
"""
from diffax.samplers import ddim as _ddim  # noqa: F401  (registers)
from diffax.samplers import ddpm as _ddpm  # noqa: F401
from diffax.samplers import dpm_solver as _dpm_solver  # noqa: F401
from diffax.samplers import karras as _karras  # noqa: F401
from diffax.samplers import ode as _ode  # noqa: F401
from diffax.samplers import pc as _pc  # noqa: F401
from diffax.samplers.base import SAMPLERS, karras_sigmas, spacing_indices, step_grid
from diffax.samplers.ddim import ddim_invert
from diffax.samplers.driver import draw_samples, sample, to_uint8
from diffax.samplers.guidance import make_denoiser

__all__ = [
    "SAMPLERS",
    "make_denoiser",
    "sample",
    "draw_samples",
    "ddim_invert",
    "karras_sigmas",
    "spacing_indices",
    "step_grid",
    "to_uint8",
]

"""Samplers: ddpm ddim pndm euler heun dpm_solver pc ode flow_euler flow_heun, chosen by config.sampling.sampler.

`sample` runs one batch (pure, jit it) with explicit options, `make_sampler(config)` reads
them from a config once, `draw_samples` streams many batches; `make_denoiser` is the
network -> Denoised(x0, eps) view every sampler uses. Adding a sampler: one function
registered with `@SAMPLERS.register(name)` taking (denoise, schedule, noise, key, *, options)
whose keyword options are config.sampling fields of the same names.
"""
from diffax.samplers import ddim as _ddim  # noqa: F401  (registers)
from diffax.samplers import ddpm as _ddpm  # noqa: F401
from diffax.samplers import dpm_solver as _dpm_solver  # noqa: F401
from diffax.samplers import flow as _flow  # noqa: F401
from diffax.samplers import karras as _karras  # noqa: F401
from diffax.samplers import ode as _ode  # noqa: F401
from diffax.samplers import pc as _pc  # noqa: F401
from diffax.samplers import pndm as _pndm  # noqa: F401
from diffax.samplers.base import SAMPLERS, Denoised, karras_sigmas, spacing_indices, step_grid
from diffax.samplers.ddim import ddim_invert
from diffax.samplers.driver import draw_samples, make_sampler, sample, sampler_options, to_uint8
from diffax.samplers.guidance import make_denoiser

__all__ = [
    "SAMPLERS",
    "Denoised",
    "make_denoiser",
    "make_sampler",
    "sample",
    "sampler_options",
    "draw_samples",
    "ddim_invert",
    "karras_sigmas",
    "spacing_indices",
    "step_grid",
    "to_uint8",
]

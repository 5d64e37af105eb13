"""Euler and Heun samplers on a sigma grid (Karras et al. 2022, Algorithms 1 and 2).

Any schedule is run in its VE-equivalent form (Karras et al. 2022, Sec. 4 / App. C): x~ = z / alpha_t
with noise level sigma~ = sigma_t / alpha_t follows dx~/dsigma~ = (x~ - x0) / sigma~, and the network is
evaluated at z = alpha_t x~ with t = t_from_logsnr(-2 log sigma~).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from diffax.samplers import diffusers_grids
from diffax.samplers.base import SAMPLERS, Denoiser, SigmaGrid, karras_sigmas, sigma_range, step_noise, t_of_sigma

Array = jax.Array


def karras_grid(schedule: Any, steps: int, rho: float, sigma_min: float) -> SigmaGrid:
    """The EDM grid (Karras et al. 2022, Eq. 5) over the schedule's sigma~ range (`base.sigma_range`, floored
    at `sigma_min`), starting from the prior N(0, alpha^2 + sigma^2) on z, i.e. N(0, 1 + sigma~^2) on x~."""
    lo, hi = sigma_range(schedule, sigma_min)
    return SigmaGrid(karras_sigmas(lo, hi, steps, rho), jnp.sqrt(1.0 + hi**2))


def sigma_grid(
    schedule: Any, *, steps: int, rho: float, sigma_min: float, grid: str, spacing: str, steps_offset: int
) -> SigmaGrid:
    """The euler / heun noise levels: the paper's EDM grid (`karras_grid`), or diffusers' Euler / Heun grid."""
    if diffusers_grids.check_grid(grid) == "paper":
        return karras_grid(schedule, steps, rho, sigma_min)
    return diffusers_grids.euler_sigma_grid(schedule, steps=steps, spacing=spacing, steps_offset=steps_offset,
                                            karras=grid == "diffusers_karras")


def ve_derivative(denoise: Denoiser, schedule: Any) -> Any:
    """d(x~, sigma~, c_noise) = dx~/dsigma~ = (x~ - D(x~; sigma~)) / sigma~ (Karras et al. 2022, Eq. 3 / Alg. 2
    line 7) from a (z, t) denoiser, D = x0 at z = alpha_t x~, t = t(sigma~). Using D rather than eps keeps the step
    consistent with sigma~ when the schedule's t_from_logsnr is inexact in float32 (eps would be scaled
    by sigma~(t) / sigma~, an error multiplied by |x~| ~ sigma_max)."""

    def d(x: Array, sigma: Array, c_noise: Array | None = None) -> Array:
        t = t_of_sigma(schedule, sigma)
        a, _ = schedule.alpha_sigma(t)
        x0 = denoise(jnp.asarray(a, jnp.float32) * x, t, c_noise).x0
        return (x - x0) / sigma

    return d


def _edm_sampler(
    denoise: Denoiser, schedule: Any, noise: Array, key: Array, grid: SigmaGrid, *, second_order: bool,
    churn: float, s_tmin: float, s_tmax: float, s_noise: float,
) -> Array:
    n = grid.sigmas.shape[0] - 1
    sigma_hi = grid.sigmas[0]
    gamma_max = min(float(churn) / n, math.sqrt(2.0) - 1.0)
    d_fn = ve_derivative(denoise, schedule)
    x = grid.init_scale * jnp.asarray(noise, jnp.float32)
    c_noise = (None, None) if grid.c_noise is None else (grid.c_noise[:-1], grid.c_noise[1:])

    def step(x, xs):
        i, s_cur, s_next, c_cur, c_next = xs
        if churn > 0:  # Algorithm 2, lines 4-6: raise the noise level to s_hat (capped at sigma_max)
            gamma = jnp.where((s_cur >= s_tmin) & (s_cur <= s_tmax), gamma_max, 0.0)
            s_hat = jnp.minimum(s_cur * (1.0 + gamma), sigma_hi)
            x = x + jnp.sqrt(jnp.maximum(s_hat**2 - s_cur**2, 0.0)) * s_noise * step_noise(key, i, x)
        else:
            s_hat = s_cur
        d = d_fn(x, s_hat, c_cur)
        x_next = x + (s_next - s_hat) * d  # Euler step (Algorithm 1 line 5 / Algorithm 2 line 8)
        if second_order:  # 2nd-order correction unless stepping to sigma = 0 (Algorithm 2, lines 9-11)

            def correct(x_next):
                return x + (s_next - s_hat) * 0.5 * (d + d_fn(x_next, s_next, c_next))

            x_next = jax.lax.cond(s_next > 0, correct, lambda u: u, x_next)
        return x_next, None

    x, _ = jax.lax.scan(step, x, (jnp.arange(n), grid.sigmas[:-1], grid.sigmas[1:], *c_noise))
    return x


@SAMPLERS.register("euler")
def euler(
    denoise: Denoiser,
    schedule: Any,
    noise: Array,
    key: Array,
    *,
    steps: int,
    rho: float = 7.0,
    sigma_min: float = 0.002,
    churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    grid: str = "paper",
    spacing: str = "trailing",
    steps_offset: int = 0,
) -> Array:
    """Euler on the probability-flow ODE in sigma~ (Karras et al. 2022, Algorithm 1 with the Eq. 5 grid of
    `rho`, floored at `sigma_min`), plus the stochastic churn of Algorithm 2 (churn, s_tmin, s_tmax,
    s_noise). `grid` = diffusers / diffusers_karras replaces the EDM grid with EulerDiscreteScheduler's
    (`spacing`, `steps_offset`, see `diffusers_grids.euler_sigma_grid`). One evaluation per step."""
    sigmas = sigma_grid(schedule, steps=steps, rho=rho, sigma_min=sigma_min, grid=grid, spacing=spacing,
                        steps_offset=steps_offset)
    return _edm_sampler(denoise, schedule, noise, key, sigmas, second_order=False, churn=churn, s_tmin=s_tmin,
                        s_tmax=s_tmax, s_noise=s_noise)


@SAMPLERS.register("heun")
def heun(
    denoise: Denoiser,
    schedule: Any,
    noise: Array,
    key: Array,
    *,
    steps: int,
    rho: float = 7.0,
    sigma_min: float = 0.002,
    churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    grid: str = "paper",
    spacing: str = "trailing",
    steps_offset: int = 0,
) -> Array:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 2): stochastic churn, Euler step, trapezoidal
    correction except on the last step to sigma = 0, so n steps cost 2n - 1 network evaluations. Options
    as `euler`."""
    sigmas = sigma_grid(schedule, steps=steps, rho=rho, sigma_min=sigma_min, grid=grid, spacing=spacing,
                        steps_offset=steps_offset)
    return _edm_sampler(denoise, schedule, noise, key, sigmas, second_order=True, churn=churn, s_tmin=s_tmin,
                        s_tmax=s_tmax, s_noise=s_noise)

"""Euler and Heun samplers on the EDM sigma grid (Karras et al. 2022, Algorithms 1 and 2).

Any schedule is run in its VE-equivalent form (Karras et al. 2022, Sec. 4 / App. C): x~ = z / alpha_t
with noise level sigma~ = sigma_t / alpha_t follows dx~/dsigma~ = (x~ - x0) / sigma~, and the network is
evaluated at z = alpha_t x~ with t = t_from_logsnr(-2 log sigma~).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffax.samplers.base import SAMPLERS, karras_sigmas, sigma_range, split_output, t_of_sigma

Array = jax.Array


def ve_derivative(denoise: Callable, schedule: Any) -> Callable:
    """d(x~, sigma~) = dx~/dsigma~ = (x~ - D(x~; sigma~)) / sigma~ (Karras et al. 2022, Eq. 3 / Alg. 2 line 7)
    from a (z, t) denoiser, D = x0 at z = alpha_t x~, t = t(sigma~). Using D rather than eps keeps the step
    consistent with sigma~ when the schedule's t_from_logsnr is inexact in float32 (eps would be scaled
    by sigma~(t) / sigma~, an error multiplied by |x~| ~ sigma_max)."""

    def d(x: Array, sigma: Array) -> Array:
        t = t_of_sigma(schedule, sigma)
        a, _ = schedule.alpha_sigma(t)
        x0 = split_output(denoise(jnp.asarray(a, jnp.float32) * x, t))[0]
        return (x - x0) / sigma

    return d


def _edm_sampler(denoise, schedule, noise, key, sampling_cfg, diffusion_cfg, *, second_order: bool) -> Array:
    n = int(sampling_cfg.steps)
    sigma_lo, sigma_hi = sigma_range(schedule, diffusion_cfg)
    sigmas = karras_sigmas(sigma_lo, sigma_hi, n, float(sampling_cfg.rho))
    churn = float(sampling_cfg.churn)
    gamma_max = min(churn / n, math.sqrt(2.0) - 1.0)
    s_tmin, s_tmax, s_noise = float(sampling_cfg.s_tmin), float(sampling_cfg.s_tmax), float(sampling_cfg.s_noise)
    d_fn = ve_derivative(denoise, schedule)
    # prior N(0, alpha^2 + sigma^2) on z is N(0, 1 + sigma~^2) on x~ (init_noise_sigma of diffusers)
    x = jnp.sqrt(1.0 + sigma_hi**2) * jnp.asarray(noise, jnp.float32)

    def step(x, xs):
        i, s_cur, s_next = xs
        if churn > 0:  # Algorithm 2, lines 4-6: raise the noise level to s_hat (capped at sigma_max)
            gamma = jnp.where((s_cur >= s_tmin) & (s_cur <= s_tmax), gamma_max, 0.0)
            s_hat = jnp.minimum(s_cur * (1.0 + gamma), sigma_hi)
            xi = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
            x = x + jnp.sqrt(jnp.maximum(s_hat**2 - s_cur**2, 0.0)) * s_noise * xi
        else:
            s_hat = s_cur
        d = d_fn(x, s_hat)
        x_next = x + (s_next - s_hat) * d  # Euler step (Algorithm 1 line 5 / Algorithm 2 line 8)
        if second_order:  # 2nd-order correction unless stepping to sigma = 0 (Algorithm 2, lines 9-11)

            def correct(x_next):
                return x + (s_next - s_hat) * 0.5 * (d + d_fn(x_next, s_next))

            x_next = jax.lax.cond(s_next > 0, correct, lambda u: u, x_next)
        return x_next, None

    x, _ = jax.lax.scan(step, x, (jnp.arange(n), sigmas[:-1], sigmas[1:]))
    return x


@SAMPLERS.register("euler")
def euler(denoise: Callable, schedule: Any, noise: Array, key: Array, sampling_cfg: Any, diffusion_cfg: Any) -> Array:
    """Euler on the probability-flow ODE in sigma~ (Karras et al. 2022, Algorithm 1 with Eq. 5 grid, rho =
    config.sampling.rho), plus the stochastic churn of Algorithm 2 (churn, s_tmin, s_tmax, s_noise).
    One network evaluation per step."""
    return _edm_sampler(denoise, schedule, noise, key, sampling_cfg, diffusion_cfg, second_order=False)


@SAMPLERS.register("heun")
def heun(denoise: Callable, schedule: Any, noise: Array, key: Array, sampling_cfg: Any, diffusion_cfg: Any) -> Array:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 2): stochastic churn, Euler step, trapezoidal
    correction except on the last step to sigma = 0, so n steps cost 2n - 1 network evaluations."""
    return _edm_sampler(denoise, schedule, noise, key, sampling_cfg, diffusion_cfg, second_order=True)

"""DDPM ancestral sampling (Ho et al. 2020) with fixed or learned variance (Nichol & Dhariwal 2021)."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffax.parameterization import interpolate_log_variance
from diffax.samplers.base import SAMPLERS, grid_alpha_sigma, prior_scale, split_output, step_grid

Array = jax.Array
VARIANCES = ("small", "large", "learned")


def ddpm_step(x0: Array, z: Array, a_c, s_c, a_n, s_n, variance: str, v: Array | None, noise: Array, last) -> Array:
    """One ancestral step z_c -> z_n ~ N(mu, var) of the posterior q(z_n | z_c, x0) (Ho et al. 2020, Eq. 6-7).

    With the step's forward variance beta = sigma_c^2 - (alpha_c/alpha_n)^2 sigma_n^2 (= 1 - abar_c/abar_n
    for a VP schedule, the respaced beta of Nichol & Dhariwal 2021, App. B) the mean is
    mu = alpha_n beta / sigma_c^2 x0 + (alpha_c/alpha_n) sigma_n^2 / sigma_c^2 z_c and the variance is
    "small" beta~ = beta sigma_n^2 / sigma_c^2, "large" beta, or "learned" exp(f log beta + (1 - f) log beta~)
    with f = (v + 1) / 2 (Nichol & Dhariwal 2021, Eq. 15). No noise is added on the last step.
    """
    beta = jnp.maximum(s_c**2 - (a_c / a_n) ** 2 * s_n**2, 0.0)
    mean = (a_n * beta / s_c**2) * x0 + ((a_c / a_n) * s_n**2 / s_c**2) * z
    small = beta * s_n**2 / s_c**2
    if variance == "small":
        std = jnp.sqrt(small)
    elif variance == "large":
        std = jnp.sqrt(beta)
    elif variance == "learned":
        if v is None:
            raise ValueError("config.sampling.variance='learned' needs a model with learn_sigma (2C output channels)")
        log_var = interpolate_log_variance(v, jnp.log(jnp.maximum(small, 1e-20)), jnp.log(jnp.maximum(beta, 1e-20)))
        std = jnp.exp(0.5 * log_var)
    else:
        raise ValueError(
            f"Unknown DDPM variance {variance!r} in config.sampling.variance; valid: {', '.join(VARIANCES)}"
        )
    return mean + jnp.where(last, 0.0, std) * noise


@SAMPLERS.register("ddpm")
def ddpm(denoise: Callable, schedule: Any, noise: Array, key: Array, sampling_cfg: Any, diffusion_cfg: Any) -> Array:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) on the respaced grid of config.sampling.spacing.

    With config.sampling.steps = T and trailing spacing this is exactly Algorithm 2; fewer steps
    use the respaced posterior (Nichol & Dhariwal 2021, App. B). config.sampling.variance selects
    small (beta~), large (beta) or the model's learned interpolation. One evaluation per step.
    """
    t_cur, t_next, final_clean = step_grid(schedule, sampling_cfg)
    a_c, s_c, a_n, s_n = grid_alpha_sigma(schedule, t_cur, t_next, final_clean)
    variance = str(sampling_cfg.variance)
    n = t_cur.shape[0]
    z = prior_scale(schedule, t_cur[0]) * jnp.asarray(noise, jnp.float32)

    def step(z, xs):
        k, t, ac, sc, an, sn = xs
        x0, _, v = split_output(denoise(z, t))
        xi = jax.random.normal(jax.random.fold_in(key, k), z.shape, jnp.float32)
        return ddpm_step(x0, z, ac, sc, an, sn, variance, v, xi, k == n - 1), None

    z, _ = jax.lax.scan(step, z, (jnp.arange(n), jnp.asarray(t_cur), a_c, s_c, a_n, s_n))
    return z

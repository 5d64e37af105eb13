"""DDPM ancestral sampling (Ho et al. 2020) with fixed or learned variance (Nichol & Dhariwal 2021)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from diffax.parameterization import interpolate_log_variance
from diffax.samplers.base import SAMPLERS, Denoiser, grid_alpha_sigma, prior_scale, step_grid, step_noise

Array = jax.Array
VARIANCES = ("small", "large", "learned")


def ddpm_std(a_c, s_c, a_n, s_n, variance: str, var_interp: Array | None) -> Array:
    """Standard deviation of the ancestral step: "small" beta~ = beta sigma_n^2 / sigma_c^2 (the posterior's),
    "large" beta, or "learned" exp(f log beta + (1 - f) log beta~) with f = (var_interp + 1) / 2 (Nichol &
    Dhariwal 2021, Eq. 15), where beta = sigma_c^2 - (alpha_c/alpha_n)^2 sigma_n^2 is the step's forward
    variance (= 1 - abar_c/abar_n for a VP schedule, the respaced beta of Nichol & Dhariwal 2021, App. B)."""
    beta = jnp.maximum(s_c**2 - (a_c / a_n) ** 2 * s_n**2, 0.0)
    small = beta * s_n**2 / s_c**2
    if variance == "small":
        return jnp.sqrt(small)
    if variance == "large":
        return jnp.sqrt(beta)
    if variance == "learned":
        if var_interp is None:
            raise ValueError("config.sampling.variance='learned' needs a model with learn_sigma (2C output channels)")
        log_small, log_beta = jnp.log(jnp.maximum(small, 1e-20)), jnp.log(jnp.maximum(beta, 1e-20))
        return jnp.exp(0.5 * interpolate_log_variance(var_interp, log_small, log_beta))
    raise ValueError(f"Unknown DDPM variance {variance!r} in config.sampling.variance; valid: {', '.join(VARIANCES)}")


def ddpm_mean(x0: Array, z: Array, a_c, s_c, a_n, s_n) -> Array:
    """Mean of the posterior q(z_n | z_c, x0) (Ho et al. 2020, Eq. 7), for any alpha, sigma:
    mu = alpha_n beta / sigma_c^2 x0 + (alpha_c/alpha_n) sigma_n^2 / sigma_c^2 z_c."""
    beta = jnp.maximum(s_c**2 - (a_c / a_n) ** 2 * s_n**2, 0.0)
    return (a_n * beta / s_c**2) * x0 + ((a_c / a_n) * s_n**2 / s_c**2) * z


@SAMPLERS.register("ddpm")
def ddpm(
    denoise: Denoiser,
    schedule: Any,
    noise: Array,
    key: Array,
    *,
    steps: int,
    spacing: str = "trailing",
    steps_offset: int = 0,
    final_alpha_one: bool = True,
    variance: str = "small",
) -> Array:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) on the respaced grid of `spacing`.

    With steps = T and trailing spacing this is exactly Algorithm 2; fewer steps use the
    respaced posterior (Nichol & Dhariwal 2021, App. B). `variance` selects small (beta~),
    large (beta) or the model's learned interpolation (`ddpm_std`). No noise on the last
    step. One evaluation per step.
    """
    if variance not in VARIANCES:
        raise ValueError(
            f"Unknown DDPM variance {variance!r} in config.sampling.variance; valid: {', '.join(VARIANCES)}"
        )
    grid = step_grid(schedule, steps=steps, spacing=spacing, steps_offset=steps_offset, final_clean=final_alpha_one)
    a_c, s_c, a_n, s_n = grid_alpha_sigma(schedule, grid)
    n = grid.t_cur.shape[0]
    z = prior_scale(schedule, grid.t_cur[0]) * jnp.asarray(noise, jnp.float32)

    def step(z, xs):
        k, t, c_noise, ac, sc, an, sn = xs
        out = denoise(z, t, c_noise)
        std = jnp.where(k == n - 1, 0.0, ddpm_std(ac, sc, an, sn, variance, out.var_interp))
        return ddpm_mean(out.x0, z, ac, sc, an, sn) + std * step_noise(key, k, z), None

    z, _ = jax.lax.scan(step, z, (jnp.arange(n), grid.t_cur, grid.c_noise, a_c, s_c, a_n, s_n))
    return z

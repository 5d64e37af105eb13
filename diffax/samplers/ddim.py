"""DDIM (Song, Meng & Ermon 2021) and its inversion, for any schedule (alpha_t, sigma_t)."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffax.samplers.base import SAMPLERS, grid_alpha_sigma, prior_scale, split_output, step_grid

Array = jax.Array


def ddim_step(x0: Array, eps: Array, a_c, s_c, a_n, s_n, eta, noise: Array) -> Array:
    """One DDIM step z_c -> z_n (Song et al. 2021, Eq. 12 with sigma from Eq. 16), written for any alpha, sigma.

    z_n = alpha_n x0 + sqrt(sigma_n^2 - c^2) eps + c xi with c = eta * the std of the posterior
    q(z_n | z_c, x0), c^2 = (sigma_c^2 - (alpha_c / alpha_n)^2 sigma_n^2) sigma_n^2 / sigma_c^2; for a
    variance-preserving schedule this is Eq. 16: (1 - abar_n)/(1 - abar_c) (1 - abar_c/abar_n).
    eta = 0 is the deterministic DDIM, eta = 1 the DDPM ancestral step with the "small" variance.
    """
    var_cn = jnp.maximum(s_c**2 - (a_c / a_n) ** 2 * s_n**2, 0.0)
    c = eta * jnp.sqrt(var_cn * s_n**2 / s_c**2)
    return a_n * x0 + jnp.sqrt(jnp.maximum(s_n**2 - c**2, 0.0)) * eps + c * noise


@SAMPLERS.register("ddim")
def ddim(denoise: Callable, schedule: Any, noise: Array, key: Array, sampling_cfg: Any, diffusion_cfg: Any) -> Array:
    """DDIM sampling (Song et al. 2021, Eq. 12) with eta = config.sampling.eta on diffusers' timestep grid.

    The grid is config.sampling.spacing (leading / trailing / linspace, with steps_offset),
    the last step goes to alpha = 1 when config.sampling.final_alpha_one (diffusers'
    set_alpha_to_one), else to alphas_cumprod[0]. One network evaluation per step.
    """
    t_cur, t_next, final_clean = step_grid(schedule, sampling_cfg)
    a_c, s_c, a_n, s_n = grid_alpha_sigma(schedule, t_cur, t_next, final_clean)
    eta = float(sampling_cfg.eta)
    z = prior_scale(schedule, t_cur[0]) * jnp.asarray(noise, jnp.float32)

    def step(z, xs):
        k, t, ac, sc, an, sn = xs
        x0, eps, _ = split_output(denoise(z, t))
        xi = jax.random.normal(jax.random.fold_in(key, k), z.shape, jnp.float32) if eta > 0 else 0.0
        return ddim_step(x0, eps, ac, sc, an, sn, eta, xi), None

    ks = jnp.arange(t_cur.shape[0])
    z, _ = jax.lax.scan(step, z, (ks, jnp.asarray(t_cur), a_c, s_c, a_n, s_n))
    return z


def ddim_invert(denoise: Callable, schedule: Any, x: Array, sampling_cfg: Any, diffusion_cfg: Any) -> Array:
    """DDIM inversion (Song et al. 2021, Sec. 4.3; Dhariwal & Nichol 2021, App. F): data x -> latent z.

    Runs the eta = 0 grid of `ddim` backwards. Each step from (alpha_s, sigma_s) to the noisier
    grid time t evaluates eps = denoise(z, t) at the target time, sets x0 = (z - sigma_s eps) / alpha_s
    and z <- alpha_t x0 + sigma_t eps, exactly as diffusers' DDIMInverseScheduler. Returns the
    latent divided by prior_scale, i.e. the `noise` that `ddim` maps back to about x.
    """
    t_cur, t_next, final_clean = step_grid(schedule, sampling_cfg)
    a_c, s_c, a_n, s_n = grid_alpha_sigma(schedule, t_cur, t_next, final_clean)

    def step(z, xs):
        t, a_t, s_t, a_s, s_s = xs
        _, eps, _ = split_output(denoise(z, t))
        x0 = (z - s_s * eps) / a_s
        return a_t * x0 + s_t * eps, None

    xs = tuple(jnp.asarray(v)[::-1] for v in (t_cur, a_c, s_c, a_n, s_n))
    z, _ = jax.lax.scan(step, jnp.asarray(x, jnp.float32), xs)
    return z / prior_scale(schedule, t_cur[0])

"""DDIM (Song, Meng & Ermon 2021) and its inversion, for any schedule (alpha_t, sigma_t)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from diffax.samplers import diffusers_grids
from diffax.samplers.base import SAMPLERS, Denoiser, grid_alpha_sigma, prior_scale, step_grid, step_noise

Array = jax.Array


def ddim_step(x0: Array, eps: Array, a_c, s_c, a_n, s_n, *, eta, noise: Array) -> Array:
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
def ddim(
    denoise: Denoiser,
    schedule: Any,
    noise: Array,
    key: Array,
    *,
    steps: int,
    spacing: str = "trailing",
    steps_offset: int = 0,
    final_alpha_one: bool = True,
    eta: float = 0.0,
    grid: str = "paper",
) -> Array:
    """DDIM sampling (Song et al. 2021, Eq. 12) with `eta` on diffusers' timestep grid.

    The grid is `spacing` (leading / trailing / linspace, with `steps_offset`), the last step
    goes to alpha = 1 when `final_alpha_one` (diffusers' set_alpha_to_one), else to
    alphas_cumprod[0]. One network evaluation per step. `grid="diffusers"` steps from index i to
    i - T // n as diffusers' DDIMScheduler (`diffusers_grids.ddim_step_ratio_grid`) instead of to the
    next grid index; the two differ only for linspace, or trailing when n does not divide T.
    """
    options = dict(steps=steps, spacing=spacing, steps_offset=steps_offset, final_clean=final_alpha_one)
    if diffusers_grids.check_grid(grid) == "diffusers_karras":
        raise ValueError("config.sampling.grid='diffusers_karras' is for euler, heun and dpm_solver, not ddim")
    if grid == "paper":
        grid = step_grid(schedule, **options)
    else:
        grid = diffusers_grids.ddim_step_ratio_grid(schedule, **options)
    a_c, s_c, a_n, s_n = grid_alpha_sigma(schedule, grid)
    eta = float(eta)
    z = prior_scale(schedule, grid.t_cur[0]) * jnp.asarray(noise, jnp.float32)

    def step(z, xs):
        k, t, c_noise, ac, sc, an, sn = xs
        out = denoise(z, t, c_noise)
        xi = step_noise(key, k, z) if eta > 0 else 0.0
        return ddim_step(out.x0, out.eps, ac, sc, an, sn, eta=eta, noise=xi), None

    ks = jnp.arange(grid.t_cur.shape[0])
    z, _ = jax.lax.scan(step, z, (ks, grid.t_cur, grid.c_noise, a_c, s_c, a_n, s_n))
    return z


def ddim_invert(
    denoise: Denoiser,
    schedule: Any,
    x: Array,
    *,
    steps: int,
    spacing: str = "trailing",
    steps_offset: int = 0,
    final_alpha_one: bool = True,
) -> Array:
    """DDIM inversion (Song et al. 2021, Sec. 4.3; Dhariwal & Nichol 2021, App. F): data x -> latent z.

    Runs the eta = 0 grid of `ddim` (same options) backwards. Each step from (alpha_s, sigma_s) to
    the noisier grid time t evaluates eps = denoise(z, t) at the target time, sets
    x0 = (z - sigma_s eps) / alpha_s and z <- alpha_t x0 + sigma_t eps, exactly as diffusers'
    DDIMInverseScheduler. Returns the latent divided by prior_scale, i.e. the `noise` that `ddim`
    maps back to about x.
    """
    grid = step_grid(schedule, steps=steps, spacing=spacing, steps_offset=steps_offset, final_clean=final_alpha_one)
    a_c, s_c, a_n, s_n = grid_alpha_sigma(schedule, grid)

    def step(z, xs):
        t, c_noise, a_t, s_t, a_s, s_s = xs
        eps = denoise(z, t, c_noise).eps
        x0 = (z - s_s * eps) / a_s
        return a_t * x0 + s_t * eps, None

    c_noise = None if grid.c_noise is None else grid.c_noise[::-1]
    xs = (grid.t_cur[::-1], c_noise, a_c[::-1], s_c[::-1], a_n[::-1], s_n[::-1])
    z, _ = jax.lax.scan(step, jnp.asarray(x, jnp.float32), xs)
    return z / prior_scale(schedule, grid.t_cur[0])

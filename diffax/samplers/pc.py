"""Predictor-corrector sampling (Song et al. 2021, "Score-Based Generative Modeling through SDEs", Algorithms 2-3).

score(z, t) = -eps / sigma_t. Predictors: the reverse-diffusion discretisation (Eq. 46, here with the exact
forward transition between grid points, which gives score_sde's DDPM / SMLD discretisations for VP / VE) or
Euler-Maruyama on the reverse SDE (Eq. 6) with (f, g^2) from `schedule.sde`. Corrector: Langevin dynamics
with step size set by the signal-to-noise ratio `snr` (Algorithm 4/5).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from diffax.samplers.base import SAMPLERS, Denoiser, grid_alpha_sigma, num_train_steps, prior_scale, step_grid

Array = jax.Array
PREDICTORS = ("reverse_diffusion", "euler_maruyama")


def _norm(x: Array) -> Array:
    return jnp.sqrt(jnp.sum(x.reshape(x.shape[0], -1) ** 2, axis=-1))


def langevin_step(z: Array, score: Array, noise: Array, snr: float, alpha) -> Array:
    """One Langevin corrector step (Song et al. 2021, Algorithm 5; score_sde's LangevinCorrector):
    step = 2 alpha (snr ||xi|| / ||score||)^2, z <- z + step score + sqrt(2 step) xi, with the norms
    averaged over the batch as score_sde does (a per-example ratio explodes where ||score|| ~ 0 in low
    dimension), so a sample depends on the rest of its batch."""
    step = 2.0 * alpha * (snr * jnp.mean(_norm(noise)) / jnp.maximum(jnp.mean(_norm(score)), 1e-12)) ** 2
    return z + step * score + jnp.sqrt(2.0 * step) * noise


@SAMPLERS.register("pc")
def pc(
    denoise: Denoiser,
    schedule: Any,
    noise: Array,
    key: Array,
    *,
    steps: int,
    spacing: str = "trailing",
    steps_offset: int = 0,
    final_alpha_one: bool = True,
    predictor: str = "reverse_diffusion",
    corrector_steps: int = 1,
    snr: float = 0.16,
) -> Array:
    """Predictor-corrector sampler (Song et al. 2021, Algorithm 1 of App. G) on the grid of `spacing`.

    At each grid time: `corrector_steps` Langevin steps with signal-to-noise ratio `snr`, then one
    `predictor` step to the next grid time; no noise on the last predictor step, which returns the
    denoised mean E[x0 | z] (Tweedie) when it lands on sigma = 0.
    Cost: (corrector_steps + 1) evaluations per step.
    """
    if predictor not in PREDICTORS:
        raise ValueError(
            f"Unknown predictor {predictor!r} in config.sampling.predictor; valid: {', '.join(PREDICTORS)}"
        )
    n_corr, snr = int(corrector_steps), float(snr)
    grid = step_grid(schedule, steps=steps, spacing=spacing, steps_offset=steps_offset, final_clean=final_alpha_one)
    a_c, s_c, a_n, s_n = grid_alpha_sigma(schedule, grid)
    # Langevin's alpha: abar_i / abar_{i-1} over one training step (score_sde's VP alphas; 1 for VE)
    dt_train = 1.0 / num_train_steps(schedule)
    a_prev, _ = schedule.alpha_sigma(jnp.maximum(grid.t_cur - dt_train, 0.0))
    langevin_alpha = (a_c / jnp.asarray(a_prev, jnp.float32)) ** 2
    n = grid.t_cur.shape[0]
    z = prior_scale(schedule, grid.t_cur[0]) * jnp.asarray(noise, jnp.float32)

    def step(z, xs):
        i, t, tn, c_noise, ac, sc, an, sn, lang_a = xs
        key_i = jax.random.fold_in(key, i)

        def correct(j, z):
            eps = denoise(z, t, c_noise).eps
            xi = jax.random.normal(jax.random.fold_in(key_i, j + 1), z.shape, jnp.float32)
            return langevin_step(z, -eps / sc, xi, snr, lang_a)

        z = jax.lax.fori_loop(0, n_corr, correct, z)
        out = denoise(z, t, c_noise)
        x0, score = out.x0, -out.eps / sc
        if predictor == "reverse_diffusion":  # z - f + G^2 score, + G xi (Eq. 46)
            a = ac / an
            g2 = jnp.maximum(sc**2 - a**2 * sn**2, 0.0)
            mean = (2.0 - a) * z + g2 * score
        else:  # Euler-Maruyama on dz = [f z - g^2 score] dt + g dw, dt = tn - t < 0
            f, g2 = (jnp.asarray(u, jnp.float32) for u in schedule.sde(t))
            mean = z + (f * z - g2 * score) * (tn - t)
            g2 = g2 * (t - tn)
        xi = jax.random.normal(jax.random.fold_in(key_i, 0), z.shape, jnp.float32)
        z = jnp.where(i == n - 1, jnp.where(sn == 0, x0, mean), mean + jnp.sqrt(g2) * xi)
        return z, None

    xs = (jnp.arange(n), grid.t_cur, grid.t_next, grid.c_noise, a_c, s_c, a_n, s_n, langevin_alpha)
    z, _ = jax.lax.scan(step, z, xs)
    return z

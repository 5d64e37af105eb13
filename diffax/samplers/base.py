"""What every sampler shares: the registry, the denoiser's output, the time grids, and small helpers.

Every sampler is registered here under its config name and has one signature,

    sampler(denoise, schedule, noise, key, **options) -> x

where `denoise(z, t, c_noise=None) -> Denoised` (see `guidance.make_denoiser`; labels are
already bound), `noise` is standard normal with the batch's shape, `t` is a scalar float32
and the options are the sampler's own keyword arguments (`make_sampler` reads them from
config.sampling once). The sampler scales the noise to the prior itself (`prior_scale`) and
runs its whole step loop on the device (`lax.scan`), so compile time does not depend on the
number of steps.

Time grids
----------
`spacing_indices` reproduces diffusers' `DDIMScheduler.set_timesteps` exactly
(the three spacings of Lin et al. 2024, Table 2); an index i is the time
t = (i + 1) / T. A continuous-time schedule uses the same grid with T = 1000.
`karras_sigmas` is the EDM grid (Karras et al. 2022, Eq. 5) of the VE-equivalent
noise level sigma~ = sigma_t / alpha_t.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffax.registry import Registry

Array = jax.Array
SamplerFn = Callable[..., Array]

SAMPLERS: Registry[SamplerFn] = Registry("sampler", "config.sampling.sampler")

DEFAULT_NUM_TRAIN_STEPS = 1000  # the index grid of a continuous-time schedule (c_noise = 1000 t)
SIGMA_MAX_CAP = 4096.0  # cap of sigma~ = sigma/alpha at t = 1 (infinite with zero terminal SNR), as diffusers
SPACINGS = ("leading", "trailing", "linspace")


class Denoised(NamedTuple):
    """What a denoiser returns at (z_t, t): the posterior means of the data and the noise, float32.

    `var_interp` is the learned-variance interpolation value in [-1, 1] of models trained with
    learned sigma (Nichol & Dhariwal 2021, Eq. 15), None otherwise.
    """

    x0: Array
    eps: Array
    var_interp: Array | None = None


Denoiser = Callable[..., Denoised]


class StepGrid(NamedTuple):
    """A sampler's steps: step k goes from t_cur[k] to t_next[k] (float32 [n]).

    final_clean: the last step lands on alpha = 1, sigma = 0 (instead of t_next[-1]).
    c_noise: the network's noise input per step when it is not the parameterization's c_noise(t_cur)
    (diffusers' rounded timesteps of Karras sigmas); None otherwise.
    """

    t_cur: Array
    t_next: Array
    final_clean: bool
    c_noise: Array | None = None


class SigmaGrid(NamedTuple):
    """Noise levels sigma~_0 > ... > sigma~_n = 0 ([n + 1]), the initial x~ scale, and the network's noise
    input at each level ([n + 1]) when it is not the parameterization's (diffusers' timesteps), else None."""

    sigmas: Array
    init_scale: Array
    c_noise: Array | None = None


def num_train_steps(schedule: Any) -> int:
    """T of the discrete view: the schedule's `num_steps`, or 1000 in continuous time."""
    return int(getattr(schedule, "num_steps", 0) or DEFAULT_NUM_TRAIN_STEPS)


def spacing_indices(num_train_steps: int, steps: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """Descending integer time steps of diffusers' `DDIMScheduler.set_timesteps` (Lin et al. 2024, Table 2).

    leading:  r = T // n;  [0, r, ..., (n-1) r][::-1] + steps_offset   (never reaches T - 1; SD uses offset 1)
    trailing: r = T / n;   round([T, T - r, ..., r]) - 1               (starts at T - 1, the pure-noise end)
    linspace: round(linspace(0, T - 1, n))[::-1]                       (both ends: T - 1 ... 0)
    Computed in float64 numpy as diffusers does, so the rounding matches it bit for bit.
    """
    T, n = int(num_train_steps), int(steps)
    if not 1 <= n <= T:
        raise ValueError(f"config.sampling.steps={n} must be in [1, {T}] (the schedule's number of steps)")
    if spacing == "linspace":
        idx = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    elif spacing == "leading":
        idx = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.int64) + int(steps_offset)
    elif spacing == "trailing":
        idx = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    else:
        raise ValueError(f"Unknown spacing {spacing!r} in config.sampling.spacing; valid: {', '.join(SPACINGS)}")
    if idx.max() > T - 1 or idx.min() < 0:
        raise ValueError(f"{spacing} spacing with steps_offset={steps_offset} leaves [0, {T - 1}]: {idx}")
    return idx


def step_grid(
    schedule: Any, *, steps: int, spacing: str = "trailing", steps_offset: int = 0, final_clean: bool = True
) -> StepGrid:
    """The sampler's times on diffusers' index grid (`spacing_indices`), t = (i + 1) / T.

    Step k goes from t_cur[k] to t_next[k] = t_cur[k + 1]; the last step goes to the
    clean end (alpha = 1, sigma = 0) when `final_clean` (diffusers' set_alpha_to_one /
    config.sampling.final_alpha_one), else to t = 1 / T (alphas_cumprod[0]). Unlike
    diffusers' DDIM, which steps to `t - T // n` whatever the spacing, the next time is
    always the next grid point (the two agree for leading/trailing when n divides T).
    Times are capped where sigma~ = sigma/alpha reaches SIGMA_MAX_CAP (`time_cap`).
    """
    T = num_train_steps(schedule)
    idx = spacing_indices(T, steps, spacing, steps_offset)
    t_cur = ((idx + 1) / T).astype(np.float32)
    t_next = np.concatenate([t_cur[1:], np.array([1.0 / T], np.float32)])
    cap = time_cap(schedule)
    return StepGrid(jnp.minimum(t_cur, cap), jnp.minimum(t_next, cap), bool(final_clean))


def grid_alpha_sigma(schedule: Any, grid: StepGrid) -> tuple[Array, Array, Array, Array]:
    """(alpha, sigma) at the current and next grid times, the last target set to (1, 0) if final_clean."""
    a_c, s_c = schedule.alpha_sigma(jnp.asarray(grid.t_cur))
    a_n, s_n = schedule.alpha_sigma(jnp.asarray(grid.t_next))
    a_c, s_c, a_n, s_n = (jnp.asarray(v, jnp.float32) for v in (a_c, s_c, a_n, s_n))
    if grid.final_clean:
        last = jnp.arange(grid.t_next.shape[0]) == grid.t_next.shape[0] - 1
        a_n = jnp.where(last, 1.0, a_n)
        s_n = jnp.where(last, 0.0, s_n)
    return a_c, s_c, a_n, s_n


def prior_scale(schedule: Any, t: Array | float) -> Array:
    """Standard deviation of the prior at time t: sqrt(alpha_t^2 + sigma_t^2).

    1 for a variance-preserving schedule (diffusers' init_noise_sigma = 1 for DDPM/DDIM,
    score_sde's N(0, I) prior) and sqrt(1 + sigma_max^2) for VE/EDM (diffusers'
    EDMEulerScheduler init_noise_sigma): z_start = prior_scale * noise for every sampler.
    """
    a, s = schedule.alpha_sigma(jnp.asarray(t, jnp.float32))
    return jnp.sqrt(jnp.asarray(a, jnp.float32) ** 2 + jnp.asarray(s, jnp.float32) ** 2)


def vesigma(schedule: Any, t: Array | float) -> Array:
    """The VE-equivalent noise level sigma~ = sigma_t / alpha_t of x~ = z / alpha (Karras et al. 2022, Sec. 4)."""
    a, s = schedule.alpha_sigma(jnp.asarray(t, jnp.float32))
    return jnp.asarray(s, jnp.float32) / jnp.asarray(a, jnp.float32)


def t_of_sigma(schedule: Any, sigma: Array) -> Array:
    """The time with VE-equivalent noise level sigma~: t = t_from_logsnr(-2 log sigma~)."""
    return jnp.asarray(schedule.t_from_logsnr(-2.0 * jnp.log(sigma)), jnp.float32)


def sigma_max(schedule: Any) -> Array:
    """sigma~ at t = 1, capped at SIGMA_MAX_CAP (infinite or undefined where alpha_1 = 0, zero terminal SNR)."""
    hi = vesigma(schedule, 1.0)
    return jnp.minimum(jnp.where(jnp.isfinite(hi), hi, SIGMA_MAX_CAP), SIGMA_MAX_CAP)


def time_cap(schedule: Any) -> Array:
    """The largest time a sampler starts from: 1, or where sigma~ reaches SIGMA_MAX_CAP if sigma~(1) is
    larger (a schedule with alpha_1 = 0 has no finite x0 from eps at t = 1 itself), as diffusers caps."""
    return jnp.minimum(t_of_sigma(schedule, jnp.float32(SIGMA_MAX_CAP)), 1.0)


def sigma_range(schedule: Any, sigma_floor: float) -> tuple[Array, Array]:
    """(sigma~_min, sigma~_max) a sampler covers: sigma~ at t = 1 / T (discrete) or t = 0 (continuous),
    floored at `sigma_floor` (config.sampling.sigma_min, EDM's 0.002), and `sigma_max` (capped)."""
    T = int(getattr(schedule, "num_steps", 0) or 0)
    lo = vesigma(schedule, 1.0 / T if T else 0.0)
    lo = jnp.maximum(jnp.where(jnp.isfinite(lo), lo, 0.0), float(sigma_floor))
    return lo, sigma_max(schedule)


def karras_sigmas(sigma_min: Array | float, sigma_max: Array | float, steps: int, rho: float) -> Array:
    """EDM noise levels (Karras et al. 2022, Eq. 5), n + 1 values ending with sigma_n = 0:
    sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    n = int(steps)
    ramp = jnp.arange(n, dtype=jnp.float32) / max(n - 1, 1)
    inv_rho = 1.0 / float(rho)
    lo, hi = jnp.asarray(sigma_min, jnp.float32) ** inv_rho, jnp.asarray(sigma_max, jnp.float32) ** inv_rho
    sigmas = (hi + ramp * (lo - hi)) ** float(rho)
    return jnp.concatenate([sigmas, jnp.zeros((1,), jnp.float32)])


def step_noise(key: Array, k: Array, like: Array) -> Array:
    """The standard-normal noise of step k: normal(fold_in(key, k)), float32, shaped like `like`."""
    return jax.random.normal(jax.random.fold_in(key, k), like.shape, jnp.float32)

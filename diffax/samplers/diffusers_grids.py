"""diffusers' scheduler grids, so that an imported checkpoint samples as its diffusers pipeline does.

Each function reproduces one `set_timesteps` in numpy, with diffusers' dtypes and rounding, and returns
the grid a diffax sampler steps over (`config.sampling.grid = "diffusers"` or `"diffusers_karras"`):

- `ddim_step_ratio_grid`: DDIMScheduler steps from t to t - T // n (not the next grid point).
- `euler_sigma_grid`: EulerDiscreteScheduler / HeunDiscreteScheduler: sigma~ interpolated linearly in the
  (fractional) timestep, or Karras sigmas over that range with timesteps by log-sigma interpolation; the
  initial noise scale is sigma_max for linspace / trailing and sqrt(sigma_max^2 + 1) for leading.
- `dpm_step_grid`: DPMSolverMultistepScheduler's own timestep formulas, Karras sigmas over the full
  training range with rounded timesteps, and final_sigmas_type zero / sigma_min.

The network gets diffusers' timestep as its noise input (`c_noise`); the update uses the schedule at
the time t with that sigma~ = sigma_t / alpha_t. Where diffusers departs from the paper grids (the
defaults, `base.step_grid` and `karras.karras_grid`), README "Sampler grids: paper and diffusers" says how.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffax.samplers.base import SigmaGrid, StepGrid, num_train_steps, spacing_indices, t_of_sigma, time_cap

GRIDS = ("paper", "diffusers", "diffusers_karras")  # config.sampling.grid (flow samplers: see flow.FLOW_GRIDS)
RHO = 7.0  # diffusers' _convert_to_karras


def check_grid(grid: str) -> str:
    """The config.sampling.grid value, or a clear error."""
    if grid not in GRIDS:
        raise ValueError(f"Unknown grid {grid!r} in config.sampling.grid; valid: {', '.join(GRIDS)}")
    return grid


def train_sigmas(schedule: Any) -> np.ndarray:
    """sigma~_i = sqrt((1 - abar_i) / abar_i) at the T training steps t_i = (i + 1) / T, float32 (diffusers'
    `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5`)."""
    T = num_train_steps(schedule)
    with jax.ensure_compile_time_eval():  # a host-side table, also when called under jit
        a, _ = schedule.alpha_sigma(jnp.asarray((np.arange(T) + 1) / T, jnp.float32))
    a2 = np.asarray(a, np.float64) ** 2
    return np.sqrt((1.0 - a2) / a2).astype(np.float32)


def sigma_to_timestep(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """diffusers' `_sigma_to_t`: the fractional timestep of sigma~ by linear interpolation in log sigma~."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    low, high = log_sigmas[low_idx], log_sigmas[low_idx + 1]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * (low_idx + 1)).reshape(sigma.shape)


def karras_from(sigma_min: float, sigma_max: float, steps: int) -> np.ndarray:
    """diffusers' `_convert_to_karras` (Karras et al. 2022, Eq. 5 with rho = 7) in float64 numpy."""
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / RHO), sigma_max ** (1 / RHO)
    return (hi + ramp * (lo - hi)) ** RHO


def ddim_step_ratio_grid(schedule: Any, *, steps: int, spacing: str, steps_offset: int, final_clean: bool) -> StepGrid:
    """DDIMScheduler.step's previous timestep t - T // n (final: alpha = 1 if set_alpha_to_one, else
    alphas_cumprod[0]) on the `spacing_indices` grid. Equal to `base.step_grid` for leading / trailing
    when n divides T; for linspace it lands off the grid (999 -> 899, then evaluates at 888)."""
    T = num_train_steps(schedule)
    idx = spacing_indices(T, steps, spacing, steps_offset)
    prev = idx - T // int(steps)  # only the last step passes index 0: it lands on the final alpha (as step_grid)
    cap = time_cap(schedule)
    t_cur = jnp.minimum(jnp.asarray((idx + 1) / T, jnp.float32), cap)
    t_next = jnp.minimum(jnp.asarray((np.maximum(prev, 0) + 1) / T, jnp.float32), cap)
    return StepGrid(t_cur, t_next, bool(final_clean))


def euler_sigma_grid(schedule: Any, *, steps: int, spacing: str, steps_offset: int, karras: bool) -> SigmaGrid:
    """EulerDiscreteScheduler.set_timesteps (and HeunDiscreteScheduler's, whose repeated entries are Heun's
    two evaluations): timesteps by `spacing` (linspace in float, leading + steps_offset, trailing), sigma~ by
    np.interp on the training sigmas; with `karras`, Karras sigmas between the first and last of those and
    timesteps by log-sigma interpolation; then 0 (final_sigmas_type zero)."""
    T, n = num_train_steps(schedule), int(steps)
    if spacing == "linspace":
        timesteps = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    elif spacing == "leading":
        timesteps = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.float32) + steps_offset
    elif spacing == "trailing":
        timesteps = np.arange(T, 0, -T / n).round().copy().astype(np.float32) - 1
    else:
        raise ValueError(f"Unknown spacing {spacing!r} in config.sampling.spacing; valid: leading, trailing, linspace")
    train = train_sigmas(schedule)
    sigmas = np.interp(timesteps, np.arange(T), train)
    if karras:
        sigmas = karras_from(float(sigmas[-1]), float(sigmas[0]), n)
        timesteps = sigma_to_timestep(sigmas, np.log(train))
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    s_max = float(sigmas.max())
    init = s_max if spacing in ("linspace", "trailing") else (s_max**2 + 1) ** 0.5
    c_noise = np.concatenate([timesteps, [0.0]]).astype(np.float32)
    return SigmaGrid(jnp.asarray(sigmas), jnp.float32(init), jnp.asarray(c_noise))


def dpm_step_grid(
    schedule: Any, *, steps: int, spacing: str, steps_offset: int, karras: bool, final_clean: bool
) -> StepGrid:
    """DPMSolverMultistepScheduler.set_timesteps (lambda_min_clipped = -inf): its own timestep formulas
    (linspace over n + 1 points without the last, leading with ratio T // (n + 1), trailing as DDIM's),
    Karras sigmas over the whole training range with rounded timesteps when `karras`, and the last
    sigma 0 (final_sigmas_type zero, `final_clean`) or sigma~ at t = 1 / T (sigma_min)."""
    T, n = num_train_steps(schedule), int(steps)
    if spacing == "linspace":
        idx = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif spacing == "leading":
        idx = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    elif spacing == "trailing":
        idx = np.arange(T, 0, -T / n).round().copy().astype(np.int64) - 1
    else:
        raise ValueError(f"Unknown spacing {spacing!r} in config.sampling.spacing; valid: leading, trailing, linspace")
    c_noise = None  # the parameterization's: the integer index on the grid
    if karras:
        train = train_sigmas(schedule)
        sigmas = karras_from(float(train[0]), float(train[-1]), n).astype(np.float32)
        c_noise = jnp.asarray(sigma_to_timestep(sigmas.astype(np.float64), np.log(train)).round(), jnp.float32)
        t_cur = t_of_sigma(schedule, jnp.asarray(sigmas))
    else:
        t_cur = jnp.minimum(jnp.asarray((idx + 1) / T, jnp.float32), time_cap(schedule))
    t_next = jnp.concatenate([t_cur[1:], jnp.full((1,), 1.0 / T, jnp.float32)])
    return StepGrid(t_cur, t_next, bool(final_clean), c_noise)

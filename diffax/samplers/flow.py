"""Euler and Heun in time on the velocity dz/dt = alpha'_t x0 + sigma'_t eps (flow matching; Lipman et al.
2023, Eq. 1 and 15; Liu et al. 2023; Esser et al. 2024, Sec. 2 and 5.3.2 for the shifted grid).

For rectified flow (alpha = 1 - t, sigma = t) the velocity is eps - x0, the network's own `flow`
output, and these are the samplers of SD3 / Flux (diffusers' `FlowMatchEulerDiscreteScheduler`
and `FlowMatchHeunDiscreteScheduler`). For any other schedule the same velocity is the
probability-flow ODE's in t (the conditional expectation of the path's velocity, Lipman et al.
2023, Thm. 1), so they run on every schedule and target; the grid starts at t = 1 itself,
which needs a target finite where alpha = 0 (flow, v, x0; not eps under zero terminal SNR).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffax.parameterization import batch_broadcast
from diffax.samplers.base import SAMPLERS, Denoiser, num_train_steps, prior_scale
from diffax.schedules import shift_time

Array = jax.Array
FLOW_GRIDS = ("paper", "diffusers", "diffusers_dynamic")  # config.sampling.grid


class TimeGrid(NamedTuple):
    """Times t_0 > ... > t_n = 0 ([n + 1]) and the network's noise input at each when it is not the
    parameterization's (diffusers' timesteps sigma T), else None."""

    t: Array
    c_noise: Array | None = None


def flow_time_grid(steps: int, shift: float = 1.0, grid: str = "paper", train_steps: int = 1000) -> TimeGrid:
    """The times of the flow samplers, float32, ending at t = 0.

    paper: t_k = shift_time(1 - k / n, shift), k = 0..n (Esser et al. 2024, Eq. 23 on a uniform grid).
    diffusers (FlowMatchEulerDiscreteScheduler.set_timesteps, shift applied in its constructor and
    again in set_timesteps): u = linspace(1, shift_time(1 / T, shift), n), t_k = shift_time(u_k, shift),
    then 0; the network gets c_noise = t T. The two differ: diffusers' lowest time is shifted twice.
    diffusers_dynamic (use_dynamic_shifting, shift = e^mu, e.g. `schedules.flux_shift`): the constructor
    does not shift, so u = linspace(1, 1 / T, n) and the shift is applied once.
    """
    n, s = int(steps), float(shift)
    if grid == "paper":
        return TimeGrid(shift_time(jnp.linspace(1.0, 0.0, n + 1, dtype=jnp.float32), s))
    if grid in ("diffusers", "diffusers_dynamic"):
        T = int(train_steps)
        train = np.linspace(1, T, T, dtype=np.float32)[::-1] / T  # diffusers' __init__ sigmas
        if grid == "diffusers":
            train = s * train / (1 + (s - 1) * train)
        u = np.linspace(float(train[0]) * T, float(train[-1]) * T, n) / T  # in float64, as diffusers
        t = (s * u / (1 + (s - 1) * u)).astype(np.float32)  # shift_time, but in float64 numpy as diffusers
        t = np.concatenate([t, np.zeros(1, np.float32)])
        return TimeGrid(jnp.asarray(t), jnp.asarray(t * T, jnp.float32))
    raise ValueError(
        f"Unknown grid {grid!r} in config.sampling.grid for the flow samplers; valid: {', '.join(FLOW_GRIDS)}"
    )


def velocity(denoise: Denoiser, schedule: Any) -> Any:
    """u(z, t, c_noise) = alpha'_t x0 + sigma'_t eps from the denoiser (= the flow network's output)."""

    def u(z: Array, t: Array, c_noise: Array | None = None) -> Array:
        out = denoise(z, t, c_noise)
        _, _, dalpha, dsigma = schedule.alpha_sigma_dt(jnp.asarray(t, jnp.float32))
        return batch_broadcast(dalpha, z) * out.x0 + batch_broadcast(dsigma, z) * out.eps

    return u


def _flow_sampler(denoise: Denoiser, schedule: Any, noise: Array, grid: TimeGrid, second_order: bool) -> Array:
    u_fn = velocity(denoise, schedule)
    t = grid.t
    c_noise = (None, None) if grid.c_noise is None else (grid.c_noise[:-1], grid.c_noise[1:])
    z = prior_scale(schedule, t[0]) * jnp.asarray(noise, jnp.float32)  # N(0, 1) at t = 1 for rectified flow

    def step(z, xs):
        t_cur, t_next, c_cur, c_next = xs
        u = u_fn(z, t_cur, c_cur)
        z_next = z + (t_next - t_cur) * u  # Euler
        if second_order:  # Heun's trapezoid, except on the last step to t = 0 (as Karras et al. 2022, Alg. 2)

            def correct(z_next):
                return z + (t_next - t_cur) * 0.5 * (u + u_fn(z_next, t_next, c_next))

            z_next = jax.lax.cond(t_next > 0, correct, lambda v: v, z_next)
        return z_next, None

    z, _ = jax.lax.scan(step, z, (t[:-1], t[1:], *c_noise))
    return z


@SAMPLERS.register("flow_euler")
def flow_euler(
    denoise: Denoiser,
    schedule: Any,
    noise: Array,
    key: Array,
    *,
    steps: int,
    shift: float = 1.0,
    grid: str = "paper",
) -> Array:
    """Euler in t on the flow velocity (Liu et al. 2023, Eq. 1; Esser et al. 2024) over `flow_time_grid`
    (`shift`; `grid` = paper | diffusers, T = the schedule's steps or 1000). One evaluation per step; deterministic."""
    return _flow_sampler(denoise, schedule, noise, flow_time_grid(steps, shift, grid, num_train_steps(schedule)), False)


@SAMPLERS.register("flow_heun")
def flow_heun(
    denoise: Denoiser,
    schedule: Any,
    noise: Array,
    key: Array,
    *,
    steps: int,
    shift: float = 1.0,
    grid: str = "paper",
) -> Array:
    """Heun's 2nd-order method in t on the flow velocity (Karras et al. 2022, Alg. 1 in t; diffusers'
    FlowMatchHeunDiscreteScheduler with grid = diffusers): 2n - 1 evaluations, Euler on the last step."""
    return _flow_sampler(denoise, schedule, noise, flow_time_grid(steps, shift, grid, num_train_steps(schedule)), True)

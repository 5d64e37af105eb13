"""DPM-Solver++ multistep, 2M / 3M, ODE or SDE (Lu et al. 2022, "DPM-Solver++", Algorithm 2; SDE variant Sec. 5).

Written in z-space for any schedule with lambda = log(alpha / sigma) and, as k-diffusion's
`sample_dpmpp_2m`, with the names of the paper: `denoised` is the data prediction x_theta at
the current time, `old_denoised` and `older_denoised` those of the previous two steps,
h = lambda_next - lambda_cur the step in log-SNR / 2 and r = h_last / h the ratio of the
previous step to this one. The SDE variant (eta = 1) multiplies the exponential terms by
e^{-eta h} and adds sigma_next sqrt(1 - e^{-2 eta h}) xi.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from diffax.samplers import diffusers_grids
from diffax.samplers.base import SAMPLERS, Denoiser, StepGrid, grid_alpha_sigma, prior_scale, step_grid, step_noise

Array = jax.Array
SOLVER_TYPES = ("ode", "sde")


class History(NamedTuple):
    """The multistep memory carried from step to step."""

    old_denoised: Array  # x0 prediction at the previous grid time
    older_denoised: Array  # and at the one before
    h_last: Array  # the previous step's h
    h_older: Array  # and the one before
    count: Array  # previous steps of finite h (0, 1 or 2): the order available


class Step(NamedTuple):
    """One step's coefficients: alpha, sigma at the next time, h, and the exponential terms."""

    alpha_next: Array
    sigma_next: Array
    sigma_ratio: Array  # (sigma_next / sigma_cur) e^{-eta h}
    h: Array  # 1 in place of an infinite h (only first-order steps, whose terms take their limits, see those)
    h_eta: Array  # (1 + eta) h
    one_minus_exp: Array  # 1 - e^{-(1 + eta) h}
    finite: Array  # whether h is finite


def first_order(z: Array, denoised: Array, past: History, s: Step) -> Array:
    """DPM-Solver++(1) (Lu et al. 2022, Eq. 8; = DDIM): z_next = (sigma_n/sigma_c) z + alpha_n (1 - e^{-h}) x_theta."""
    return s.sigma_ratio * z + s.alpha_next * s.one_minus_exp * denoised


def second_order(z: Array, denoised: Array, past: History, s: Step) -> Array:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): D = (1 + 1/(2r)) x_theta - 1/(2r) x_theta_old,
    i.e. the first-order step plus alpha_n (1 - e^{-h}) (x_theta - x_theta_old) / (2 r), r = h_last / h."""
    r = past.h_last / s.h
    return first_order(z, denoised, past, s) + s.alpha_next * s.one_minus_exp * (denoised - past.old_denoised) / (2 * r)


def third_order(z: Array, denoised: Array, past: History, s: Step) -> Array:
    """DPM-Solver++(3M) (Lu et al. 2022, App. B; diffusers' / k-diffusion's 3M): with the first and second
    divided differences D1, D2 of x_theta over the last three times (ratios r0 = h_last/h, r1 = h_older/h),
    z_next = first-order step + alpha_n (phi2 D1 - phi3 D2), phi2 = 1 - (1 - e^{-h}) / h, phi3 = phi2 / h - 1/2."""
    r0, r1 = past.h_last / s.h, past.h_older / s.h
    d1_0 = (denoised - past.old_denoised) / r0
    d1_1 = (past.old_denoised - past.older_denoised) / r1
    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi2 = 1.0 - s.one_minus_exp / s.h_eta
    phi3 = phi2 / s.h_eta - 0.5
    return first_order(z, denoised, past, s) + s.alpha_next * (phi2 * d1 - phi3 * d2)


def step_coefficients(a_c, s_c, a_n, s_n, eta: float) -> Step:
    """The step from (alpha_c, sigma_c) to (alpha_n, sigma_n). h is infinite when the step starts at
    alpha = 0 or ends at sigma = 0; its exponentials then take their limits (e^{-h} = 0)."""
    h = (jnp.log(a_n) - jnp.log(s_n)) - (jnp.log(a_c) - jnp.log(s_c))
    finite = jnp.isfinite(h)
    h = jnp.where(finite, h, 1.0)
    decay = jnp.where(finite, jnp.exp(-eta * h), 0.0 if eta else 1.0)
    h_eta = (1.0 + eta) * h
    return Step(a_n, s_n, s_n / s_c * decay, h, h_eta, jnp.where(finite, -jnp.expm1(-h_eta), 1.0), finite)


def sde_noise_std(s: Step, eta: float) -> Array:
    """SDE-DPM-Solver++ (Lu et al. 2022, Sec. 5): the std sigma_next sqrt(1 - e^{-2 eta h}) of the added noise."""
    return s.sigma_next * jnp.sqrt(jnp.where(s.finite, -jnp.expm1(-2.0 * eta * s.h), 1.0))


def step_orders(grid: StepGrid, sigma_next: Array, order: int, lower_order_final: bool) -> Array:
    """The order wanted at each step: `order`, with diffusers' lower_order_final (fewer than 15 steps: the
    last step first order, the one before at most second), and first order on a step landing on sigma = 0."""
    n = grid.t_cur.shape[0]
    k = jnp.arange(n)
    last, second_last = (1, min(order, 2)) if lower_order_final and n < 15 else (order, order)
    wanted = jnp.where(k == n - 1, last, jnp.where(k == n - 2, second_last, order))
    return jnp.where(sigma_next == 0, 1, wanted)


@SAMPLERS.register("dpm_solver")
def dpm_solver(
    denoise: Denoiser,
    schedule: Any,
    noise: Array,
    key: Array,
    *,
    steps: int,
    spacing: str = "trailing",
    steps_offset: int = 0,
    final_alpha_one: bool = True,
    order: int = 2,
    solver_type: str = "ode",
    grid: str = "paper",
) -> Array:
    """DPM-Solver++(2M) / (3M) (Lu et al. 2022) on the grid of `spacing`, one evaluation per step.

    `order` (1, 2 or 3) is the multistep order; the first steps use lower orders while the
    history fills, the last step is first order (always when it lands on sigma = 0; and, with
    fewer than 15 steps, the last two steps are at most 1st / 2nd order, as diffusers'
    lower_order_final). Only the order in use is computed (`lax.switch`). `solver_type="sde"`
    gives SDE-DPM-Solver++ (Lu et al. 2022, Sec. 5). `grid` = diffusers / diffusers_karras replaces
    the spacing grid with DPMSolverMultistepScheduler's (`diffusers_grids.dpm_step_grid`; `final_alpha_one`
    is its final_sigmas_type zero).
    """
    if int(order) not in (1, 2, 3):
        raise ValueError(f"config.sampling.order={order} must be 1, 2 or 3 for dpm_solver")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"Unknown solver_type {solver_type!r} in config.sampling.solver_type; valid: ode, sde")
    eta = 1.0 if solver_type == "sde" else 0.0
    options = dict(steps=steps, spacing=spacing, steps_offset=steps_offset, final_clean=final_alpha_one)
    if diffusers_grids.check_grid(grid) == "paper":
        grid = step_grid(schedule, **options)
    else:
        grid = diffusers_grids.dpm_step_grid(schedule, karras=grid == "diffusers_karras", **options)
    a_c, s_c, a_n, s_n = grid_alpha_sigma(schedule, grid)
    wanted = step_orders(grid, s_n, int(order), lower_order_final=True)
    z = prior_scale(schedule, grid.t_cur[0]) * jnp.asarray(noise, jnp.float32)

    def step(carry, xs):
        z, past = carry
        k, t, c_noise, coefs, wanted_k = xs
        denoised = denoise(z, t, c_noise).x0
        s = step_coefficients(*coefs, eta)
        use = jnp.minimum(wanted_k, past.count + 1)
        z_next = jax.lax.switch(use - 1, (first_order, second_order, third_order), z, denoised, past, s)
        if eta:
            z_next = z_next + sde_noise_std(s, eta) * step_noise(key, k, z)
        # history only counts steps of finite length (a start at alpha = 0 has h = inf)
        count = jnp.where(s.finite, jnp.minimum(past.count + 1, 2), 0)
        past = History(denoised, past.old_denoised, s.h, past.h_last, count)
        return (z_next, past), None

    zero = jnp.zeros_like(z)
    past = History(zero, zero, jnp.float32(1.0), jnp.float32(1.0), jnp.int32(0))
    ks = jnp.arange(grid.t_cur.shape[0])
    (z, _), _ = jax.lax.scan(step, (z, past), (ks, grid.t_cur, grid.c_noise, (a_c, s_c, a_n, s_n), wanted))
    return z

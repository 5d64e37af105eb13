"""DPM-Solver++ multistep, 2M / 3M, ODE or SDE (Lu et al. 2022, "DPM-Solver++", Algorithm 2; SDE variant Sec. 5).

Written in z-space for any schedule with lambda = log(alpha / sigma); h = lambda_next - lambda_cur.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffax.samplers.base import SAMPLERS, grid_alpha_sigma, prior_scale, split_output, step_grid

Array = jax.Array
SOLVER_TYPES = ("ode", "sde")


def dpmpp_update(z, m0, m1, m2, h, h1, h2, a_c, s_c, a_n, s_n, order, eta, noise):
    """One DPM-Solver++ step of order 1, 2 or 3 (traced `order`), deterministic (eta = 0) or SDE (eta = 1).

    z_n = (sigma_n/sigma_c) e^{-eta h} z + alpha_n [E m0 + corr] + sigma_n sqrt(1 - e^{-2 eta h}) xi with
    E = 1 - e^{-(1+eta) h}. Order 2 (Lu et al. 2022, Algorithm 2; diffusers' "midpoint"): corr = E/2 (m0 - m1)/r,
    r = h1/h. Order 3 (diffusers' / k-diffusion's 3M): corr = phi2 D1 - phi3 D2 with phi2 = 1 - E/h_eta,
    phi3 = phi2/h_eta - 1/2. m0, m1, m2 are the x0 predictions at the current and two previous times.
    """
    finite = jnp.isfinite(h)
    hs = jnp.where(finite, h, 1.0)
    h_eta = hs * (1.0 + eta)
    E = jnp.where(finite, -jnp.expm1(-h_eta), 1.0)
    decay = jnp.where(finite, jnp.exp(-eta * hs), 0.0 if eta else 1.0)
    ratio = s_n / s_c * decay
    out1 = ratio * z + a_n * E * m0
    r0 = h1 / hs
    out2 = out1 + a_n * 0.5 * E * (m0 - m1) / r0
    r1 = h2 / hs
    d1_0 = (m0 - m1) / r0
    d1_1 = (m1 - m2) / r1
    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi2 = 1.0 - E / h_eta
    phi3 = phi2 / h_eta - 0.5
    out3 = out1 + a_n * (phi2 * d1 - phi3 * d2)
    out = jnp.where(order >= 3, out3, jnp.where(order == 2, out2, out1))
    if eta:
        out = out + s_n * jnp.sqrt(jnp.where(finite, -jnp.expm1(-2.0 * eta * hs), 1.0)) * noise
    return out


@SAMPLERS.register("dpm_solver")
def dpm_solver(
    denoise: Callable, schedule: Any, noise: Array, key: Array, sampling_cfg: Any, diffusion_cfg: Any
) -> Array:
    """DPM-Solver++(2M) / (3M) (Lu et al. 2022) on the grid of config.sampling.spacing, one evaluation per step.

    config.sampling.order (2 or 3) is the multistep order; the first steps use lower orders
    while the history fills, the last step is first order (always when it lands on sigma = 0;
    and, with fewer than 15 steps, the last two steps are at most 1st / 2nd order, as diffusers'
    lower_order_final). config.sampling.solver_type = "sde" gives SDE-DPM-Solver++ (Lu et al. 2022, Sec. 5).
    """
    order = int(sampling_cfg.order)
    if order not in (1, 2, 3):
        raise ValueError(f"config.sampling.order={order} must be 1, 2 or 3 for dpm_solver")
    solver_type = str(sampling_cfg.solver_type)
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"Unknown solver_type {solver_type!r} in config.sampling.solver_type; valid: ode, sde")
    eta = 1.0 if solver_type == "sde" else 0.0
    t_cur, t_next, final_clean = step_grid(schedule, sampling_cfg)
    a_c, s_c, a_n, s_n = grid_alpha_sigma(schedule, t_cur, t_next, final_clean)
    n = t_cur.shape[0]
    lam_c, lam_n = jnp.log(a_c) - jnp.log(s_c), jnp.log(a_n) - jnp.log(s_n)
    k = jnp.arange(n)
    last, second_last = (1, min(order, 2)) if n < 15 else (order, order)
    max_order = jnp.where(k == n - 1, last, jnp.where(k == n - 2, second_last, order))
    max_order = jnp.where(s_n == 0, 1, max_order)
    z = prior_scale(schedule, t_cur[0]) * jnp.asarray(noise, jnp.float32)
    zero = jnp.zeros_like(z)

    def step(carry, xs):
        z, m1, m2, h1, h2, hist = carry
        i, t, ac, sc, an, sn, lc, ln, mo = xs
        m0 = split_output(denoise(z, t))[0]
        h = ln - lc
        eff = jnp.minimum(mo, hist + 1)
        xi = jax.random.normal(jax.random.fold_in(key, i), z.shape, jnp.float32) if eta else 0.0
        z_n = dpmpp_update(z, m0, m1, m2, h, h1, h2, ac, sc, an, sn, eff, eta, xi)
        # history only counts steps of finite length (a start at alpha = 0 has h = inf)
        hist = jnp.where(jnp.isfinite(h), jnp.minimum(hist + 1, 2), 0)
        return (z_n, m0, m1, jnp.where(jnp.isfinite(h), h, 1.0), h1, hist), None

    carry = (z, zero, zero, jnp.float32(1.0), jnp.float32(1.0), jnp.int32(0))
    xs = (k, jnp.asarray(t_cur), a_c, s_c, a_n, s_n, lam_c, lam_n, max_order)
    (z, *_), _ = jax.lax.scan(step, carry, xs)
    return z

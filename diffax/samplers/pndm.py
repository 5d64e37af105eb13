"""PNDM / PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"), as diffusers'
PNDMScheduler (diffusers 0.42, schedulers/scheduling_pndm.py) that Stable Diffusion 1.x pipelines ship.

Every step moves z along the DDIM "transfer" phi(z, e, t -> t') of the paper's Eq. 9 (= a DDIM step with
eta = 0 fed the noise estimate e), and the noise estimates of several model calls are combined as a
classical linear multistep or Runge-Kutta method would combine derivatives:

- PLMS (Eq. 12, `skip_prk_steps=True`, what SD uses): the 4th-order Adams-Bashforth combination
  (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24 of the last four estimates. While the history fills, diffusers
  uses its own start: one Euler transfer with e_0 from the first grid time, then the same start point
  moved again with the mean of e_0 and the estimate at the Euler result (a 2nd-order, Heun-like step, the
  reason diffusers' grid repeats its second time step), then the 2- and 3-step Adams-Bashforth weights
  (3, -1) / 2 and (23, -16, 5) / 12; the Heun evaluation is not kept in the history.
- PRK (Eq. 13, `skip_prk_steps=False`, diffusers' default): the first three steps are 4th-order
  pseudo Runge-Kutta steps of four calls each (at t, twice at the midpoint t - delta / 2, at t - delta, weights
  1/6, 1/3, 1/3, 1/6), whose first estimates start the history; then PLMS.

The step to the previous time is always delta = T // n (diffusers' `prev_timestep = t - T // n`), also on
linspace / trailing grids where that lands between grid points; a step below index 0 ends at alpha = 1
(`final_alpha_one`, diffusers' set_alpha_to_one) or at alphas_cumprod[0]. The method is written as a table
(`pndm_plan`, numpy on the host) of what each model call does, so one `lax.scan` runs both variants.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffax.samplers.base import SAMPLERS, Denoiser, num_train_steps, prior_scale, spacing_indices, time_cap

Array = jax.Array

# Adams-Bashforth weights of (new estimate, previous, the one before, ...) by how many estimates exist
# (Liu et al. 2022, Eq. 12 and diffusers' start).
_ADAMS_BASHFORTH = {2: (3 / 2, -1 / 2, 0.0, 0.0), 3: (23 / 12, -16 / 12, 5 / 12, 0.0),
                    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
_RK4 = (1 / 6, 1 / 3, 1 / 3, 1 / 6)


class PndmPlan(NamedTuple):
    """What model call k does (numpy arrays over the calls): the network sees step index `model_idx`;
    the transfer goes from index `from_idx` to `to_idx` (< 0: the final alpha) starting at the stored
    sample (`from_stored`, stored before the call when `store`) or at the current one; its noise estimate
    is `weights` . (new, history_1, history_2, history_3, rk_sum); the new estimate enters the history
    when `push`; the Runge-Kutta sum becomes `rk_keep` * rk_sum + `rk_add` * new."""

    model_idx: np.ndarray
    from_idx: np.ndarray
    to_idx: np.ndarray
    store: np.ndarray
    from_stored: np.ndarray
    push: np.ndarray
    weights: np.ndarray  # [calls, 5]
    rk_keep: np.ndarray
    rk_add: np.ndarray


def pndm_timesteps(num_train_steps: int, steps: int, spacing: str, steps_offset: int,
                   skip_prk_steps: bool) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' PNDMScheduler.set_timesteps: (prk_timesteps, plms_timesteps), the step index of each model call.

    PLMS only: the spacing grid descending with its second entry repeated (n + 1 calls). With PRK: the
    first 4 grid times and their midpoints as the three RK4 steps need them (12 calls), then the rest of
    the grid from the 4th time on (n - 3 calls)."""
    T, n = int(num_train_steps), int(steps)
    grid = spacing_indices(T, n, spacing, steps_offset)[::-1]  # ascending, as diffusers' _timesteps
    if skip_prk_steps:
        return np.zeros((0,), np.int64), np.concatenate([grid[:-1], grid[-2:-1], grid[-1:]])[::-1].copy()
    if n < 4:
        raise ValueError(f"config.sampling.steps={n}: PNDM with Runge-Kutta steps (skip_prk_steps=False) needs at "
                         "least 4 steps")
    half = T // n // 2
    prk = grid[-4:].repeat(2) + np.tile(np.array([0, half]), 4)
    prk = prk[:-1].repeat(2)[1:-1][::-1].copy()
    return prk, grid[:-3][::-1].copy()


def pndm_plan(num_train_steps: int, steps: int, spacing: str = "leading", steps_offset: int = 0,
              skip_prk_steps: bool = True) -> PndmPlan:
    """The table of `PndmPlan` that replays diffusers' PNDMScheduler.step_prk / step_plms call by call."""
    T, n = int(num_train_steps), int(steps)
    delta = T // n
    prk, plms = pndm_timesteps(T, n, spacing, steps_offset, skip_prk_steps)
    rows = []
    for c, t in enumerate(prk):  # step_prk: counter c, the transfer always starts at its RK step's first time
        r = c % 4
        t0 = int(prk[c // 4 * 4])
        prev = int(t) - (0 if c % 2 else delta // 2)
        w = (_RK4[3], 0, 0, 0, 1.0) if r == 3 else (1.0, 0, 0, 0, 0)  # the 4th call closes the RK4 sum
        rows.append((int(t), t0, prev, r == 0, True, r == 0, w, 1.0 if r in (1, 2) else 0.0,
                     _RK4[r] if r < 3 else 0.0))
    count = len(prk) // 4  # estimates in the history: one per RK step
    for j, t in enumerate(plms):  # step_plms: counter c = len(prk) + j
        c, t = len(prk) + j, int(t)
        if c == 1:  # the Heun-like second call: from the stored first sample, one delta back to t, mean estimate
            rows.append((t, t + delta, t, False, True, False, (0.5, 0.5, 0, 0, 0), 0.0, 0.0))
            continue
        count = min(count + 1, 4)
        w = (1.0, 0, 0, 0, 0) if count == 1 else _ADAMS_BASHFORTH[count] + (0.0,)
        rows.append((t, t, t - delta, c == 0, False, True, w, 0.0, 0.0))
    cols = list(zip(*rows))
    return PndmPlan(*(np.asarray(v, np.int64) for v in cols[:3]), *(np.asarray(v, bool) for v in cols[3:6]),
                    np.asarray(cols[6], np.float32), np.asarray(cols[7], np.float32), np.asarray(cols[8], np.float32))


def _alpha_sigma_at(schedule: Any, idx: np.ndarray, final_alpha_one: bool) -> tuple[Array, Array]:
    """(alpha, sigma) at step indices (time (i + 1) / T, capped as every sampler); i < 0 is the final alpha:
    (1, 0) when `final_alpha_one`, else that of index 0 (diffusers' final_alpha_cumprod)."""
    T = num_train_steps(schedule)
    t = jnp.minimum(jnp.asarray((np.maximum(idx, 0) + 1) / T, jnp.float32), time_cap(schedule))
    a, s = (jnp.asarray(v, jnp.float32) for v in schedule.alpha_sigma(t))
    if final_alpha_one:
        final = jnp.asarray(idx < 0)
        a, s = jnp.where(final, 1.0, a), jnp.where(final, 0.0, s)
    return a, s


@SAMPLERS.register("pndm")
def pndm(
    denoise: Denoiser,
    schedule: Any,
    noise: Array,
    key: Array,
    *,
    steps: int,
    spacing: str = "leading",
    steps_offset: int = 0,
    final_alpha_one: bool = False,
    skip_prk_steps: bool = True,
) -> Array:
    """PNDM sampling (Liu et al. 2022): PLMS, or with `skip_prk_steps=False` three pseudo Runge-Kutta steps first,
    on diffusers' PNDMScheduler grid (see the module docstring). Deterministic (`key` unused): n + 1 network
    calls for PLMS, n + 9 with the Runge-Kutta start. Each transfer is phi of Eq. 9, written as DDIM's
    z' = alpha' x0 + sigma' e with x0 = (z - sigma e) / alpha (the same map for a variance-preserving schedule).
    """
    plan = pndm_plan(num_train_steps(schedule), steps, spacing, steps_offset, bool(skip_prk_steps))
    T = num_train_steps(schedule)
    t_model = jnp.minimum(jnp.asarray((plan.model_idx + 1) / T, jnp.float32), time_cap(schedule))
    a_from, s_from = _alpha_sigma_at(schedule, plan.from_idx, final_alpha_one)
    a_to, s_to = _alpha_sigma_at(schedule, plan.to_idx, final_alpha_one)
    z = prior_scale(schedule, t_model[0]) * jnp.asarray(noise, jnp.float32)

    def step(carry, xs):
        z, stored, history, rk_sum = carry
        t, store, from_stored, push, w, rk_keep, rk_add, af, sf, at, st = xs
        new = denoise(z, t).eps
        stored = jnp.where(store, z, stored)
        e = w[0] * new + w[1] * history[0] + w[2] * history[1] + w[3] * history[2] + w[4] * rk_sum
        base = jnp.where(from_stored, stored, z)
        z_next = at * (base - sf * e) / af + st * e
        history = jax.tree.map(lambda a, b: jnp.where(push, a, b), (new, history[0], history[1]), history)
        rk_sum = rk_keep * rk_sum + rk_add * new
        return (z_next, stored, history, rk_sum), None

    zero = jnp.zeros_like(z)
    xs = (t_model, jnp.asarray(plan.store), jnp.asarray(plan.from_stored), jnp.asarray(plan.push),
          jnp.asarray(plan.weights), jnp.asarray(plan.rk_keep), jnp.asarray(plan.rk_add), a_from, s_from, a_to, s_to)
    (z, *_), _ = jax.lax.scan(step, (z, z, (zero, zero, zero), zero), xs)
    return z

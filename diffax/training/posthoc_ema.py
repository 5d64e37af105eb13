"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2).

Training keeps a few power-function EMAs of the weights (Sec. 3.1, Eq. 2-3):
after update t (t = 1, 2, ... counts optimizer steps) each profile is

    ema_t = beta_t * ema_{t-1} + (1 - beta_t) * theta_t,   beta_t = (1 - 1/t)^(gamma + 1),

so beta_1 = 0 forgets the initialisation, and ema_t = sum_i w_i theta_i with
w_i = (i^(gamma+1) - (i-1)^(gamma+1)) / t^(gamma+1): exactly the continuous
profile p_t(tau) = (gamma+1) tau^gamma / t^(gamma+1) on [0, t] integrated over
each step's interval (i-1, i]. Its width relative to t is sigma_rel (App. C.1,
Eq. 123); sigma_rel is what users choose, gamma follows from it.

Snapshots of the profiles are saved every few steps. Any other profile
(gamma_out, t_out) is reconstructed afterwards as the combination of the
snapshots whose profiles are closest to it in L2 (App. C.2, Eq. 151,
Algorithm 3): the Gram matrix of the snapshot profiles and their inner
products with the target come in closed form, and the least-squares
coefficients solve one small linear system. Times only enter as ratios, so
steps or images give the same coefficients (EDM2's code counts images).

Everything here is float64 numpy on a handful of numbers, except `update`,
which runs inside the jitted train step.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# sigma_rel of gamma = 0 (the uniform average of the whole run): the largest value with gamma >= 0.
MAX_SIGMA_REL = float(np.sqrt(1.0 / 12.0))
# A reconstruction whose profile is further than this (relative L2) from the target is refused.
MAX_PROFILE_ERROR = 0.05


def sigma_rel_of_gamma(gamma: Any) -> np.ndarray:
    """Relative standard deviation of the power-function profile with exponent gamma (EDM2 Eq. 123).

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))).
    """
    g = np.asarray(gamma, np.float64)
    return np.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def gamma_of_sigma_rel(sigma_rel: Any) -> np.ndarray:
    """The exponent gamma >= 0 whose profile has relative width `sigma_rel` (EDM2 Eq. 126, Algorithm 2).

    Squaring Eq. 123 and clearing denominators gives the cubic
    gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0 with s = sigma_rel^-2;
    for 0 < sigma_rel < sqrt(1/12) its largest real root is the one >= 0.
    EDM2's code takes the largest root of that cubic with np.roots; here the
    root is found by bisection on the monotone relation instead, which reaches
    float64 precision without the cubic's cancellation for small sigma_rel.
    """
    sr = np.asarray(sigma_rel, np.float64)
    check_sigma_rel(sr)
    lo = np.zeros_like(sr)
    hi = np.full_like(sr, 1.0)
    while np.any(sigma_rel_of_gamma(hi) > sr):  # sigma_rel falls as gamma grows: bracket the root
        hi = np.where(sigma_rel_of_gamma(hi) > sr, hi * 2.0, hi)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        above = sigma_rel_of_gamma(mid) > sr
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    return 0.5 * (lo + hi)


def check_sigma_rel(sigma_rel: Any) -> None:
    """Raise a ValueError naming the value unless 0 < sigma_rel < sqrt(1/12) (gamma > 0, as EDM2 requires)."""
    for v in np.atleast_1d(np.asarray(sigma_rel, np.float64)):
        if not 0.0 < v < MAX_SIGMA_REL:
            raise ValueError(
                f"sigma_rel={v:g} is outside the power-function EMA's range 0 < sigma_rel < {MAX_SIGMA_REL:.4f} "
                "(sqrt(1/12), the uniform average); EDM2 uses 0.05 to 0.15.")


def beta(step: jax.Array, gamma: float) -> jax.Array:
    """beta_t = (1 - 1/t)^(gamma + 1) for update number t = step + 1 (EDM2 Eq. 3), in float32.

    Written as exp((gamma + 1) log1p(-1/t)) so it stays accurate when beta is close to 1.
    """
    t = step.astype(jnp.float32) + 1.0
    return jnp.exp((gamma + 1.0) * jnp.log1p(-1.0 / t))


def update(profiles: tuple, params: Any, step: jax.Array, gammas: Sequence[float]) -> tuple:
    """One update of every profile after optimizer step `step` (0-based): EDM2 Eq. 2 with `beta`."""
    out = []
    for profile, gamma in zip(profiles, gammas):
        b = beta(step, gamma)
        out.append(jax.tree.map(lambda e, p: e * b + (1.0 - b) * p.astype(e.dtype), profile, params))
    return tuple(out)


def profile_inner_product(t_a: Any, gamma_a: Any, t_b: Any, gamma_b: Any) -> np.ndarray:
    """<p_a, p_b> = integral of p_a(tau) p_b(tau) over tau for two power-function profiles (EDM2 Eq. 151).

    With p(tau) = (gamma+1) tau^gamma / t^(gamma+1) on [0, t] and t_a <= t_b:
    (gamma_a+1)(gamma_b+1) / ((gamma_a+gamma_b+1) t_b) * (t_a / t_b)^gamma_b.
    Broadcasts over its arguments.
    """
    t_a, g_a, t_b, g_b = (np.asarray(x, np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    first_shorter = t_a <= t_b
    t_max = np.where(first_shorter, t_b, t_a)
    ratio = np.where(first_shorter, t_a / t_b, t_b / t_a)
    g_long = np.where(first_shorter, g_b, g_a)  # the exponent of the profile that runs to t_max
    return (g_a + 1.0) * (g_b + 1.0) / ((g_a + g_b + 1.0) * t_max) * ratio**g_long


def solve_coefficients(
    snapshot_steps: Sequence[int], snapshot_gammas: Sequence[float], step: int, gamma: float
) -> tuple[np.ndarray, float]:
    """Least-squares coefficients x (summing to 1) of the snapshots for the profile (step, gamma) (EDM2 App. C.2).

    Minimises || sum_i x_i p_i - p_out ||_L2 over the snapshot profiles p_i
    (Algorithm 3): A x = b with A_ij = <p_i, p_j> and b_i = <p_i, p_out>, then
    x is normalised to sum 1 so a constant trajectory is reproduced exactly.
    Also returns the relative L2 error of the combined profile against the
    target, ||sum_i x_i p_i - p_out|| / ||p_out||: how well the snapshots can
    represent it. Snapshots later than `step` cannot contribute and must be
    left out by the caller.
    """
    ts = np.asarray(snapshot_steps, np.float64)
    gs = np.asarray(snapshot_gammas, np.float64)
    if np.any(ts <= 0) or np.any(ts > step):
        raise ValueError(f"Snapshot steps must lie in (0, {step}]; got {sorted(set(ts.tolist()))}.")
    gram = profile_inner_product(ts[:, None], gs[:, None], ts[None, :], gs[None, :])
    target = profile_inner_product(ts, gs, float(step), float(gamma))
    x = np.linalg.lstsq(gram, target, rcond=None)[0]  # lstsq: near-duplicate snapshots make A singular
    x = x / np.sum(x)
    norm2 = float(profile_inner_product(step, gamma, step, gamma))
    residual2 = x @ gram @ x - 2.0 * x @ target + norm2
    return x, float(np.sqrt(max(residual2, 0.0) / norm2))


def representable_range(
    snapshot_steps: Sequence[int], snapshot_gammas: Sequence[float], step: int, tol: float = MAX_PROFILE_ERROR
) -> tuple[float, float]:
    """The sigma_rel interval (on a fine log grid) the snapshots reconstruct with profile error <= tol at `step`."""
    grid = np.geomspace(1e-3, MAX_SIGMA_REL * 0.999, 400)
    ok = [s for s in grid
          if solve_coefficients(snapshot_steps, snapshot_gammas, step, float(gamma_of_sigma_rel(s)))[1] <= tol]
    if not ok:
        return (float("nan"), float("nan"))
    return (float(min(ok)), float(max(ok)))


def combine(trees: Sequence[Any], coefficients: Sequence[float]) -> Any:
    """sum_i c_i trees[i], leaf by leaf, accumulated in float32."""
    out = None
    for tree, c in zip(trees, coefficients):
        term = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32) * np.float32(c), tree)
        out = term if out is None else jax.tree.map(jnp.add, out, term)
    return out

"""Probability-flow ODE sampling with an adaptive diffrax solver on the device (Song et al. 2021, Eq. 13)."""
from __future__ import annotations

from typing import Any, Callable

import diffrax
import jax
import jax.numpy as jnp

from diffax.parameterization import batch_broadcast
from diffax.samplers.base import SAMPLERS, Denoiser, prior_scale, sigma_range, t_of_sigma, time_cap

Array = jax.Array
ODE_SOLVERS = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5, "dopri8": diffrax.Dopri8, "bosh3": diffrax.Bosh3}
MAX_STEPS = 4096


def ode_solver(name: str) -> diffrax.AbstractSolver:
    """A diffrax adaptive Runge-Kutta solver by name (config.sampling.ode_solver)."""
    if name not in ODE_SOLVERS:
        raise ValueError(f"Unknown ODE solver {name!r} in config.sampling.ode_solver; valid: {', '.join(ODE_SOLVERS)}")
    return ODE_SOLVERS[name]()


def probability_flow(denoise: Denoiser, schedule: Any) -> Callable:
    """The probability-flow drift dz/dt = f(t) z - g(t)^2 / 2 * score = f z + g^2 eps / (2 sigma_t)
    (Song et al. 2021, Eq. 13) with (f, g^2) = schedule.sde(t); returns drift(t, z)."""

    def drift(t: Array, z: Array) -> Array:
        t = jnp.asarray(t, jnp.float32)
        f, g2 = (jnp.asarray(u, jnp.float32) for u in schedule.sde(t))
        _, s = schedule.alpha_sigma(t)
        eps = denoise(z, t).eps
        return batch_broadcast(f, z) * z + batch_broadcast(0.5 * g2 / jnp.asarray(s, jnp.float32), z) * eps

    return drift


@SAMPLERS.register("ode")
def ode(
    denoise: Denoiser,
    schedule: Any,
    noise: Array,
    key: Array,
    *,
    solver: str = "tsit5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    sigma_min: float = 0.002,
) -> Array:
    """Integrate the probability-flow ODE from `base.time_cap` (1 unless alpha_1 = 0) down to the time of
    sigma~ = max(sigma~(0 or 1/T), `sigma_min`) with an adaptive diffrax `solver` (Song et al. 2021 used
    RK45 with rtol = atol = 1e-5), then return the denoised mean E[x0 | z_tmin] (one more evaluation).
    Deterministic: `key` is unused."""
    t_min, t_max = t_of_sigma(schedule, sigma_range(schedule, sigma_min)[0]), time_cap(schedule)
    z = prior_scale(schedule, t_max) * jnp.asarray(noise, jnp.float32)
    drift = probability_flow(denoise, schedule)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: drift(t, y)),
        ode_solver(solver),
        t0=t_max,
        t1=t_min,
        dt0=None,
        y0=z,
        stepsize_controller=diffrax.PIDController(rtol=float(rtol), atol=float(atol)),
        saveat=diffrax.SaveAt(t1=True),
        max_steps=MAX_STEPS,
    )
    return denoise(sol.ys[-1], t_min).x0

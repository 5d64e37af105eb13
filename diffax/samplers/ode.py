"""Probability-flow ODE sampling with an adaptive diffrax solver on the device (Song et al. 2021, Eq. 13)."""
from __future__ import annotations

from typing import Any, Callable

import diffrax
import jax
import jax.numpy as jnp

from diffax.samplers.base import SAMPLERS, bcast, prior_scale, sigma_range, split_output, t_of_sigma

Array = jax.Array
ODE_SOLVERS = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5, "dopri8": diffrax.Dopri8, "bosh3": diffrax.Bosh3}
MAX_STEPS = 4096


def ode_solver(name: str) -> diffrax.AbstractSolver:
    """A diffrax adaptive Runge-Kutta solver by name (config.sampling.ode_solver)."""
    if name not in ODE_SOLVERS:
        raise ValueError(f"Unknown ODE solver {name!r} in config.sampling.ode_solver; valid: {', '.join(ODE_SOLVERS)}")
    return ODE_SOLVERS[name]()


def probability_flow(denoise: Callable, schedule: Any) -> Callable:
    """The probability-flow drift dz/dt = f(t) z - g(t)^2 / 2 * score = f z + g^2 eps / (2 sigma_t)
    (Song et al. 2021, Eq. 13) with (f, g^2) = schedule.sde(t); returns drift(t, z)."""

    def drift(t: Array, z: Array) -> Array:
        t = jnp.asarray(t, jnp.float32)
        f, g2 = (jnp.asarray(u, jnp.float32) for u in schedule.sde(t))
        _, s = schedule.alpha_sigma(t)
        eps = split_output(denoise(z, t))[1]
        return bcast(f, z) * z + bcast(0.5 * g2 / jnp.asarray(s, jnp.float32), z) * eps

    return drift


def ode_time_range(schedule: Any, diffusion_cfg: Any) -> tuple[Array, Array]:
    """(t_min, t_max) of the ODE sampler: the times of the sampler sigma~ range (see base.sigma_range)."""
    lo, hi = sigma_range(schedule, diffusion_cfg)
    return t_of_sigma(schedule, lo), jnp.minimum(t_of_sigma(schedule, hi), 1.0)


@SAMPLERS.register("ode")
def ode(denoise: Callable, schedule: Any, noise: Array, key: Array, sampling_cfg: Any, diffusion_cfg: Any) -> Array:
    """Integrate the probability-flow ODE from t_max (~1) to t_min with an adaptive diffrax solver
    (config.sampling.ode_solver, ode_rtol, ode_atol; Song et al. 2021 used RK45 with 1e-5), then return
    the denoised mean E[x0 | z_tmin] (one more evaluation). Deterministic: `key` is unused."""
    t_min, t_max = ode_time_range(schedule, diffusion_cfg)
    z = prior_scale(schedule, t_max) * jnp.asarray(noise, jnp.float32)
    drift = probability_flow(denoise, schedule)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: drift(t, y)),
        ode_solver(str(getattr(sampling_cfg, "ode_solver", "tsit5"))),
        t0=t_max,
        t1=t_min,
        dt0=None,
        y0=z,
        stepsize_controller=diffrax.PIDController(rtol=float(sampling_cfg.ode_rtol), atol=float(sampling_cfg.ode_atol)),
        saveat=diffrax.SaveAt(t1=True),
        max_steps=MAX_STEPS,
    )
    z = sol.ys[-1]
    return split_output(denoise(z, t_min))[0]

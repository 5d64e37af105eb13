"""Log-likelihood and bits/dim through the probability-flow ODE (Song et al. 2021, Sec. 4.3 and App. D.2).

log p_0(x) = log p_T(z_T) + int_0^T div f~(z_t, t) dt along dz/dt = f~(z, t), the probability-flow drift
(Chen et al. 2018, "Neural ODEs", Thm. 1), integrated with an adaptive diffrax solver on the device. The
divergence is exact (trace of the Jacobian by forward-mode autodiff; D network calls, for small data) or
Hutchinson's unbiased estimate eps^T J eps with a Rademacher or Gaussian probe held fixed over the solve
(Hutchinson 1989; Grathwohl et al. 2019, FFJORD).

Bits per dimension of 8-bit images (`bits_per_dim`). Pixels k in {0..255} are scaled as everywhere in diffax
to x = k / 127.5 - 1, so one intensity level is a bin of width 1/127.5. Uniform dequantisation
(Theis et al. 2016; Ho et al. 2019, Flow++ Eq. 1) evaluates the density at x + u / 127.5, u ~ U[0, 1)^D
(`dequantize`); since the bins are disjoint, log P(k) >= E_u log p(x + u/127.5) - D log 127.5, so

    bits/dim = (-log p(x_deq) / D + log 127.5) / log 2          (an upper bound on the discrete NLL)

i.e. the change of variables from [-1, 1] back to the [0, 256) pixel scale adds log2(127.5) = 6.994 bits.
score_sde (Song et al. 2021, likelihood.py) adds 7 = log2(128) instead because it dequantises as
(k + u) / 256 before mapping to [-1, 1] (bins of width 2/256); VDM (Kingma et al. 2021) needs no offset
because its decoder p(x | z_0) is already discrete. Sanity check: the uniform density on the
dequantised cube [-1, 1 + 1/127.5)^D gives exactly 8 bits/dim.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import diffrax
import jax
import jax.numpy as jnp

from diffax.samplers.base import prior_scale, time_cap
from diffax.samplers.ode import MAX_STEPS, ode_solver, probability_flow

Array = jax.Array
PIXEL_SCALE = 127.5  # x = k / 127.5 - 1
DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")


def dequantize(x: Array, key: Array) -> Array:
    """Uniform dequantisation of [-1, 1]-scaled 8-bit data: x + u / 127.5 with u ~ U[0, 1) (Theis et al. 2016)."""
    return x + jax.random.uniform(key, x.shape, jnp.float32) / PIXEL_SCALE


def bits_per_dim(logp: Array, dim: int, *, pixel_scale: float | None = PIXEL_SCALE) -> Array:
    """Bits/dim from a continuous log-density in nats of the [-1, 1]-scaled (dequantised) data:
    (-logp / D + log(pixel_scale)) / log 2 (see the module docstring; pixel_scale=None for continuous data)."""
    offset = math.log(pixel_scale) if pixel_scale else 0.0
    return (-jnp.asarray(logp, jnp.float32) / dim + offset) / math.log(2.0)


def _divergence_exact(drift_t: Callable, z: Array) -> Array:
    """Per-example trace of d drift / dz via jacfwd (one forward-mode pass per dimension)."""

    def single(zi: Array) -> Array:
        jac = jax.jacfwd(lambda u: drift_t(u[None])[0])(zi)
        d = zi.size
        return jnp.trace(jac.reshape(d, d))

    return jax.vmap(single)(z)


def _divergence_hutchinson(drift_t: Callable, z: Array, probe: Array) -> tuple[Array, Array]:
    """(drift, eps^T (d drift / dz) eps per example) with one jvp (Hutchinson 1989)."""
    f, jvp = jax.jvp(drift_t, (z,), (probe,))
    return f, jnp.sum((probe * jvp).reshape(z.shape[0], -1), axis=-1)


def log_likelihood(
    denoise: Callable,
    schedule: Any,
    x: Array,
    key: Array | None = None,
    *,
    divergence: str = "hutchinson",
    probe: str = "rademacher",
    t_min: float = 1e-5,
    t_max: float | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    solver: str = "tsit5",
    max_steps: int = MAX_STEPS,
) -> dict[str, Array]:
    """log p(x) per example [B] in nats by the probability-flow ODE (Song et al. 2021, Eq. 39-40).

    `denoise(z, t) -> samplers.Denoised(x0, eps)` (no guidance or clipping: the drift must be smooth). x is taken as
    the state at t_min (score_sde's eps = 1e-5) and integrated to t_max (default: where sigma/alpha
    reaches min(sigma_1/alpha_1, 4096), i.e. 1 unless alpha_1 = 0 as in the cosine schedule, where the
    drift is singular), where the prior is N(0, (alpha^2 + sigma^2) I), the samplers' prior (N(0, I)
    for VP). Like any diffusion likelihood this includes the prior mismatch at t_max (e.g. alpha_1 mu).
    `divergence` is "exact" or "hutchinson" with a `probe` ("rademacher" | "gaussian") drawn from `key`.
    Returns logp, prior_logp, delta_logp (the integrated divergence), z_T, t_max and num_steps of the
    adaptive solver. Jittable.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"Unknown divergence {divergence!r}; valid: {', '.join(DIVERGENCES)}")
    x = jnp.asarray(x, jnp.float32)
    if t_max is None:
        t_max = time_cap(schedule)
    drift = probability_flow(denoise, schedule)
    if divergence == "hutchinson":
        if key is None:
            raise ValueError("Hutchinson's estimator needs a key for its probe")
        if probe == "rademacher":
            eps = jax.random.rademacher(key, x.shape, jnp.float32)
        elif probe == "gaussian":
            eps = jax.random.normal(key, x.shape, jnp.float32)
        else:
            raise ValueError(f"Unknown probe {probe!r}; valid: {', '.join(PROBES)}")

    def rhs(t, state, args):
        z, _ = state
        drift_t = lambda u: drift(t, u)  # noqa: E731
        if divergence == "exact":
            return drift_t(z), _divergence_exact(drift_t, z)
        return _divergence_hutchinson(drift_t, z, eps)

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(rhs),
        ode_solver(solver),
        t0=float(t_min),
        t1=t_max,
        dt0=None,
        y0=(x, jnp.zeros(x.shape[:1], jnp.float32)),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=diffrax.SaveAt(t1=True),
        max_steps=max_steps,
    )
    z_T, delta = sol.ys[0][-1], sol.ys[1][-1]
    var = prior_scale(schedule, t_max) ** 2
    d = math.prod(x.shape[1:])
    prior = -0.5 * d * jnp.log(2 * math.pi * var) - 0.5 * jnp.sum(z_T.reshape(z_T.shape[0], -1) ** 2, -1) / var
    return {
        "logp": prior + delta,
        "t_max": jnp.asarray(t_max, jnp.float32),
        "prior_logp": prior,
        "delta_logp": delta,
        "z_T": z_T,
        "num_steps": sol.stats["num_steps"],
    }


def make_bpd_fn(
    apply_fn: Callable,
    schedule: Any,
    parameterization: Any,
    *,
    dequantize_data: bool = True,
    **kwargs: Any,
) -> Callable:
    """bpd_fn(x, key) -> bits/dim [B] of [-1, 1] images x from a network (Song et al. 2021, Table 2 protocol):
    dequantise (if `dequantize_data`), integrate the probability-flow ODE (`log_likelihood` kwargs), convert
    with `bits_per_dim`. No guidance or clipping is applied. Jit the result."""
    from diffax.samplers.guidance import raw_denoiser

    net = raw_denoiser(apply_fn, schedule, parameterization)

    def denoise(z, t):
        return net(z, jnp.broadcast_to(jnp.asarray(t, jnp.float32), z.shape[:1]), None)

    def bpd_fn(x: Array, key: Array) -> Array:
        k_deq, k_probe = jax.random.split(key)
        if dequantize_data:
            x = dequantize(x, k_deq)
        out = log_likelihood(denoise, schedule, x, k_probe, **kwargs)
        return bits_per_dim(out["logp"], math.prod(x.shape[1:]), pixel_scale=PIXEL_SCALE if dequantize_data else None)

    return bpd_fn

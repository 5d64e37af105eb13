"""Noise schedules: t in [0, 1] -> (alpha_t, sigma_t), logsnr_t, its inverse, and the SDE.

Every schedule describes one forward process z_t = alpha_t x + sigma_t eps
(Kingma et al. 2021, eq. 1) with log signal-to-noise ratio
lambda_t = log(alpha_t^2 / sigma_t^2), decreasing in t, and the linear SDE
dz = f(t) z dt + g(t) dW with the same marginals (Song et al. 2021, eq. 5;
Kingma et al. 2021, appendix A): f = d log(alpha)/dt, g^2 = d sigma^2/dt - 2 f sigma^2.

Discrete DDPM time is a view of the same object: a schedule with
`num_steps = T > 0` has grid points t_i = (i + 1) / T, i = 0..T-1. For the
variance-preserving (VP) schedules the discrete view is a table of
log alpha_bar_i = sum_{j<=i} log(1 - beta_j) (Ho et al. 2020, eq. 4), and
between grid points (and on [0, t_0] with alpha_bar = 1 at t = 0) log alpha_bar is
interpolated linearly in t, i.e. beta is constant over a step: a continuous
query (t_from_logsnr, ODE samplers, the SDE) is therefore exact at grid points and
smooth in between. VE / EDM / sub-VP schedules keep their continuous formulas and
only carry `num_steps` for the step-index conditioning and discrete time sampling.

logsnr conventions. Where alpha_t = 0 (zero terminal SNR, the cosine schedule at
t = 1) or sigma_t = 0 (VP at t = 0) the true logsnr is -inf / +inf. `logsnr` clamps
to [-LOGSNR_CLAMP, LOGSNR_CLAMP] = [-30, 30] so samplers, weightings and
c_noise always see finite values; `alpha_sigma` stays exact (alpha_1 = 0 exactly
under zero terminal SNR), and `t_from_logsnr` maps the clamp values back to the
end points. The clamp costs nothing measurable: at |lambda| = 30 the signal or
the noise is below 3e-7 of the other.

Adding a schedule: write a frozen dataclass subclass of `Schedule` (or of
`VPSchedule`, defining only `log_alpha2_sigma2`) and one builder function
`(cfg, image_size, seed)` decorated with `@SCHEDULES.register("name")` that maps the config to it. The
generic base methods give a jit-able bisection + Newton inverse and an
autodiff SDE for free; override them with closed forms where they exist.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffax.registry import Registry

Array = jax.Array

SCHEDULES: Registry[Callable[..., "Schedule"]] = Registry("schedule", "config.diffusion.schedule")

LOGSNR_CLAMP = 30.0  # |logsnr| is clamped to this; see the module docstring.
_BISECTION_STEPS = 32  # 2^-32 is below float32 resolution on [0, 1]


def clamp_logsnr(logsnr: Array) -> Array:
    """Clamp logsnr to [-LOGSNR_CLAMP, LOGSNR_CLAMP] so +-inf at the ends become finite."""
    return jnp.clip(logsnr, -LOGSNR_CLAMP, LOGSNR_CLAMP)


def _f32(t: Any) -> Array:
    return jnp.asarray(t, jnp.float32)


def step_to_t(i: Array, num_steps: int) -> Array:
    """Discrete DDPM step index i in {0..T-1} -> continuous time t = (i + 1) / T."""
    return (jnp.asarray(i, jnp.float32) + 1.0) / num_steps


def t_to_step(t: Array, num_steps: int) -> Array:
    """Continuous time on the grid -> nearest DDPM step index round(T t - 1), int32, clipped to [0, T-1]."""
    return jnp.clip(jnp.round(_f32(t) * num_steps - 1.0), 0, num_steps - 1).astype(jnp.int32)


class Schedule:
    """Base class: z_t = alpha_t x + sigma_t eps for t in [0, 1] (Kingma et al. 2021, eq. 1).

    Subclasses implement `alpha_sigma`; `logsnr`, `t_from_logsnr` (bisection +
    one Newton step, which also gives implicit-function gradients) and `sde`
    (forward-mode autodiff of log alpha and sigma^2, Kingma et al. 2021, eq. 28-29)
    are generic and overridden by closed forms where they exist. All methods take
    and return float32 arrays of any shape, elementwise, and are jit/vmap/grad safe.
    """

    num_steps: int = 0
    variance_preserving: ClassVar[bool] = False

    def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
        """(alpha_t, sigma_t) such that z_t = alpha_t x + sigma_t eps."""
        raise NotImplementedError(f"{type(self).__name__} must define alpha_sigma")

    def logsnr(self, t: Array) -> Array:
        """lambda_t = log(alpha_t^2 / sigma_t^2), clamped to +-LOGSNR_CLAMP."""
        alpha, sigma = self.alpha_sigma(t)
        return clamp_logsnr(2.0 * (jnp.log(alpha) - jnp.log(sigma)))

    def t_from_logsnr(self, logsnr: Array) -> Array:
        """Inverse of `logsnr` by bisection on [0, 1] then one Newton step (exact implicit gradients)."""
        logsnr = clamp_logsnr(_f32(logsnr))

        def body(_, lohi):
            lo, hi = lohi
            mid = 0.5 * (lo + hi)
            above = self.logsnr(mid) > logsnr  # logsnr decreases in t: the root lies right of mid
            return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

        lo, hi = jax.lax.fori_loop(
            0, _BISECTION_STEPS, body, (jnp.zeros_like(logsnr), jnp.ones_like(logsnr))
        )
        t0 = jax.lax.stop_gradient(0.5 * (lo + hi))
        return self._newton_step(t0, logsnr)

    def _newton_step(self, t0: Array, logsnr: Array) -> Array:
        """t0 - (lambda(t0) - logsnr) / lambda'(t0): polishes t0 and carries d t / d(logsnr, params)."""
        lam, dlam = jax.jvp(self.logsnr, (t0,), (jnp.ones_like(t0),))
        dlam = jax.lax.stop_gradient(dlam)
        ok = dlam < 0
        step = jnp.where(ok, (lam - logsnr) / jnp.where(ok, dlam, -1.0), 0.0)
        return jnp.clip(t0 - step, 0.0, 1.0)

    def alpha_sigma_dt(self, t: Array) -> tuple[Array, Array, Array, Array]:
        """(alpha_t, sigma_t, d alpha / dt, d sigma / dt) by forward-mode autodiff (closed forms override).

        The derivatives give the velocity dz/dt = alpha' x + sigma' eps of the forward path
        (the `flow` target; Lipman et al. 2023, eq. 15).
        """
        t = _f32(t)
        (alpha, sigma), (dalpha, dsigma) = jax.jvp(self.alpha_sigma, (t,), (jnp.ones_like(t),))
        return alpha, sigma, dalpha, dsigma

    def sde(self, t: Array) -> tuple[Array, Array]:
        """(f(t), g(t)^2): f = d log alpha / dt, g^2 = d sigma^2 / dt - 2 f sigma^2 (Kingma et al. 2021, eq. 28-29)."""
        t = _f32(t)

        def log_alpha_and_var(t):
            alpha, sigma = self.alpha_sigma(t)
            return jnp.log(alpha), sigma**2

        (_, var), (f, dvar) = jax.jvp(log_alpha_and_var, (t,), (jnp.ones_like(t),))
        return f, dvar - 2.0 * f * var


def _static_dataclass(cls):
    """Frozen, hashable dataclass registered as a leafless pytree, so it passes through jax.jit."""
    return jax.tree_util.register_static(dataclasses.dataclass(frozen=True)(cls))


class VPSchedule(Schedule):
    """Variance-preserving schedule, alpha^2 + sigma^2 = 1, defined by (log alpha^2, log sigma^2).

    Working with both logarithms keeps full float32 precision near t = 0 (sigma -> 0)
    and t = 1 (alpha -> 0). VP SDE: f = 1/2 d log alpha^2/dt, g^2 = beta(t) = -d log alpha^2/dt
    (Song et al. 2021, eq. 11).
    """

    variance_preserving: ClassVar[bool] = True

    def log_alpha2_sigma2(self, t: Array) -> tuple[Array, Array]:
        """(log alpha_t^2, log sigma_t^2) = (log alpha_bar_t, log(1 - alpha_bar_t))."""
        raise NotImplementedError(f"{type(self).__name__} must define log_alpha2_sigma2")

    def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
        log_alpha2, log_sigma2 = self.log_alpha2_sigma2(_f32(t))
        return jnp.exp(0.5 * log_alpha2), jnp.exp(0.5 * log_sigma2)

    def logsnr(self, t: Array) -> Array:
        log_alpha2, log_sigma2 = self.log_alpha2_sigma2(_f32(t))
        return clamp_logsnr(log_alpha2 - log_sigma2)

    def sde(self, t: Array) -> tuple[Array, Array]:
        t = _f32(t)
        _, dlog_alpha2 = jax.jvp(lambda t: self.log_alpha2_sigma2(t)[0], (t,), (jnp.ones_like(t),))
        return 0.5 * dlog_alpha2, -dlog_alpha2


def _vp_from_logsnr(logsnr: Array) -> tuple[Array, Array]:
    """VP (log alpha^2, log sigma^2) = (log sigmoid(lambda), log sigmoid(-lambda)) (Kingma et al. 2021, eq. 3)."""
    return jax.nn.log_sigmoid(logsnr), jax.nn.log_sigmoid(-logsnr)


def _vp_from_integral(b: Array) -> tuple[Array, Array]:
    """VP (log alpha^2, log sigma^2) from B(t) = int_0^t beta: (-B, log(1 - e^-B))."""
    return -b, jnp.log(-jnp.expm1(-b))


def _linear_beta_integral(t: Array, beta_min: float, beta_max: float) -> Array:
    """B(t) = int_0^t beta(s) ds of the linear beta(s) = beta_min + s (beta_max - beta_min)."""
    return beta_min * t + 0.5 * (beta_max - beta_min) * t**2


def _t_from_quadratic_integral(b: Array, beta_min: float, beta_max: float) -> Array:
    """Solve B = beta_min t + (beta_max - beta_min) t^2 / 2 for t >= 0 (cancellation-free root)."""
    return 2.0 * b / (beta_min + jnp.sqrt(beta_min**2 + 2.0 * (beta_max - beta_min) * b))


# ----------------------------------------------------------------------------- continuous VP
@_static_dataclass
class VPLinear(VPSchedule):
    """VP SDE with linear beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021, eq. 11 and 33).

    alpha_t = exp(-1/4 t^2 (beta_max - beta_min) - 1/2 t beta_min), the marginal mean
    coefficient of eq. 33. With (0.1, 20) it is the continuous limit of the DDPM
    linear schedule (Ho et al. 2020) with T = 1000.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    num_steps: int = 0

    def integral(self, t: Array) -> Array:
        """B(t) = int_0^t beta(s) ds."""
        return _linear_beta_integral(t, self.beta_min, self.beta_max)

    def log_alpha2_sigma2(self, t):
        return _vp_from_integral(self.integral(_f32(t)))

    def t_from_logsnr(self, logsnr):
        b = jax.nn.softplus(-clamp_logsnr(_f32(logsnr)))  # alpha^2 = sigmoid(lambda) = e^-B
        return jnp.clip(_t_from_quadratic_integral(b, self.beta_min, self.beta_max), 0.0, 1.0)

    def sde(self, t):
        beta = self.beta_min + _f32(t) * (self.beta_max - self.beta_min)
        return -0.5 * beta, beta


@_static_dataclass
class ScaledLinear(VPSchedule):
    """Continuous limit of Stable Diffusion's "scaled_linear" betas (Rombach et al. 2022).

    Discrete: beta_i = (sqrt(beta_start) + i/(T-1) (sqrt(beta_end) - sqrt(beta_start)))^2.
    Continuous: beta(t) = T0 (a + (b - a) t)^2 with a, b the square roots and T0 = 1000,
    so B(t) = T0 (a^2 t + a (b - a) t^2 + (b - a)^2 t^3 / 3).
    """

    beta_start: float = 0.00085
    beta_end: float = 0.012
    base_steps: int = 1000
    num_steps: int = 0

    def _sqrt_beta_start_and_slope(self):
        """(a, b - a) with a, b = sqrt(beta_start), sqrt(beta_end): sqrt(beta) is linear in t."""
        a = math.sqrt(self.beta_start)
        return a, math.sqrt(self.beta_end) - a

    def integral(self, t: Array) -> Array:
        a, d = self._sqrt_beta_start_and_slope()
        return self.base_steps * (a * a * t + a * d * t**2 + d * d * t**3 / 3.0)

    def log_alpha2_sigma2(self, t):
        return _vp_from_integral(self.integral(_f32(t)))

    def t_from_logsnr(self, logsnr):
        a, d = self._sqrt_beta_start_and_slope()
        b = jax.nn.softplus(-clamp_logsnr(_f32(logsnr)))
        t = (jnp.cbrt(a**3 + 3.0 * d * b / self.base_steps) - a) / d
        beta = self.base_steps * (a + d * t) ** 2
        t = t - (self.integral(t) - b) / beta  # one Newton step removes the cube-root cancellation
        return jnp.clip(t, 0.0, 1.0)

    def sde(self, t):
        a, d = self._sqrt_beta_start_and_slope()
        beta = self.base_steps * (a + d * _f32(t)) ** 2
        return -0.5 * beta, beta


@_static_dataclass
class Cosine(VPSchedule):
    """Cosine schedule alpha_bar(t) = cos^2((t+s)/(1+s) pi/2) / cos^2(s/(1+s) pi/2) (Nichol & Dhariwal 2021, eq. 17).

    Evaluated as alpha^2 = sin^2((1-t) c) / cos^2(s c) and
    sigma^2 = sin(t c) sin((t + 2s) c) / cos^2(s c), c = pi / (2 (1 + s)), which is
    exact at both ends: sigma_0 = 0 and alpha_1 = 0 (the continuous cosine schedule
    has zero terminal SNR; logsnr is clamped there).
    """

    s: float = 0.008
    num_steps: int = 0

    def _frequency_and_log_norm(self):
        """(c = pi / (2 (1 + s)), log cos^2(s c)): the angle scale and the normaliser alpha_bar(0)."""
        return math.pi / (2.0 * (1.0 + self.s)), 2.0 * math.log(math.cos(self.s * math.pi / (2.0 * (1.0 + self.s))))

    def log_alpha2_sigma2(self, t):
        t = _f32(t)
        c, log_norm = self._frequency_and_log_norm()
        log_alpha2 = 2.0 * jnp.log(jnp.sin((1.0 - t) * c)) - log_norm
        log_sigma2 = jnp.log(jnp.sin(t * c)) + jnp.log(jnp.sin((t + 2.0 * self.s) * c)) - log_norm
        return log_alpha2, log_sigma2

    def t_from_logsnr(self, logsnr):
        logsnr = clamp_logsnr(_f32(logsnr))
        c, _ = self._frequency_and_log_norm()
        b = self.s * c
        a2 = jax.nn.sigmoid(logsnr)  # alpha_bar; cos u = sqrt(alpha_bar) cos b, u = (t + s) c
        u = jnp.arctan2(
            jnp.sqrt(jax.nn.sigmoid(-logsnr) + a2 * math.sin(b) ** 2), jnp.sqrt(a2) * math.cos(b)
        )
        return jnp.clip((u - b) / c, 0.0, 1.0)

    def sde(self, t):
        c, _ = self._frequency_and_log_norm()
        beta = 2.0 * c / jnp.tan((1.0 - _f32(t)) * c)  # -d log alpha_bar / dt = pi tan(u) / (1 + s)
        return -0.5 * beta, beta


@_static_dataclass
class ShiftedCosine(VPSchedule):
    """Truncated cosine logsnr shifted for resolution (Hoogeboom et al. 2023, "simple diffusion", eq. 5-6).

    lambda(t) = -2 log tan(t_min + t (t_max - t_min)) + shift, with
    t_min = atan(exp(-logsnr_max / 2)), t_max = atan(exp(-logsnr_min / 2)) and
    shift = 2 log(shift_resolution / image_size).
    """

    logsnr_min: float = -15.0
    logsnr_max: float = 15.0
    shift: float = 0.0
    num_steps: int = 0

    def _range(self):
        return math.atan(math.exp(-0.5 * self.logsnr_max)), math.atan(math.exp(-0.5 * self.logsnr_min))

    def _raw_logsnr(self, t):
        t_min, t_max = self._range()
        return -2.0 * jnp.log(jnp.tan(t_min + _f32(t) * (t_max - t_min))) + self.shift

    def log_alpha2_sigma2(self, t):
        return _vp_from_logsnr(self._raw_logsnr(t))

    def logsnr(self, t):
        return clamp_logsnr(self._raw_logsnr(t))

    def t_from_logsnr(self, logsnr):
        t_min, t_max = self._range()
        u = jnp.arctan(jnp.exp(-0.5 * (clamp_logsnr(_f32(logsnr)) - self.shift)))
        return jnp.clip((u - t_min) / (t_max - t_min), 0.0, 1.0)


def _sigmoid_diff(a: Array, b: Array) -> Array:
    """sigmoid(a) - sigmoid(b) without cancellation: sigmoid(a) sigmoid(-b) (1 - e^(b - a))."""
    return jax.nn.sigmoid(a) * jax.nn.sigmoid(-b) * -jnp.expm1(b - a)


@_static_dataclass
class Sigmoid(VPSchedule):
    """Sigmoid schedule (Jabri et al. 2022; Chen 2023, "On the importance of noise scheduling", Algorithm 1).

    alpha_bar(t) = (v_end - sigmoid((t (end - start) + start) / tau)) / (v_end - v_start),
    v = sigmoid(. / tau), clipped below at clip_min = 1e-9 as in the paper.
    """

    start: float = -3.0
    end: float = 3.0
    tau: float = 1.0
    clip_min: float = 1e-9
    num_steps: int = 0

    def log_alpha2_sigma2(self, t):
        x = (_f32(t) * (self.end - self.start) + self.start) / self.tau
        e, s = self.end / self.tau, self.start / self.tau
        denom = 1.0 / (1.0 + math.exp(-e)) - 1.0 / (1.0 + math.exp(-s))
        a2 = _sigmoid_diff(e, x) / denom
        s2 = _sigmoid_diff(x, s) / denom
        a2 = jnp.maximum(a2, self.clip_min)
        s2 = jnp.minimum(s2, 1.0 - self.clip_min)
        return jnp.log(a2), jnp.log(s2)

    def t_from_logsnr(self, logsnr):
        logsnr = clamp_logsnr(_f32(logsnr))
        ve, vs = jax.nn.sigmoid(self.end / self.tau), jax.nn.sigmoid(self.start / self.tau)
        o = jnp.where(
            logsnr > 0,
            vs + jax.nn.sigmoid(-logsnr) * (ve - vs),
            ve - jax.nn.sigmoid(logsnr) * (ve - vs),
        )
        x = jnp.log(o) - jnp.log1p(-o)
        return jnp.clip((self.tau * x - self.start) / (self.end - self.start), 0.0, 1.0)


# ----------------------------------------------------------------------------- non-VP
@_static_dataclass
class SubVP(Schedule):
    """sub-VP SDE (Song et al. 2021, eq. 13 and 34): alpha = e^{-B/2}, sigma = 1 - e^{-B}.

    B(t) = beta_min t + (beta_max - beta_min) t^2 / 2; f = -beta/2, g^2 = beta (1 - e^{-2B}).
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    num_steps: int = 0

    def integral(self, t: Array) -> Array:
        return _linear_beta_integral(t, self.beta_min, self.beta_max)

    def alpha_sigma(self, t):
        b = self.integral(_f32(t))
        return jnp.exp(-0.5 * b), -jnp.expm1(-b)

    def logsnr(self, t):
        b = self.integral(_f32(t))
        return clamp_logsnr(-b - 2.0 * jnp.log(-jnp.expm1(-b)))

    def t_from_logsnr(self, logsnr):
        r = jnp.exp(0.5 * clamp_logsnr(_f32(logsnr)))  # u / (1 - u^2) = r with u = alpha = e^{-B/2}
        u = 2.0 * r / (1.0 + jnp.sqrt(1.0 + 4.0 * r * r))
        b = -2.0 * jnp.log(u)
        return jnp.clip(_t_from_quadratic_integral(b, self.beta_min, self.beta_max), 0.0, 1.0)

    def sde(self, t):
        t = _f32(t)
        beta = self.beta_min + t * (self.beta_max - self.beta_min)
        return -0.5 * beta, beta * -jnp.expm1(-2.0 * self.integral(t))


@_static_dataclass
class VE(Schedule):
    """Variance-exploding (NCSN) schedule sigma(t) = sigma_min (sigma_max / sigma_min)^t, alpha = 1.

    Song et al. 2021, eq. 9 and 30: f = 0, g^2 = 2 sigma^2 log(sigma_max / sigma_min).
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    num_steps: int = 0

    def alpha_sigma(self, t):
        t = _f32(t)
        return jnp.ones_like(t), jnp.exp(math.log(self.sigma_min) + t * math.log(self.sigma_max / self.sigma_min))

    def logsnr(self, t):
        return clamp_logsnr(-2.0 * (math.log(self.sigma_min) + _f32(t) * math.log(self.sigma_max / self.sigma_min)))

    def t_from_logsnr(self, logsnr):
        log_sigma = -0.5 * clamp_logsnr(_f32(logsnr))
        return jnp.clip((log_sigma - math.log(self.sigma_min)) / math.log(self.sigma_max / self.sigma_min), 0.0, 1.0)

    def sde(self, t):
        _, sigma = self.alpha_sigma(t)
        return jnp.zeros_like(sigma), 2.0 * sigma**2 * math.log(self.sigma_max / self.sigma_min)


@_static_dataclass
class EDM(Schedule):
    """Karras et al. 2022 sigma parameterisation: alpha = 1 and
    sigma(t) = (s_min^(1/rho) + t (s_max^(1/rho) - s_min^(1/rho)))^rho.

    The time mapping is the rho = 7 discretisation of Karras et al. 2022, eq. 5, so
    uniform steps in t are the EDM sampler's sigma steps. f = 0 and
    g^2 = d sigma^2/dt = 2 rho sigma^2 (s_max^(1/rho) - s_min^(1/rho)) / sigma^(1/rho).
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    num_steps: int = 0

    def _ends(self):
        return self.sigma_min ** (1.0 / self.rho), self.sigma_max ** (1.0 / self.rho)

    def alpha_sigma(self, t):
        t = _f32(t)
        lo, hi = self._ends()
        return jnp.ones_like(t), (lo + t * (hi - lo)) ** self.rho

    def logsnr(self, t):
        lo, hi = self._ends()
        return clamp_logsnr(-2.0 * self.rho * jnp.log(lo + _f32(t) * (hi - lo)))

    def t_from_logsnr(self, logsnr):
        lo, hi = self._ends()
        root = jnp.exp(-0.5 * clamp_logsnr(_f32(logsnr)) / self.rho)
        return jnp.clip((root - lo) / (hi - lo), 0.0, 1.0)

    def sde(self, t):
        t = _f32(t)
        lo, hi = self._ends()
        base = lo + t * (hi - lo)
        sigma = base**self.rho
        return jnp.zeros_like(t), 2.0 * self.rho * sigma**2 * (hi - lo) / base


# ----------------------------------------------------------------------------- rectified flow
@_static_dataclass
class RectifiedFlow(Schedule):
    """Rectified flow / flow matching with the optimal-transport path: alpha_t = 1 - t, sigma_t = t
    (Liu et al. 2023, eq. 1; Lipman et al. 2023, eq. 20-23; Esser et al. 2024, Sec. 2 and 3.1).

    lambda_t = 2 log((1 - t) / t), so t = sigmoid(-lambda / 2). The velocity of the path is
    dz/dt = eps - x. SDE with the same marginals: f = d log alpha / dt = -1 / (1 - t) and
    g^2 = d sigma^2/dt - 2 f sigma^2 = 2 t / (1 - t) (infinite at t = 1, where alpha = 0 as
    under zero terminal SNR; samplers cap sigma/alpha there).
    """

    num_steps: int = 0

    def alpha_sigma(self, t):
        t = _f32(t)
        return 1.0 - t, t

    def alpha_sigma_dt(self, t):
        alpha, sigma = self.alpha_sigma(t)
        return alpha, sigma, -jnp.ones_like(t), jnp.ones_like(t)

    def logsnr(self, t):
        t = _f32(t)
        return clamp_logsnr(2.0 * (jnp.log1p(-t) - jnp.log(t)))

    def t_from_logsnr(self, logsnr):
        logsnr = _f32(logsnr)
        t = jax.nn.sigmoid(-0.5 * clamp_logsnr(logsnr))
        # the clamp values are the end points, as logsnr(0) = +LOGSNR_CLAMP and logsnr(1) = -LOGSNR_CLAMP
        return jnp.where(logsnr >= LOGSNR_CLAMP, 0.0, jnp.where(logsnr <= -LOGSNR_CLAMP, 1.0, t))

    def sde(self, t):
        t = _f32(t)
        return -1.0 / (1.0 - t), 2.0 * t / (1.0 - t)


def shift_time(t: Array, shift: Array | float) -> Array:
    """Resolution-dependent time shift t -> s t / (1 + (s - 1) t) (Esser et al. 2024, Eq. 23).

    For alpha = 1 - t, sigma = t it multiplies sigma/alpha by s, i.e. lowers the logsnr by
    2 log s at every step; s > 1 spends more time at high noise (larger images). A pure map of
    [0, 1] onto itself, used alike on training times and on sampler grids; s = 1 is the identity.
    """
    t = _f32(t)
    return shift * t / (1.0 + (shift - 1.0) * t)


def shift_time_derivative(t: Array, shift: Array | float) -> Array:
    """d shift_time / dt = s / (1 + (s - 1) t)^2: the Jacobian that transforms time densities."""
    return shift / (1.0 + (shift - 1.0) * _f32(t)) ** 2


def flux_shift(
    image_seq_len: int | Array,
    *,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> Array:
    """Flux's token-count dependent shift s = e^mu (diffusers' FluxPipeline `calculate_shift`).

    mu is linear in the number of image tokens: base_shift at base_seq_len and max_shift at
    max_seq_len (extrapolated beyond). diffusers' FlowMatchEulerDiscreteScheduler with
    use_dynamic_shifting applies e^mu / (e^mu + (1/t - 1)) = `shift_time(t, e^mu)`.
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    mu = base_shift + slope * (jnp.asarray(image_seq_len, jnp.float32) - base_seq_len)
    return jnp.exp(mu)


# ----------------------------------------------------------------------------- discrete VP view
@_static_dataclass
class DiscreteVP(VPSchedule):
    """DDPM discrete schedule as a continuous-time view (Ho et al. 2020, eq. 4; Kingma et al. 2021, sec. 3).

    `log_alpha_bar[i] = log prod_{j<=i} (1 - beta_j)` at t_i = (i + 1) / T; log alpha_bar is
    linear in t between knots (t = 0 has alpha_bar = 1), so beta is constant within a
    step and every grid value is reproduced exactly. A terminal knot of -inf (zero
    terminal SNR) is reached by interpolating alpha itself linearly on the last step,
    so alpha_1 = 0 exactly and alpha stays continuous.
    """

    log_alpha_bar: tuple[float, ...] = ()
    num_steps: int = 0

    @classmethod
    def from_betas(cls, betas) -> "DiscreteVP":
        """Cumulative products of (1 - beta) computed in float64."""
        log_alpha2 = np.cumsum(np.log1p(-np.asarray(betas, np.float64)))
        return cls(tuple(float(v) for v in log_alpha2), len(log_alpha2))

    @classmethod
    def from_schedule(cls, schedule: "VPSchedule", num_steps: int) -> "DiscreteVP":
        """Sample a continuous VP schedule's alpha_bar at the grid t_i = (i + 1) / T."""
        log_alpha2, _ = schedule.log_alpha2_sigma2(step_to_t(jnp.arange(num_steps), num_steps))
        return cls(tuple(float(v) for v in np.asarray(log_alpha2)), num_steps)

    def _table(self) -> Array:
        return jnp.asarray((0.0,) + self.log_alpha_bar, jnp.float32)

    def log_alpha2_sigma2(self, t):
        t = _f32(t)
        table, T = self._table(), self.num_steps
        x = jnp.clip(t, 0.0, 1.0) * T
        k = jnp.clip(jnp.floor(x), 0, T - 1).astype(jnp.int32)
        w = x - k
        lo, hi = table[k], table[k + 1]
        end = jnp.isneginf(hi)
        log_alpha2_lin = lo + w * (jnp.where(end, lo, hi) - lo)
        log_alpha2_end = lo + 2.0 * jnp.log1p(-jnp.where(end, w, 0.0))  # alpha linear in t on a zero-SNR last step
        log_alpha2 = jnp.where(end, log_alpha2_end, log_alpha2_lin)
        return log_alpha2, jnp.log(-jnp.expm1(log_alpha2))

    def t_from_logsnr(self, logsnr):
        log_alpha2 = jax.nn.log_sigmoid(clamp_logsnr(_f32(logsnr)))
        table, T = self._table(), self.num_steps
        j = jnp.searchsorted(-table, -log_alpha2, side="left")  # first knot with log alpha_bar <= log_alpha2
        k = jnp.clip(j - 1, 0, T - 1)
        lo, hi = table[k], table[k + 1]
        end = jnp.isneginf(hi)
        w_lin = (log_alpha2 - lo) / (jnp.where(end, lo - 1.0, hi) - lo)
        w_end = -jnp.expm1(0.5 * (log_alpha2 - lo))
        w = jnp.clip(jnp.where(end, w_end, w_lin), 0.0, 1.0)
        return jnp.clip((k + w) / T, 0.0, 1.0)

    def betas(self) -> np.ndarray:
        """The per-step betas 1 - alpha_bar_i / alpha_bar_{i-1} (float64)."""
        log_alpha2 = np.concatenate([[0.0], np.asarray(self.log_alpha_bar, np.float64)])
        return -np.expm1(np.diff(log_alpha2))


# ----------------------------------------------------------------------------- zero terminal SNR
@_static_dataclass
class ZeroTerminalSNR(VPSchedule):
    """Rescale a continuous VP schedule to zero terminal SNR (Lin et al. 2024, Algorithm 1).

    alpha'(t) = (alpha(t) - alpha_1) alpha_0 / (alpha_0 - alpha_1), sigma'^2 = 1 - alpha'^2,
    with alpha_0, alpha_1 the base schedule's end values; alpha'(1) = 0 exactly and
    logsnr(1) is clamped to -LOGSNR_CLAMP. 1 - alpha' is computed from sigma^2 so
    precision near t = 0 is kept.
    """

    base: Any = None
    num_steps: int = 0

    def _ends(self):
        a0, s0 = self.base.alpha_sigma(jnp.float32(0.0))
        a1, _ = self.base.alpha_sigma(jnp.float32(1.0))
        return a0, s0, a1

    def log_alpha2_sigma2(self, t):
        t = _f32(t)
        a0, s0, a1 = self._ends()
        alpha, sigma = self.base.alpha_sigma(t)
        scale = a0 / (a0 - a1)
        alpha_new = jnp.where(t >= 1.0, 0.0, jnp.maximum(alpha - a1, 0.0) * scale)
        one_minus = (a0 * sigma**2 / (1.0 + alpha) - a1 * s0**2 / (1.0 + a0)) / (a0 - a1)
        one_minus = jnp.where(t >= 1.0, 1.0, jnp.maximum(one_minus, 0.0))
        return 2.0 * jnp.log(alpha_new), jnp.log(one_minus * (1.0 + alpha_new))

    def t_from_logsnr(self, logsnr):
        logsnr = clamp_logsnr(_f32(logsnr))
        a0, s0, a1 = self._ends()
        an = jnp.sqrt(jax.nn.sigmoid(logsnr))
        one_minus_an = jax.nn.sigmoid(-logsnr) / (1.0 + an)
        alpha = an * (a0 - a1) / a0 + a1
        one_minus = (a0 - a1) / a0 * one_minus_an + a1 * s0**2 / ((1.0 + a0) * a0)
        base_logsnr = 2.0 * jnp.log(alpha) - jnp.log(one_minus * (1.0 + alpha))
        return self.base.t_from_logsnr(base_logsnr)


def rescale_zero_terminal_snr(schedule: Schedule) -> Schedule:
    """Zero terminal SNR for any VP schedule (Lin et al. 2024, "Common diffusion noise schedules and
    sample steps are flawed", Algorithm 1).

    A discrete schedule has its sqrt(alpha_bar) table shifted and scaled exactly as
    Algorithm 1 (first step kept, last step 0); a continuous VP schedule is wrapped
    in `ZeroTerminalSNR`. Non-VP schedules have no terminal alpha to zero: ValueError.
    """
    if isinstance(schedule, DiscreteVP):
        sqrt_ab = np.exp(0.5 * np.asarray(schedule.log_alpha_bar, np.float64))
        a0, a1 = sqrt_ab[0], sqrt_ab[-1]
        new = (sqrt_ab - a1) * a0 / (a0 - a1)
        with np.errstate(divide="ignore"):
            log_alpha2 = 2.0 * np.log(new)
        log_alpha2[-1] = -np.inf
        return DiscreteVP(tuple(float(v) for v in log_alpha2), schedule.num_steps)
    if isinstance(schedule, VPSchedule) and not isinstance(schedule, nnx.Module):
        return ZeroTerminalSNR(schedule, schedule.num_steps)
    raise ValueError(
        f"config.diffusion.zero_terminal_snr needs a fixed variance-preserving schedule; "
        f"{type(schedule).__name__} is not one."
    )


# ----------------------------------------------------------------------------- learned (VDM)
class LearnedSchedule(Schedule, nnx.Module):
    """Learned monotone logsnr schedule (Kingma et al. 2021, VDM, sec. 5 and appendix H).

    gamma(t) = -lambda(t) = gamma_0 + (gamma_1 - gamma_0) (g(t) - g(0)) / (g(1) - g(0)), with
    g(t) = |w1| t + sum_h |w3_h| (2 sigmoid(|w2_h| (2t - 1) + b2_h) - 1) / H, a monotone
    network (positive weights) as VDM's NoiseSchedule_NNet. The end points
    logsnr_max = -gamma_0 and logsnr_min = -gamma_1 are parameters too (logsnr_max =
    logsnr_min + softplus(.) keeps them ordered). Variance preserving:
    alpha^2 = sigmoid(lambda). An nnx.Module: its parameters train with the model.
    """

    variance_preserving: ClassVar[bool] = True

    def __init__(
        self,
        logsnr_min: float = -15.0,
        logsnr_max: float = 15.0,
        *,
        hidden: int = 1024,
        num_steps: int = 0,
        rngs: nnx.Rngs,
    ):
        self.num_steps = num_steps
        self.logsnr_min = nnx.Param(jnp.asarray(logsnr_min, jnp.float32))
        span = float(logsnr_max - logsnr_min)
        self.logsnr_span = nnx.Param(jnp.asarray(span + math.log(-math.expm1(-span)), jnp.float32))
        self.w1 = nnx.Param(jnp.ones((), jnp.float32))
        self.w2 = nnx.Param(0.01 * jax.random.normal(rngs.params(), (hidden,), jnp.float32))
        self.b2 = nnx.Param(jnp.zeros((hidden,), jnp.float32))
        self.w3 = nnx.Param(0.01 * jax.random.normal(rngs.params(), (hidden,), jnp.float32))

    def _g(self, t: Array) -> Array:
        h = jax.nn.sigmoid(jnp.abs(self.w2[...]) * (2.0 * t[..., None] - 1.0) + self.b2[...])
        return jnp.abs(self.w1[...]) * t + jnp.mean(jnp.abs(self.w3[...]) * (2.0 * h - 1.0), axis=-1)

    def _raw_logsnr(self, t: Array) -> Array:
        t = _f32(t)
        g = self._g(jnp.concatenate([jnp.zeros((1,)), jnp.ones((1,)), t.reshape(-1)]))  # one pass: g(0), g(1), g(t)
        g0, g1 = g[0], g[1]
        frac = (g[2:].reshape(t.shape) - g0) / (g1 - g0)
        lmin = self.logsnr_min[...]
        lmax = lmin + jax.nn.softplus(self.logsnr_span[...])
        return lmax - frac * (lmax - lmin)

    def alpha_sigma(self, t):
        log_alpha2, log_sigma2 = _vp_from_logsnr(self._raw_logsnr(t))
        return jnp.exp(0.5 * log_alpha2), jnp.exp(0.5 * log_sigma2)

    def logsnr(self, t):
        return clamp_logsnr(self._raw_logsnr(t))

    def sde(self, t):
        t = _f32(t)
        _, dlog_alpha2 = jax.jvp(lambda t: jax.nn.log_sigmoid(self._raw_logsnr(t)), (t,), (jnp.ones_like(t),))
        return 0.5 * dlog_alpha2, -dlog_alpha2


# ----------------------------------------------------------------------------- betas
def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """DDPM linear betas (Ho et al. 2020, sec. 4), scaled by 1000 / T for T != 1000 (Nichol & Dhariwal 2021 code).

    The scaling keeps the continuous limit fixed; for T < 20 it would push betas past 1, so
    they are clipped at 0.999 as the cosine betas are.
    """
    scale = 1000.0 / num_steps
    return np.minimum(np.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=np.float64), 0.999)


def scaled_linear_betas(num_steps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> np.ndarray:
    """Stable Diffusion betas linspace(sqrt(beta_start), sqrt(beta_end), T)^2 (Rombach et al. 2022), scaled by 1000 / T.

    Clipped at 0.999 like `linear_betas`.
    """
    scale = 1000.0 / num_steps
    betas = np.linspace(math.sqrt(scale * beta_start), math.sqrt(scale * beta_end), num_steps, dtype=np.float64) ** 2
    return np.minimum(betas, 0.999)


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """beta_i = min(1 - alpha_bar(t_{i+1}) / alpha_bar(t_i), 0.999) (Nichol & Dhariwal 2021, eq. 17 and sec. 3.2)."""
    f = lambda t: np.cos((t + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    t = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    return np.minimum(1.0 - f(t[1:]) / f(t[:-1]), max_beta)


# ----------------------------------------------------------------------------- registry
def _discrete_or(schedule: VPSchedule, num_steps: int) -> Schedule:
    return DiscreteVP.from_schedule(schedule, num_steps) if num_steps > 0 else schedule


@SCHEDULES.register("linear")
def _linear(cfg, image_size=None, seed=0) -> Schedule:
    """DDPM linear betas 1e-4..0.02 (Ho et al. 2020); continuous limit = VP SDE (0.1, 20)."""
    T = cfg.num_steps
    return DiscreteVP.from_betas(linear_betas(T)) if T > 0 else VPLinear(0.1, 20.0)


@SCHEDULES.register("vp")
def _vp(cfg, image_size=None, seed=0) -> Schedule:
    """VP SDE (Song et al. 2021) with config beta_min/beta_max; discrete: betas (beta_min..beta_max) / T."""
    T = cfg.num_steps
    if T > 0:
        return DiscreteVP.from_betas(np.minimum(np.linspace(cfg.beta_min / T, cfg.beta_max / T, T), 0.999))
    return VPLinear(float(cfg.beta_min), float(cfg.beta_max))


@SCHEDULES.register("scaled_linear")
def _scaled_linear(cfg, image_size=None, seed=0) -> Schedule:
    """Stable Diffusion sqrt-linear betas 0.00085..0.012."""
    T = cfg.num_steps
    return DiscreteVP.from_betas(scaled_linear_betas(T)) if T > 0 else ScaledLinear()


@SCHEDULES.register("cosine")
def _cosine(cfg, image_size=None, seed=0) -> Schedule:
    """Nichol & Dhariwal 2021 cosine, s = 0.008; discrete betas clipped at 0.999."""
    T = cfg.num_steps
    return DiscreteVP.from_betas(cosine_betas(T)) if T > 0 else Cosine()


@SCHEDULES.register("shifted_cosine")
def _shifted_cosine(cfg, image_size=None, seed=0) -> Schedule:
    """Hoogeboom et al. 2023: cosine logsnr in [logsnr_min, logsnr_max] + 2 log(shift_resolution / image_size)."""
    if image_size is None:
        raise ValueError("schedule 'shifted_cosine' needs image_size (get_schedule(cfg, image_size=...)).")
    shift = 2.0 * math.log(cfg.shift_resolution / image_size)
    sched = ShiftedCosine(float(cfg.logsnr_min), float(cfg.logsnr_max), shift)
    return _discrete_or(sched, cfg.num_steps)


@SCHEDULES.register("sigmoid")
def _sigmoid(cfg, image_size=None, seed=0) -> Schedule:
    """Chen 2023 sigmoid schedule with config sigmoid_start / sigmoid_end / sigmoid_tau."""
    sched = Sigmoid(float(cfg.sigmoid_start), float(cfg.sigmoid_end), float(cfg.sigmoid_tau))
    return _discrete_or(sched, cfg.num_steps)


@SCHEDULES.register("subvp")
def _subvp(cfg, image_size=None, seed=0) -> Schedule:
    """sub-VP SDE (Song et al. 2021) with config beta_min/beta_max."""
    return SubVP(float(cfg.beta_min), float(cfg.beta_max), cfg.num_steps)


@SCHEDULES.register("ve")
def _ve(cfg, image_size=None, seed=0) -> Schedule:
    """NCSN / VE SDE geometric sigmas with config ve_sigma_min / ve_sigma_max (0.01 / 50)."""
    return VE(float(cfg.ve_sigma_min), float(cfg.ve_sigma_max), cfg.num_steps)


@SCHEDULES.register("edm")
def _edm(cfg, image_size=None, seed=0) -> Schedule:
    """Karras et al. 2022 sigma in [sigma_min, sigma_max] with the rho = 7 time mapping."""
    return EDM(float(cfg.sigma_min), float(cfg.sigma_max), 7.0, cfg.num_steps)


@SCHEDULES.register("rectified_flow")
def _rectified_flow(cfg, image_size=None, seed=0) -> Schedule:
    """Rectified flow alpha = 1 - t, sigma = t (Liu et al. 2023; Lipman et al. 2023; Esser et al. 2024)."""
    return RectifiedFlow(cfg.num_steps)


@SCHEDULES.register("learned")
def _learned(cfg, image_size=None, seed=0) -> Schedule:
    """VDM learned schedule initialised near linear in logsnr from learned_logsnr_max to learned_logsnr_min,
    its network initialised from the run's seed."""
    # configs written before the learned end points had their own fields used logsnr_min / logsnr_max
    lo = cfg.get("learned_logsnr_min", cfg.get("logsnr_min"))
    hi = cfg.get("learned_logsnr_max", cfg.get("logsnr_max"))
    return LearnedSchedule(float(lo), float(hi), num_steps=cfg.num_steps, rngs=nnx.Rngs(seed))


def get_schedule(diffusion_cfg, image_size: int | None = None, *, seed: int = 0) -> Schedule:
    """Build config.diffusion.schedule, applying config.diffusion.zero_terminal_snr (Lin et al. 2024).

    `seed` initialises a learned schedule's network (the run's config.seed).
    """
    schedule = SCHEDULES.get(diffusion_cfg.schedule)(diffusion_cfg, image_size, seed)
    if diffusion_cfg.get("zero_terminal_snr", False):
        schedule = rescale_zero_terminal_snr(schedule)
    return schedule

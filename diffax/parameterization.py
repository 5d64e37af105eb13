"""What the network predicts (eps, x0, v, score, EDM's F, flow velocity) and exact conversions between them.

Given z_t = alpha_t x + sigma_t eps and the time t, any one of the targets fixes
the pair (x0, eps) and hence every other target: each `Parameterization` maps a
network output to (x0, eps) (`to_x0_eps`) and back (`from_x0_eps`, which is also
the regression target when fed the true (x, eps)). `eps_mse_factor` gives the
factor k(t) with ||eps_hat - eps||^2 = k ||out - target||^2, so the
objective can express every loss weighting as a weight on the eps-MSE
(Kingma & Gao 2023, sec. 2) whatever the network predicts. The factors are
written in terms of the clamped logsnr lambda and c^2 = alpha^2 + sigma^2, which
keeps them finite at the ends (alpha = 0 under zero terminal SNR, sigma = 0 at
t = 0 for VP); the conversions themselves divide by alpha (eps -> x0) or sigma
(x0 -> eps) where the maths does, so an eps-network has no x0 at alpha = 0 (use
v, Lin et al. 2024) and an x0-network has no eps at sigma = 0.

All maths in float32: `to_x0_eps` casts the network output first (a bfloat16
network gives float32 results). Adding a target: subclass `Parameterization`,
implement the three methods, decorate with `@PARAMETERIZATIONS.register("name")`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from diffax.registry import Registry

Array = jax.Array

PARAMETERIZATIONS: Registry[type["Parameterization"]] = Registry("prediction", "config.diffusion.prediction")


def batch_broadcast(a: Array, z: Array) -> Array:
    """Reshape a per-example array [B] (or scalar) to broadcast against z [B, ...], as float32."""
    a = jnp.asarray(a, jnp.float32)
    return a.reshape(a.shape + (1,) * (z.ndim - a.ndim))


def coefficients(z: Array, t: Array, schedule) -> tuple[Array, Array]:
    """(alpha_t, sigma_t) as float32, shaped to broadcast against z (Kingma et al. 2021, eq. 1)."""
    alpha, sigma = schedule.alpha_sigma(jnp.asarray(t, jnp.float32))
    return batch_broadcast(alpha, z), batch_broadcast(sigma, z)


def noise_conditioning(t: Array, schedule) -> Array:
    """Default c_noise: 1000 t in continuous time; step index T t - 1 for a discrete schedule (DDPM / diffusers).

    On the grid t_i = (i + 1) / T the index is exactly the integer i: float32 rounding of
    (i + 1) / T and of T t leaves up to ~T 2^-23 off it, so values that close to an integer
    are snapped to it (a time between grid points keeps its fractional index).
    """
    t = jnp.asarray(t, jnp.float32)
    if schedule.num_steps <= 0:
        return 1000.0 * t
    index = t * schedule.num_steps - 1.0
    nearest = jnp.round(index)
    on_grid = jnp.abs(index - nearest) <= 8.0 * schedule.num_steps * float(jnp.finfo(jnp.float32).eps)
    return jnp.where(on_grid, nearest, index)


def logsnr_scale2(t: Array, schedule) -> tuple[Array, Array]:
    """(clamped lambda_t, c^2 = alpha_t^2 + sigma_t^2): finite at both ends, for the eps-MSE factors."""
    t = jnp.asarray(t, jnp.float32)
    alpha, sigma = schedule.alpha_sigma(t)
    return schedule.logsnr(t), alpha**2 + sigma**2


def velocity_coefficients(z: Array, t: Array, schedule) -> tuple[Array, Array, Array, Array]:
    """(alpha, sigma, d alpha/dt, d sigma/dt) at t, float32, shaped to broadcast against z."""
    coefs = schedule.alpha_sigma_dt(jnp.asarray(t, jnp.float32))
    return tuple(batch_broadcast(c, z) for c in coefs)


@dataclasses.dataclass(frozen=True)
class Parameterization:
    """Base class: a network output `out` <-> (x0, eps) given (z_t, t, schedule)."""


    @classmethod
    def from_config(cls, diffusion_cfg) -> "Parameterization":
        """Build from config.diffusion (subclasses with options override)."""
        return cls()

    def model_inputs(self, z: Array, t: Array, schedule) -> tuple[Array, Array]:
        """(z_in, c_noise[B]) fed to the network: z itself and `noise_conditioning(t)`."""
        return z, noise_conditioning(t, schedule)

    def to_x0_eps(self, out: Array, z: Array, t: Array, schedule) -> tuple[Array, Array]:
        """Exact (x0, eps) from the network output."""
        raise NotImplementedError

    def from_x0_eps(self, x0: Array, eps: Array, z: Array, t: Array, schedule) -> Array:
        """The network output that corresponds to (x0, eps): the regression target."""
        raise NotImplementedError

    def eps_mse_factor(self, t: Array, schedule) -> Array:
        """k [B] with ||eps_hat - eps||^2 = k ||out - target||^2 at time t."""
        raise NotImplementedError


@PARAMETERIZATIONS.register("eps")
@dataclasses.dataclass(frozen=True)
class EpsPrediction(Parameterization):
    """Noise prediction (Ho et al. 2020, eq. 11): x0 = (z - sigma eps) / alpha."""


    def to_x0_eps(self, out, z, t, schedule):
        alpha, sigma = coefficients(z, t, schedule)
        eps = out.astype(jnp.float32)
        return (z - sigma * eps) / alpha, eps

    def from_x0_eps(self, x0, eps, z, t, schedule):
        return eps

    def eps_mse_factor(self, t, schedule):
        return jnp.ones_like(jnp.asarray(t, jnp.float32))


@PARAMETERIZATIONS.register("x0")
@dataclasses.dataclass(frozen=True)
class X0Prediction(Parameterization):
    """Data prediction (Kingma et al. 2021, eq. 12): eps = (z - alpha x0) / sigma; eps error = alpha/sigma x0 error."""


    def to_x0_eps(self, out, z, t, schedule):
        alpha, sigma = coefficients(z, t, schedule)
        x0 = out.astype(jnp.float32)
        return x0, (z - alpha * x0) / sigma

    def from_x0_eps(self, x0, eps, z, t, schedule):
        return x0

    def eps_mse_factor(self, t, schedule):
        logsnr, _ = logsnr_scale2(t, schedule)
        return jnp.exp(logsnr)


@PARAMETERIZATIONS.register("v")
@dataclasses.dataclass(frozen=True)
class VPrediction(Parameterization):
    """Velocity v = alpha eps - sigma x (Salimans & Ho 2022, sec. 4 and appendix D).

    Inverting [[alpha, sigma], [-sigma, alpha]] gives, for any schedule,
    x0 = (alpha z - sigma v) / c^2 and eps = (sigma z + alpha v) / c^2 with
    c^2 = alpha^2 + sigma^2 (= 1 for VP); finite at alpha = 0 (zero terminal SNR).
    """


    def to_x0_eps(self, out, z, t, schedule):
        alpha, sigma = coefficients(z, t, schedule)
        v = out.astype(jnp.float32)
        c2 = alpha**2 + sigma**2
        return (alpha * z - sigma * v) / c2, (sigma * z + alpha * v) / c2

    def from_x0_eps(self, x0, eps, z, t, schedule):
        alpha, sigma = coefficients(z, t, schedule)
        return alpha * eps - sigma * x0

    def eps_mse_factor(self, t, schedule):
        logsnr, scale2 = logsnr_scale2(t, schedule)
        return jax.nn.sigmoid(logsnr) / scale2  # (alpha / c^2)^2 = sigmoid(lambda) / c^2


@PARAMETERIZATIONS.register("score")
@dataclasses.dataclass(frozen=True)
class ScorePrediction(Parameterization):
    """Score grad_z log q(z_t) = -eps / sigma (Song et al. 2021, eq. 7 with the Gaussian kernel)."""


    def to_x0_eps(self, out, z, t, schedule):
        alpha, sigma = coefficients(z, t, schedule)
        score = out.astype(jnp.float32)
        return (z + sigma**2 * score) / alpha, -sigma * score

    def from_x0_eps(self, x0, eps, z, t, schedule):
        _, sigma = coefficients(z, t, schedule)
        return -eps / sigma

    def eps_mse_factor(self, t, schedule):
        logsnr, scale2 = logsnr_scale2(t, schedule)
        return scale2 * jax.nn.sigmoid(-logsnr)  # sigma^2


@PARAMETERIZATIONS.register("flow")
@dataclasses.dataclass(frozen=True)
class FlowPrediction(Parameterization):
    """Velocity of the forward path u = dz/dt = alpha'_t x + sigma'_t eps (flow matching; Lipman et al. 2023,
    eq. 15 and 20-23; Liu et al. 2023; Esser et al. 2024, eq. 2-3): u = eps - x for rectified flow.

    For any schedule, inverting [[alpha, sigma], [alpha', sigma']] with determinant
    det = alpha sigma' - sigma alpha' = -alpha sigma lambda'/2 > 0 gives
    x0 = (sigma' z - sigma u) / det and eps = (alpha u - alpha' z) / det (for rectified flow
    det = 1: x0 = z - t u, eps = z + (1 - t) u, finite at both ends). The eps error is
    alpha / det times the velocity error.
    """

    def to_x0_eps(self, out, z, t, schedule):
        alpha, sigma, dalpha, dsigma = velocity_coefficients(z, t, schedule)
        u = out.astype(jnp.float32)
        det = alpha * dsigma - sigma * dalpha
        return (dsigma * z - sigma * u) / det, (alpha * u - dalpha * z) / det

    def from_x0_eps(self, x0, eps, z, t, schedule):
        _, _, dalpha, dsigma = velocity_coefficients(z, t, schedule)
        return dalpha * x0 + dsigma * eps

    def eps_mse_factor(self, t, schedule):
        alpha, sigma, dalpha, dsigma = schedule.alpha_sigma_dt(jnp.asarray(t, jnp.float32))
        return (alpha / (alpha * dsigma - sigma * dalpha)) ** 2


def edm_coefficients(sigma: Array, sigma_data: float) -> dict[str, Array]:
    """EDM preconditioning for VE noise level sigma (Karras et al. 2022, Table 1 and eq. 7).

    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = log(sigma) / 4.
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    d2 = sigma**2 + sigma_data**2
    return dict(
        c_skip=sigma_data**2 / d2,
        c_out=sigma * sigma_data / jnp.sqrt(d2),
        c_in=1.0 / jnp.sqrt(d2),
        c_noise=0.25 * jnp.log(sigma),
    )


@PARAMETERIZATIONS.register("edm")
@dataclasses.dataclass(frozen=True)
class EDMPrediction(Parameterization):
    """EDM preconditioned network F: D(x~; s) = c_skip x~ + c_out F(c_in x~; c_noise) (Karras et al. 2022, eq. 7).

    For any schedule the VE-equivalent input is x~ = z / alpha with s = sigma / alpha
    (Karras et al. 2022, eq. 12 and appendix C.1); D is the x0 estimate. Multiplying
    through by alpha gives the alpha = 0-safe forms used here, with
    d^2 = sigma^2 + alpha^2 sd^2: z_in = z / d, x0 = alpha sd^2 z / d^2 + sigma sd / d F,
    target F = (sigma x0 - alpha sd^2 eps) / (d sd), and c_noise = log(s) / 4 = -lambda / 8.
    """

    sigma_data: float = 0.5

    @classmethod
    def from_config(cls, diffusion_cfg) -> "EDMPrediction":
        return cls(sigma_data=float(diffusion_cfg.sigma_data))

    def _d(self, alpha, sigma):
        return jnp.sqrt(sigma**2 + alpha**2 * self.sigma_data**2)

    def model_inputs(self, z, t, schedule):
        alpha, sigma = coefficients(z, t, schedule)
        c_noise = -0.125 * schedule.logsnr(jnp.asarray(t, jnp.float32))
        return z / self._d(alpha, sigma), jnp.broadcast_to(c_noise, (z.shape[0],))

    def to_x0_eps(self, out, z, t, schedule):
        alpha, sigma = coefficients(z, t, schedule)
        f = out.astype(jnp.float32)
        d = self._d(alpha, sigma)
        sd = self.sigma_data
        x0 = alpha * sd**2 * z / d**2 + sigma * sd / d * f
        # eps = (z - alpha x0) / sigma, simplified so that sigma = 0 (alpha > 0) is also exact
        eps = (sigma * z - alpha * sd * d * f) / d**2
        return x0, eps

    def from_x0_eps(self, x0, eps, z, t, schedule):
        alpha, sigma = coefficients(z, t, schedule)
        sd = self.sigma_data
        return (sigma * x0 - alpha * sd**2 * eps) / (self._d(alpha, sigma) * sd)

    def eps_mse_factor(self, t, schedule):
        logsnr, _ = logsnr_scale2(t, schedule)
        sd2 = self.sigma_data**2
        return sd2 / (jnp.exp(-logsnr) + sd2)  # (alpha sd / d)^2


def get_parameterization(diffusion_cfg) -> Parameterization:
    """The parameterization named by config.diffusion.prediction."""
    return PARAMETERIZATIONS.get(diffusion_cfg.prediction).from_config(diffusion_cfg)


def convert(
    out: Array, z: Array, t: Array, schedule, src: Parameterization, dst: Parameterization
) -> Array:
    """Exactly convert a `src` prediction into the `dst` prediction for the same (z_t, t)."""
    x0, eps = src.to_x0_eps(out, z, t, schedule)
    return dst.from_x0_eps(x0, eps, z, t, schedule)


def split_learned_variance(out: Array, channels: int) -> tuple[Array, Array | None]:
    """Split a learn_sigma output (2C channels, last axis) into (prediction, variance interpolation values).

    The values in [-1, 1] interpolate the DDPM log-variances (Nichol & Dhariwal 2021, eq. 15):
    see `interpolate_log_variance`. An output with C channels gives (out, None).
    """
    if out.shape[-1] == channels:
        return out, None
    if out.shape[-1] != 2 * channels:
        raise ValueError(f"expected {channels} or {2 * channels} output channels, got {out.shape[-1]}")
    return out[..., :channels], out[..., channels:]


def interpolate_log_variance(var_interp: Array, min_log: Array, max_log: Array) -> Array:
    """log Sigma^2 = frac log beta + (1 - frac) log beta_tilde, frac = (var_interp + 1) / 2 (Nichol & Dhariwal 2021, eq. 15)."""
    frac = 0.5 * (jnp.asarray(var_interp, jnp.float32) + 1.0)
    return frac * max_log + (1.0 - frac) * min_log


def clip_x0(x0: Array, low: float = -1.0, high: float = 1.0) -> Array:
    """Static thresholding: clip predicted x0 to the data range (Ho et al. 2020; Saharia et al. 2022, sec. 2.3)."""
    return jnp.clip(x0, low, high)


def dynamic_threshold(x0: Array, percentile: float) -> Array:
    """Dynamic thresholding (Saharia et al. 2022, sec. 2.3): per example s = max(quantile_p(|x0|), 1),
    then x0 = clip(x0, -s, s) / s.

    `percentile` is a quantile in (0, 1] (e.g. 0.995) or a percentage in (1, 100] (e.g. 99.5).
    """
    q = percentile / 100.0 if percentile > 1.0 else percentile
    flat = jnp.abs(x0.reshape(x0.shape[0], -1)).astype(jnp.float32)
    s = jnp.maximum(jnp.quantile(flat, q, axis=-1), 1.0)
    s = batch_broadcast(s, x0)
    return jnp.clip(x0, -s, s) / s


def threshold_x0(x0: Array, *, clip: bool = False, dynamic: float = 0.0) -> Array:
    """Apply config.diffusion.dynamic_threshold (if > 0) else config.diffusion.clip_x0 to an x0 estimate."""
    if dynamic > 0:
        return dynamic_threshold(x0, dynamic)
    return clip_x0(x0) if clip else x0

"""Training objectives: time sampling, loss weightings and the diffusion loss.

One loss for every schedule x prediction x weighting. The network output is
compared with its own target (eps, x0, v, score or EDM's F), the squared error is
converted into the eps-MSE with the parameterization's exact factor, and the
weighting is a multiplier on the eps-MSE written as a function of the logsnr
lambda (Kingma & Gao 2023, "Understanding diffusion objectives", sec. 2-3):

    loss = w(lambda, ...) * k_param(t) * mean((out - target)^2) [+ ELBO terms]

| weighting     | multiplier on the eps-MSE                  | paper                                  |
|---------------|--------------------------------------------|----------------------------------------|
| simple        | 1                                          | Ho et al. 2020, eq. 14                 |
| x0            | e^-lambda                  (= x0-MSE)      | Kingma et al. 2021; Hang et al. 2023   |
| v             | c^2 (1 + e^-lambda)        (= v-MSE)       | Salimans & Ho 2022                     |
| snr           | 1  (= SNR x0-MSE; an alias of simple)      | Hang et al. 2023, Table 1              |
| flow          | (1 + e^-lambda/2)^2   (= velocity MSE)     | Lipman et al. 2023; Esser et al. 2024  |
| truncated_snr | max(1, e^-lambda)    (= max(SNR, 1) x0-MSE)| Salimans & Ho 2022, sec. 4             |
| min_snr       | min(1, gamma e^-lambda)                    | Hang et al. 2023, eq. 9                |
| soft_min_snr  | sigmoid(log gamma - lambda)                | Crowson et al. 2024, sec. 5.2          |
| edm           | 1 + e^-lambda / sigma_data^2               | Karras et al. 2022, Table 1 lambda(s)  |
| sigmoid       | -1/2 dlambda/dt sigmoid(b - lambda) / p(t) | Kingma & Gao 2023, sec. 5              |
| elbo          | -1/2 dlambda/dt / p(t) + prior + recon     | Kingma et al. 2021, eq. 17             |

(c^2 = alpha^2 + sigma^2 = 1 for VP.) The ELBO-relative weightings (sigmoid,
elbo) are importance-weighted by the density p(t) of the time sampler, so they are
unbiased under any time sampling; for logsnr-space samplers this is
1/2 w(lambda) / p(lambda). With `num_steps > 0` the `elbo` weighting is the
discrete-time variational bound (Kingma et al. 2021, eq. 13-14; Ho et al. 2020, eq. 5).

Adding a weighting or a time sampler is one function + one registry decorator here; its
keyword-only options (e.g. `min_snr_gamma`) are read once by `make_loss_fn` from the
config.diffusion fields of the same name, so the functions themselves take no config.
Everything is float32 (the network output is cast first), jit/vmap/grad-compatible.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from diffax.parameterization import (
    Parameterization,
    batch_broadcast,
    coefficients,
    interpolate_log_variance,
    split_learned_variance,
)
from diffax.registry import Registry
from diffax.schedules import shift_time, shift_time_derivative, step_to_t, t_to_step

Array = jax.Array

TIME_SAMPLERS: Registry[Callable] = Registry("time sampling", "config.diffusion.time_sampling")
WEIGHTINGS: Registry[Callable] = Registry("weighting", "config.diffusion.weighting")

HYBRID_VLB_WEIGHT = 0.001  # lambda of L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal 2021, eq. 16)


def mean_flat(a: Array) -> Array:
    """Mean over all non-batch dimensions, float32 [B]."""
    return jnp.mean(a.astype(jnp.float32).reshape(a.shape[0], -1), axis=-1)


# ----------------------------------------------------------------------------- time sampling
class TimeDraw(NamedTuple):
    """Training times [B] and the density they were drawn with, for importance weighting.

    `time_density` is p(t) of samplers that draw t (None: uniform on (0, 1]);
    `logsnr_density` is p(lambda) of samplers that draw the logsnr directly.
    """

    t: Array
    time_density: Array | None = None
    logsnr_density: Array | None = None


def _grid_floor(u: Array, num_steps: int) -> Array:
    """u in [0, 1) -> grid time (floor(u T) + 1) / T: uniform over the T steps."""
    i = jnp.clip(jnp.floor(u * num_steps), 0, num_steps - 1)
    return step_to_t(i, num_steps)


def _on_grid(t: Array, schedule) -> Array:
    """Continuous t -> the nearest grid time t_i = (i + 1) / T of a discrete schedule (t itself if continuous)."""
    T = schedule.num_steps
    return step_to_t(t_to_step(t, T), T) if T > 0 else t


def _from_unit(u: Array, schedule) -> Array:
    """u in [0, 1) -> t in (0, 1] (never the sigma = 0 end of a VP schedule), or the grid when discrete."""
    return _grid_floor(u, schedule.num_steps) if schedule.num_steps > 0 else 1.0 - u


@TIME_SAMPLERS.register("uniform")
def uniform_time(key: Array, batch: int, schedule: Any) -> TimeDraw:
    """t ~ U(0, 1] (Kingma et al. 2021); a discrete schedule draws the step uniformly (Ho et al. 2020, Alg. 1)."""
    return TimeDraw(_from_unit(jax.random.uniform(key, (batch,)), schedule))


@TIME_SAMPLERS.register("discrete")
def discrete_time(key: Array, batch: int, schedule: Any) -> TimeDraw:
    """Step i ~ U{0..T-1}, t = (i + 1) / T (Ho et al. 2020, Algorithm 1); needs num_steps > 0."""
    if schedule.num_steps <= 0:
        raise ValueError("time_sampling 'discrete' needs a discrete schedule: set config.diffusion.num_steps > 0.")
    i = jax.random.randint(key, (batch,), 0, schedule.num_steps)
    return TimeDraw(step_to_t(i, schedule.num_steps))


@TIME_SAMPLERS.register("antithetic")
def antithetic_time(key: Array, batch: int, schedule: Any) -> TimeDraw:
    """Low-discrepancy t_b = (u_0 + b / B) mod 1 (Kingma et al. 2021, appendix I.1): one stratum per example."""
    u = jnp.mod(jax.random.uniform(key, ()) + jnp.arange(batch, dtype=jnp.float32) / batch, 1.0)
    return TimeDraw(_from_unit(u, schedule))


@TIME_SAMPLERS.register("lognormal")
def lognormal_time(key: Array, batch: int, schedule: Any, *, p_mean: float = -1.2, p_std: float = 1.2) -> TimeDraw:
    """ln(sigma) ~ N(p_mean, p_std^2) for the VE-equivalent sigma = sigma_t / alpha_t (Karras et al. 2022, sec. 5).

    t = t_from_logsnr(-2 ln sigma), clipped to [0, 1] (the tails beyond the schedule's
    sigma range are mapped to its ends); the density of lambda = -2 ln sigma is p(lambda).
    """
    log_sigma = p_mean + p_std * jax.random.normal(key, (batch,))
    density = jnp.exp(-0.5 * ((log_sigma - p_mean) / p_std) ** 2) / (2.0 * p_std * math.sqrt(2.0 * math.pi))
    return TimeDraw(_on_grid(schedule.t_from_logsnr(-2.0 * log_sigma), schedule), logsnr_density=density)


@TIME_SAMPLERS.register("logsnr_uniform")
def logsnr_uniform_time(
    key: Array, batch: int, schedule: Any, *, time_logsnr_min: float = -15.0, time_logsnr_max: float = 15.0
) -> TimeDraw:
    """lambda ~ U[time_logsnr_min, time_logsnr_max], t = t_from_logsnr(lambda) (Kingma & Gao 2023, sec. 4); p = 1 / range."""
    lo, hi = float(time_logsnr_min), float(time_logsnr_max)
    logsnr = jax.random.uniform(key, (batch,), minval=lo, maxval=hi)
    return TimeDraw(_on_grid(schedule.t_from_logsnr(logsnr), schedule), logsnr_density=jnp.full((batch,), 1.0 / (hi - lo)))


@TIME_SAMPLERS.register("logit_normal")
def logit_normal_time(
    key: Array, batch: int, schedule: Any, *, logit_mean: float = 0.0, logit_std: float = 1.0
) -> TimeDraw:
    """Logit-normal t = sigmoid(u), u ~ N(logit_mean, logit_std^2) (Esser et al. 2024, sec. 3.1, eq. 19; SD3 uses (0, 1)).

    Density pi_ln(t) = exp(-(logit(t) - m)^2 / (2 s^2)) / (s sqrt(2 pi) t (1 - t)).
    """
    n = jax.random.normal(key, (batch,))
    u = logit_mean + logit_std * n
    t = jax.nn.sigmoid(u)
    # the density from the draw itself: t (1 - t) = sigmoid(u) sigmoid(-u) stays > 0 where t rounds to 1.0
    density = jnp.exp(-0.5 * n**2) / (logit_std * math.sqrt(2.0 * math.pi) * jax.nn.sigmoid(u) * jax.nn.sigmoid(-u))
    return TimeDraw(_on_grid(t, schedule), time_density=density)


def mode_map(u: Array, scale: float) -> Array:
    """f_mode(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u) (Esser et al. 2024, eq. 20): decreasing for -1 <= s <= 2 / (pi - 2)."""
    return 1.0 - u - scale * (jnp.cos(0.5 * math.pi * u) ** 2 - 1.0 + u)


@TIME_SAMPLERS.register("mode")
def mode_time(key: Array, batch: int, schedule: Any, *, mode_scale: float = 1.29) -> TimeDraw:
    """Mode sampling with heavy tails t = f_mode(u), u ~ U[0, 1] (Esser et al. 2024, sec. 3.1, eq. 20).

    Its density is 1 / |f_mode'(u)| with f_mode'(u) = -1 - s + (pi s / 2) sin(pi u); s = 0 is
    uniform, and s > 0 favours mid-range t. The map is monotone only for s in [-1, 2 / (pi - 2)].
    """
    if not -1.0 <= mode_scale <= 2.0 / (math.pi - 2.0):
        raise ValueError(
            f"config.diffusion.mode_scale={mode_scale} makes f_mode non-monotone: use a value in [-1, {2 / (math.pi - 2):.4f}]."
        )
    u = jax.random.uniform(key, (batch,))
    slope = -1.0 - mode_scale + 0.5 * math.pi * mode_scale * jnp.sin(math.pi * u)
    return TimeDraw(_on_grid(mode_map(u, mode_scale), schedule), time_density=-1.0 / slope)


@TIME_SAMPLERS.register("cosmap")
def cosmap_time(key: Array, batch: int, schedule: Any) -> TimeDraw:
    """CosMap t = 1 - 1 / (tan(pi u / 2) + 1), u ~ U[0, 1] (Esser et al. 2024, sec. 3.1, eq. 21).

    Matches the logsnr of the cosine schedule for rectified flow; density
    pi(t) = 2 / (pi - 2 pi t + 2 pi t^2) (eq. 22).
    """
    u = jax.random.uniform(key, (batch,))
    t = 1.0 - 1.0 / (jnp.tan(0.5 * math.pi * u) + 1.0)
    return TimeDraw(_on_grid(t, schedule), time_density=2.0 / (math.pi * (1.0 - 2.0 * t + 2.0 * t**2)))


def shift_draw(draw: TimeDraw, shift: float, schedule: Any) -> TimeDraw:
    """Apply the resolution shift t -> s t / (1 + (s - 1) t) (Esser et al. 2024, eq. 23) to drawn times.

    The density transforms with the map's Jacobian: p(t') = p(t) / (dt'/dt). Defined for
    samplers that draw t (a logsnr-space sampler already fixes the noise levels).
    """
    if draw.logsnr_density is not None:
        raise ValueError(
            "config.diffusion.time_shift applies to samplers that draw t (uniform, antithetic, logit_normal, mode, "
            "cosmap), not to lognormal / logsnr_uniform: set time_shift=1."
        )
    density = 1.0 if draw.time_density is None else draw.time_density
    t = shift_time(draw.t, shift)
    return TimeDraw(_on_grid(t, schedule), time_density=density / shift_time_derivative(draw.t, shift))


# ----------------------------------------------------------------------------- weightings
@dataclasses.dataclass(kw_only=True)
class WeightContext:
    """Per-example quantities a weighting may use, all float32 [B]."""

    t: Array
    logsnr: Array  # clamped lambda_t
    dlogsnr_dt: Array  # d lambda / dt (<= 0)
    alpha: Array
    sigma: Array
    x: Array  # the clean data [B, ...] (prior term of the ELBO)
    schedule: Any
    time_density: Array | None = None  # p(t) of the time sampler; None: uniform on (0, 1]
    logsnr_density: Array | None = None  # p(lambda) of a logsnr-space time sampler

    @property
    def scale2(self) -> Array:
        return self.alpha**2 + self.sigma**2


def elbo_relative(ctx: WeightContext, w: Array) -> Array:
    """Eps-MSE multiplier of the weighted ELBO 1/2 E_t[w(lambda) (-dlambda/dt) ||eps - eps_hat||^2] (Kingma & Gao 2023).

    Importance-weighted by the time sampler: -1/2 w dlambda/dt / p(t) for samplers that draw
    t (p = 1 for t ~ U(0, 1)), 1/2 w / p(lambda) for samplers drawing lambda with density p(lambda).
    """
    if ctx.logsnr_density is not None:
        return 0.5 * w / ctx.logsnr_density
    weight = -0.5 * w * ctx.dlogsnr_dt
    return weight if ctx.time_density is None else weight / ctx.time_density


@WEIGHTINGS.register("simple")
@WEIGHTINGS.register("snr")
def simple_weight(ctx: WeightContext) -> Array:
    """L_simple: the unweighted eps-MSE (Ho et al. 2020, eq. 14), which is also the SNR-weighted x0-MSE
    (Hang et al. 2023, Table 1 "SNR"): `snr` is another name for it."""
    return jnp.ones_like(ctx.logsnr)


@WEIGHTINGS.register("x0")
def x0_weight(ctx: WeightContext) -> Array:
    """Unweighted x0-MSE: ||x - x_hat||^2 = e^-lambda ||eps - eps_hat||^2 (Kingma et al. 2021, eq. 12)."""
    return jnp.exp(-ctx.logsnr)


@WEIGHTINGS.register("v")
def v_weight(ctx: WeightContext) -> Array:
    """Unweighted v-MSE, = (SNR + 1) x0-MSE for VP (Salimans & Ho 2022, sec. 4; Hang et al. 2023, Table 1)."""
    return ctx.scale2 * (1.0 + jnp.exp(-ctx.logsnr))


@WEIGHTINGS.register("flow")
def flow_weight(ctx: WeightContext) -> Array:
    """Unweighted rectified-flow velocity MSE ||u - u_hat||^2, u = eps - x: (1 + e^-lambda/2)^2 eps-MSE.

    On the path alpha = 1 - t, sigma = t: eps = z + (1 - t) u, so the eps error is (1 - t) times
    the velocity error, and 1 - t = sigmoid(lambda / 2). Written on lambda, it is the velocity
    MSE of the rectified-flow point with the same logsnr for any schedule; with uniform t it is
    the ELBO weighting w(lambda) = e^-lambda/2 (Kingma & Gao 2023, sec. 4 and appendix D;
    Lipman et al. 2023; Esser et al. 2024, sec. 3.1).
    """
    return (1.0 + jnp.exp(-0.5 * ctx.logsnr)) ** 2


@WEIGHTINGS.register("truncated_snr")
def truncated_snr_weight(ctx: WeightContext) -> Array:
    """max(SNR, 1) x0-MSE (Salimans & Ho 2022, sec. 4 "truncated SNR")."""
    return jnp.maximum(1.0, jnp.exp(-ctx.logsnr))


@WEIGHTINGS.register("min_snr")
def min_snr_weight(ctx: WeightContext, *, min_snr_gamma: float = 5.0) -> Array:
    """Min-SNR-gamma: min(SNR, gamma) x0-MSE = min(1, gamma / SNR) eps-MSE (Hang et al. 2023, eq. 9)."""
    return jnp.minimum(1.0, min_snr_gamma * jnp.exp(-ctx.logsnr))


@WEIGHTINGS.register("soft_min_snr")
def soft_min_snr_weight(ctx: WeightContext, *, min_snr_gamma: float = 5.0) -> Array:
    """Soft-min-SNR: SNR gamma / (SNR + gamma) x0-MSE = gamma / (SNR + gamma) eps-MSE (Crowson et al. 2024, 5.2)."""
    return jax.nn.sigmoid(math.log(min_snr_gamma) - ctx.logsnr)


@WEIGHTINGS.register("edm")
def edm_weight(ctx: WeightContext, *, sigma_data: float = 0.5) -> Array:
    """EDM lambda(s) = (s^2 + sd^2) / (s sd)^2 on the x0-MSE, s^2 = e^-lambda (Karras et al. 2022, Table 1, eq. 8)."""
    return 1.0 + jnp.exp(-ctx.logsnr) / sigma_data**2


@WEIGHTINGS.register("sigmoid")
def sigmoid_weight(ctx: WeightContext, *, sigmoid_bias: float = -2.0) -> Array:
    """ELBO weighted by w(lambda) = sigmoid(b - lambda), b = config sigmoid_bias (Kingma & Gao 2023, sec. 5)."""
    return elbo_relative(ctx, jax.nn.sigmoid(sigmoid_bias - ctx.logsnr))


def prior_kl(ctx: WeightContext) -> Array:
    """KL(q(z_1 | x) || N(0, alpha_1^2 + sigma_1^2)) per dimension (Kingma et al. 2021, eq. 11; N(0, I) for VP)."""
    ones = jnp.ones_like(ctx.t)
    a1, s1 = coefficients(ctx.x, ones, ctx.schedule)
    var_p = a1**2 + s1**2
    kl = 0.5 * ((s1**2 + a1**2 * ctx.x**2) / var_p - 1.0 - jnp.log(s1**2 / var_p))
    return mean_flat(jnp.broadcast_to(kl, ctx.x.shape))


@WEIGHTINGS.register("elbo")
def elbo_weight(ctx: WeightContext) -> tuple[Array, dict[str, Array]]:
    """Negative ELBO in nats per dimension: diffusion loss + prior KL + reconstruction (Kingma et al. 2021, eq. 11-18).

    Continuous time: the diffusion term -1/2 dlambda/dt ||eps - eps_hat||^2 (eq. 17-18,
    dlambda/dt by jax.jvp), a Gaussian decoder p(x | z_0) = N(z_0 / alpha_0, e^-lambda_0)
    for continuous data whose expected NLL is 1/2 (log 2 pi + 1 - lambda_0), and the prior KL.
    Discrete time (num_steps = T): step i >= 1 costs T/2 (SNR(t_{i-1}) / SNR(t_i) - 1) on the
    eps-MSE (eq. 13-14), step 0 is the decoder N(x; x_hat_0, e^-lambda_{t_0})
    (T/2 (log 2 pi - lambda) + T/2 eps-MSE), importance-weighted for uniform step sampling
    (`make_loss_fn` refuses other time samplers in discrete time).
    """
    schedule, T = ctx.schedule, ctx.schedule.num_steps
    prior = prior_kl(ctx)
    if T == 0:
        recon = 0.5 * (math.log(2.0 * math.pi) + 1.0 - schedule.logsnr(jnp.zeros_like(ctx.t)))
        return elbo_relative(ctx, jnp.ones_like(ctx.logsnr)), dict(elbo_prior=prior, elbo_recon=recon)
    first = jnp.round(ctx.t * T) <= 1.0
    logsnr_prev = schedule.logsnr(jnp.maximum(ctx.t - 1.0 / T, 0.0))
    w = jnp.where(first, 0.5 * T, 0.5 * T * jnp.expm1(logsnr_prev - ctx.logsnr))
    recon = jnp.where(first, 0.5 * T * (math.log(2.0 * math.pi) - ctx.logsnr), 0.0)
    return w, dict(elbo_prior=prior, elbo_recon=recon)


def options_from_config(fn: Callable, diffusion_cfg: Any) -> dict[str, Any]:
    """The keyword-only options of a time sampler or weighting, read from config.diffusion fields of the same name.

    A field missing from the config (one written before the field existed) keeps the
    function's default, except the renamed time-sampling logsnr range, which falls back to
    the `logsnr_min` / `logsnr_max` that older configs used for it.
    """
    options = {}
    for name, param in inspect.signature(fn).parameters.items():
        if param.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        field = name if name in diffusion_cfg else _LEGACY_FIELDS.get(name)
        if field in diffusion_cfg:
            options[name] = diffusion_cfg[field]
    return options


_LEGACY_FIELDS = {"time_logsnr_min": "logsnr_min", "time_logsnr_max": "logsnr_max"}


# ----------------------------------------------------------------------------- learned variance
def _normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Array, mean: Array, log_scale: Array) -> Array:
    """log P(x) of 8-bit data in [-1, 1] under a Gaussian discretised to 256 bins (Ho et al. 2020, eq. 13)."""
    inv_std = jnp.exp(-log_scale)
    upper = inv_std * (x - mean + 1.0 / 255.0)
    lower = inv_std * (x - mean - 1.0 / 255.0)
    log_cdf_upper = jax.scipy.special.log_ndtr(upper)
    log_sf_lower = jax.scipy.special.log_ndtr(-lower)
    delta = jax.scipy.special.ndtr(upper) - jax.scipy.special.ndtr(lower)
    mid = jnp.log(jnp.maximum(delta, 1e-12))
    return jnp.where(x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_sf_lower, mid))


def _transition(schedule, t: Array, s: Array):
    """For grid steps s < t: (log beta_{t|s}, log beta_tilde, posterior mean coefficients on z_t and x) [B].

    beta_{t|s} = sigma_t^2 - alpha_{t|s}^2 sigma_s^2 = -sigma_t^2 expm1(lambda_t - lambda_s),
    beta_tilde = beta_{t|s} sigma_s^2 / sigma_t^2 (Kingma et al. 2021, eq. 6-8; Ho et al. 2020, eq. 7).
    """
    a_t, s_t = schedule.alpha_sigma(t)
    a_s, s_s = schedule.alpha_sigma(s)
    shrink = -jnp.expm1(schedule.logsnr(t) - schedule.logsnr(s))
    log_beta = jnp.log(s_t**2 * shrink)
    log_beta_tilde = jnp.log(s_s**2 * shrink)
    coef_z = (a_t / a_s) * s_s**2 / s_t**2
    coef_x = a_s * shrink
    return log_beta, log_beta_tilde, coef_z, coef_x


def hybrid_vlb(
    out: Array, var_interp: Array, x: Array, z: Array, t: Array, schedule, *, parameterization: Parameterization
) -> Array:
    """L_vlb term of the hybrid loss in bits per dimension [B] (Nichol & Dhariwal 2021, sec. 3.1, eq. 15-16).

    KL(q(z_s | z_t, x) || p(z_s | z_t)) for step i >= 1 and the discretised decoder NLL for
    i = 0, where p has mean from stop_gradient(x_hat) (only the variance learns from this
    term) and log-variance interpolated by `var_interp` in [-1, 1] between log beta_tilde (clipped at step 0 to
    step 1's, as in the paper's code) and log beta.
    """
    T = schedule.num_steps
    x0_hat, _ = parameterization.to_x0_eps(jax.lax.stop_gradient(out), z, t, schedule)
    first = jnp.round(t * T) <= 1.0
    s = jnp.maximum(t - 1.0 / T, 0.0)
    log_beta, log_beta_tilde, coef_z, coef_x = _transition(schedule, t, s)
    _, log_beta_tilde_1, _, _ = _transition(schedule, jnp.full_like(t, 2.0 / T), jnp.full_like(t, 1.0 / T))
    min_log = jnp.where(first, log_beta_tilde_1, log_beta_tilde)
    b = functools.partial(batch_broadcast, z=x)
    logvar_p = interpolate_log_variance(var_interp, b(min_log), b(log_beta))
    mean_p = b(coef_z) * z + b(coef_x) * x0_hat
    mean_q = b(coef_z) * z + b(coef_x) * x
    kl = mean_flat(_normal_kl(mean_q, b(jnp.where(first, 0.0, log_beta_tilde)), mean_p, logvar_p))
    nll = -mean_flat(discretized_gaussian_log_likelihood(x, mean_p, 0.5 * logvar_p))
    return jnp.where(first, nll, kl) / math.log(2.0)


# ----------------------------------------------------------------------------- the loss
def drop_labels(key: Array, labels: Array, p: float, null_label: int) -> Array:
    """Replace each label by the null label with probability p, for classifier-free guidance (Ho & Salimans 2022)."""
    if p <= 0:
        return labels
    return jnp.where(jax.random.bernoulli(key, p, labels.shape), null_label, labels).astype(labels.dtype)


def make_loss_fn(
    diffusion_cfg, parameterization: Parameterization, *, num_classes: int = 0, learn_sigma: bool = False
) -> Callable[..., tuple[Array, dict[str, Array]]]:
    """The per-example diffusion loss: loss_fn(apply_fn, schedule, x, key, labels=None) -> (loss [B] f32, aux).

    apply_fn(z_in, c_noise, labels) is the network. aux holds per-example [B] arrays:
    t, logsnr, weight (multiplier on the eps-MSE), mse (in the network's target space),
    eps_mse, and the ELBO terms / `vlb` (bits per dim, learn_sigma) when present. With
    learn_sigma the loss is L_simple + 0.001 T L_vlb (Nichol & Dhariwal 2021, eq. 16), which
    needs a discrete schedule. Names are checked here, so a typo fails before tracing.
    """
    cfg = diffusion_cfg  # read here, once: the functions below take plain keyword options
    sampler = TIME_SAMPLERS.get(cfg.time_sampling)
    sample_time = functools.partial(sampler, **options_from_config(sampler, cfg))
    weighting_fn = WEIGHTINGS.get(cfg.weighting)
    weighting = functools.partial(weighting_fn, **options_from_config(weighting_fn, cfg))
    time_shift = float(cfg.get("time_shift", 1.0))  # absent from configs written before it existed
    if time_shift <= 0:
        raise ValueError(f"config.diffusion.time_shift={time_shift}: the shift must be > 0 (1 = no shift).")
    if learn_sigma and cfg.num_steps <= 0:
        raise ValueError(
            "model.learn_sigma=True needs the discrete-time hybrid loss: set config.diffusion.num_steps > 0 "
            "(learned variances are defined for DDPM steps only; Nichol & Dhariwal 2021)."
        )
    if cfg.weighting == "elbo" and cfg.num_steps > 0 and (
        cfg.time_sampling not in ("uniform", "discrete", "antithetic") or time_shift != 1.0
    ):
        raise ValueError(
            "the discrete-time ELBO (weighting 'elbo' with num_steps > 0) needs time_sampling "
            f"uniform, discrete or antithetic without time_shift, not {cfg.time_sampling!r} (time_shift={time_shift})."
        )
    label_dropout = float(cfg.get("label_dropout", 0.0))

    def loss_fn(apply_fn, schedule, x, key, labels=None):
        x = jnp.asarray(x, jnp.float32)
        batch = x.shape[0]
        k_t, k_eps, k_drop = jax.random.split(key, 3)
        draw = sample_time(k_t, batch, schedule)
        if time_shift != 1.0:
            draw = shift_draw(draw, time_shift, schedule)
        t = draw.t
        eps = jax.random.normal(k_eps, x.shape, jnp.float32)
        alpha, sigma = coefficients(x, t, schedule)
        z = alpha * x + sigma * eps
        if labels is not None and num_classes > 0:
            labels = drop_labels(k_drop, labels, label_dropout, num_classes)

        z_in, c_noise = parameterization.model_inputs(z, t, schedule)
        out = jnp.asarray(apply_fn(z_in, c_noise, labels)).astype(jnp.float32)
        var_interp = None
        if learn_sigma:
            out, var_interp = split_learned_variance(out, x.shape[-1])
            if var_interp is None:
                raise ValueError("learn_sigma=True but the network output has as many channels as the data.")

        target = parameterization.from_x0_eps(x, eps, z, t, schedule)
        mse = mean_flat((out - target) ** 2)
        logsnr, dlogsnr_dt = jax.jvp(schedule.logsnr, (t,), (jnp.ones_like(t),))
        a, s = schedule.alpha_sigma(t)
        ctx = WeightContext(
            t=t, logsnr=logsnr, dlogsnr_dt=dlogsnr_dt, alpha=a, sigma=s, x=x, schedule=schedule,
            time_density=draw.time_density, logsnr_density=draw.logsnr_density,
        )
        result = weighting(ctx)
        w, extras = result if isinstance(result, tuple) else (result, {})
        eps_mse = parameterization.eps_mse_factor(t, schedule) * mse
        loss = w * eps_mse
        for term in extras.values():
            loss = loss + term
        aux = dict(t=t, logsnr=logsnr, weight=w, mse=mse, eps_mse=eps_mse, **extras)

        if learn_sigma:
            if schedule.num_steps <= 0:
                raise ValueError("learn_sigma=True needs a discrete schedule (config.diffusion.num_steps > 0).")
            vlb = hybrid_vlb(out, var_interp, x, z, t, schedule, parameterization=parameterization)
            loss = loss + HYBRID_VLB_WEIGHT * schedule.num_steps * vlb
            aux["vlb"] = schedule.num_steps * vlb
        return loss.astype(jnp.float32), aux

    return loss_fn

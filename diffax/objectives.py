"""Training objectives: time sampling, loss weightings and the diffusion loss.

One loss for every schedule x prediction x weighting. The network output is
compared with its own target (eps, x0, v, score or EDM's F), the squared error is
converted into the eps-MSE with the parameterization's exact factor, and the
weighting is a multiplier on the eps-MSE written as a function of the logsnr
lambda (Kingma & Gao 2023, "Understanding diffusion objectives", sec. 2-3):

    loss = w(lambda, ...) * k_param(lambda) * mean((out - target)^2) [+ ELBO terms]

| weighting     | multiplier on the eps-MSE                  | paper                                  |
|---------------|--------------------------------------------|----------------------------------------|
| simple        | 1                                          | Ho et al. 2020, eq. 14                 |
| x0            | e^-lambda                  (= x0-MSE)      | Kingma et al. 2021; Hang et al. 2023   |
| v             | c^2 (1 + e^-lambda)        (= v-MSE)       | Salimans & Ho 2022                     |
| snr           | 1                          (= SNR x0-MSE)  | Hang et al. 2023, Table 1              |
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

Adding a weighting or a time sampler is one function + one registry decorator here.
Everything is float32 (the network output is cast first), jit/vmap/grad-compatible.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffax.parameterization import Parameterization, coefficients, split_learned_variance
from diffax.registry import Registry
from diffax.schedules import step_to_t

Array = jax.Array

TIME_SAMPLERS: Registry[Callable] = Registry("time sampling", "config.diffusion.time_sampling")
WEIGHTINGS: Registry[Callable] = Registry("weighting", "config.diffusion.weighting")

HYBRID_VLB_WEIGHT = 0.001  # lambda of L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal 2021, eq. 16)


def mean_flat(a: Array) -> Array:
    """Mean over all non-batch dimensions, float32 [B]."""
    return jnp.mean(a.astype(jnp.float32).reshape(a.shape[0], -1), axis=-1)


# ----------------------------------------------------------------------------- time sampling
def _grid_floor(u: Array, num_steps: int) -> Array:
    """u in [0, 1) -> grid time (floor(u T) + 1) / T: uniform over the T steps."""
    i = jnp.clip(jnp.floor(u * num_steps), 0, num_steps - 1)
    return step_to_t(i, num_steps)


def _grid_nearest(t: Array, num_steps: int) -> Array:
    """Continuous t -> nearest grid time t_i = (i + 1) / T."""
    i = jnp.clip(jnp.round(t * num_steps) - 1.0, 0, num_steps - 1)
    return step_to_t(i, num_steps)


def _from_unit(u: Array, schedule) -> Array:
    """u in [0, 1) -> t in (0, 1] (never the sigma = 0 end of a VP schedule), or the grid when discrete."""
    return _grid_floor(u, schedule.num_steps) if schedule.num_steps > 0 else 1.0 - u


def _from_logsnr(logsnr: Array, schedule) -> Array:
    t = schedule.t_from_logsnr(logsnr)
    return _grid_nearest(t, schedule.num_steps) if schedule.num_steps > 0 else t


@TIME_SAMPLERS.register("uniform")
def uniform_time(key: Array, batch: int, schedule: Any, cfg: Any) -> tuple[Array, Array | None]:
    """t ~ U(0, 1] (Kingma et al. 2021); a discrete schedule draws the step uniformly (Ho et al. 2020, Alg. 1)."""
    return _from_unit(jax.random.uniform(key, (batch,)), schedule), None


@TIME_SAMPLERS.register("discrete")
def discrete_time(key: Array, batch: int, schedule: Any, cfg: Any) -> tuple[Array, Array | None]:
    """Step i ~ U{0..T-1}, t = (i + 1) / T (Ho et al. 2020, Algorithm 1); needs num_steps > 0."""
    if schedule.num_steps <= 0:
        raise ValueError("time_sampling 'discrete' needs a discrete schedule: set config.diffusion.num_steps > 0.")
    i = jax.random.randint(key, (batch,), 0, schedule.num_steps)
    return step_to_t(i, schedule.num_steps), None


@TIME_SAMPLERS.register("antithetic")
def antithetic_time(key: Array, batch: int, schedule: Any, cfg: Any) -> tuple[Array, Array | None]:
    """Low-discrepancy t_b = (u_0 + b / B) mod 1 (Kingma et al. 2021, appendix I.1): one stratum per example."""
    u = jnp.mod(jax.random.uniform(key, ()) + jnp.arange(batch, dtype=jnp.float32) / batch, 1.0)
    return _from_unit(u, schedule), None


@TIME_SAMPLERS.register("lognormal")
def lognormal_time(key: Array, batch: int, schedule: Any, cfg: Any) -> tuple[Array, Array | None]:
    """ln(sigma) ~ N(P_mean, P_std^2) for the VE-equivalent sigma = sigma_t / alpha_t (Karras et al. 2022, sec. 5).

    t = t_from_logsnr(-2 ln sigma), clipped to [0, 1] (the tails beyond the schedule's
    sigma range are mapped to its ends); also returns the density p(lambda).
    """
    log_sigma = cfg.p_mean + cfg.p_std * jax.random.normal(key, (batch,))
    logsnr = -2.0 * log_sigma
    density = jnp.exp(-0.5 * ((log_sigma - cfg.p_mean) / cfg.p_std) ** 2) / (
        2.0 * cfg.p_std * math.sqrt(2.0 * math.pi)
    )
    return _from_logsnr(logsnr, schedule), density


@TIME_SAMPLERS.register("logsnr_uniform")
def logsnr_uniform_time(key: Array, batch: int, schedule: Any, cfg: Any) -> tuple[Array, Array | None]:
    """lambda ~ U[logsnr_min, logsnr_max], t = t_from_logsnr(lambda) (Kingma & Gao 2023, sec. 4); density 1 / range."""
    lo, hi = float(cfg.logsnr_min), float(cfg.logsnr_max)
    logsnr = jax.random.uniform(key, (batch,), minval=lo, maxval=hi)
    return _from_logsnr(logsnr, schedule), jnp.full((batch,), 1.0 / (hi - lo))


# ----------------------------------------------------------------------------- weightings
@dataclasses.dataclass
class WeightContext:
    """Per-example quantities a weighting may use, all float32 [B] (schedule and config for the rest)."""

    t: Array
    logsnr: Array  # clamped lambda_t
    dlogsnr_dt: Array  # d lambda / dt (<= 0)
    alpha: Array
    sigma: Array
    logsnr_density: Array | None  # p(lambda) of a logsnr-space time sampler, else None (t uniform)
    x: Array  # the clean data [B, ...] (prior term of the ELBO)
    schedule: Any
    cfg: Any

    @property
    def scale2(self) -> Array:
        return self.alpha**2 + self.sigma**2


def elbo_relative(ctx: WeightContext, w: Array) -> Array:
    """Eps-MSE multiplier of the weighted ELBO 1/2 E_t[w(lambda) (-dlambda/dt) ||eps - eps_hat||^2] (Kingma & Gao 2023).

    Importance-weighted by the time sampler: -1/2 w dlambda/dt for t ~ U(0, 1),
    1/2 w / p(lambda) for samplers drawing lambda with density p(lambda).
    """
    if ctx.logsnr_density is not None:
        return 0.5 * w / ctx.logsnr_density
    return -0.5 * w * ctx.dlogsnr_dt


@WEIGHTINGS.register("simple")
def simple_weight(ctx: WeightContext) -> Array:
    """L_simple: unweighted eps-MSE (Ho et al. 2020, eq. 14)."""
    return jnp.ones_like(ctx.logsnr)


@WEIGHTINGS.register("x0")
def x0_weight(ctx: WeightContext) -> Array:
    """Unweighted x0-MSE: ||x - x_hat||^2 = e^-lambda ||eps - eps_hat||^2 (Kingma et al. 2021, eq. 12)."""
    return jnp.exp(-ctx.logsnr)


@WEIGHTINGS.register("v")
def v_weight(ctx: WeightContext) -> Array:
    """Unweighted v-MSE, = (SNR + 1) x0-MSE for VP (Salimans & Ho 2022, sec. 4; Hang et al. 2023, Table 1)."""
    return ctx.scale2 * (1.0 + jnp.exp(-ctx.logsnr))


@WEIGHTINGS.register("snr")
def snr_weight(ctx: WeightContext) -> Array:
    """SNR-weighted x0-MSE, which equals the eps-MSE (Hang et al. 2023, Table 1 "SNR")."""
    return jnp.ones_like(ctx.logsnr)


@WEIGHTINGS.register("truncated_snr")
def truncated_snr_weight(ctx: WeightContext) -> Array:
    """max(SNR, 1) x0-MSE (Salimans & Ho 2022, sec. 4 "truncated SNR")."""
    return jnp.maximum(1.0, jnp.exp(-ctx.logsnr))


@WEIGHTINGS.register("min_snr")
def min_snr_weight(ctx: WeightContext) -> Array:
    """Min-SNR-gamma: min(SNR, gamma) x0-MSE = min(1, gamma / SNR) eps-MSE (Hang et al. 2023, eq. 9)."""
    return jnp.minimum(1.0, ctx.cfg.min_snr_gamma * jnp.exp(-ctx.logsnr))


@WEIGHTINGS.register("soft_min_snr")
def soft_min_snr_weight(ctx: WeightContext) -> Array:
    """Soft-min-SNR: SNR gamma / (SNR + gamma) x0-MSE = gamma / (SNR + gamma) eps-MSE (Crowson et al. 2024, 5.2)."""
    return jax.nn.sigmoid(math.log(ctx.cfg.min_snr_gamma) - ctx.logsnr)


@WEIGHTINGS.register("edm")
def edm_weight(ctx: WeightContext) -> Array:
    """EDM lambda(s) = (s^2 + sd^2) / (s sd)^2 on the x0-MSE, s^2 = e^-lambda (Karras et al. 2022, Table 1, eq. 8)."""
    return 1.0 + jnp.exp(-ctx.logsnr) / ctx.cfg.sigma_data**2


@WEIGHTINGS.register("sigmoid")
def sigmoid_weight(ctx: WeightContext) -> Array:
    """ELBO weighted by w(lambda) = sigmoid(b - lambda), b = config sigmoid_bias (Kingma & Gao 2023, sec. 5)."""
    return elbo_relative(ctx, jax.nn.sigmoid(ctx.cfg.sigmoid_bias - ctx.logsnr))


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
    (T/2 (log 2 pi - lambda) + T/2 eps-MSE), importance-weighted for uniform step sampling.
    """
    schedule, T = ctx.schedule, ctx.schedule.num_steps
    prior = prior_kl(ctx)
    if T == 0:
        recon = 0.5 * (math.log(2.0 * math.pi) + 1.0 - schedule.logsnr(jnp.zeros_like(ctx.t)))
        return elbo_relative(ctx, jnp.ones_like(ctx.logsnr)), dict(elbo_prior=prior, elbo_recon=recon)
    if ctx.cfg.time_sampling not in ("uniform", "discrete", "antithetic"):
        raise ValueError(
            "the discrete-time ELBO (weighting 'elbo' with num_steps > 0) needs time_sampling "
            f"uniform, discrete or antithetic, not {ctx.cfg.time_sampling!r}."
        )
    first = jnp.round(ctx.t * T) <= 1.0
    logsnr_prev = schedule.logsnr(jnp.maximum(ctx.t - 1.0 / T, 0.0))
    w = jnp.where(first, 0.5 * T, 0.5 * T * jnp.expm1(logsnr_prev - ctx.logsnr))
    recon = jnp.where(first, 0.5 * T * (math.log(2.0 * math.pi) - ctx.logsnr), 0.0)
    return w, dict(elbo_prior=prior, elbo_recon=recon)


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


def hybrid_vlb(out: Array, v: Array, x: Array, z: Array, t: Array, schedule, param: Parameterization) -> Array:
    """L_vlb term of the hybrid loss in bits per dimension [B] (Nichol & Dhariwal 2021, sec. 3.1, eq. 15-16).

    KL(q(z_s | z_t, x) || p(z_s | z_t)) for step i >= 1 and the discretised decoder NLL for
    i = 0, where p has mean from stop_gradient(x_hat) (only the variance learns from this
    term) and log-variance interpolated by v between log beta_tilde (clipped at step 0 to
    step 1's, as in the paper's code) and log beta.
    """
    T = schedule.num_steps
    x0_hat, _ = param.to_x0_eps(jax.lax.stop_gradient(out), z, t, schedule)
    first = jnp.round(t * T) <= 1.0
    s = jnp.maximum(t - 1.0 / T, 0.0)
    log_beta, log_beta_tilde, coef_z, coef_x = _transition(schedule, t, s)
    _, log_beta_tilde_1, _, _ = _transition(schedule, jnp.full_like(t, 2.0 / T), jnp.full_like(t, 1.0 / T))
    min_log = jnp.where(first, log_beta_tilde_1, log_beta_tilde)
    b = lambda a: a.reshape(a.shape + (1,) * (x.ndim - 1))  # noqa: E731
    frac = 0.5 * (v.astype(jnp.float32) + 1.0)
    logvar_p = frac * b(log_beta) + (1.0 - frac) * b(min_log)
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
    cfg = diffusion_cfg
    sample_time = TIME_SAMPLERS.get(cfg.time_sampling)
    weighting = WEIGHTINGS.get(cfg.weighting)
    if learn_sigma and cfg.num_steps <= 0:
        raise ValueError(
            "model.learn_sigma=True needs the discrete-time hybrid loss: set config.diffusion.num_steps > 0 "
            "(learned variances are defined for DDPM steps only; Nichol & Dhariwal 2021)."
        )
    label_dropout = float(cfg.get("label_dropout", 0.0))

    def loss_fn(apply_fn, schedule, x, key, labels=None):
        x = jnp.asarray(x, jnp.float32)
        batch = x.shape[0]
        k_t, k_eps, k_drop = jax.random.split(key, 3)
        t, logsnr_density = sample_time(k_t, batch, schedule, cfg)
        eps = jax.random.normal(k_eps, x.shape, jnp.float32)
        alpha, sigma = coefficients(x, t, schedule)
        z = alpha * x + sigma * eps
        if labels is not None and num_classes > 0:
            labels = drop_labels(k_drop, labels, label_dropout, num_classes)

        z_in, c_noise = parameterization.model_inputs(z, t, schedule)
        out = jnp.asarray(apply_fn(z_in, c_noise, labels)).astype(jnp.float32)
        v = None
        if learn_sigma:
            out, v = split_learned_variance(out, x.shape[-1])
            if v is None:
                raise ValueError("learn_sigma=True but the network output has as many channels as the data.")

        target = parameterization.from_x0_eps(x, eps, z, t, schedule)
        mse = mean_flat((out - target) ** 2)
        logsnr, dlogsnr_dt = jax.jvp(schedule.logsnr, (t,), (jnp.ones_like(t),))
        a, s = schedule.alpha_sigma(t)
        ctx = WeightContext(t, logsnr, dlogsnr_dt, a, s, logsnr_density, x, schedule, cfg)
        result = weighting(ctx)
        w, extras = result if isinstance(result, tuple) else (result, {})
        eps_mse = parameterization.eps_mse_factor(logsnr, ctx.scale2) * mse
        loss = w * eps_mse
        for term in extras.values():
            loss = loss + term
        aux = dict(t=t, logsnr=logsnr, weight=w, mse=mse, eps_mse=eps_mse, **extras)

        if learn_sigma:
            if schedule.num_steps <= 0:
                raise ValueError("learn_sigma=True needs a discrete schedule (config.diffusion.num_steps > 0).")
            vlb = hybrid_vlb(out, v, x, z, t, schedule, parameterization)
            loss = loss + HYBRID_VLB_WEIGHT * schedule.num_steps * vlb
            aux["vlb"] = schedule.num_steps * vlb
        return loss.astype(jnp.float32), aux

    return loss_fn

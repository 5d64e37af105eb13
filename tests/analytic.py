"""Exact denoisers and densities for data whose diffused marginals are known in closed form.

For z_t = alpha_t x + sigma_t eps (Kingma et al. 2021, eq. 1) and Gaussian data
x ~ N(mu, diag(s^2)), z_t is Gaussian and the posterior means E[x | z_t] and
E[eps | z_t] are linear in z_t (Bishop 2006, eq. 2.116). For an isotropic Gaussian
mixture they are responsibility-weighted sums of those. These are the exact
optimal denoisers that a perfectly trained network would output, so the tests of
the losses and the samplers can run without training anything. Every function
works for ANY schedule object exposing `alpha_sigma(t)`; `t` is a scalar or has
shape [B] with B = z.shape[0]. Pure jax.numpy: jit-, vmap- and grad-compatible.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def _alpha_sigma(z: Array, t, schedule) -> tuple[Array, Array]:
    """alpha_t, sigma_t reshaped to broadcast against z ([B] -> [B, 1, ..., 1])."""
    alpha, sigma = schedule.alpha_sigma(jnp.asarray(t, jnp.float32))
    shape = alpha.shape + (1,) * (z.ndim - alpha.ndim)
    return alpha.reshape(shape), sigma.reshape(shape)


def _sum_nonbatch(a: Array) -> Array:
    return a.reshape(a.shape[0], -1).sum(-1) if a.ndim > 1 else a


# ----------------------------------------------------------------------------- Gaussian data
def gaussian_x0(z: Array, t, schedule, mu, s) -> Array:
    """E[x | z_t] for x ~ N(mu, diag(s^2)): mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (z - alpha mu)."""
    alpha, sigma = _alpha_sigma(z, t, schedule)
    var = alpha**2 * s**2 + sigma**2
    return mu + alpha * s**2 / var * (z - alpha * mu)


def gaussian_eps(z: Array, t, schedule, mu, s) -> Array:
    """E[eps | z_t] for x ~ N(mu, diag(s^2)): sigma / (alpha^2 s^2 + sigma^2) (z - alpha mu).

    Well defined even where alpha_t = 0 or sigma_t = 0 (no division by either).
    """
    alpha, sigma = _alpha_sigma(z, t, schedule)
    var = alpha**2 * s**2 + sigma**2
    return sigma / var * (z - alpha * mu)


def gaussian_score(z: Array, t, schedule, mu, s) -> Array:
    """grad_z log q(z_t) = -(z - alpha mu) / (alpha^2 s^2 + sigma^2) (Song et al. 2021, eq. 4 target)."""
    alpha, sigma = _alpha_sigma(z, t, schedule)
    return -(z - alpha * mu) / (alpha**2 * s**2 + sigma**2)


def gaussian_marginal_logpdf(z: Array, t, schedule, mu, s) -> Array:
    """log q(z_t) = sum_d log N(z_d; alpha mu_d, alpha^2 s_d^2 + sigma^2), shape [B]."""
    alpha, sigma = _alpha_sigma(z, t, schedule)
    var = alpha**2 * s**2 + sigma**2
    var = jnp.broadcast_to(var, z.shape)
    logp = -0.5 * (jnp.log(2 * math.pi * var) + (z - alpha * mu) ** 2 / var)
    return _sum_nonbatch(logp)


def gaussian_logpdf(x: Array, mu, s) -> Array:
    """Data log-density log N(x; mu, diag(s^2)) summed over non-batch dims, shape [B]."""
    s = jnp.broadcast_to(jnp.asarray(s, jnp.float32), x.shape)
    logp = -0.5 * jnp.log(2 * math.pi * s**2) - 0.5 * ((x - mu) / s) ** 2
    return _sum_nonbatch(logp)


def gaussian_eps_mse(t, schedule, s) -> Array:
    """Irreducible E||eps - E[eps|z_t]||^2 per dimension: Var(eps | z_t) = alpha^2 s^2 / (alpha^2 s^2 + sigma^2).

    Shape: broadcast of t and s (take the mean over dims yourself).
    """
    alpha, sigma = schedule.alpha_sigma(jnp.asarray(t, jnp.float32))
    alpha, sigma = alpha[..., None], sigma[..., None]
    return alpha**2 * s**2 / (alpha**2 * s**2 + sigma**2)


def gaussian_x0_mse(t, schedule, s) -> Array:
    """Irreducible E||x - E[x|z_t]||^2 per dimension: Var(x | z_t) = sigma^2 s^2 / (alpha^2 s^2 + sigma^2)."""
    alpha, sigma = schedule.alpha_sigma(jnp.asarray(t, jnp.float32))
    alpha, sigma = alpha[..., None], sigma[..., None]
    return sigma**2 * s**2 / (alpha**2 * s**2 + sigma**2)


# ----------------------------------------------------------------------------- Gaussian mixture
def _gmm_posterior(z: Array, t, schedule, means, std, weights):
    """(alpha, sigma, v, mean of the component means under the posterior responsibilities)."""
    alpha, sigma = _alpha_sigma(z, t, schedule)
    means = jnp.asarray(means, jnp.float32)  # [K, *D]
    weights = jnp.asarray(weights, jnp.float32)  # [K]
    v = alpha**2 * std**2 + sigma**2  # [B, 1, ..., 1]
    zf = z.reshape(z.shape[0], -1)  # [B, D]
    mf = means.reshape(means.shape[0], -1)  # [K, D]
    af = alpha.reshape(-1, 1)
    vf = v.reshape(-1, 1)
    d2 = jnp.sum((zf[:, None, :] - af[:, :, None] * mf[None]) ** 2, -1)  # [B, K]
    logits = jnp.log(weights)[None] - 0.5 * d2 / vf
    resp = jax.nn.softmax(logits, axis=-1)  # [B, K]
    mbar = (resp @ mf).reshape(z.shape)
    return alpha, sigma, v, mbar


def gmm_x0(z: Array, t, schedule, means, std, weights) -> Array:
    """E[x | z_t] for x ~ sum_k w_k N(m_k, std^2 I): sum_k r_k(z) (m_k + alpha std^2 / v (z - alpha m_k)).

    v = alpha^2 std^2 + sigma^2 and r_k(z) is the posterior responsibility of component k
    given z_t (Bishop 2006, eq. 9.13). means has shape [K, *z.shape[1:]], weights [K].
    """
    alpha, sigma, v, mbar = _gmm_posterior(z, t, schedule, means, std, weights)
    return alpha * std**2 / v * z + sigma**2 / v * mbar


def gmm_eps(z: Array, t, schedule, means, std, weights) -> Array:
    """E[eps | z_t] for the isotropic Gaussian mixture: sigma / v (z - alpha sum_k r_k m_k)."""
    alpha, sigma, v, mbar = _gmm_posterior(z, t, schedule, means, std, weights)
    return sigma / v * (z - alpha * mbar)


def gmm_score(z: Array, t, schedule, means, std, weights) -> Array:
    """grad_z log q(z_t) for the isotropic Gaussian mixture: -(z - alpha sum_k r_k m_k) / v."""
    alpha, sigma, v, mbar = _gmm_posterior(z, t, schedule, means, std, weights)
    return -(z - alpha * mbar) / v


def gmm_marginal_logpdf(z: Array, t, schedule, means, std, weights) -> Array:
    """log q(z_t) = logsumexp_k [log w_k + log N(z; alpha m_k, v I)], shape [B]."""
    alpha, sigma = _alpha_sigma(z, t, schedule)
    means = jnp.asarray(means, jnp.float32)
    weights = jnp.asarray(weights, jnp.float32)
    zf = z.reshape(z.shape[0], -1)
    mf = means.reshape(means.shape[0], -1)
    vf = (alpha**2 * std**2 + sigma**2).reshape(-1, 1)
    af = alpha.reshape(-1, 1)
    d = zf.shape[-1]
    d2 = jnp.sum((zf[:, None, :] - af[:, :, None] * mf[None]) ** 2, -1)
    logn = -0.5 * d * jnp.log(2 * math.pi * vf) - 0.5 * d2 / vf
    return jax.scipy.special.logsumexp(jnp.log(weights)[None] + logn, axis=-1)


def gmm_sample(key: Array, n: int, means, std, weights) -> Array:
    """n exact samples of the isotropic Gaussian mixture, shape [n, *means.shape[1:]]."""
    means = jnp.asarray(means, jnp.float32)
    k1, k2 = jax.random.split(key)
    comp = jax.random.choice(k1, means.shape[0], (n,), p=jnp.asarray(weights, jnp.float32))
    return means[comp] + std * jax.random.normal(k2, (n,) + means.shape[1:])


# ----------------------------------------------------------------------------- as sampler denoisers
def gaussian_denoiser(schedule, mu, s):
    """The exact denoiser of Gaussian data as the samplers call it: (z, t, c_noise=None) -> Denoised(x0, eps)."""
    from diffax.samplers import Denoised

    return lambda z, t, c_noise=None: Denoised(gaussian_x0(z, t, schedule, mu, s), gaussian_eps(z, t, schedule, mu, s))


def gmm_denoiser(schedule, means, std, weights):
    """The exact denoiser of the isotropic Gaussian mixture: (z, t, c_noise=None) -> Denoised(x0, eps)."""
    from diffax.samplers import Denoised

    return lambda z, t, c_noise=None: Denoised(
        gmm_x0(z, t, schedule, means, std, weights), gmm_eps(z, t, schedule, means, std, weights)
    )

"""Probability-flow ODE likelihood against the closed-form log-density of Gaussian data, and bits/dim."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import get_config
from diffax import likelihood
from diffax import parameterization as P
from diffax import schedules as S
from tests import analytic

MU = np.array([0.5, -1.0, 0.0], np.float32)
STD = np.array([0.3, 1.0, 0.6], np.float32)


def denoiser(schedule):
    return analytic.gaussian_denoiser(schedule, MU, STD)


def data(n, key=0):
    return jnp.asarray(MU + STD * np.asarray(jax.random.normal(jax.random.PRNGKey(key), (n, 3))))


@pytest.mark.parametrize("schedule", [S.VPLinear(), S.EDM(), S.Cosine(), S.RectifiedFlow()], ids=["vp", "edm", "cosine", "rectified_flow"])
def test_exact_divergence_matches_analytic_logpdf(schedule):
    """log p(x) by the ODE with the exact trace equals log N(x; mu, diag(s^2)) within 1% (Song et al. 2021,
    Sec. 4.3); the part due to the ODE alone (delta_logp) equals log q_0(x) - log q_T(z_T) within 1e-3 nats,
    q_t the exact Gaussian marginals (what is left, ~0.02 nats, is the prior's mismatch, e.g. alpha_1 mu)."""
    x = data(32)
    out = jax.jit(lambda x: likelihood.log_likelihood(denoiser(schedule), schedule, x, divergence="exact"))(x)
    exact = np.asarray(analytic.gaussian_logpdf(x, MU, STD))
    logp = np.asarray(out["logp"])
    assert np.all(np.abs(logp - exact) <= 0.01 * np.maximum(np.abs(exact), 1.0)), np.c_[logp, exact]
    q_0 = np.asarray(analytic.gaussian_marginal_logpdf(x, 1e-5, schedule, MU, STD))
    q_T = np.asarray(analytic.gaussian_marginal_logpdf(out["z_T"], out["t_max"], schedule, MU, STD))
    np.testing.assert_allclose(np.asarray(out["delta_logp"]), q_0 - q_T, atol=1e-3)
    assert int(out["num_steps"]) > 5  # the adaptive solver did take steps


ROT = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0].astype(np.float32)


def rotated_denoiser(schedule):
    """Data y = R x (non-diagonal covariance): the diffusion commutes with R, so D_y(z) = R D_x(R^T z)."""
    inner = denoiser(schedule)

    def den(z, t):
        out = inner(z @ ROT, t)  # (R^T z^T)^T = z R
        return out._replace(x0=out.x0 @ ROT.T, eps=out.eps @ ROT.T)

    return den


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(probe):
    """Averaged over probes, Hutchinson's estimate (Hutchinson 1989; Grathwohl et al. 2019) agrees with the
    exact log-density. Rotated data, since a Rademacher probe is exact for a diagonal Jacobian."""
    schedule = S.VPLinear()
    reps, points = 64, 4
    x = data(points, key=1)
    y = x @ ROT.T
    f = jax.jit(
        lambda y, k: likelihood.log_likelihood(
            rotated_denoiser(schedule), schedule, y, k, divergence="hutchinson", probe=probe
        )
    )
    est = np.asarray(f(jnp.repeat(y, reps, axis=0), jax.random.PRNGKey(2))["logp"]).reshape(points, reps)
    exact = np.asarray(analytic.gaussian_logpdf(x, MU, STD))  # |det R| = 1
    se = est.std(1, ddof=1) / math.sqrt(reps)
    assert np.all(est.std(1) > 1e-2)  # an estimate, not the exact trace
    assert np.all(np.abs(est.mean(1) - exact) < 4 * se + 0.01), (est.mean(1), exact, se)


def test_bits_per_dim_convention():
    """Uniform density on the dequantised cube [-1, 1 + 1/127.5)^D is exactly 8 bits/dim (256 levels)."""
    d = 12
    logp = d * math.log(127.5 / 256.0)
    assert float(likelihood.bits_per_dim(logp, d)) == pytest.approx(8.0, abs=1e-5)
    # the offset from nats of [-1, 1] data to bits of 8-bit pixels is log2(127.5)
    assert float(likelihood.bits_per_dim(0.0, d)) == pytest.approx(math.log2(127.5), abs=1e-6)
    assert float(likelihood.bits_per_dim(-d * math.log(2.0), d, pixel_scale=None)) == pytest.approx(1.0)
    x = jnp.linspace(-1.0, 1.0, 256)[None]
    deq = likelihood.dequantize(x, jax.random.PRNGKey(0))
    u = (deq - x) * 127.5
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0


def test_make_bpd_fn_matches_analytic():
    """The network path (oracle eps-network through the parameterization) gives the analytic bits/dim."""
    schedule = S.VPLinear()
    param = P.get_parameterization(get_config().diffusion)

    def apply_fn(z, c_noise, labels):  # exact eps for the Gaussian, c_noise = 1000 t
        return analytic.gaussian_eps(z, c_noise / 1000.0, schedule, MU, STD)

    x = data(16, key=3)
    bpd_fn = jax.jit(likelihood.make_bpd_fn(apply_fn, schedule, param, dequantize_data=False, divergence="exact"))
    bpd = np.asarray(bpd_fn(x, jax.random.PRNGKey(0)))
    expected = -np.asarray(analytic.gaussian_logpdf(x, MU, STD)) / 3 / math.log(2.0)
    np.testing.assert_allclose(bpd, expected, atol=0.01)

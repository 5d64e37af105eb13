"""Prediction targets: exact conversions, EDM preconditioning, thresholding, learned variance split."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from configs.default import get_config
from diffax import parameterization as P
from diffax import schedules as S

NAMES = P.PARAMETERIZATIONS.names()
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run_jit(fn, *args):
    """Run fn under jax.jit compiled without XLA's expensive CPU passes (these tests compile more than they run)."""
    return jax.device_get(jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args))
SCHEDS = {
    "vp": S.VPLinear(),
    "cosine-zt": S.rescale_zero_terminal_snr(S.Cosine()),
    "ve": S.VE(),
    "edm": S.EDM(),
    "ddpm": S.DiscreteVP.from_betas(S.linear_betas(1000)),
    "rf": S.RectifiedFlow(),
}


def param(name, sigma_data=0.5):
    cfg = get_config().diffusion
    cfg.prediction, cfg.sigma_data = name, sigma_data
    return P.get_parameterization(cfg)


def sample(seed, sched, batch=4, shape=(3, 3, 2), t_lo=0.02, t_hi=0.98):
    kx, ke, kt = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.uniform(kx, (batch,) + shape, minval=-1, maxval=1)
    eps = jax.random.normal(ke, x.shape)
    t = jax.random.uniform(kt, (batch,), minval=t_lo, maxval=t_hi)
    alpha, sigma = P.coefficients(x, t, sched)
    return x, eps, t, alpha * x + sigma * eps


_COMPILED = {}


def conversions(sched, seed):
    """Every target from the true (x, eps), its (x0, eps) read-back, and every ordered pairwise conversion."""
    x, eps, t, z = sample(seed, sched)
    params = {n: param(n) for n in NAMES}
    targets = {n: p.from_x0_eps(x, eps, z, t, sched) for n, p in params.items()}
    readback = {n: p.to_x0_eps(targets[n], z, t, sched) for n, p in params.items()}
    pairs = {}
    for a, b in itertools.permutations(NAMES, 2):
        pairs[a, b] = P.convert(targets[a], z, t, sched, params[a], params[b])
    return x, eps, targets, readback, pairs


@pytest.mark.parametrize("sched_name", ["cosine-zt", "ve", "ddpm", "rf"])
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_conversions_round_trip_every_pair(sched_name, seed):
    """For true (x, eps): target_b == convert(target_a, a -> b) for every ordered pair, and back again."""
    sched = SCHEDS[sched_name]
    seed = jnp.uint32(seed)
    if sched_name not in _COMPILED:  # one compilation per schedule, reused by every hypothesis example
        fn = lambda seed: conversions(sched, seed)  # noqa: E731
        _COMPILED[sched_name] = jax.jit(fn).lower(seed).compile(compiler_options=FAST_COMPILE)
    x, eps, targets, readback, pairs = jax.device_get(_COMPILED[sched_name](seed))
    for n, (x0, e) in readback.items():
        np.testing.assert_allclose(x0, x, atol=2e-3, rtol=1e-3, err_msg=n)
        np.testing.assert_allclose(e, eps, atol=2e-3, rtol=1e-3, err_msg=n)
    for (a, b), got in pairs.items():  # both orders: a -> b and b -> a are each exact
        np.testing.assert_allclose(got, targets[b], atol=2e-3 * (np.abs(targets[b]).max() + 1), err_msg=f"{a}->{b}")


def test_eps_mse_factor():
    """||eps_hat - eps||^2 == k(lambda) ||out - target||^2 for any output error, every target and schedule kind."""

    def factors():
        res = {}
        for sched_name in ("vp", "ve", "cosine-zt", "rf"):
            sched = SCHEDS[sched_name]
            x, eps, t, z = sample(1, sched)
            for name in NAMES:
                p = param(name)
                target = p.from_x0_eps(x, eps, z, t, sched)
                out = target + 0.1 * jax.random.normal(jax.random.PRNGKey(7), target.shape)
                _, eps_hat = p.to_x0_eps(out, z, t, sched)
                k = p.eps_mse_factor(t, sched)
                res[sched_name, name] = (
                    jnp.mean((eps_hat - eps) ** 2, axis=(1, 2, 3)),
                    k * jnp.mean((out - target) ** 2, axis=(1, 2, 3)),
                )
        return res

    for key, (lhs, rhs) in run_jit(factors).items():
        np.testing.assert_allclose(lhs, rhs, rtol=2e-3, err_msg=str(key))


def test_edm_coefficients_karras_table1():
    """c_skip = sd^2/(s^2+sd^2), c_out = s sd / sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4."""
    for s, sd in [(0.5, 0.5), (0.002, 0.5), (80.0, 0.5), (1.3, 1.0)]:
        c = P.edm_coefficients(jnp.float32(s), sd)
        assert float(c["c_skip"]) == pytest.approx(sd**2 / (s**2 + sd**2), rel=1e-5)
        assert float(c["c_out"]) == pytest.approx(s * sd / math.sqrt(s**2 + sd**2), rel=1e-5)
        assert float(c["c_in"]) == pytest.approx(1 / math.sqrt(s**2 + sd**2), rel=1e-5)
        assert float(c["c_noise"]) == pytest.approx(math.log(s) / 4, rel=1e-5, abs=1e-6)
    c = P.edm_coefficients(jnp.float32(0.5), 0.5)
    assert float(c["c_skip"]) == pytest.approx(0.5) and float(c["c_in"]) == pytest.approx(math.sqrt(2))


@pytest.mark.parametrize("sched_name", ["edm", "vp", "ddpm"])
def test_edm_preconditioning_matches_ve_equivalent(sched_name):
    """D(x~; s) = c_skip x~ + c_out F(c_in x~; c_noise) with x~ = z / alpha, s = sigma / alpha (Karras et al. 2022, eq. 7)."""
    sched = SCHEDS[sched_name]
    p = param("edm", sigma_data=0.7)

    def compute():
        x, eps, t, z = sample(3, sched)
        alpha, sigma = P.coefficients(z, t, sched)
        c = P.edm_coefficients(sigma / alpha, 0.7)
        z_in, c_noise = p.model_inputs(z, t, sched)
        f = jax.random.normal(jax.random.PRNGKey(5), z.shape)
        x0, _ = p.to_x0_eps(f, z, t, sched)
        return dict(
            z_in=(z_in, c["c_in"] * z / alpha), c_noise=(c_noise, c["c_noise"].reshape(-1)),
            x0=(x0, c["c_skip"] * z / alpha + c["c_out"] * f),
        )

    for key, (got, expect) in run_jit(compute).items():
        np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-5, err_msg=key)


def test_noise_conditioning_conventions():
    def compute():
        t = jnp.array([0.001, 0.5, 1.0])
        z = jnp.zeros((3, 2))
        return dict(
            continuous=param("eps").model_inputs(z, t, SCHEDS["vp"])[1],
            discrete=param("v").model_inputs(z, t, SCHEDS["ddpm"])[1],
            edm=param("edm").model_inputs(z, t, SCHEDS["edm"])[1],
            log_sigma=jnp.log(SCHEDS["edm"].alpha_sigma(t)[1]),
        )

    r = run_jit(compute)
    np.testing.assert_allclose(r["continuous"], [1, 500, 1000], rtol=1e-6)
    np.testing.assert_allclose(r["discrete"], [0, 499, 999], atol=1e-3)
    np.testing.assert_allclose(r["edm"], r["log_sigma"] / 4, rtol=1e-5)


@pytest.mark.parametrize("T", [1000, 4000, 10])
def test_discrete_c_noise_is_the_integer_step(T):
    """Every grid time t_i = (i + 1) / T gives c_noise exactly i (float32 rounding used to leave 575 of 1000
    indices off by up to 6e-5); a time between grid points keeps its fractional index."""
    sched = S.DiscreteVP.from_betas(S.linear_betas(T))
    z = jnp.zeros((T, 1))
    c = jax.jit(lambda t: param("eps").model_inputs(z, t, sched)[1])(S.step_to_t(jnp.arange(T), T))
    np.testing.assert_array_equal(c, np.arange(T, dtype=np.float32))
    mid = jax.jit(lambda t: P.noise_conditioning(t, sched))(jnp.float32(0.5 + 0.25 / T))
    assert float(mid) == pytest.approx(0.5 * T - 0.75, abs=1e-3)


def test_zero_terminal_snr_v_and_edm_are_finite():
    """At alpha = 0 (Lin et al. 2024) v gives x0 = -v, eps = z; EDM stays finite too."""
    sched = SCHEDS["cosine-zt"]

    def compute():
        z = jax.random.normal(jax.random.PRNGKey(0), (2, 4))
        out = jax.random.normal(jax.random.PRNGKey(1), (2, 4))
        t = jnp.ones((2,))
        p = param("edm")
        return dict(z=z, out=out, v=param("v").to_x0_eps(out, z, t, sched), edm_in=p.model_inputs(z, t, sched),
                    edm=p.to_x0_eps(out, z, t, sched))

    r = run_jit(compute)
    np.testing.assert_allclose(r["v"][0], -r["out"], atol=1e-6)
    np.testing.assert_allclose(r["v"][1], r["z"], atol=1e-6)
    assert all(np.all(np.isfinite(a)) for a in jax.tree_util.tree_leaves((r["edm_in"], r["edm"])))
    np.testing.assert_allclose(r["edm"][1], r["z"], atol=1e-6)


def test_bfloat16_output_gives_float32():
    sched = SCHEDS["vp"]

    def compute():
        x, eps, t, z = sample(0, sched)
        return {name: param(name).to_x0_eps(eps.astype(jnp.bfloat16), z, t, sched) for name in NAMES}

    for name, (x0, e) in run_jit(compute).items():
        assert x0.dtype == np.float32 and e.dtype == np.float32, name


def test_thresholding():
    """Static clipping and dynamic thresholding (Saharia et al. 2022, sec. 2.3)."""
    x = jnp.stack([jnp.linspace(-0.5, 0.5, 100), jnp.linspace(-4.0, 4.0, 100)]).reshape(2, 10, 10)

    def compute(x):
        return dict(
            clip=P.clip_x0(x), dyn=P.dynamic_threshold(x, 0.9), dyn_pct=P.dynamic_threshold(x, 90.0),
            thr_clip=P.threshold_x0(x, clip=True), thr_dyn=P.threshold_x0(x, clip=True, dynamic=0.9),
            thr_none=P.threshold_x0(x), grad=jax.grad(lambda a: P.dynamic_threshold(a, 0.99).sum())(x),
        )

    r, x = run_jit(compute, x), np.asarray(x)
    np.testing.assert_array_equal(r["clip"], np.clip(x, -1, 1))
    np.testing.assert_allclose(r["dyn"][0], x[0], atol=1e-7)  # quantile below 1 -> s = 1, untouched
    s = np.quantile(np.abs(x[1]), 0.9)
    np.testing.assert_allclose(r["dyn"][1], np.clip(x[1], -s, s) / s, rtol=1e-5)
    assert np.abs(r["dyn"]).max() <= 1.0
    np.testing.assert_allclose(r["dyn_pct"], r["dyn"])  # percent or quantile
    np.testing.assert_allclose(r["thr_clip"], r["clip"])
    np.testing.assert_allclose(r["thr_dyn"], r["dyn"])
    np.testing.assert_allclose(r["thr_none"], x)
    assert np.all(np.isfinite(r["grad"]))


def test_split_learned_variance():
    out = jnp.arange(2 * 3 * 6, dtype=jnp.float32).reshape(2, 3, 6)
    mean, v = P.split_learned_variance(out, 3)
    np.testing.assert_array_equal(mean, out[..., :3])
    np.testing.assert_array_equal(v, out[..., 3:])
    same, none = P.split_learned_variance(out, 6)
    assert none is None and same is out
    with pytest.raises(ValueError, match="channels"):
        P.split_learned_variance(out, 4)
    lo, hi = jnp.log(0.1), jnp.log(0.2)
    np.testing.assert_allclose(P.interpolate_log_variance(jnp.array([-1.0, 1.0, 0.0]), lo, hi), [lo, hi, (lo + hi) / 2])


def test_unknown_prediction_lists_names():
    with pytest.raises(ValueError, match="Valid names: edm, eps, flow, score, v, x0"):
        param("epsilon")


def test_flow_target_closed_forms():
    """Flow target = path velocity (Lipman et al. 2023, eq. 15): eps - x for rectified flow, with x0 = z - t u and
    eps = z + (1 - t) u, exact at t = 0 and t = 1; for a VP schedule alpha' x + sigma' eps by finite differences."""
    p = param("flow")

    def compute():
        x, eps, _, _ = sample(2, SCHEDS["rf"])
        t = jnp.array([0.0, 0.3, 0.7, 1.0])
        z = P.coefficients(x, t, SCHEDS["rf"])[0] * x + P.coefficients(x, t, SCHEDS["rf"])[1] * eps
        u = jax.random.normal(jax.random.PRNGKey(3), x.shape)
        tv = jnp.array([0.2, 0.4, 0.6, 0.8])
        vp = SCHEDS["vp"]
        alpha, sigma = P.coefficients(x, tv, vp)
        zv = alpha * x + sigma * eps
        h = 1e-3
        (a_hi, s_hi), (a_lo, s_lo) = P.coefficients(x, tv + h, vp), P.coefficients(x, tv - h, vp)
        return dict(
            x=x, eps=eps, z=z, u=u, t=t, target=p.from_x0_eps(x, eps, z, t, SCHEDS["rf"]),
            read=p.to_x0_eps(u, z, t, SCHEDS["rf"]), k=p.eps_mse_factor(t, SCHEDS["rf"]),
            vp_target=p.from_x0_eps(x, eps, zv, tv, vp),
            vp_fd=((a_hi - a_lo) * x + (s_hi - s_lo) * eps) / (2 * h),
        )

    r = run_jit(compute)
    tb = r["t"].reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(r["target"], r["eps"] - r["x"], atol=1e-6)
    np.testing.assert_allclose(r["read"][0], r["z"] - tb * r["u"], atol=1e-6)
    np.testing.assert_allclose(r["read"][1], r["z"] + (1 - tb) * r["u"], atol=1e-6)
    np.testing.assert_allclose(r["k"], (1 - r["t"]) ** 2, atol=1e-7)
    np.testing.assert_allclose(r["vp_target"], r["vp_fd"], rtol=2e-3, atol=2e-3)

"""Noise schedules against published values, closed forms and their own inverses / SDEs."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.default import get_config
from diffax import schedules as S


def fast_jit(fn):
    """jax.jit compiled without XLA's expensive CPU optimisations: these tests compile far more than they run."""

    def call(*args):
        return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)

    return call


FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def make(name, num_steps=0, zero_terminal_snr=False, image_size=64, **overrides):
    cfg = get_config().diffusion
    cfg.schedule, cfg.num_steps, cfg.zero_terminal_snr = name, num_steps, zero_terminal_snr
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return S.get_schedule(cfg, image_size=image_size)


# every schedule in continuous time; the discrete table built from betas and from a continuous
# schedule; the zero-terminal-SNR table rescale and the continuous wrapper over several bases
CASES = (
    [(n, 0, False) for n in S.SCHEDULES.names()]
    + [("linear", 1000, False), ("cosine", 1000, False), ("sigmoid", 1000, False)]
    + [("linear", 1000, True), ("vp", 0, True), ("cosine", 0, True), ("sigmoid", 0, True), ("scaled_linear", 0, True)]
)
ZT_CASES = [("linear", 1000), ("cosine", 1000), ("vp", 0), ("cosine", 0), ("sigmoid", 0), ("shifted_cosine", 0), ("scaled_linear", 0)]
IDS = [f"{n}-T{T}{'-zt' if zt else ''}" for n, T, zt in CASES]


def f64(a):
    return np.asarray(a, np.float64)


# ----------------------------------------------------------------------------- published values
def test_ddpm_linear_alpha_bar():
    """Ho et al. 2020: betas 1e-4..0.02 over 1000 steps give alpha_bar_1000 ~ 4.04e-5."""
    sched = make("linear", 1000)
    betas = np.linspace(1e-4, 0.02, 1000)
    ab = np.cumprod(1.0 - betas)
    assert ab[-1] == pytest.approx(4.04e-5, rel=2e-3)
    alpha, sigma = fast_jit(sched.alpha_sigma)(jnp.array([1 / 1000, 0.5, 1.0]))
    np.testing.assert_allclose(f64(alpha) ** 2, ab[[0, 499, 999]], rtol=2e-5)
    np.testing.assert_allclose(f64(sigma) ** 2, 1 - ab[[0, 499, 999]], rtol=2e-5)
    np.testing.assert_allclose(sched.betas(), betas, rtol=1e-10)
    assert float(alpha[-1]) ** 2 == pytest.approx(4.04e-5, rel=2e-3)


def test_cosine_alpha_bar_matches_nichol_dhariwal():
    """Discrete cosine with the 0.999 clip (Nichol & Dhariwal 2021, eq. 17) computed independently."""
    T, s = 1000, 0.008
    f = lambda t: np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    betas = np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)])
    ab = np.cumprod(1 - betas)
    steps = np.array([0, 9, 99, 499, 899, 989, 999])
    t = np.array([0.001, 0.1, 0.5, 0.9, 0.99, 1.0])
    discrete, continuous = make("cosine", T), make("cosine")
    r = fast_jit(lambda td, tc: (discrete.alpha_sigma(td)[0], continuous.alpha_sigma(tc)))(
        jnp.asarray((steps + 1) / T), jnp.asarray(t)
    )
    np.testing.assert_allclose(f64(r[0]) ** 2, ab[steps], rtol=1e-4)
    assert betas[-1] == 0.999  # the clip is active at the last step
    # continuous cosine is f(t) / f(0) itself, with alpha(1) = 0 exactly
    alpha, sigma = r[1]
    np.testing.assert_allclose(f64(alpha) ** 2, f(t * T) / f(0), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(f64(sigma) ** 2, 1 - f(t * T) / f(0), rtol=1e-4)
    assert float(alpha[-1]) == 0.0


def test_vp_sde_marginal_mean_song_eq33():
    """Song et al. 2021, eq. 33: mean coefficient exp(-1/4 t^2 (bmax - bmin) - 1/2 t bmin)."""
    t = np.linspace(0.0, 1.0, 11)
    for name in ("vp", "linear"):
        alpha, sigma = make(name).alpha_sigma(jnp.asarray(t))
        expect = np.exp(-0.25 * t**2 * (20 - 0.1) - 0.5 * t * 0.1)
        np.testing.assert_allclose(f64(alpha), expect, rtol=1e-6)
        np.testing.assert_allclose(f64(sigma) ** 2, 1 - expect**2, rtol=1e-5, atol=1e-7)
    alpha, sigma = make("subvp").alpha_sigma(jnp.asarray(t))
    np.testing.assert_allclose(f64(alpha), np.exp(-0.25 * t**2 * 19.9 - 0.05 * t), rtol=1e-6)
    np.testing.assert_allclose(f64(sigma), 1 - np.exp(-0.5 * t**2 * 19.9 - 0.1 * t), rtol=1e-5, atol=1e-7)


def test_scaled_linear_stable_diffusion():
    """Stable Diffusion: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2; alpha_bar_999 ~ 0.00466."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    ab = np.cumprod(1 - betas)
    assert ab[-1] == pytest.approx(0.00466, rel=1e-2)
    discrete, continuous = make("scaled_linear", 1000), make("scaled_linear")
    a_d, a_c = fast_jit(lambda t: (discrete.alpha_sigma(t)[0], continuous.alpha_sigma(t)[0]))(jnp.asarray([0.001, 0.25, 1.0]))
    np.testing.assert_allclose(f64(a_d) ** 2, ab[[0, 249, 999]], rtol=2e-5)
    # the continuous limit: -log alpha_bar = sum beta ~ integral, within 1 % at t = 1
    assert -2 * math.log(float(a_c[-1])) == pytest.approx(betas.sum(), rel=1e-2)


def test_ve_edm_sigma():
    """VE sigma_min (sigma_max / sigma_min)^t (Song et al. 2021, eq. 30) and EDM's rho = 7 mapping (Karras et al. 2022, eq. 5)."""
    t = np.array([0.0, 0.5, 1.0])
    alpha, sigma = make("ve").alpha_sigma(jnp.asarray(t))
    np.testing.assert_allclose(f64(sigma), 0.01 * (50 / 0.01) ** t, rtol=1e-5)
    np.testing.assert_allclose(f64(alpha), 1.0)
    _, sigma = make("edm").alpha_sigma(jnp.asarray(t))
    lo, hi = 0.002 ** (1 / 7), 80 ** (1 / 7)
    np.testing.assert_allclose(f64(sigma), (lo + t * (hi - lo)) ** 7, rtol=1e-5)
    assert float(sigma[0]) == pytest.approx(0.002, rel=1e-5) and float(sigma[-1]) == pytest.approx(80, rel=1e-5)


def test_shifted_cosine_and_sigmoid():
    """Hoogeboom et al. 2023 shift 2 log(64 / d); Chen 2023 sigmoid alpha_bar."""
    t = jnp.linspace(0.05, 0.95, 7)
    base = make("shifted_cosine", image_size=64)
    shifted = make("shifted_cosine", image_size=256)
    np.testing.assert_allclose(shifted.logsnr(t) - base.logsnr(t), 2 * math.log(64 / 256), atol=1e-4)
    np.testing.assert_allclose(f64(base.logsnr(jnp.array([0.0, 1.0]))), [15.0, -15.0], atol=1e-3)
    tt = np.asarray(t, np.float64)
    expect = -2 * np.log(np.tan(np.arctan(np.exp(-7.5)) + tt * (np.arctan(np.exp(7.5)) - np.arctan(np.exp(-7.5)))))
    np.testing.assert_allclose(f64(base.logsnr(t)), expect, rtol=1e-5, atol=1e-5)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    expect = (sig(3) - sig(tt * 6 - 3)) / (sig(3) - sig(-3))
    alpha, _ = make("sigmoid").alpha_sigma(t)
    np.testing.assert_allclose(f64(alpha) ** 2, expect, rtol=1e-5)
    with pytest.raises(ValueError, match="image_size"):
        make("shifted_cosine", image_size=None)


# ----------------------------------------------------------------------------- structure
def jitted(sched, fn):
    """fn(sched, *args) under one jit; a learned (nnx) schedule goes through split / merge."""
    if isinstance(sched, nnx.Module):
        graphdef, state = nnx.split(sched)
        f = fast_jit(lambda state, *a: fn(nnx.merge(graphdef, state), *a))
        return lambda *a: f(state, *a)
    return fast_jit(lambda *a: fn(sched, *a))


def invariants(sched, t, t_sde):
    lam = sched.logsnr(t)
    lam_grid = jnp.linspace(sched.logsnr(0.99), sched.logsnr(0.01), 33)
    alpha, sigma = sched.alpha_sigma(t)
    f, g2 = sched.sde(t_sde)

    def log_alpha_var(t):
        alpha, sigma = sched.alpha_sigma(t)
        return jnp.log(alpha), sigma**2

    (_, var), (dla, dvar) = jax.jvp(log_alpha_var, (t_sde,), (jnp.ones_like(t_sde),))
    return dict(
        lam=lam, back=sched.t_from_logsnr(lam), lam_grid=lam_grid,
        lam_grid_back=sched.logsnr(sched.t_from_logsnr(lam_grid)), alpha=alpha, sigma=sigma,
        f=f, g2=g2, dla=dla, g2_autodiff=dvar - 2 * dla * var,
    )


@pytest.mark.parametrize("name,T,zt", CASES, ids=IDS)
def test_inverse_and_sde(name, T, zt):
    """t_from_logsnr inverts logsnr; alpha, sigma agree with logsnr; f = d log alpha/dt and
    g^2 = d sigma^2/dt - 2 f sigma^2 (Kingma et al. 2021, eq. 28-29) by autodiff of the marginals."""
    sched = make(name, T, zt)
    t = jnp.concatenate([jnp.linspace(0.002, 0.998, 101), jax.random.uniform(jax.random.PRNGKey(0), (64,))])
    t_sde = jnp.linspace(0.0113, 0.9813, 29)  # off the 1/1000 grid
    r = jitted(sched, invariants)(t, t_sde)
    assert bool(jnp.all(jnp.diff(r["lam"][:101]) < 0)), "logsnr must decrease"
    np.testing.assert_allclose(r["back"], t, atol=2e-5)
    np.testing.assert_allclose(r["lam_grid_back"], r["lam_grid"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(2 * (jnp.log(r["alpha"]) - jnp.log(r["sigma"])), r["lam"], rtol=1e-4, atol=1e-4)
    if sched.variance_preserving:
        np.testing.assert_allclose(r["alpha"] ** 2 + r["sigma"] ** 2, 1.0, atol=1e-6)
    np.testing.assert_allclose(r["f"], r["dla"], rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(r["g2"], r["g2_autodiff"], rtol=2e-3, atol=1e-4)
    assert bool(jnp.all(r["g2"] > 0))


def test_discrete_sde_is_beta_per_step():
    """Between grid points beta(t) = -T log(1 - beta_i): g^2 by finite differences of the marginals."""
    sched = make("linear", 1000)
    betas = np.linspace(1e-4, 0.02, 1000)
    i = np.array([3, 400, 998])
    t = (i + 0.5) / 1000  # inside step i+1's interval ((i)/T, (i+1)/T] -> beta index i
    f, g2 = sched.sde(jnp.asarray(t))
    np.testing.assert_allclose(f64(g2), -1000 * np.log1p(-betas[i]), rtol=1e-3)
    np.testing.assert_allclose(f64(f), 0.5 * 1000 * np.log1p(-betas[i]), rtol=1e-3)


@pytest.mark.parametrize("name,T", ZT_CASES, ids=[f"{n}-T{T}" for n, T in ZT_CASES])
def test_zero_terminal_snr(name, T):
    """Lin et al. 2024, Alg. 1: terminal alpha exactly 0, logsnr clamped finite, first step kept."""
    sched, base = make(name, T, True), make(name, T, False)
    t_first = 1.0 / T if T else 0.0
    grid = jnp.arange(1, max(T, 1) + 1) / max(T, 1)

    def values():
        alpha, sigma = sched.alpha_sigma(jnp.float32(1.0))
        return dict(
            alpha=alpha, sigma=sigma, lam=sched.logsnr(1.0), t_end=sched.t_from_logsnr(-S.LOGSNR_CLAMP),
            dlam=jax.grad(sched.logsnr)(0.5), dalpha=jax.grad(lambda t: sched.alpha_sigma(t)[0])(jnp.float32(0.999)),
            first=sched.alpha_sigma(t_first)[0], first_base=base.alpha_sigma(t_first)[0],
            grid=sched.alpha_sigma(grid)[0],
        )

    r = fast_jit(values)()
    assert float(r["alpha"]) == 0.0 and float(r["sigma"]) == 1.0
    assert float(r["lam"]) == -S.LOGSNR_CLAMP
    assert float(r["t_end"]) > 0.999
    assert bool(jnp.isfinite(r["dlam"])) and bool(jnp.isfinite(r["dalpha"]))
    np.testing.assert_allclose(r["first"], r["first_base"], rtol=1e-6)
    if T:  # diffusers' rescale_zero_terminal_snr on the sqrt(alpha_bar) table, computed independently
        a = np.exp(0.5 * np.asarray(base.log_alpha_bar))
        np.testing.assert_allclose(f64(r["grid"]), (a - a[-1]) * a[0] / (a[0] - a[-1]), rtol=1e-4, atol=1e-7)


def test_zero_terminal_snr_rejects_non_vp():
    for name in ("ve", "edm", "subvp", "learned"):
        with pytest.raises(ValueError, match="variance-preserving"):
            make(name, 0, True)


def test_unknown_schedule_lists_names():
    with pytest.raises(ValueError, match="Valid names: cosine, edm"):
        make("cosnie")


def test_schedules_pass_through_jit():
    """Fixed schedules are static pytrees: a jitted function can take them as arguments."""
    calls = []

    @jax.jit
    def f(sched, t):
        calls.append(1)
        return sched.alpha_sigma(t)[0]

    for T in (0, 1000):
        sched = make("cosine", T)
        np.testing.assert_allclose(f(sched, jnp.float32(0.3)), sched.alpha_sigma(0.3)[0], rtol=1e-6)
        f(make("cosine", T), jnp.float32(0.4))  # equal schedules hit the cache
    assert len(calls) == 2
    vmapped = jax.vmap(make("vp").t_from_logsnr)(jnp.array([1.0, 0.0, -1.0]))
    assert bool(jnp.all(jnp.diff(vmapped) > 0))


def test_step_index_helpers():
    assert float(S.step_to_t(0, 1000)) == pytest.approx(1e-3)
    np.testing.assert_array_equal(S.t_to_step(S.step_to_t(jnp.arange(1000), 1000), 1000), np.arange(1000))


def test_learned_schedule_trains():
    """VDM learned schedule: monotone, endpoints from config, gradients into its parameters."""
    sched = make("learned", learned_logsnr_min=-10.0, learned_logsnr_max=12.0)
    assert isinstance(sched, nnx.Module) and isinstance(sched, S.Schedule)

    def check(s):
        def objective(s):
            return jnp.sum(s.alpha_sigma(jnp.array([0.2, 0.6]))[1]) + s.t_from_logsnr(jnp.float32(1.0))

        lam = jnp.float32(2.0)
        return dict(
            ends=s.logsnr(jnp.array([0.0, 1.0])), lam=s.logsnr(jnp.linspace(0, 1, 50)),
            grads=nnx.grad(objective)(s), dt=jax.grad(s.t_from_logsnr)(lam),
            dlam=jax.grad(s.logsnr)(s.t_from_logsnr(lam)),
        )

    r = jitted(sched, check)()
    np.testing.assert_allclose(f64(r["ends"]), [12.0, -10.0], atol=1e-4)
    assert bool(jnp.all(jnp.diff(r["lam"]) < 0))
    leaves = jax.tree_util.tree_leaves(r["grads"])
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves)
    # implicit gradient of the inverse: dt/dlambda = 1 / lambda'(t)
    assert float(r["dt"]) == pytest.approx(1.0 / float(r["dlam"]), rel=1e-3)

    # Training: Adam on the squared error to a curved target with other end points (7 and -7) moves
    # the schedule onto it (VDM trains these parameters by gradient), and it stays monotone.
    import optax

    t = jnp.linspace(0.0, 1.0, 64)
    target = 7.0 - 14.0 * t**2
    graphdef, params = nnx.split(sched, nnx.Param)
    tx = optax.adam(3e-2)

    def error(params):
        return jnp.mean((nnx.merge(graphdef, params).logsnr(t) - target) ** 2)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def train(params):
        def step(carry, _):
            params, opt_state = carry
            updates, opt_state = tx.update(jax.grad(error)(params), opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=2000)
        return params

    before, trained = float(error(params)), train(params)
    after, target = f64(nnx.merge(graphdef, trained).logsnr(t)), f64(target)
    assert float(error(trained)) < 1e-3 * before, (before, float(error(trained)), after[[0, 32, -1]])
    np.testing.assert_allclose(after[[0, -1]], target[[0, -1]], atol=0.1)
    assert np.all(np.diff(after) < 0)

# ----------------------------------------------------------------------------- rectified flow and time shifts
def test_rectified_flow_closed_forms():
    """alpha = 1 - t, sigma = t (Liu et al. 2023; Esser et al. 2024): logsnr 2 log((1 - t) / t), inverse
    sigmoid(-lambda / 2) with the clamp values at the end points, derivatives (-1, 1), SDE f = -1/(1-t), g^2 = 2t/(1-t)."""
    sched = make("rectified_flow")
    t = np.array([0.0, 1e-3, 0.25, 0.5, 0.9, 1.0])
    r = fast_jit(lambda t: dict(
        ab=sched.alpha_sigma(t), lam=sched.logsnr(t[1:-1]), back=sched.t_from_logsnr(jnp.array([-30.0, 30.0, -2.0])),
        dt=sched.alpha_sigma_dt(t), generic=S.Schedule.alpha_sigma_dt(sched, t), sde=sched.sde(t[:-1]),
    ))(jnp.asarray(t, jnp.float32))
    np.testing.assert_array_equal(r["ab"][0], 1 - t.astype(np.float32))
    np.testing.assert_array_equal(r["ab"][1], t.astype(np.float32))
    tm = t[1:-1]
    np.testing.assert_allclose(f64(r["lam"]), 2 * np.log((1 - tm) / tm), rtol=1e-5)
    np.testing.assert_allclose(f64(r["back"]), [1.0, 0.0, 1 / (1 + np.exp(-1.0))], rtol=1e-6)
    np.testing.assert_array_equal(r["dt"][2], -1.0)
    np.testing.assert_array_equal(r["dt"][3], 1.0)
    for closed, autodiff in zip(r["dt"], r["generic"]):  # the override agrees with the generic autodiff
        np.testing.assert_allclose(closed, autodiff, atol=1e-6)
    np.testing.assert_allclose(f64(r["sde"][0]), -1 / (1 - t[:-1]), rtol=1e-6)
    np.testing.assert_allclose(f64(r["sde"][1]), 2 * t[:-1] / (1 - t[:-1]), rtol=1e-5, atol=1e-9)


def test_shift_time_esser_eq23():
    """t -> s t / (1 + (s - 1) t) multiplies sigma / alpha of rectified flow by s (Esser et al. 2024, eq. 23):
    logsnr drops by 2 log s; identity at s = 1; fixes 0 and 1; derivative s / (1 + (s - 1) t)^2 = autodiff."""
    sched = make("rectified_flow")
    t = jnp.linspace(0.01, 0.99, 23)
    for s in (1.0, 3.0, 0.5):
        ts = S.shift_time(t, s)
        np.testing.assert_allclose(f64(sched.logsnr(ts)), f64(sched.logsnr(t)) - 2 * math.log(s), atol=2e-4)
        np.testing.assert_allclose(f64(S.shift_time(jnp.array([0.0, 1.0]), s)), [0.0, 1.0], atol=1e-7)
        np.testing.assert_allclose(S.shift_time_derivative(t, s), jax.vmap(jax.grad(lambda u: S.shift_time(u, s)))(t), rtol=1e-5)
    np.testing.assert_allclose(S.shift_time(t, 1.0), t, rtol=1e-7)


def test_flux_shift_matches_calculate_shift():
    """diffusers' FluxPipeline calculate_shift: mu = m L + b with m = (1.15 - 0.5) / (4096 - 256), b = 0.5 - 256 m."""
    m = (1.15 - 0.5) / (4096 - 256)
    b = 0.5 - m * 256
    for seq_len in (256, 1024, 4096, 8192):
        assert float(S.flux_shift(seq_len)) == pytest.approx(math.exp(seq_len * m + b), rel=1e-6)
    m = (2.0 - 1.0) / (100 - 10)
    assert float(S.flux_shift(40, base_seq_len=10, max_seq_len=100, base_shift=1.0, max_shift=2.0)) == pytest.approx(
        math.exp(40 * m + 1.0 - 10 * m), rel=1e-6)

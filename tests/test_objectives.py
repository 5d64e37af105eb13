"""Training objectives against closed forms for Gaussian data, plus every schedule x prediction x weighting."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.default import get_config
from diffax import objectives as O
from diffax import parameterization as P
from diffax import schedules as S
from tests import analytic as A


FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run_jit(fn, *args):
    """Run fn under jax.jit compiled without XLA's expensive CPU passes (these tests compile more than they run)."""
    return jax.device_get(jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args))


def config(**overrides):
    cfg = get_config().diffusion
    cfg.num_steps = 0  # continuous time unless a test says otherwise
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def exact_apply(sched, par, mu, s):
    """The exact posterior-mean network for x ~ N(mu, diag(s^2)), in `par`'s output space."""

    def apply_fn(z_in, c_noise, labels):
        if isinstance(par, P.EDMPrediction):
            t = sched.t_from_logsnr(-8.0 * c_noise)
        elif sched.num_steps > 0:
            t = (c_noise + 1.0) / sched.num_steps
        else:
            t = c_noise / 1000.0
        alpha, sigma = P.coefficients(z_in, t, sched)
        z = z_in * jnp.sqrt(sigma**2 + alpha**2 * par.sigma_data**2) if isinstance(par, P.EDMPrediction) else z_in
        x0 = A.gaussian_x0(z, t, sched, mu, s)
        eps = A.gaussian_eps(z, t, sched, mu, s)
        return par.from_x0_eps(x0, eps, z, t, sched)

    return apply_fn


def gaussian_data(batch, dim, seed=1, scale=3.0):
    mu = jnp.linspace(-1.0, 1.0, dim)
    s = scale * jnp.linspace(0.5, 1.5, dim)
    x = mu + s * jax.random.normal(jax.random.PRNGKey(seed), (batch, dim))
    return x, mu, s


# ----------------------------------------------------------------------------- closed forms
def _x0_var(t, sched, s):
    return A.gaussian_x0_mse(t, sched, s)  # Var(x | z_t) per dim, [B, D]


IRREDUCIBLE = {
    # weighting -> expected loss per dim of the exact denoiser, from Var(x | z_t) = V, in x0-space terms
    "simple": lambda V, a, sg, cfg: V * a**2 / sg**2,  # eps-MSE = SNR V
    "x0": lambda V, a, sg, cfg: V,
    "v": lambda V, a, sg, cfg: V * (a**2 + sg**2) ** 2 / sg**2,
    "min_snr": lambda V, a, sg, cfg: jnp.minimum(a**2 / sg**2, cfg.min_snr_gamma) * V,
    "edm": lambda V, a, sg, cfg: ((sg / a) ** 2 + cfg.sigma_data**2) / ((sg / a) * cfg.sigma_data) ** 2 * V,
}


@pytest.mark.parametrize(
    "schedule,prediction,weighting",
    [("cosine", "eps", "simple"), ("vp", "x0", "x0"), ("cosine", "v", "v"), ("edm", "edm", "edm"),
     ("linear", "score", "min_snr"), ("ve", "eps", "x0")],
)
def test_exact_denoiser_loss_is_irreducible_error(schedule, prediction, weighting):
    """The posterior mean's loss equals the weighted posterior variance (closed form for Gaussian data)."""
    cfg = config(schedule=schedule, prediction=prediction, weighting=weighting, time_sampling="antithetic")
    sched, par = S.get_schedule(cfg), P.get_parameterization(cfg)
    x, mu, s = gaussian_data(4096, 16, scale=0.5)
    loss_fn = O.make_loss_fn(cfg, par)
    loss, aux = run_jit(lambda x, k: loss_fn(exact_apply(sched, par, mu, s), sched, x, k), x, jax.random.PRNGKey(2))
    t = aux["t"]
    a, sg = (v[:, None] for v in sched.alpha_sigma(t))
    expect = IRREDUCIBLE[weighting](_x0_var(t, sched, s), a, sg, cfg).mean(-1)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss.mean(), expect.mean(), rtol=0.03)


def test_continuous_elbo_equals_gaussian_nll():
    """VDM continuous-time ELBO (diffusion + prior + reconstruction) of the exact denoiser == -log p(x) within 1 %."""
    cfg = config(schedule="shifted_cosine", prediction="eps", weighting="elbo", time_sampling="antithetic",
                 logsnr_min=-8.0, logsnr_max=8.0, time_logsnr_min=-8.0, time_logsnr_max=8.0)
    sched, par = S.get_schedule(cfg, image_size=cfg.shift_resolution), P.get_parameterization(cfg)
    x, mu, s = gaussian_data(8192, 128)
    loss_fn = O.make_loss_fn(cfg, par)
    loss, aux = run_jit(lambda x, k: loss_fn(exact_apply(sched, par, mu, s), sched, x, k), x, jax.random.PRNGKey(3))
    nll = -A.gaussian_logpdf(x, mu, s) / x.shape[-1]  # nats per dim
    assert float(loss.mean()) == pytest.approx(float(nll.mean()), rel=0.01)
    # the recon term is the Gaussian decoder's expected NLL at lambda_0 = logsnr_max
    np.testing.assert_allclose(aux["elbo_recon"], 0.5 * (math.log(2 * math.pi) + 1 - 8.0), rtol=1e-5)
    # importance-weighted logsnr-uniform sampling estimates the same bound (iid draws: looser tolerance)
    cfg.time_sampling = "logsnr_uniform"
    loss_fn = O.make_loss_fn(cfg, par)
    loss2, _ = run_jit(lambda x, k: loss_fn(exact_apply(sched, par, mu, s), sched, x, k), x, jax.random.PRNGKey(4))
    assert float(loss2.mean()) == pytest.approx(float(nll.mean()), rel=0.05)


def test_discrete_elbo_equals_analytic_bound():
    """Discrete-time VLB (Kingma et al. 2021, eq. 13; Ho et al. 2020, eq. 5) of the exact denoiser vs its closed form."""
    T = 100
    cfg = config(schedule="linear", num_steps=T, prediction="eps", weighting="elbo", time_sampling="antithetic")
    sched, par = S.get_schedule(cfg), P.get_parameterization(cfg)
    x, mu, s = gaussian_data(8192, 64)
    loss_fn = O.make_loss_fn(cfg, par)
    loss, aux = run_jit(lambda x, k: loss_fn(exact_apply(sched, par, mu, s), sched, x, k), x, jax.random.PRNGKey(5))
    # closed form in float64 from the betas
    ab = np.cumprod(1 - S.linear_betas(T))
    snr = ab / (1 - ab)
    s2 = np.asarray(s, np.float64) ** 2
    var_x = s2[None] / (1 + snr[:, None] * s2[None])  # [T, D]
    diffusion = 0.5 * ((snr[:-1] - snr[1:])[:, None] * var_x[1:]).sum(0)
    recon = 0.5 * (math.log(2 * math.pi) - np.log(snr[0])) + 0.5 * snr[0] * var_x[0]
    x64 = np.asarray(x, np.float64)
    prior = 0.5 * ((1 - ab[-1]) + ab[-1] * x64**2 - 1 - np.log(1 - ab[-1]))
    bound = (diffusion + recon).mean() + prior.mean()
    assert float(loss.mean()) == pytest.approx(bound, rel=0.03)
    # a bound on the NLL: looser than the continuous one, DDPM's first steps jump in logsnr by log((i+1)/i)
    nll = float(-A.gaussian_logpdf(x, mu, s).mean()) / x.shape[-1]
    assert nll < bound < nll + 2.0
    # the antithetic sampler visits every step of the grid equally often (8192 = 81 * 100 + 92)
    assert np.ptp(np.bincount(np.rint(aux["t"] * T).astype(int) - 1, minlength=T)) <= 1


def test_discrete_elbo_needs_uniform_steps():
    for overrides in (dict(time_sampling="lognormal"), dict(time_sampling="uniform", time_shift=3.0)):
        cfg = config(schedule="linear", num_steps=10, weighting="elbo", **overrides)
        with pytest.raises(ValueError, match="discrete-time ELBO"):  # raised before tracing
            O.make_loss_fn(cfg, P.get_parameterization(cfg))


# ----------------------------------------------------------------------------- weightings and time sampling
def weight_options(name, cfg):
    fn = O.WEIGHTINGS.get(name)
    return lambda ctx: fn(ctx, **O.options_from_config(fn, cfg))


def test_weighting_formulas():
    """Each weighting's eps-MSE multiplier against its paper's x0-space definition (SNR = e^lambda)."""
    cfg = config(min_snr_gamma=5.0, sigma_data=0.5, sigmoid_bias=-2.0)
    lam = np.linspace(-10.0, 10.0, 21)
    snr = np.exp(lam)
    sig = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
    expect = {
        "simple": np.ones_like(lam),
        "x0": 1 / snr,
        "v": (snr + 1) / snr,
        "flow": (1 + 1 / np.sqrt(snr)) ** 2,  # rectified flow: eps error = (1 - t) u error, 1 - t = 1 / (1 + snr^-1/2)
        "snr": snr / snr,
        "truncated_snr": np.maximum(snr, 1) / snr,
        "min_snr": np.minimum(snr, 5.0) / snr,
        "soft_min_snr": (snr * 5.0 / (snr + 5.0)) / snr,
        "edm": ((1 / snr + 0.25) / (0.25 / snr)) / snr,
        "sigmoid": 0.5 * 3.0 * sig(-2.0 - lam),  # -1/2 dlambda/dt w(lambda), dlambda/dt = -3
    }
    assert set(expect) | {"elbo"} == set(O.WEIGHTINGS.names())
    assert O.WEIGHTINGS.get("snr") is O.WEIGHTINGS.get("simple")  # one function, two names

    def compute(lam):
        a, sg = jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))
        ctx = O.WeightContext(t=lam, logsnr=lam, dlogsnr_dt=-3.0 * jnp.ones_like(lam), alpha=a, sigma=sg,
                              x=jnp.zeros((21, 2)), schedule=None)
        out = {name: weight_options(name, cfg)(ctx) for name in expect}
        ctx.logsnr_density = jnp.full_like(lam, 0.25)  # a logsnr-space sampler: 1/2 w / p(lambda)
        out["sigmoid_density"] = weight_options("sigmoid", cfg)(ctx)
        ctx.logsnr_density, ctx.time_density = None, jnp.full_like(lam, 0.5)  # a t-space sampler: -1/2 w lambda' / p(t)
        out["sigmoid_time_density"] = weight_options("sigmoid", cfg)(ctx)
        return out

    got = run_jit(compute, jnp.asarray(lam, jnp.float32))
    for name, value in expect.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, err_msg=name)
    np.testing.assert_allclose(got["sigmoid_density"], 2.0 * sig(-2.0 - lam), rtol=1e-5)
    np.testing.assert_allclose(got["sigmoid_time_density"], 3.0 * sig(-2.0 - lam), rtol=1e-5)


def test_time_samplers():
    cfg = config()
    cont, disc = S.VPLinear(), S.DiscreteVP.from_betas(S.linear_betas(10))
    edm, cos = S.EDM(), S.Cosine()

    def compute(key):
        out = dict(anti=O.antithetic_time(key, 64, cont).t, anti_disc=O.antithetic_time(key, 100, disc).t,
                   uniform_disc=O.uniform_time(key, 100, disc).t, disc=O.discrete_time(key, 100, disc).t)
        t = O.lognormal_time(key, 4096, edm, p_mean=cfg.p_mean, p_std=cfg.p_std).t
        out["log_sigma"] = jnp.log(edm.alpha_sigma(t)[1])
        t, _, out["density"] = O.logsnr_uniform_time(key, 4096, cos)
        out["lam"] = cos.logsnr(t)
        return out

    r = run_jit(compute, jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.diff(np.sort(r["anti"])), 1 / 64, atol=1e-5)
    assert np.all((r["anti"] > 0) & (r["anti"] <= 1))
    for name in ("anti_disc", "uniform_disc", "disc"):
        steps = r[name] * 10
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)
        assert steps.min() >= 1 - 1e-4 and steps.max() <= 10 + 1e-4
    assert np.all(np.bincount(np.rint(r["anti_disc"] * 10).astype(int) - 1, minlength=10) == 10)
    assert r["log_sigma"].mean() == pytest.approx(-1.2, abs=0.06) and r["log_sigma"].std() == pytest.approx(1.2, abs=0.06)
    assert r["lam"].min() >= -15.01 and r["lam"].max() <= 15.01 and abs(r["lam"].mean()) < 0.5
    np.testing.assert_allclose(r["density"], 1 / 30)
    with pytest.raises(ValueError, match="num_steps > 0"):
        O.discrete_time(jax.random.PRNGKey(0), 4, cont)


def test_label_dropout():
    """Labels become the null label num_classes with probability label_dropout (Ho & Salimans 2022)."""
    labels = jnp.arange(2000, dtype=jnp.int32) % 10
    r = run_jit(lambda k: {p: O.drop_labels(k, labels, p, 10) for p in (0.0, 0.3, 1.0)}, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(r[0.0], labels)
    assert np.all(r[1.0] == 10)
    assert np.mean(r[0.3] == 10) == pytest.approx(0.3, abs=0.04)
    assert np.all((r[0.3] == 10) | (r[0.3] == labels))
    # the loss wires it through: the network sees the dropped labels, or None without labels
    seen = {}

    def apply_fn(z, c, labels):
        seen["labels"] = labels
        return z

    cfg = config(label_dropout=1.0)

    def through_loss(x, key):
        loss, _ = O.make_loss_fn(cfg, P.get_parameterization(cfg), num_classes=10)(apply_fn, S.Cosine(), x, key, labels[:8])
        return loss, seen["labels"]

    loss, seen_labels = run_jit(through_loss, jnp.zeros((8, 2)), jax.random.PRNGKey(0))
    assert np.all(seen_labels == 10) and seen_labels.dtype == np.int32 and loss.shape == (8,)
    jax.eval_shape(lambda x, k: O.make_loss_fn(cfg, P.get_parameterization(cfg))(apply_fn, S.Cosine(), x, k), jnp.zeros((8, 2)), jax.random.PRNGKey(0))
    assert seen["labels"] is None


# ----------------------------------------------------------------------------- learned variance
def test_hybrid_loss_learned_variance():
    """Nichol & Dhariwal 2021: L_simple + 0.001 T L_vlb, stop-gradient on the mean, discrete time only."""
    with pytest.raises(ValueError, match="num_steps > 0"):
        O.make_loss_fn(config(num_steps=0), P.get_parameterization(config()), learn_sigma=True)
    T = 50
    cfg = config(schedule="cosine", num_steps=T, prediction="x0", time_sampling="antithetic")
    sched, par = S.get_schedule(cfg), P.get_parameterization(cfg)
    loss_fn = O.make_loss_fn(cfg, par, learn_sigma=True)
    x = jnp.round(jax.random.uniform(jax.random.PRNGKey(0), (100, 4, 4, 1), minval=-1, maxval=1) * 127.5) / 127.5

    def compute(x, key):
        # an oracle that knows x and picks v = -1 (the true posterior variance): KL = 0 on every step i >= 1
        oracle = lambda z, c, l: jnp.concatenate([x, -jnp.ones_like(x)], -1)  # noqa: E731
        loss, aux = loss_fn(oracle, sched, x, key)

        def objective(p):
            apply_fn = lambda z, c, l: jnp.concatenate([p["m"] * z, p["v"] * jnp.ones_like(z)], -1)  # noqa: E731
            loss, aux = loss_fn(apply_fn, sched, x, key)
            return aux["vlb"].mean(), loss.mean()

        g_vlb, g = jax.jacrev(objective)({"m": jnp.float32(0.9), "v": jnp.float32(0.2)})
        return loss, aux, g_vlb, g

    loss, aux, g_vlb, g = run_jit(compute, x, jax.random.PRNGKey(1))
    first = np.rint(aux["t"] * T).astype(int) == 1
    assert first.sum() == 2
    np.testing.assert_allclose(aux["vlb"][~first], 0.0, atol=1e-3)
    assert np.all(aux["vlb"][first] > 0) and np.all(np.isfinite(aux["vlb"]))
    np.testing.assert_allclose(loss, 0.001 * aux["vlb"], atol=1e-6)  # the mean is perfect: L_simple = 0
    assert g_vlb["m"] == 0.0 and g_vlb["v"] != 0.0  # only the variance learns from L_vlb
    assert all(np.isfinite(v) and v != 0.0 for v in g.values())


# ----------------------------------------------------------------------------- every combination
PREDICTIONS, WEIGHTINGS = P.PARAMETERIZATIONS.names(), O.WEIGHTINGS.names()


def expected_loss(weighting, c, sch, x, eps, out, t, pred):
    """The loss of `weighting` from its paper's definition, computed here from the network's (x0, eps) estimates and
    the schedule's alpha, sigma: independent of WEIGHTINGS and of the eps-MSE factors (a wrong sign or factor fails)."""
    mean = lambda a: jnp.mean(a.reshape(a.shape[0], -1), axis=-1)  # noqa: E731
    b = lambda a: a.reshape(a.shape + (1,) * (x.ndim - 1))  # noqa: E731
    a, sg = sch.alpha_sigma(t)
    z = b(a) * x + b(sg) * eps
    x0_hat, eps_hat = P.get_parameterization(c).to_x0_eps(out, z, t, sch)
    e, X = mean((eps_hat - eps) ** 2), mean((x0_hat - x) ** 2)
    snr = a**2 / sg**2
    log_snr = lambda u: jnp.log(sch.alpha_sigma(u)[0] ** 2) - jnp.log(sch.alpha_sigma(u)[1] ** 2)  # noqa: E731
    dlam = jax.jvp(log_snr, (t,), (jnp.ones_like(t),))[1]
    if weighting == "elbo":
        a1, s1 = (b(v) for v in sch.alpha_sigma(jnp.ones_like(t)))
        var_p = a1**2 + s1**2
        prior = mean(0.5 * ((s1**2 + a1**2 * x**2) / var_p - 1 - jnp.log(s1**2 / var_p)))
        T = sch.num_steps
        if T == 0:
            lam0 = S.clamp_logsnr(log_snr(jnp.zeros_like(t)))  # sigma_0 = 0 for VP: the documented clamp
            return -0.5 * dlam * e + prior + 0.5 * (math.log(2 * math.pi) + 1 - lam0)
        first = jnp.round(t * T) <= 1
        snr_prev = jnp.exp(log_snr(jnp.maximum(t - 1 / T, 0.0)))
        return jnp.where(first, 0.5 * T * (e + math.log(2 * math.pi) - jnp.log(snr)), 0.5 * T * (snr_prev / snr - 1) * e) + prior
    gamma, sd, s_ve = c.min_snr_gamma, c.sigma_data, sg / a
    return {
        "simple": e, "snr": e, "x0": X,
        "v": mean((b(a) * eps_hat - b(sg) * x0_hat - (b(a) * eps - b(sg) * x)) ** 2),
        "flow": mean((eps_hat - x0_hat - (eps - x)) ** 2),  # velocity of the rectified-flow path at this logsnr
        "truncated_snr": jnp.maximum(snr, 1) * X, "min_snr": jnp.minimum(snr, gamma) * X,
        "soft_min_snr": snr * gamma / (snr + gamma) * X, "edm": (s_ve**2 + sd**2) / (s_ve * sd) ** 2 * X,
        "sigmoid": -0.5 * dlam * jax.nn.sigmoid(c.sigmoid_bias - jnp.log(snr)) * e,
    }[weighting]


def combination_results(sched, name, T, combos, x, key, params):
    """Real loss_fn calls under one jit: loss, d loss / d(network, schedule params), eps-MSE, the loss expected
    from the weighting's definition, and every weighting's multiplier at the same sampled times (for finiteness)."""
    learned = isinstance(sched, nnx.Module)
    graphdef, sched_state = nnx.split(sched) if learned else (None, None)

    def run(params, sched_state, x, key):
        sch = nnx.merge(graphdef, sched_state) if learned else sched
        out = {}
        for pred, weighting in combos:
            c = config(schedule=name, num_steps=T, prediction=pred, weighting=weighting, time_sampling="uniform")
            par = P.get_parameterization(c)
            loss_fn = O.make_loss_fn(c, par)

            def net(params, z_in, cn):
                return (params["a"] * z_in + params["b"] * jnp.tanh(cn / 100.0)[:, None, None, None]).astype(jnp.bfloat16)

            def per_example(params, sched_state):
                s = nnx.merge(graphdef, sched_state) if learned else sched
                loss, aux = loss_fn(lambda z, cn, l: net(params, z, cn), s, x, key)
                return (loss, aux["eps_mse"]), dict(aux, loss=loss)

            (jac, jac_eps), aux = jax.jacrev(per_example, has_aux=True)(params, sched_state)
            if learned:  # the schedule's parameters train too: gradient of the batch loss
                jac = (jac, jax.grad(lambda st: per_example(params, st)[1]["loss"].mean())(sched_state))
            t = aux["t"]
            eps = jax.random.normal(jax.random.split(key, 3)[1], x.shape)  # the loss's own noise draw
            a, sg = (v.reshape(-1, 1, 1, 1) for v in sch.alpha_sigma(t))
            net_out = net(params, *par.model_inputs(a * x + sg * eps, t, sch)).astype(jnp.float32)
            expect = expected_loss(weighting, c, sch, x, eps, net_out, t, pred)
            lam, dlam = jax.jvp(sch.logsnr, (t,), (jnp.ones_like(t),))
            a, sg = sch.alpha_sigma(t)
            ctx = O.WeightContext(t=t, logsnr=lam, dlogsnr_dt=dlam, alpha=a, sigma=sg, x=x, schedule=sch)
            mults = {}
            for w in WEIGHTINGS:
                m = O.WEIGHTINGS.get(w)(ctx, **O.options_from_config(O.WEIGHTINGS.get(w), c))
                mults[w] = m if isinstance(m, tuple) else (m, {})
            out[pred, weighting] = dict(loss=aux["loss"], aux=aux, jac=jax.tree_util.tree_leaves(jac), jac_eps=jac_eps,
                                        mults=mults, expect=expect)
        return out

    return run_jit(run, params, sched_state, x, key)


FAST_CASES = [("cosine", 0, False), ("vp", 0, True), ("linear", 1000, False), ("cosine", 1000, True),
              ("ve", 0, False), ("edm", 0, False), ("subvp", 0, False), ("learned", 0, False), ("rectified_flow", 0, False)]


@pytest.mark.parametrize("k,case", list(enumerate(FAST_CASES)), ids=[f"{n}-T{T}{'-zt' if zt else ''}" for n, T, zt in FAST_CASES])
def test_every_prediction_and_weighting_is_finite_under_jit(k, case):
    """Every prediction x weighting on the corner-case schedules (sigma_0 = 0, alpha_1 = 0, alpha = 1, discrete,
    non-VP, learned): finite float32 losses and gradients under jit.

    Each prediction runs the real loss under jit with a weighting that rotates over the
    schedules, and the loss must equal the weighting's definition computed independently
    (eps-, x0-, v- or velocity-MSE, SNR-weighted x0-MSE, the ELBO terms) from the network's
    (x0, eps) estimates; every other weighting's multiplier is checked finite on the same draws.
    The toy network returns bfloat16, so the float32 cast is exercised; a learned schedule's
    parameters get gradients too. The literal 50-pair x every-schedule
    product is `test_every_combination_literal` (slow).
    """
    name, T, zt = case
    sched = S.get_schedule(config(schedule=name, num_steps=T, zero_terminal_snr=zt), image_size=32)
    combos = [(p, WEIGHTINGS[(i + k) % len(WEIGHTINGS)]) for i, p in enumerate(PREDICTIONS)]
    if name == "learned":  # its graph is large: the two weightings that differentiate the schedule itself
        combos = [("eps", "elbo"), ("v", "sigmoid")]
    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 2, 2, 1), minval=-1, maxval=1)
    params = {"a": jnp.float32(0.5), "b": jnp.float32(0.1)}
    results = combination_results(sched, name, T, combos, x, jax.random.PRNGKey(1), params)
    for (pred, weighting), r in results.items():
        loss, eps_mse = r["loss"], r["aux"]["eps_mse"]
        assert loss.dtype == np.float32 and loss.shape == (4,), (pred, weighting)
        assert np.all(np.isfinite(loss)) and all(np.all(np.isfinite(j)) for j in r["jac"]), (pred, weighting)
        np.testing.assert_allclose(loss, r["expect"], rtol=2e-3, atol=1e-5, err_msg=f"{pred} {weighting}")
        for w, (m, extras) in r["mults"].items():
            combo = m * eps_mse + sum(extras.values(), 0.0)
            assert np.all(np.isfinite(combo)), (pred, w)
            assert all(np.all(np.isfinite(m * j)) for j in r["jac_eps"].values()), (pred, w)


@pytest.mark.slow
@pytest.mark.parametrize("name,T,zt", FAST_CASES + [(n, 0, False) for n in ("linear", "scaled_linear", "shifted_cosine", "sigmoid")] + [("sigmoid", 20, False)])
def test_every_combination_literal(name, T, zt):
    """The literal product: every prediction x every weighting runs loss_fn under jit (one jit per schedule)."""
    sched = S.get_schedule(config(schedule=name, num_steps=T, zero_terminal_snr=zt), image_size=32)
    combos = [(p, w) for p in PREDICTIONS for w in WEIGHTINGS]
    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 2, 2, 1), minval=-1, maxval=1)
    results = combination_results(sched, name, T, combos, x, jax.random.PRNGKey(1), {"a": jnp.float32(0.5), "b": jnp.float32(0.1)})
    for key, r in results.items():
        assert r["loss"].dtype == np.float32 and np.all(np.isfinite(r["loss"])), key
        assert all(np.all(np.isfinite(j)) for j in r["jac"]), key


# ----------------------------------------------------------------------------- flow matching (Esser et al. 2024)
def test_flow_time_sampler_densities():
    """Logit-normal (eq. 19), mode (eq. 20) and cosmap (eq. 22) densities, and the shift's p(t') = p(t) / (dt'/dt),
    against closed forms of the inverse CDF derivative and against histograms of the draws."""
    cont = S.RectifiedFlow()
    n = 200_000

    def compute(key):
        return dict(
            logit=O.logit_normal_time(key, n, cont, logit_mean=0.5, logit_std=0.8), mode=O.mode_time(key, n, cont, mode_scale=1.29),
            cosmap=O.cosmap_time(key, n, cont), shifted=O.shift_draw(O.uniform_time(key, n, cont), 3.0, cont),
            shifted_logit=O.shift_draw(O.logit_normal_time(key, n, cont, logit_mean=0.0, logit_std=1.0), 3.0, cont),
        )

    r = run_jit(compute, jax.random.PRNGKey(0))
    t = np.asarray(r["logit"].t, np.float64)
    logit = np.log(t / (1 - t))
    np.testing.assert_allclose(r["logit"].time_density, np.exp(-0.5 * ((logit - 0.5) / 0.8) ** 2) / (0.8 * np.sqrt(2 * np.pi) * t * (1 - t)), rtol=1e-4)
    t = np.asarray(r["cosmap"].t, np.float64)
    # u = 2/pi atan(t / (1 - t)) is the CDF: du/dt = 2 / (pi ((1 - t)^2 + t^2))
    np.testing.assert_allclose(r["cosmap"].time_density, 2 / (np.pi * ((1 - t) ** 2 + t**2)), rtol=1e-4)
    t = np.asarray(r["shifted"].t, np.float64)
    # t' = 3 t / (1 + 2 t) <=> t = t' / (3 - 2 t'): p(t') = 3 / (3 - 2 t')^2
    np.testing.assert_allclose(r["shifted"].time_density, 3 / (3 - 2 * t) ** 2, rtol=1e-4)
    # mode: invert f_mode numerically (it decreases) and differentiate the CDF 1 - f^-1(t) by finite differences
    grid = np.linspace(0, 1, 200_001)
    f = 1 - grid - 1.29 * (np.cos(np.pi * grid / 2) ** 2 - 1 + grid)
    tq = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
    inv = lambda v: np.interp(v, f[::-1], grid[::-1])  # noqa: E731
    fd = -(inv(tq + 1e-3) - inv(tq - 1e-3)) / 2e-3
    mode_t, mode_p = np.asarray(r["mode"].t), np.asarray(r["mode"].time_density)
    near = [np.argmin(np.abs(mode_t - q)) for q in tq]
    np.testing.assert_allclose(mode_p[near], fd, rtol=2e-2)
    # every density integrates the draws' histogram
    for name in ("logit", "mode", "cosmap", "shifted", "shifted_logit"):
        t, p = np.asarray(r[name].t), np.asarray(r[name].time_density)
        hist, edges = np.histogram(t, bins=20, range=(0, 1), density=True)
        density_at = np.interp(0.5 * (edges[1:] + edges[:-1]), np.sort(t), p[np.argsort(t)])
        np.testing.assert_allclose(hist[2:-2], density_at[2:-2], rtol=0.05, err_msg=name)


def test_importance_weighting_under_flow_time_samplers():
    """E_{t ~ p}[elbo_relative weight * g(t)] = int_0^1 -1/2 w(lambda) dlambda/dt g(t) dt under mode, cosmap and shifted
    uniform draws (bounded densities), for rectified flow and the sigmoid ELBO weighting."""
    sched = S.RectifiedFlow()
    n = 400_000
    lam_range = (-6.0, 6.0)

    def estimate(key):
        draws = dict(uniform=O.uniform_time(key, n, sched), mode=O.mode_time(key, n, sched, mode_scale=0.8),
                     cosmap=O.cosmap_time(key, n, sched), shifted=O.shift_draw(O.uniform_time(key, n, sched), 2.0, sched))
        out = {}
        for name, d in draws.items():
            lam, dlam = jax.jvp(sched.logsnr, (d.t,), (jnp.ones_like(d.t),))
            ctx = O.WeightContext(t=d.t, logsnr=lam, dlogsnr_dt=dlam, alpha=1 - d.t, sigma=d.t, x=jnp.zeros((n, 1)),
                                  schedule=sched, time_density=d.time_density, logsnr_density=d.logsnr_density)
            g = jnp.where((lam > lam_range[0]) & (lam < lam_range[1]), jnp.cos(lam) ** 2, 0.0)
            out[name] = jnp.mean(O.sigmoid_weight(ctx, sigmoid_bias=1.0) * g)
        return out

    r = run_jit(estimate, jax.random.PRNGKey(3))
    # exact: 1/2 int sigmoid(1 - lambda) cos^2(lambda) d lambda over the range, by quadrature in lambda
    lam = np.linspace(*lam_range, 200_001)
    exact = 0.5 * np.trapezoid(np.cos(lam) ** 2 / (1 + np.exp(lam - 1.0)), lam)
    for name, value in r.items():
        assert float(value) == pytest.approx(exact, rel=0.02), name


@pytest.mark.parametrize("prediction", ["flow", "eps", "v"])
def test_flow_weighting_is_the_velocity_mse(prediction):
    """Rectified flow with the `flow` weighting: the loss is exactly ||u_hat - (eps - x)||^2 (Lipman et al. 2023, eq. 23;
    Esser et al. 2024, eq. 1-3), whatever the network predicts, under shifted logit-normal times."""
    cfg = config(schedule="rectified_flow", prediction=prediction, weighting="flow", time_sampling="logit_normal", time_shift=3.0)
    sched, par = S.get_schedule(cfg), P.get_parameterization(cfg)
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 3, 3, 1))
    key = jax.random.PRNGKey(1)
    net = lambda z, c, l: 0.3 * z + jnp.sin(c / 1000.0)[:, None, None, None]  # noqa: E731

    def compute(x, key):
        loss, aux = O.make_loss_fn(cfg, par)(net, sched, x, key)
        t = aux["t"]
        eps = jax.random.normal(jax.random.split(key, 3)[1], x.shape)
        tb = t.reshape(-1, 1, 1, 1)
        z = (1 - tb) * x + tb * eps
        x0_hat, eps_hat = par.to_x0_eps(net(*par.model_inputs(z, t, sched), None), z, t, sched)
        return loss, jnp.mean(((eps_hat - x0_hat) - (eps - x)) ** 2, axis=(1, 2, 3)), t

    loss, velocity_mse, t = run_jit(compute, x, key)
    np.testing.assert_allclose(loss, velocity_mse, rtol=1e-4, atol=1e-6)
    assert np.median(t) > 0.6  # shift 3 moves the logit-normal median 0.5 to 0.75


def test_configs_written_before_the_logsnr_field_split_still_load():
    """A config.json from before time_logsnr_* / learned_logsnr_* / time_shift existed keeps its meaning:
    logsnr_min / logsnr_max still drive logsnr_uniform sampling and the learned schedule's end points."""
    import ml_collections

    from diffax import configuration

    new = config(schedule="learned", time_sampling="logsnr_uniform", logsnr_min=-8.0, logsnr_max=6.0)
    old = configuration.to_dict(new)
    for field in ("time_logsnr_min", "time_logsnr_max", "learned_logsnr_min", "learned_logsnr_max", "time_shift",
                  "logit_mean", "logit_std", "mode_scale"):
        del old[field]
    old = ml_collections.ConfigDict(old)
    assert O.options_from_config(O.logsnr_uniform_time, old) == {"time_logsnr_min": -8.0, "time_logsnr_max": 6.0}
    assert O.options_from_config(O.logsnr_uniform_time, new) == {"time_logsnr_min": -15.0, "time_logsnr_max": 15.0}
    ends = S.get_schedule(old).logsnr(jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(ends, [6.0, -8.0], atol=1e-4)
    O.make_loss_fn(old, P.get_parameterization(old))  # time_shift absent: no shift, no KeyError

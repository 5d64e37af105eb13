"""Samplers against exact denoisers (tests/analytic.py): distributions, convergence orders, grids, compile size.

Data: x ~ N(mu, diag(s^2)) in D = 3, or a 2-D isotropic Gaussian mixture; the denoiser is the exact
posterior mean, so a sampler's only errors are its discretisation and the Monte-Carlo noise. Bounds
are stated in units of the standard error of n samples plus a discretisation allowance measured once
with 1e5 samples (listed per case).
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats

from configs.default import get_config
from diffax import parameterization as P
from diffax import schedules as S
from diffax import samplers
from diffax.samplers import SAMPLERS, base
from tests import analytic

MU = np.array([0.5, -1.0, 0.0], np.float32)
STD = np.array([0.3, 1.0, 0.6], np.float32)
GMM_MEANS = np.array([[-1.0, -1.0], [1.0, 0.5], [0.0, 1.5]], np.float32)
GMM_STD = 0.25
GMM_W = np.array([0.5, 0.3, 0.2], np.float32)
N = 4000


def config_with(**sampling) -> ml_collections.ConfigDict:
    c = get_config()
    for k, v in sampling.items():
        setattr(c.sampling, k, v)
    return c


def gauss_denoiser(schedule):
    return analytic.gaussian_denoiser(schedule, MU, STD)


def gmm_denoiser(schedule):
    return analytic.gmm_denoiser(schedule, GMM_MEANS, GMM_STD, GMM_W)


def oracle_apply_fn(schedule, param, denoiser):
    """A 'network' that outputs the exact target of `param` (eps, x0, v, score or EDM's F) from its inputs."""

    def apply_fn(z_in, c_noise, labels):
        if isinstance(param, P.EDMPrediction):
            t = schedule.t_from_logsnr(-8.0 * c_noise)
            a, s = P.coefficients(z_in, t, schedule)
            z = z_in * jnp.sqrt(s**2 + a**2 * param.sigma_data**2)
        else:
            t = (c_noise + 1.0) / schedule.num_steps if schedule.num_steps else c_noise / 1000.0
            z = z_in
        out = denoiser(z, t)
        return param.from_x0_eps(out.x0, out.eps, z, t, schedule)

    return apply_fn


def sampler_fn(schedule, denoiser, **sampling):
    """The jitted sampler (noise, key) -> x fed the denoiser directly, its options read from the config."""
    c = config_with(**sampling)
    fn, options = SAMPLERS.get(c.sampling.sampler), samplers.sampler_options(c.sampling.sampler, c.sampling)
    return jax.jit(lambda n, k: fn(denoiser, schedule, n, k, **options))


def run_sampler(schedule, denoiser, noise, key=jax.random.PRNGKey(1), **sampling) -> np.ndarray:
    return np.asarray(sampler_fn(schedule, denoiser, **sampling)(noise, key), np.float64)


def run_through_network(schedule, prediction, denoiser, noise, key=jax.random.PRNGKey(1), **sampling):
    """The public path: samplers.sample with an oracle apply_fn through the parameterization."""
    c = config_with(**sampling)
    c.diffusion.prediction = prediction
    param = P.get_parameterization(c.diffusion)
    apply_fn = oracle_apply_fn(schedule, param, denoiser)
    sampler = samplers.make_sampler(c)
    f = jax.jit(lambda n, k: sampler(schedule, param, apply_fn, n, k))
    return np.asarray(f(noise, key), np.float64)


def assert_gaussian(x: np.ndarray, allowance: float) -> None:
    """Mean within 4 SE (s / sqrt(n)); std within 4 SE (std / sqrt(2n)) + `allowance` relative."""
    n = x.shape[0]
    assert np.all(np.abs(x.mean(0) - MU) < 4 * STD / math.sqrt(n)), (x.mean(0), MU)
    ratio = x.std(0) / STD
    assert np.all(np.abs(ratio - 1) < 4 / math.sqrt(2 * n) + allowance), ratio
    corr = np.corrcoef(x.T)[np.triu_indices(3, 1)]  # independent dims: off-diagonal correlations ~ N(0, 1/n)
    assert np.all(np.abs(corr) < 4 / math.sqrt(n)), corr


DISCRETE_LINEAR = S.DiscreteVP.from_betas(S.linear_betas(1000))

# (sampler options, schedule, prediction, discretisation allowance on std measured with 1e5 samples)
GAUSSIAN_CASES = [
    (dict(sampler="ddpm", steps=1000, variance="small"), DISCRETE_LINEAR, "eps", 0.02),
    (dict(sampler="ddpm", steps=1000, variance="large"), S.VPLinear(), "x0", 0.02),
    (dict(sampler="ddim", steps=250, eta=0.0), S.Cosine(), "v", 0.015),
    (dict(sampler="euler", steps=250), S.EDM(), "edm", 0.015),
    (dict(sampler="heun", steps=60, churn=10.0, s_tmin=0.05, s_tmax=10.0), S.VPLinear(), "eps", 0.02),
    (dict(sampler="dpm_solver", steps=50, order=2), DISCRETE_LINEAR, "x0", 0.02),
    (dict(sampler="dpm_solver", steps=100, order=3, solver_type="sde"), S.VPLinear(), "score", 0.015),
    (dict(sampler="pc", steps=500, predictor="reverse_diffusion", snr=0.16), S.VE(), "eps", 0.035),
    (dict(sampler="ode"), S.VPLinear(), "eps", 0.005),
]


@pytest.mark.parametrize("opts,schedule,prediction,allowance", GAUSSIAN_CASES, ids=lambda v: str(v)[:40])
def test_gaussian_data_moments(opts, schedule, prediction, allowance):
    noise = jax.random.normal(jax.random.PRNGKey(0), (N, 3))
    x = run_through_network(schedule, prediction, gauss_denoiser(schedule), noise, **opts)
    assert_gaussian(x, allowance)


RECTIFIED_FLOW = S.RectifiedFlow()
# the flow samplers on the rectified-flow schedule with the network predicting the velocity (flow matching;
# tests/test_flow_sampling.py runs the other samplers so); allowance on std measured with 1e5 samples
FLOW_CASES = [
    (dict(sampler="flow_euler", steps=250, shift=3.0), 0.025),
    (dict(sampler="flow_heun", steps=25), 0.012),
]


@pytest.mark.parametrize("opts,allowance", FLOW_CASES, ids=lambda v: str(v)[:40])
def test_flow_samplers_gaussian_moments(opts, allowance):
    """The exact Gaussian denoiser driven through the `flow` target (velocity eps - x of alpha = 1 - t,
    sigma = t) draws the data distribution with flow_euler (shifted grid) and flow_heun."""
    noise = jax.random.normal(jax.random.PRNGKey(0), (N, 3))
    x = run_through_network(RECTIFIED_FLOW, "flow", gauss_denoiser(RECTIFIED_FLOW), noise, **opts)
    assert_gaussian(x, allowance)


def gmm_cdf(x: np.ndarray, d: int) -> np.ndarray:
    return sum(w * stats.norm.cdf(x, loc=m[d], scale=GMM_STD) for w, m in zip(GMM_W, GMM_MEANS))


@pytest.mark.parametrize(
    "opts,schedule",
    [
        (dict(sampler="heun", steps=40), S.Cosine()),
        (dict(sampler="dpm_solver", steps=40, order=3), S.EDM()),
        (dict(sampler="ddim", steps=200, eta=0.5, spacing="linspace"), DISCRETE_LINEAR),
    ],
    ids=["heun-cosine", "dpm3m-edm", "ddim-eta0.5-discrete"],
)
def test_gaussian_mixture_two_sample(opts, schedule):
    """Per-dimension KS test against the exact mixture marginals and the mode weights within 4 SE."""
    n = 2000
    noise = jax.random.normal(jax.random.PRNGKey(2), (n, 2))
    x = run_sampler(schedule, gmm_denoiser(schedule), noise, **opts)
    for d in range(2):
        p = stats.kstest(x[:, d], lambda v: gmm_cdf(v, d)).pvalue
        assert p > 1e-3, (d, p)
    nearest = np.argmin(((x[:, None] - GMM_MEANS[None]) ** 2).sum(-1), axis=1)
    frac = np.bincount(nearest, minlength=3) / n
    assert np.all(np.abs(frac - GMM_W) < 4 * np.sqrt(GMM_W * (1 - GMM_W) / n) + 0.01), frac


def test_sampler_matches_direct_denoiser_for_every_prediction():
    """eps / x0 / v / score / edm networks give the same DDIM trajectory as the exact (x0, eps) denoiser."""
    schedule = S.VPLinear()
    noise = jax.random.normal(jax.random.PRNGKey(3), (64, 3))
    ref = run_sampler(schedule, gauss_denoiser(schedule), noise, sampler="ddim", steps=20)
    for prediction in ("eps", "x0", "v", "score", "edm"):
        x = run_through_network(schedule, prediction, gauss_denoiser(schedule), noise, sampler="ddim", steps=20)
        np.testing.assert_allclose(x, ref, atol=2e-3, err_msg=prediction)


# ----------------------------------------------------------------------------- convergence order
@pytest.mark.parametrize("name,order", [("euler", 1), ("heun", 2)])
def test_ode_convergence_order(name, order):
    """Error vs a 2048-step Heun reference on the EDM grid falls as N^-order (Karras et al. 2022, Sec. 3)."""
    schedule = S.EDM()
    den = gauss_denoiser(schedule)
    noise = jax.random.normal(jax.random.PRNGKey(0), (256, 3))
    ref = run_sampler(schedule, den, noise, sampler="heun", steps=2048)
    steps = [16, 32, 64, 128]
    errs = [np.sqrt(np.mean((run_sampler(schedule, den, noise, sampler=name, steps=n) - ref) ** 2)) for n in steps]
    slope = np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert abs(-slope - order) < 0.2, (errs, slope)


# ----------------------------------------------------------------------------- DDIM / DDPM
def test_ddim_eta0_deterministic_and_inversion_round_trip():
    """eta = 0 ignores the key; inverting data then regenerating returns it with an error that is first
    order in the step (the inversion evaluates eps at the next time: about 7% of std at 100 steps, 3.6% at 200)."""
    schedule = S.VPLinear()
    den = gauss_denoiser(schedule)
    noise = jax.random.normal(jax.random.PRNGKey(4), (512, 3))
    fn = sampler_fn(schedule, den, sampler="ddim", steps=100, eta=0.0)
    np.testing.assert_array_equal(fn(noise, jax.random.PRNGKey(1)), fn(noise, jax.random.PRNGKey(2)))
    x = jnp.asarray(MU + STD * np.asarray(jax.random.normal(jax.random.PRNGKey(5), (512, 3))))
    errs = []
    for steps in (100, 200):
        z = jax.jit(lambda x: samplers.ddim_invert(den, schedule, x, steps=steps))(x)
        assert abs(float(jnp.std(z)) - 1.0) < 0.05  # the latent is standard normal
        x_back = run_sampler(schedule, den, z, sampler="ddim", steps=steps, eta=0.0)
        errs.append(float(np.max(np.sqrt(np.mean((x_back - np.asarray(x)) ** 2, 0)) / STD)))
    assert errs[1] < 0.05, errs
    assert 1.7 < errs[0] / errs[1] < 2.3, errs  # first order: halving the step halves the error


def test_ddpm_equals_ddim_eta1_and_agrees_in_distribution():
    """DDPM 'small' variance and DDIM eta=1 are the same ancestral step (Song et al. 2021, Eq. 16): with
    the same key they agree to float precision; with different keys the two samples pass a KS test."""
    schedule = DISCRETE_LINEAR
    den = gmm_denoiser(schedule)
    noise = jax.random.normal(jax.random.PRNGKey(6), (2000, 2))
    ddpm = run_sampler(schedule, den, noise, jax.random.PRNGKey(1), sampler="ddpm", steps=1000, variance="small")
    ddim_fn = sampler_fn(schedule, den, sampler="ddim", steps=1000, eta=1.0)
    np.testing.assert_allclose(ddpm, np.asarray(ddim_fn(noise, jax.random.PRNGKey(1))), atol=1e-3)
    other = np.asarray(ddim_fn(noise, jax.random.PRNGKey(7)))
    for d in range(2):
        assert stats.ks_2samp(ddpm[:, d], other[:, d]).pvalue > 1e-3


def test_ddpm_variances():
    """For alpha_bar_c = 0.3^2 -> 0.5^2 (VP): beta = 1 - abar_c / abar_n, beta~ = beta (1 - abar_n) / (1 - abar_c)
    (Ho et al. 2020, Eq. 7); var_interp = -1 gives beta~, +1 beta, 0 their geometric mean (Nichol & Dhariwal
    2021, Eq. 15)."""
    from diffax.samplers.ddpm import ddpm_std

    ac, an = 0.3, 0.5
    sc, sn = math.sqrt(1 - ac**2), math.sqrt(1 - an**2)
    beta = 1 - ac**2 / an**2
    small = beta * (1 - an**2) / (1 - ac**2)
    for variance, var_interp, want in (("small", None, small), ("large", None, beta), ("learned", -1.0, small),
                                       ("learned", 1.0, beta), ("learned", 0.0, math.sqrt(small * beta))):
        vi = None if var_interp is None else jnp.full((2,), var_interp)
        got = ddpm_std(ac, sc, an, sn, variance, vi)
        np.testing.assert_allclose(np.asarray(got) ** 2, np.full((2,) if vi is not None else (), want), rtol=1e-5)


# ----------------------------------------------------------------------------- time grids
@pytest.mark.parametrize("T,n", [(1000, 3), (1000, 7), (1000, 10), (1000, 50), (4000, 6), (100, 100)])
def test_spacing_matches_diffusers_formulas(T, n):
    """diffusers' DDIMScheduler formulas (Lin et al. 2024, Table 2), recomputed here in pure Python (the
    fixture test below checks T = 1000, n = 10 against diffusers itself)."""
    r = T // n
    leading = [i * r for i in range(n)][::-1]
    trailing = [int(np.round(T - i * T / n)) - 1 for i in range(n)]
    linspace = [int(np.round(i * (T - 1) / (n - 1))) if n > 1 else 0 for i in range(n)][::-1]
    assert base.spacing_indices(T, n, "leading").tolist() == leading
    assert base.spacing_indices(T, n, "trailing").tolist() == trailing
    assert base.spacing_indices(T, n, "linspace").tolist() == linspace


def test_ddim_matches_diffusers_fixture():
    """Same noise, same exact eps-model: our DDIM equals diffusers' DDIMScheduler (fixture made by
    tests/fixtures/samplers/make_diffusers_ddim.py) for leading (+ steps_offset 1) / trailing spacing and
    both set_alpha_to_one choices. (linspace differs by design: diffusers steps to t - T//n, off its grid.)"""
    ref = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "samplers", "diffusers_ddim.npz"))
    for spacing in ("leading", "trailing"):
        offset = 1 if spacing == "leading" else 0
        np.testing.assert_array_equal(base.spacing_indices(1000, 10, spacing, offset), ref[f"{spacing}_timesteps"])
        for one in (True, False):
            x = run_sampler(DISCRETE_LINEAR, gauss_denoiser(DISCRETE_LINEAR), jnp.asarray(ref["noise"]),
                            sampler="ddim", steps=10, spacing=spacing, steps_offset=offset, final_alpha_one=one)
            np.testing.assert_allclose(x, ref[f"{spacing}_{one}"], atol=1e-5, err_msg=f"{spacing} {one}")


def test_grid_ends():
    """Leading never reaches the pure-noise end t = 1 (index 901 + 1 = 902 of 1000 with steps_offset = 1,
    Lin et al. 2024, Sec. 3.3); trailing and linspace do;
    final_alpha_one sends the last step to alpha = 1, else to alphas_cumprod[0]."""
    schedule = DISCRETE_LINEAR
    for spacing, first in (("leading", 0.902), ("trailing", 1.0), ("linspace", 1.0)):
        grid = base.step_grid(schedule, steps=10, spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
        assert grid.t_cur[0] == pytest.approx(first)
        np.testing.assert_allclose(grid.t_next[:-1], grid.t_cur[1:])
    grid = base.step_grid(schedule, steps=10, final_clean=False)
    a_c, s_c, a_n, s_n = base.grid_alpha_sigma(schedule, grid)
    assert float(a_n[-1] ** 2) == pytest.approx(1 - 1e-4, rel=1e-6)  # alphas_cumprod[0] = 1 - beta_0
    _, _, a_n, s_n = base.grid_alpha_sigma(schedule, grid._replace(final_clean=True))
    assert float(a_n[-1]) == 1.0 and float(s_n[-1]) == 0.0


def test_karras_sigmas():
    s = np.asarray(base.karras_sigmas(0.002, 80.0, 18, 7.0))
    assert s[0] == pytest.approx(80.0, rel=1e-5) and s[-2] == pytest.approx(0.002, rel=1e-4) and s[-1] == 0
    i = np.arange(18)
    expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7  # Karras et al. 2022, Eq. 5
    np.testing.assert_allclose(s[:-1], expected, rtol=1e-5)


# ----------------------------------------------------------------------------- on-device loop
def _count_eqns(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                if hasattr(sub, "jaxpr"):
                    n += _count_eqns(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
                elif hasattr(sub, "eqns"):
                    n += _count_eqns(sub)
    return n


@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler", "heun", "dpm_solver", "pc", "flow_euler", "flow_heun"])
def test_program_size_independent_of_steps(name):
    """The step loop is a lax.scan: the traced program has the same number of equations at 10 and 1000 steps."""
    schedule = DISCRETE_LINEAR
    den = gauss_denoiser(schedule)
    sizes = []
    for steps in (10, 1000):
        c = config_with(sampler=name, steps=steps, eta=0.5, churn=1.0, order=3)
        options = samplers.sampler_options(name, c.sampling)
        jaxpr = jax.make_jaxpr(lambda n, k: SAMPLERS.get(name)(den, schedule, n, k, **options))(
            jnp.zeros((4, 3)), jax.random.PRNGKey(0)
        )
        sizes.append(_count_eqns(jaxpr.jaxpr))
    assert sizes[0] == sizes[1], sizes


# ----------------------------------------------------------------------------- denoiser: guidance, clipping
def _affine_model(schedule):
    """eps-network whose output depends on the label: eps = 0.1 * z + label (null label -> 0)."""

    def apply_fn(z_in, c_noise, labels):
        lab = jnp.where(labels == 10, 0.0, labels.astype(jnp.float32))
        return 0.1 * z_in + lab[:, None]

    return apply_fn


def test_classifier_free_guidance_and_interval():
    schedule = S.VPLinear()
    param = P.EpsPrediction()
    guidance = dict(guidance_scale=3.0, guidance_interval=(0.2, 0.6))
    den = samplers.make_denoiser(_affine_model(schedule), schedule, param, null_label=10, **guidance)
    z = jnp.ones((2, 3))
    labels = jnp.array([1, 2])
    inside = den(z, 0.5, labels)
    np.testing.assert_allclose(inside.eps, 0.1 + 3.0 * np.array([[1.0], [2.0]]) * np.ones((2, 3)), rtol=1e-6)
    a, s = schedule.alpha_sigma(jnp.float32(0.5))
    np.testing.assert_allclose(inside.x0, (z - s * inside.eps) / a, rtol=1e-5)  # x0 guided consistently
    outside = den(z, 0.9, labels)  # outside the interval: purely conditional
    np.testing.assert_allclose(outside.eps, 0.1 + np.array([[1.0], [2.0]]) * np.ones((2, 3)), rtol=1e-6)
    with pytest.raises(ValueError, match="null_label"):
        samplers.make_denoiser(_affine_model(schedule), schedule, param, **guidance)(z, 0.5, labels)


def test_class_conditional_sampling_and_guidance():
    """Label k -> component k of the mixture (null label 3 -> the whole mixture): conditional samples have
    the component's mean and std; guidance w = 3 pushes them away from the mixture and sharpens them."""
    schedule = S.VPLinear()
    means = jnp.asarray(GMM_MEANS)

    def apply_fn(z, c_noise, labels):  # exact eps of the conditional / unconditional data, c_noise = 1000 t
        t = c_noise / 1000.0
        cond = analytic.gaussian_eps(z, t, schedule, means[jnp.minimum(labels, 2)], GMM_STD)
        uncond = analytic.gmm_eps(z, t, schedule, GMM_MEANS, GMM_STD, GMM_W)
        return jnp.where((labels == 3)[:, None], uncond, cond)

    n = 1500
    labels = jnp.arange(n) % 3
    noise = jax.random.normal(jax.random.PRNGKey(8), (n, 2))
    for w in (1.0, 3.0):
        sampler = samplers.make_sampler(config_with(sampler="heun", steps=40, guidance_scale=w))
        x = np.asarray(sampler(schedule, P.EpsPrediction(), apply_fn, noise, jax.random.PRNGKey(0), labels,
                               null_label=3))
        for k in range(3):
            xk = x[np.asarray(labels) == k]
            if w == 1.0:
                assert np.all(np.abs(xk.mean(0) - GMM_MEANS[k]) < 4 * GMM_STD / math.sqrt(len(xk))), (k, xk.mean(0))
                assert np.all(np.abs(xk.std(0) / GMM_STD - 1) < 4 / math.sqrt(2 * len(xk)) + 0.02), xk.std(0)
            else:  # pushed away from the unconditional mixture towards its own mode, and sharper
                away = GMM_MEANS[k] - GMM_W @ GMM_MEANS
                assert (xk.mean(0) - GMM_MEANS[k]) @ away > 0, (k, xk.mean(0))
                assert np.all(xk.std(0) < 0.85 * GMM_STD), xk.std(0)


def test_x0_clipping_rederives_eps():
    schedule = S.VPLinear()
    den = samplers.make_denoiser(lambda z, c, l: -5.0 * z, schedule, P.EpsPrediction(), clip_x0=True)
    z = jnp.array([[0.3, -0.8, 0.05]])
    out = den(z, 0.3)
    assert float(jnp.max(jnp.abs(out.x0))) <= 1.0
    a, s = schedule.alpha_sigma(jnp.float32(0.3))
    np.testing.assert_allclose(a * out.x0 + s * out.eps, z, atol=1e-5)
    with pytest.raises(ValueError, match="dynamic_threshold=99.5"):  # one meaning: a quantile, not a percentage
        samplers.make_denoiser(lambda z, c, l: z, schedule, P.EpsPrediction(), dynamic_threshold=99.5)


def test_learned_variance_reaches_ddpm():
    """A 2C-channel output's second half reaches the DDPM step: var_interp = -1 samples as 'small'."""
    schedule = DISCRETE_LINEAR
    param = P.EpsPrediction()

    def apply_fn(z, c, labels):  # eps = 0, var_interp = -1 (the 'small' variance)
        return jnp.concatenate([jnp.zeros_like(z), -jnp.ones_like(z)], axis=-1)

    noise = jax.random.normal(jax.random.PRNGKey(0), (2, 3))
    learned = samplers.sample("ddpm", schedule, param, apply_fn, noise, jax.random.PRNGKey(1), steps=10,
                              variance="learned")
    zero_fn = lambda z, c, l: jnp.zeros_like(z)  # noqa: E731
    small = samplers.sample("ddpm", schedule, param, zero_fn, noise, jax.random.PRNGKey(1), steps=10, variance="small")
    np.testing.assert_allclose(learned, small, rtol=1e-5)


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ValueError, match="ddim"):
        samplers.make_sampler(config_with(sampler="ddmi"))


# ----------------------------------------------------------------------------- draw_samples
def test_draw_samples_chunks_seed_noise_and_uint8():
    shape = (2, 2, 1)
    sample_fn = jax.jit(lambda noise, key, labels: jnp.tanh(noise) + 0.0 * jax.random.normal(key, noise.shape))
    a = samplers.draw_samples(sample_fn, 10, 4, shape, seed=3, progress=False)
    b = samplers.draw_samples(sample_fn, 10, 4, shape, seed=3, progress=False)
    c = samplers.draw_samples(sample_fn, 10, 4, shape, seed=4, progress=False)
    assert a["images"].shape == (10, 2, 2, 1) and a["images"].dtype == np.uint8
    np.testing.assert_array_equal(a["images"], b["images"])
    assert not np.array_equal(a["images"], c["images"])
    # chunk c's noise comes from fold_in(fold_in(PRNGKey(seed), c), 0): the last partial chunk is its head
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(3), 2), 0)
    last = np.asarray(jnp.tanh(jax.random.normal(key, (4, *shape))))[:2]
    np.testing.assert_array_equal(a["images"][8:], samplers.to_uint8(last))
    # fixed initial noise: output is sample_fn(noise) regardless of the seed, with labels passed through
    noise = np.random.default_rng(0).normal(size=(5, *shape)).astype(np.float32)
    labels = np.arange(5, dtype=np.int32)
    seen = []
    fn = lambda n, k, l: (seen.append(l.shape), jnp.tanh(n))[1]  # noqa: E731
    out = samplers.draw_samples(fn, 5, 2, shape, seed=9, noise=noise, labels=labels, progress=False)
    np.testing.assert_array_equal(out["images"], samplers.to_uint8(np.tanh(noise)))
    np.testing.assert_array_equal(out["labels"], labels)
    assert set(seen) == {(2,)}  # fixed chunk size, the partial last chunk padded
    seen.clear()
    samplers.draw_samples(fn, 5, 256, shape, seed=9, noise=noise, labels=labels, progress=False)
    assert seen == [(5,)]  # fewer samples than batch_size: one call of 5, not padded to 256
    np.testing.assert_array_equal(samplers.to_uint8(np.array([-1.0, -0.999, 0.0, 1.0, 2.0])), [0, 0, 128, 255, 255])


SHARDED_SCRIPT = """
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from diffax import parameterization as P, samplers, schedules as S
from tests import analytic

assert jax.device_count() == 8, jax.devices()
schedule = S.VPLinear()
mu, std = np.array([0.5, -1.0, 0.0], np.float32), np.array([0.3, 1.0, 0.6], np.float32)
apply_fn = lambda z, c, labels: analytic.gaussian_eps(z, c / 1000.0, schedule, mu, std)
sharding = NamedSharding(jax.make_mesh((8,), ("data",)), PartitionSpec("data"))
cases = {"ddim": dict(steps=20, eta=0.5)}
for name, options in cases.items():
    fn = jax.jit(lambda n, k, l: samplers.sample(name, schedule, P.EpsPrediction(), apply_fn, n, k, **options))
    sharded = samplers.draw_samples(fn, 20, 16, (3,), seed=0, sharding=sharding, progress=False)["images"]
    single = samplers.draw_samples(fn, 20, 16, (3,), seed=0, progress=False)["images"]
    assert sharded.shape == (20, 3) and np.isfinite(sharded).all() and sharded.std() > 0.3, name
    np.testing.assert_array_equal(sharded, single, err_msg=name)
print("OK")
"""


def test_sharded_sampling_equals_single_device():
    """With 8 simulated devices, stochastic samplers give the same samples sharded over the data axis as on one
    device (per-example noise from the same keys): bit-identical for DDIM with eta = 0.5. (Samplers with exp / log
    in the step, e.g. DPM-Solver++ SDE, differ by a few float32 ulps: XLA compiles them for another batch shape.)"""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- diffusers' schedulers
SCHEDULER_FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "samplers", "diffusers_schedulers.npz")
# one case per scheduler class by default, the other variants with -m slow
DEFAULT_SCHEDULER_CASES = {"pndm_sd", "pndm_defaults", "ddim_defaults", "ddim_clip", "euler_defaults", "heun_karras", "dpm_leading_3", "dpm_karras", "edm_euler",
                           "flow_euler_dynamic", "flow_heun"}
SCHEDULER_CASES = [c if c in DEFAULT_SCHEDULER_CASES else pytest.param(c, marks=pytest.mark.slow)
                   for c in sorted({k.split("/")[0] for k in np.load(SCHEDULER_FIXTURE).files if "/" in k})]


def fixture_model(x, c_noise, labels=None):
    """The fixture's analytic 'network' (make_diffusers_schedulers.py): depends on its input and timestep."""
    t = jnp.reshape(c_noise, (-1,) + (1,) * (x.ndim - 1))
    return jnp.tanh(x) * (0.5 + 0.4 * jnp.cos(t / 400.0)) + 0.05 * jnp.sin(t / 60.0)


@pytest.mark.parametrize("case", SCHEDULER_CASES)
def test_imported_scheduler_reproduces_diffusers(case):
    """A scheduler_config.json (missing keys = the class's defaults) imported with scheduler_config_to_diffax
    gives a diffax sampler whose output equals the diffusers scheduler's on the same model and noise, to
    float32 precision relative to the output's scale (fixture: make_diffusers_schedulers.py)."""
    import json

    from diffax.models.diffusers import scheduler_config_to_diffax

    ref = np.load(SCHEDULER_FIXTURE)
    seq_len = int(ref[f"{case}/image_seq_len"]) or None  # use_dynamic_shifting: Flux's shift for this many tokens
    diffusion, sampling = scheduler_config_to_diffax(json.loads(str(ref[f"{case}/config"])), image_seq_len=seq_len)
    c = get_config()
    c.diffusion.update(diffusion)
    c.sampling.update(sampling)
    c.sampling.steps = int(ref[f"{case}/steps"])
    schedule, param = S.get_schedule(c.diffusion), P.get_parameterization(c.diffusion)
    sampler = samplers.make_sampler(c)
    x = jax.jit(lambda n: sampler(schedule, param, fixture_model, n, jax.random.PRNGKey(0)))(jnp.asarray(ref["noise"]))
    want = ref[f"{case}/final"]
    np.testing.assert_allclose(np.asarray(x), want, rtol=0, atol=5e-6 * np.abs(want).max(), err_msg=case)
    if case.startswith("pndm"):  # the network calls' time steps are diffusers' (repeated PLMS step, PRK midpoints)
        from diffax.samplers.pndm import pndm_plan

        plan = pndm_plan(1000, c.sampling.steps, c.sampling.spacing, c.sampling.steps_offset, c.sampling.skip_prk_steps)
        np.testing.assert_array_equal(plan.model_idx, ref[f"{case}/timesteps"])

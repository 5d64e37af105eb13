"""Post-hoc EMA math (Karras et al. 2024, EDM2): the gamma <-> sigma_rel relation, the power-function EMA
update, the profiles' inner products, and the least-squares reconstruction, against closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.training import posthoc_ema as pe


def profile_moments(gamma, n=400_001):
    """Mean and std of p(tau) = (gamma+1) tau^gamma on [0, 1] by quadrature: sigma_rel from its definition."""
    tau = np.linspace(0.0, 1.0, n)
    p = (gamma + 1.0) * tau**gamma
    mean = np.trapezoid(tau * p, tau)
    return mean, np.sqrt(np.trapezoid((tau - mean) ** 2 * p, tau))


def test_sigma_rel_is_the_profiles_relative_std():
    for gamma in [0.0, 0.5, 2.0, 6.94, 16.97, 60.0]:
        _, std = profile_moments(gamma)
        assert pe.sigma_rel_of_gamma(gamma) == pytest.approx(std, rel=1e-5)


def test_gamma_of_sigma_rel_inverts_the_relation():
    # EDM2 (Sec. 3.1): sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94.
    np.testing.assert_allclose(pe.gamma_of_sigma_rel([0.05, 0.10]), [16.97, 6.94], atol=5e-3)
    sigma = np.geomspace(1e-3, 0.288, 50)
    gamma = pe.gamma_of_sigma_rel(sigma)
    assert np.all(gamma > 0) and np.all(np.diff(gamma) < 0)
    np.testing.assert_allclose(pe.sigma_rel_of_gamma(gamma), sigma, rtol=1e-12)
    s = sigma**-2  # EDM2 Eq. 126: the cubic gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0
    cubic = gamma**3 + 7 * gamma**2 + (16 - s) * gamma + (12 - s)
    np.testing.assert_allclose(cubic / (s * (gamma + 1)), 0.0, atol=1e-9)


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.29, 1.0])
def test_sigma_rel_out_of_range_names_the_range(bad):
    with pytest.raises(ValueError, match=r"0 < sigma_rel < 0\.2887"):
        pe.gamma_of_sigma_rel(bad)


def test_update_realises_the_power_function_profile():
    # ema_n = sum_i w_i theta_i with w_i = (i^(g+1) - (i-1)^(g+1)) / n^(g+1) (EDM2 Eq. 2-3): feed a one-hot
    # trajectory (theta_i = e_i) and the EMA is the weight vector.
    n, gammas = 40, [float(g) for g in pe.gamma_of_sigma_rel([0.05, 0.2])]
    eye = jnp.eye(n)

    def body(profiles, i):
        return pe.update(profiles, {"w": eye[i]}, i, gammas), None

    start = tuple({"w": jnp.full(n, 7.0)} for _ in gammas)  # beta_1 = 0: the initial value is forgotten
    profiles, _ = jax.lax.scan(body, start, jnp.arange(n))
    i = np.arange(1, n + 1, dtype=np.float64)
    for profile, g in zip(profiles, gammas):
        w = (i ** (g + 1) - (i - 1) ** (g + 1)) / n ** (g + 1)
        np.testing.assert_allclose(profile["w"], w, rtol=2e-5, atol=1e-7)


def test_inner_products_match_quadrature():
    tau = np.linspace(0.0, 10.0, 2_000_001)

    def p(t, g):
        return np.where(tau <= t, (g + 1) * tau**g / t ** (g + 1), 0.0)

    for (ta, ga), (tb, gb) in [((3.0, 2.0), (7.0, 5.0)), ((7.0, 5.0), (3.0, 2.0)), ((4.0, 6.9), (4.0, 0.5))]:
        numeric = np.trapezoid(p(ta, ga) * p(tb, gb), tau)
        assert pe.profile_inner_product(ta, ga, tb, gb) == pytest.approx(numeric, rel=1e-4)


def trajectory(i, n):
    """A parameter trajectory known in closed form (three 'weights' that drift, oscillate and saturate)."""
    x = np.asarray(i, np.float64)[..., None] / n
    return np.concatenate([np.sin(3 * x), np.cos(7 * x) + x, 1 - np.exp(-5 * x)], axis=-1)


@pytest.fixture(scope="module")
def snapshots():
    """Profiles sigma_rel 0.05, 0.10 tracked by `pe.update` along `trajectory` for 2000 steps, snapshot every 50."""
    n, every, sigma_rels = 2000, 50, [0.05, 0.10]
    gammas = [float(g) for g in pe.gamma_of_sigma_rel(sigma_rels)]
    thetas = jnp.asarray(trajectory(np.arange(1, n + 1), n), jnp.float32)

    def body(profiles, i):
        profiles = pe.update(profiles, {"w": thetas[i]}, i, gammas)
        return profiles, profiles

    _, history = jax.lax.scan(body, tuple({"w": jnp.zeros(3)} for _ in gammas), jnp.arange(n))
    steps = list(range(every, n + 1, every))
    snaps = [(s, g, np.asarray(h["w"][s - 1], np.float64)) for s in steps for g, h in zip(gammas, history)]
    return n, snaps


def direct_ema(at, gamma, n):
    """The power-function EMA at step `at` of `trajectory` (of a run of n steps), from its closed-form weights."""
    i = np.arange(1, at + 1, dtype=np.float64)
    w = (i ** (gamma + 1) - (i - 1) ** (gamma + 1)) / at ** (gamma + 1)
    return w @ trajectory(i, n)


@pytest.mark.parametrize("sigma_rel", [0.03, 0.08, 0.15])
@pytest.mark.parametrize("at", [2000, 1500])
def test_reconstruction_of_an_untracked_length_equals_the_direct_ema(snapshots, sigma_rel, at):
    n, snaps = snapshots
    used = [s for s in snaps if s[0] <= at]
    gamma = float(pe.gamma_of_sigma_rel(sigma_rel))
    x, error = pe.solve_coefficients([s[0] for s in used], [s[1] for s in used], at, gamma)
    assert x.sum() == pytest.approx(1.0) and error < pe.MAX_PROFILE_ERROR
    reconstructed = np.asarray(pe.combine([{"w": s[2]} for s in used], x)["w"], np.float64)
    np.testing.assert_allclose(reconstructed, direct_ema(at, gamma, n), rtol=1e-3)


def test_a_tracked_profile_reconstructs_itself_exactly(snapshots):
    n, snaps = snapshots
    x, error = pe.solve_coefficients([s[0] for s in snaps], [s[1] for s in snaps], n, snaps[-1][1])
    assert error < 1e-6
    np.testing.assert_allclose(x, np.eye(len(snaps))[-1], atol=1e-6)


def test_representable_range_brackets_the_tracked_lengths_and_excludes_short_ones(snapshots):
    n, snaps = snapshots
    steps, gammas = [s[0] for s in snaps], [s[1] for s in snaps]
    lo, hi = pe.representable_range(steps, gammas, n)
    assert 0.005 < lo < 0.05 and 0.10 < hi < pe.MAX_SIGMA_REL
    too_short = float(pe.gamma_of_sigma_rel(lo * 0.5))
    assert pe.solve_coefficients(steps, gammas, n, too_short)[1] > pe.MAX_PROFILE_ERROR

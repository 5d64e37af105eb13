"""Flow matching end to end with exact denoisers (tests/analytic.py): the `flow` target on the rectified-flow
schedule, fed the exact Gaussian posterior through the network path, draws the data with every existing sampler;
and a small network trained by flow matching learns 2-D data."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffax import schedules as S
from tests.test_samplers import N, assert_gaussian, gauss_denoiser, run_through_network

RF = S.RectifiedFlow()

# (sampler options, allowance on the std ratio; discretisation error at these step counts)
FLOW_CASES = [
    (dict(sampler="ddim", steps=100, eta=0.0), 0.015),  # on alpha = 1 - t, sigma = t DDIM(eta=0) is the flow Euler step
    (dict(sampler="ddim", steps=100, eta=1.0), 0.02),
    (dict(sampler="ddpm", steps=500, variance="small"), 0.02),
    (dict(sampler="euler", steps=100), 0.015),
    # Karras' rho = 7 grid runs up to sigma/alpha = 4096 (capped: alpha_1 = 0), so Heun needs more steps here than
    # on VP schedules: std ratio 1.09 at 30 steps, 1.03 at 60 (the same as zero-terminal-SNR cosine with v)
    (dict(sampler="heun", steps=60), 0.035),
    (dict(sampler="dpm_solver", steps=30, order=2), 0.015),
    pytest.param(dict(sampler="pc", steps=300, predictor="reverse_diffusion", snr=0.16), 0.035, marks=pytest.mark.slow),
    pytest.param(dict(sampler="ode"), 0.005, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("opts,allowance", FLOW_CASES, ids=lambda v: str(v)[:30])
def test_flow_target_draws_gaussian_data_with_every_sampler(opts, allowance):
    noise = jax.random.normal(jax.random.PRNGKey(0), (N, 3))
    x = run_through_network(RF, "flow", gauss_denoiser(RF), noise, **opts)
    assert np.all(np.isfinite(x))
    assert_gaussian(x, allowance)


def test_flow_matching_learns_eight_gaussians():
    """A tiny MLP trained by flow matching (configs/flow_matching.py's recipe through make_loss_fn) for 300 steps:
    the loss falls well below its start and Euler samples of the learned velocity have the data's moments."""
    from configs import toy2d
    from diffax import objectives as O
    from diffax import parameterization as P
    from diffax.data.sources import eight_gaussians

    cfg = toy2d.get_config("flow").diffusion
    sched, par = S.get_schedule(cfg), P.get_parameterization(cfg)
    loss_fn = O.make_loss_fn(cfg, par)
    data = jnp.asarray(eight_gaussians(np.random.default_rng(0), 300 * 256)[0]).reshape(300, 256, 2)

    def net(params, z, c_noise):
        h = jnp.concatenate([z, jnp.sin(c_noise[:, None] / 1000.0 * jnp.arange(1, 9)), jnp.cos(c_noise[:, None] / 1000.0 * jnp.arange(1, 9))], -1)
        for w, b in params[:-1]:
            h = jax.nn.silu(h @ w + b)
        return h @ params[-1][0] + params[-1][1]

    sizes = [18, 64, 64, 2]
    keys = jax.random.split(jax.random.PRNGKey(0), len(sizes))
    params = [(jax.random.normal(k, (i, o)) / np.sqrt(i), jnp.zeros(o)) for k, i, o in zip(keys, sizes[:-1], sizes[1:])]
    tx = optax.adam(3e-3)

    @jax.jit
    def train(params, data):
        def step(carry, xs):
            params, opt = carry
            x, i = xs
            loss, grads = jax.value_and_grad(lambda p: loss_fn(lambda z, c, l: net(p, z, c), sched, x, jax.random.PRNGKey(i))[0].mean())(params)
            updates, opt = tx.update(grads, opt)
            return (optax.apply_updates(params, updates), opt), loss

        (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), (data, jnp.arange(data.shape[0])))
        return params, losses

    params, losses = train(params, data)

    @jax.jit
    def euler(params, z):  # dz/dt = u from t = 1 (noise) to t = 0 (data), 100 steps
        def step(z, t):
            return z - 0.01 * net(params, z, jnp.full((z.shape[0],), 1000.0 * t)), None

        return jax.lax.scan(step, z, jnp.linspace(1.0, 0.01, 100))[0]

    x = np.asarray(euler(params, jax.random.normal(jax.random.PRNGKey(1), (4000, 2))))
    ref = np.asarray(data.reshape(-1, 2))
    first, last = float(losses[:5].mean()), float(losses[-50:].mean())
    assert last < 0.7 * first, (first, last)
    np.testing.assert_allclose(x.std(0), ref.std(0), rtol=0.1)
    radius, ref_radius = np.linalg.norm(x, axis=1), np.linalg.norm(ref, axis=1)
    assert abs(np.median(radius) - np.median(ref_radius)) < 0.1 * np.median(ref_radius)
    assert np.abs(x.mean(0)).max() < 0.25  # 8 modes: mode imbalance after 300 steps moves the mean a little

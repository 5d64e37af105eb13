"""Optimizer schedule, EMA and the non-finite guard of the train step, in-process."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from diffax.training import state as train_state


def opt_cfg(**kw):
    o = default.get_config().optimizer
    o.update(kw)
    return o


def test_warmup_then_constant():
    lr = train_state.learning_rate_schedule(opt_cfg(learning_rate=1.0, warmup_steps=10, decay="constant"), 100)
    np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(99)], [0.0, 0.5, 1.0, 1.0], atol=1e-7)


def test_warmup_then_cosine_reaches_zero():
    lr = train_state.learning_rate_schedule(opt_cfg(learning_rate=2.0, warmup_steps=10, decay="cosine"), 110)
    np.testing.assert_allclose([lr(10), lr(60), lr(110)], [2.0, 1.0, 0.0], atol=1e-6)


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="config.optimizer.name"):
        train_state.make_optimizer(opt_cfg(name="sgdd"), 10)


def test_gradient_clipping_happens_before_adam():
    # Two steps: a large gradient (clipped to norm 1), then a small one (kept). Adam's
    # second update depends on the first gradient's size, so clipping shows in it.
    tx = train_state.make_optimizer(opt_cfg(name="adam", learning_rate=1.0, warmup_steps=0, grad_clip=1.0), 10)
    adam = optax.adam(1.0)
    params = {"w": jnp.zeros(4)}
    g1, g2 = {"w": jnp.array([30.0, -40.0, 0.0, 0.0])}, {"w": jnp.array([0.1, 0.2, -0.1, 0.05])}
    hand_clipped = [{"w": g1["w"] / 50.0}, g2]
    s_tx, s_adam = tx.init(params), adam.init(params)
    for g, h in zip([g1, g2], hand_clipped):
        u_tx, s_tx = tx.update(g, s_tx, params)
        u_adam, s_adam = adam.update(h, s_adam, params)
    np.testing.assert_allclose(u_tx["w"], u_adam["w"], rtol=1e-6)
    unclipped = optax.adam(1.0)
    s = unclipped.init(params)
    for g in [g1, g2]:
        u, s = unclipped.update(g, s, params)
    assert not np.allclose(u["w"], u_tx["w"], rtol=1e-3)


def test_ema_warmup_matches_the_formula():
    steps = jnp.arange(5)
    np.testing.assert_allclose(train_state.ema_decay(steps, 0.999, True), (1 + steps) / (10 + steps), rtol=1e-6)
    assert float(train_state.ema_decay(jnp.asarray(10_000), 0.999, True)) == pytest.approx(0.999)
    assert float(train_state.ema_decay(jnp.asarray(0), 0.9, False)) == pytest.approx(0.9)


def test_ema_update_is_the_exponential_average():
    ema = {"w": jnp.zeros(3)}
    for _ in range(3):
        ema = train_state.update_ema(ema, {"w": jnp.ones(3)}, jnp.asarray(0.5))
    np.testing.assert_allclose(ema["w"], 1 - 0.5**3)

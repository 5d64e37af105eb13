"""The train state (weights, EMA, optimizer, step) and the optimizer built from the config."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree.

    `params` holds the trainable weights: {"net": ..., "schedule": ...} (the
    schedule entry is empty unless the noise schedule is learned). Random keys
    are not stored: each step's key is `fold_in(key(seed), step)`, so the step
    number is the RNG state and resuming reproduces the same noise.
    """

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    ema: Any
    opt_state: Any
    # Step at which a non-finite loss or gradient first appeared (-1: never).
    # With nan_policy="stop", no update is applied from that step on.
    first_bad_step: jax.Array


def learning_rate_schedule(o: Any, num_steps: int) -> optax.Schedule:
    """Linear warm-up to `o.learning_rate`, then constant or cosine decay to 0."""
    warmup = max(int(o.warmup_steps), 0)
    if o.decay == "constant":
        after = optax.constant_schedule(o.learning_rate)
    elif o.decay == "cosine":
        after = optax.cosine_decay_schedule(o.learning_rate, max(num_steps - warmup, 1))
    else:
        raise ValueError(f"Unknown config.optimizer.decay {o.decay!r}: use 'constant' or 'cosine'.")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, warmup), after], [warmup])


def make_optimizer(o: Any, num_steps: int) -> optax.GradientTransformation:
    """The optax optimizer of `config.optimizer`: clipping, then Adam or AdamW."""
    lr = learning_rate_schedule(o, num_steps)
    if o.name == "adam":
        opt = optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)
    elif o.name == "adamw":
        opt = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    else:
        raise ValueError(f"Unknown config.optimizer.name {o.name!r}: use 'adam' or 'adamw'.")
    if o.grad_clip and o.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(o.grad_clip), opt)
    return opt


def ema_decay(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """EMA decay at an update count: fixed, or min(decay, (1 + n) / (10 + n)) with warm-up.

    The warm-up form is the one of diffusers' EMAModel and of Tarvainen &
    Valpola (2017); it lets the average forget the random initialisation early on.
    """
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    n = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def update_ema(ema: Any, params: Any, decay: jax.Array) -> Any:
    return jax.tree.map(lambda e, p: e * decay + (1.0 - decay) * p.astype(e.dtype), ema, params)

"""The train state (weights, EMA(s), optimizer, step) and the optimizer built from the config."""
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
    # Power-function EMA profiles, one params tree per config.training.posthoc_ema
    # sigma_rel (diffax/training/posthoc_ema.py); () when post-hoc EMA is off.
    posthoc_ema: tuple = ()


def learning_rate_schedule(optimizer_cfg: Any, num_steps: int) -> optax.Schedule:
    """Linear warm-up to `optimizer_cfg.learning_rate`, then constant or cosine decay to 0."""
    warmup = max(int(optimizer_cfg.warmup_steps), 0)
    if optimizer_cfg.decay == "constant":
        after = optax.constant_schedule(optimizer_cfg.learning_rate)
    elif optimizer_cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(optimizer_cfg.learning_rate, max(num_steps - warmup, 1))
    else:
        raise ValueError(f"Unknown config.optimizer.decay {optimizer_cfg.decay!r}: use 'constant' or 'cosine'.")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, optimizer_cfg.learning_rate, warmup), after], [warmup])


def make_optimizer(optimizer_cfg: Any, num_steps: int) -> optax.GradientTransformation:
    """The optax optimizer of `config.optimizer`: clipping, then Adam or AdamW."""
    lr = learning_rate_schedule(optimizer_cfg, num_steps)
    if optimizer_cfg.name == "adam":
        opt = optax.adam(lr, b1=optimizer_cfg.b1, b2=optimizer_cfg.b2, eps=optimizer_cfg.eps)
    elif optimizer_cfg.name == "adamw":
        opt = optax.adamw(lr, b1=optimizer_cfg.b1, b2=optimizer_cfg.b2, eps=optimizer_cfg.eps,
                          weight_decay=optimizer_cfg.weight_decay)
    else:
        raise ValueError(f"Unknown config.optimizer.name {optimizer_cfg.name!r}: use 'adam' or 'adamw'.")
    if optimizer_cfg.grad_clip and optimizer_cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optimizer_cfg.grad_clip), opt)
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

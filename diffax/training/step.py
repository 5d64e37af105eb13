"""The train step: loss, gradients, optimizer update, EMA (and post-hoc EMA profiles); jitted once with shardings.

Several optimizer steps can run in one dispatch (`steps_per_dispatch` > 1):
the batches arrive stacked on a leading axis and `lax.scan` runs the steps.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from diffax import objectives
from diffax.training import posthoc_ema
from diffax.training.build import Diffusion
from diffax.training.state import TrainState, ema_decay, update_ema


def init_state(diffusion: Diffusion, tx: optax.GradientTransformation, posthoc_profiles: int = 0) -> TrainState:
    """The state before step 1; `posthoc_profiles` power-function EMAs (len(config.training.posthoc_ema))."""
    params = diffusion.params
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema=jax.tree.map(jnp.copy, params),
        opt_state=tx.init(params),
        first_bad_step=jnp.full((), -1, jnp.int32),
        posthoc_ema=tuple(jax.tree.map(jnp.copy, params) for _ in range(posthoc_profiles)),
    )


def state_layout(diffusion: Diffusion, config: Any, mesh: Any) -> tuple[optax.GradientTransformation, Any, Any]:
    """(optimizer, abstract TrainState, its shardings): the shapes and placement every run, restore and import share."""
    from diffax import parallel
    from diffax.training.state import make_optimizer

    tx = make_optimizer(config.optimizer, config.training.num_steps)
    if "lora" in diffusion.params:  # LoRA: the optimizer sees only the adapters; everything else stays as it is
        frozen = set(diffusion.params) - {"lora"}
    elif "text" in diffusion.params and not diffusion.text_trainable:  # a frozen pretrained encoder: never updated
        frozen = {"text"}
    else:
        frozen = set()
    if frozen:
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                   {k: "frozen" if k in frozen else "train" for k in diffusion.params})
    abstract = jax.eval_shape(lambda: init_state(diffusion, tx, len(config.training.posthoc_ema)))
    return tx, abstract, parallel.param_sharding(mesh, abstract, config.mesh.fsdp_min_size)


def step_key(seed: int, step: jax.Array) -> jax.Array:
    """The random key of an optimizer step: a function of (seed, step) only."""
    return jax.random.fold_in(jax.random.key(seed), step)


def make_train_step(
    diffusion: Diffusion,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    config: Any,
    value_and_grad: Callable | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """One optimizer step (or `steps_per_dispatch` of them) as a pure function.

    value_and_grad(params, batch, key, step) -> ((loss, aux), grads) is the diffusion loss
    of `diffusion` unless given (the autoencoder trainer passes its own, diffax/training/autoencoder.py).
    """
    t = config.training
    posthoc_gammas = [float(g) for g in posthoc_ema.gamma_of_sigma_rel(list(t.posthoc_ema))]
    stop_on_bad = t.nan_policy == "stop"
    if t.nan_policy not in ("stop", "skip"):
        raise ValueError(f"config.training.nan_policy={t.nan_policy!r}: use 'stop' or 'skip'.")
    if value_and_grad is None:
        value_and_grad = _diffusion_value_and_grad(diffusion, config)

    def one_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        (value, aux), grads = value_and_grad(state.params, batch, step_key(config.seed, state.step), state.step)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = update_ema(state.ema, params, ema_decay(state.step, t.ema_decay, t.ema_warmup))
        profiles = posthoc_ema.update(state.posthoc_ema, params, state.step, posthoc_gammas)

        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
        frozen = stop_on_bad & (state.first_bad_step >= 0)
        keep = finite & ~frozen  # apply this update?
        choose = lambda new, old: jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, old)
        new_state = TrainState(
            step=state.step + 1,
            params=choose(params, state.params),
            ema=choose(ema, state.ema),
            opt_state=choose(opt_state, state.opt_state),
            first_bad_step=jnp.where(~finite & (state.first_bad_step < 0), state.step, state.first_bad_step),
            posthoc_ema=choose(profiles, state.posthoc_ema),
        )
        metrics = {
            "loss": value,
            "grad_norm": grad_norm,
            "learning_rate": lr_schedule(state.step),
            "skipped": (~keep).astype(jnp.float32),
            **{k: jnp.mean(v) for k, v in aux.items()},
        }
        return new_state, metrics

    if t.steps_per_dispatch == 1:
        return one_step

    def many_steps(state: TrainState, batches: dict) -> tuple[TrainState, dict]:
        state, metrics = jax.lax.scan(one_step, state, batches)
        return state, jax.tree.map(jnp.mean, metrics)

    return many_steps


def _diffusion_value_and_grad(diffusion: Diffusion, config: Any) -> Callable:
    """((mean diffusion loss, aux), grads) of one batch: the loss of diffax/objectives.py."""
    loss_fn = objectives.make_loss_fn(
        config.diffusion,
        diffusion.parameterization,
        num_classes=diffusion.num_classes,
        learn_sigma=bool(config.model.learn_sigma),
    )

    caption_dropout = float(config.text.caption_dropout) if diffusion.null_tokens is not None else 0.0

    def value_and_grad(params: Any, batch: dict, key: jax.Array, step: jax.Array) -> tuple[tuple, Any]:
        noise_key, dropout_key = jax.random.split(key)
        labels = batch.get("label") if diffusion.num_classes else None
        cached = diffusion.null_tokens is not None and "text_hidden" in batch
        if cached:  # a cache's stored embeddings, some replaced by the empty prompt's stored once with them
            labels = drop_captions(jax.random.fold_in(key, 7), cached_condition(batch), caption_dropout,
                                   diffusion.null_embedding)
        elif diffusion.null_tokens is not None:  # text: the captions' tokens, some replaced by the empty prompt
            labels = drop_captions(jax.random.fold_in(key, 7), batch["tokens"], caption_dropout, diffusion.null_tokens)

        def loss(params):
            apply = diffusion.apply_fn(params, dropout_key)
            cond = labels
            if diffusion.null_tokens is not None and not cached:  # the encoder runs once per step
                cond = diffusion.encode_text(params, labels)
                if "size_ids" in batch:  # SDXL: each image's original size and crop replace the config's time ids
                    from diffax.models.text.sdxl import with_size_ids

                    cond = {**cond, "pooled": with_size_ids(cond["pooled"], batch["size_ids"])}
            per_example, aux = loss_fn(apply, diffusion.schedule(params), batch["image"], noise_key, cond)
            return jnp.mean(per_example), aux

        return jax.value_and_grad(loss, has_aux=True)(params)

    return value_and_grad


def cached_condition(batch: dict) -> dict:
    """The text condition of a batch of stored embeddings (float16 or float32 on disk; float32 here, as the
    encoder returns them)."""
    cond = {"hidden": batch["text_hidden"].astype(jnp.float32), "mask": batch["text_mask"].astype(jnp.int32)}
    if "text_pooled" in batch:
        cond["pooled"] = batch["text_pooled"].astype(jnp.float32)
    return cond


def drop_captions(key: jax.Array, cond: Any, p: float, null: Any) -> Any:
    """Replace each caption's condition (tokens [B, 2, L], or a dict of embeddings [B, ...]) by the empty
    prompt's (the same without B) with probability p, so one network learns the conditional and the
    unconditional model (Ho & Salimans 2022; GLIDE, Nichol et al. 2022, drops 20% of captions; Imagen 10%)."""
    if p <= 0:
        return cond
    batch = jax.tree.leaves(cond)[0].shape[0]
    drop = jax.random.bernoulli(key, p, (batch,))

    def choose(x, n):
        n = jnp.asarray(n, x.dtype)
        return jnp.where(drop.reshape((-1,) + (1,) * n.ndim), n[None], x)

    if isinstance(cond, dict):
        return {k: choose(v, null[k]) for k, v in cond.items()}
    return choose(cond, null)

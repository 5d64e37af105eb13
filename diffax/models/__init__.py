"""Denoiser networks: UNet (DDPM / ADM), DiT, MMDiT (SD3), MLP; and the import of diffusers UNet2DModel checkpoints.

Networks take explicit keyword arguments (usable without a config); `build_model` reads
config.model once (`model_kwargs`). Every model is called as
model(x, c_noise, labels=None, *, context=None, context_mask=None, pooled=None, dropout_key=None) -> out
(context / context_mask / pooled: a text model's text embedding; UNet, DiT and MMDiT), with
out.shape == x.shape (2C channels when config.model.learn_sigma). c_noise is a float per
example (see diffax/parameterization.py); labels are int32 with the null label num_classes.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffax.registry import Registry

MODELS = Registry("model", "config.model.name")
M = TypeVar("M", bound=nnx.Module)

from diffax.models.dit import DiT  # noqa: E402
from diffax.models.mlp import MLP  # noqa: E402
from diffax.models.mmdit import MMDiT  # noqa: E402
from diffax.models.unet import UNet  # noqa: E402

MODELS.register("unet")(UNet)
MODELS.register("dit")(DiT)
MODELS.register("mlp")(MLP)
MODELS.register("mmdit")(MMDiT)


def model_kwargs(model_cfg) -> dict:
    """The keyword arguments of the network config.model.name names, read from config.model.

    Every keyword parameter of the network's constructor (other than data_shape,
    num_classes and rngs) is taken from the config field of the same name; a
    config written before a field existed gets the network's default. The one
    place a network reads the config.
    """
    cls = MODELS.get(model_cfg.name)
    names = [p.name for p in inspect.signature(cls.__init__).parameters.values()
             if p.kind == p.KEYWORD_ONLY and p.name not in ("data_shape", "num_classes", "rngs")]
    return {name: model_cfg[name] for name in names if name in model_cfg}


def build_model(model_cfg, *, data_shape: tuple[int, ...], num_classes: int, rngs: nnx.Rngs,
                **overrides) -> nnx.Module:
    """The network named by config.model.name, built for data of shape data_shape ((H, W, C) or (D,)).

    num_classes = 0 builds an unconditional model; otherwise the class table has
    num_classes + 1 rows, the last the null label used for classifier-free guidance
    (Ho & Salimans 2022). The parameters are initialised inside one jitted program (see
    `construct`), identical to eager construction with the same rngs.
    """
    cls = MODELS.get(model_cfg.name)
    kwargs = {**model_kwargs(model_cfg), **overrides}  # overrides: a text model's context_dim / pooled_dim
    return construct(lambda r: cls(data_shape=tuple(data_shape), num_classes=int(num_classes), rngs=r, **kwargs), rngs)


def construct(make: Callable[[nnx.Rngs], M], rngs: nnx.Rngs) -> M:
    """make(rngs) run as one jax.jit program; rngs advances exactly as if make ran eagerly.

    Eager construction compiles one random-initialiser program per distinct parameter shape
    (threefry compiles slowly on XLA:CPU: about a second each, a minute for a small UNet on a
    busy CPU). One program compiled at XLA backend optimisation level 0 on CPU (it runs once)
    takes a few seconds. Inside an outer trace (nnx.eval_shape, jit) it is simply inlined.
    """
    rng_graph, rng_state = nnx.split(rngs)
    if _tracing(rng_state):
        return make(rngs)
    graph = {}

    def init(rng_state):
        r = nnx.merge(rng_graph, rng_state)
        graph["def"], state = nnx.split(make(r))
        return state, nnx.state(r)

    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    state, rng_state = jax.jit(init, compiler_options=options)(rng_state)
    nnx.update(rngs, rng_state)
    return nnx.merge(graph["def"], state)


def _tracing(tree) -> bool:
    """True inside a jit / eval_shape trace (a nested jit may not take compiler options)."""
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree)):
        return True
    return isinstance(jnp.zeros(()), jax.core.Tracer)  # inside a trace, every new array is a tracer


def count_params(tree: Any, kind: type = nnx.Param) -> int:
    """Number of scalars: of the `kind` variables (default parameters) of an nnx module, or of every leaf
    of a pytree of arrays (e.g. TrainState.params). Works on abstract shapes, so for a config

        count_params(nnx.eval_shape(lambda: build_model(config.model, data_shape=..., num_classes=...,
                                                        rngs=nnx.Rngs(0))))

    allocates nothing.
    """
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, kind)
    return sum(math.prod(np.shape(x)) for x in jax.tree.leaves(tree))


__all__ = ["MODELS", "build_model", "construct", "count_params", "model_kwargs", "UNet", "DiT", "MMDiT", "MLP"]

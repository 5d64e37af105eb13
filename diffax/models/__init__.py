"""Denoiser networks: UNet (DDPM / ADM), DiT, MLP; and the import of diffusers UNet2DModel checkpoints.

Every model is called as model(x, c_noise, labels=None, *, dropout_key=None) -> out, with
out.shape == x.shape (2C channels when config.model.learn_sigma). c_noise is a float per
example (see diffax/parameterization.py); labels are int32 with the null label num_classes.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import jax
from flax import nnx

from diffax.registry import Registry

MODELS = Registry("model", "config.model.name")
M = TypeVar("M", bound=nnx.Module)

from diffax.models.dit import DiT  # noqa: E402
from diffax.models.mlp import MLP  # noqa: E402
from diffax.models.unet import UNet  # noqa: E402

MODELS.register("unet")(UNet)
MODELS.register("dit")(DiT)
MODELS.register("mlp")(MLP)


def build_model(model_cfg, *, data_shape: tuple[int, ...], num_classes: int, rngs: nnx.Rngs) -> nnx.Module:
    """The network named by config.model.name, built for data of shape data_shape ((H, W, C) or (D,)).

    num_classes = 0 builds an unconditional model; otherwise the class table has
    num_classes + 1 rows, the last the null label used for classifier-free guidance
    (Ho & Salimans 2022). The parameters are initialised inside one jitted program (see
    `construct`), identical to eager construction with the same rngs.
    """
    cls = MODELS.get(model_cfg.name)
    return construct(
        lambda r: cls(model_cfg, data_shape=tuple(data_shape), num_classes=int(num_classes), rngs=r), rngs
    )


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
    try:
        from jax._src import core
    except ImportError:  # pragma: no cover - private module moved; assume not tracing
        return False
    return not core.trace_state_clean()


def count_params(model_cfg, *, data_shape: tuple[int, ...], num_classes: int) -> int:
    """Number of parameters of build_model(...), from shapes only (nnx.eval_shape: nothing is allocated)."""
    abstract = nnx.eval_shape(
        lambda: build_model(model_cfg, data_shape=data_shape, num_classes=num_classes, rngs=nnx.Rngs(0))
    )
    return sum(int(v.size) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))


__all__ = ["MODELS", "build_model", "construct", "count_params", "UNet", "DiT", "MLP"]

"""Build what a config names (network, schedule, parameterization) once, for training and inference alike."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from flax import nnx

from diffax import data, models, parameterization, schedules


@dataclasses.dataclass
class Diffusion:
    """A config's denoiser split into pure parts.

    `params` is {"net": network weights, "schedule": learned-schedule weights
    (empty unless config.diffusion.schedule is "learned")}. `apply_fn(params)`
    and `schedule(params)` rebuild the callables inside a jitted function.
    """

    config: Any
    data_shape: tuple[int, ...]
    num_classes: int
    net_graphdef: Any
    net_rest: Any  # non-trainable network state (usually empty)
    schedule_graphdef: Any  # None when the schedule has no weights
    static_schedule: Any  # the schedule when it has no weights
    parameterization: Any
    params: Any  # initial weights

    def apply_fn(self, params: Any, dropout_key: jax.Array | None = None) -> Callable:
        """The network as apply_fn(z_in, c_noise, labels) for the diffusion math."""
        net = nnx.merge(self.net_graphdef, params["net"], self.net_rest)

        def apply(z_in, c_noise, labels=None):
            return net(z_in, c_noise, labels, dropout_key=dropout_key)

        return apply

    def schedule(self, params: Any) -> Any:
        if self.schedule_graphdef is None:
            return self.static_schedule
        return nnx.merge(self.schedule_graphdef, params["schedule"])

    @property
    def null_label(self) -> int | None:
        return self.num_classes if self.num_classes else None


def num_classes(config: Any) -> int:
    return int(config.data.num_classes) if config.data.conditional else 0


def build(config: Any, seed: int | None = None) -> Diffusion:
    """Initialise the network (and learned schedule) of `config` with `seed` (default config.seed)."""
    seed = config.seed if seed is None else seed
    shape = tuple(data.data_shape(config))
    n_classes = num_classes(config)
    rngs = nnx.Rngs(params=jax.random.fold_in(jax.random.key(seed), 1))
    net = models.build_model(config.model, data_shape=shape, num_classes=n_classes, rngs=rngs)
    net_graphdef, net_params, net_rest = nnx.split(net, nnx.Param, ...)

    image_size = shape[0] if len(shape) == 3 else None
    schedule = schedules.get_schedule(config.diffusion, image_size=image_size, seed=seed)
    if isinstance(schedule, nnx.Module):
        schedule_graphdef, schedule_params = nnx.split(schedule, nnx.Param)
        static_schedule = None
    else:
        schedule_graphdef, schedule_params, static_schedule = None, {}, schedule
    return Diffusion(
        config=config,
        data_shape=shape,
        num_classes=n_classes,
        net_graphdef=net_graphdef,
        net_rest=net_rest,
        schedule_graphdef=schedule_graphdef,
        static_schedule=static_schedule,
        parameterization=parameterization.get_parameterization(config.diffusion),
        params={"net": net_params, "schedule": schedule_params},
    )

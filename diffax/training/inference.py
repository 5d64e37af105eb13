"""Use a trained run: load a checkpoint's (EMA) weights and draw samples, sharded over the devices.

The same functions serve the samples written during training, `diffax sample`
and the evaluation job, so all three sample the same way.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import numpy as np

from diffax import compilation, configuration, parallel, samplers
from diffax.training import checkpoint
from diffax.training.build import Diffusion, build
from diffax.training.step import state_layout


def make_sample_fn(diffusion: Diffusion, config: Any, mesh: Any, param_shardings: Any) -> Callable:
    """A jitted sample_fn(params, noise, key, labels) -> samples, its batch sharded over the mesh."""
    batch = parallel.batch_sharding(mesh)

    def sample(params, noise, key, labels):
        return samplers.sample(
            config.sampling,
            config.diffusion,
            diffusion.schedule(params),
            diffusion.parameterization,
            diffusion.apply_fn(params),
            noise,
            key,
            labels,
            null_label=diffusion.null_label,
        )

    return jax.jit(
        sample,
        in_shardings=(param_shardings, batch, parallel.replicated(mesh), batch),
        out_shardings=batch,
        compiler_options=compilation.compiler_options(config),
    )


def default_labels(num_samples: int, num_classes: int) -> np.ndarray | None:
    """Class labels cycling 0..num_classes-1 for conditional models (None when unconditional)."""
    return (np.arange(num_samples) % num_classes).astype(np.int32) if num_classes else None


def draw(
    sample_fn: Callable,
    params: Any,
    config: Any,
    mesh: Any,
    shape: tuple[int, ...],
    num_classes: int,
    *,
    num_samples: int,
    seed: int,
    progress: bool = True,
    noise: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Draw `num_samples` in chunks of `batch_size` (default config.sampling.batch_size); see samplers.draw_samples."""
    if labels is None:
        labels = default_labels(num_samples, num_classes)
    return samplers.draw_samples(
        functools.partial(sample_fn, params),
        num_samples,
        int(batch_size or config.sampling.batch_size),
        shape,
        seed,
        sharding=parallel.batch_sharding(mesh),
        labels=labels,
        noise=noise,
        progress=progress,
    )


@dataclasses.dataclass
class Inference:
    """A run's weights at one checkpoint, ready to sample from."""

    config: Any
    step: int
    diffusion: Diffusion
    params: Any  # {"net": ..., "schedule": ...}: the EMA weights unless use_ema=False
    mesh: Any
    _sample: Callable

    def sample_fn(self, noise, key, labels=None):
        """Samples from noise with the config's sampler (jitted and sharded)."""
        return self._sample(self.params, noise, key, labels)

    def apply_fn(self, z_in, c_noise, labels=None):
        return self.diffusion.apply_fn(self.params)(z_in, c_noise, labels)

    def draw(self, num_samples: int, seed: int, **kwargs) -> dict[str, np.ndarray]:
        return draw(self._sample, self.params, self.config, self.mesh, self.diffusion.data_shape,
                    self.diffusion.num_classes, num_samples=num_samples, seed=seed, **kwargs)


def load(workdir: str, step: int | None = None, use_ema: bool = True, config: Any | None = None) -> Inference:
    """Load the checkpoint at `step` (default: the latest) of the run in `workdir`.

    The config defaults to the run's own `config.json`; a given config must
    describe the same model (sampling settings may differ).
    """
    if config is None:
        config = configuration.load(os.path.join(workdir, "config.json"))
    steps = checkpoint.all_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"No checkpoint in {checkpoint.checkpoint_dir(workdir)}: train first, or check --workdir.")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"No checkpoint at step {step} in {workdir}; available steps: {steps}.")
    mesh = parallel.make_mesh(config.mesh)
    diffusion = build(config)
    _, abstract, shardings = state_layout(diffusion, config, mesh)
    ckpt = checkpoint.Checkpointer(workdir, keep=max(len(steps), 1), async_save=False)
    try:
        state = ckpt.restore(step, checkpoint.abstract_like(abstract, shardings))
    finally:
        ckpt.close()
    params = state.ema if use_ema else state.params
    sample = make_sample_fn(diffusion, config, mesh, shardings.ema)
    return Inference(config=config, step=step, diffusion=diffusion, params=params, mesh=mesh, _sample=sample)

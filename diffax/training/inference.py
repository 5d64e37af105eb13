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
import jax.numpy as jnp
import numpy as np

from diffax import compilation, configuration, parallel, samplers
from diffax.errors import UserError
from diffax.training import checkpoint, latent
from diffax.training.build import Diffusion, build
from diffax.training.step import state_layout


def make_sample_fn(diffusion: Diffusion, config: Any, mesh: Any, param_shardings: Any, null_label: Any = None) -> Callable:
    """A jitted sample_fn(params, noise, key, labels) -> samples, its batch sharded over the mesh.

    `null_label` replaces the model's null condition in guidance: a negative prompt's tokens. A text
    model's `labels` are the prompts' tokens [B, 2, L]: the text encoder runs on them once, and once on
    the null prompt, before the sampler's loop, whose network evaluations get the embeddings.
    """
    batch = parallel.batch_sharding(mesh)
    sampler = samplers.make_sampler(config)
    null = diffusion.null_label if null_label is None else null_label
    text = diffusion.null_tokens is not None

    def sample(params, noise, key, labels):
        null_cond = null
        if text:  # encode once per batch; an unguided sampler leaves the null's encoding unused (and compiled out)
            labels = diffusion.encode_text(params, labels)
            null_cond = jax.tree.map(lambda x: x[0], diffusion.encode_text(params, jnp.asarray(null, jnp.int32)[None]))
        return sampler(diffusion.schedule(params), diffusion.parameterization, diffusion.apply_fn(params),
                       noise, key, labels, null_label=null_cond)

    sample_fn = jax.jit(
        sample,
        in_shardings=(param_shardings, batch, parallel.replicated(mesh), batch),
        out_shardings=batch,
        compiler_options=compilation.compiler_options(config),
    )
    decode = latent.make_decoder(config, batch)  # latent runs: samples are decoded pixels
    if decode is None:
        return sample_fn

    def sample_and_decode(params, noise, key, labels):
        return decode(sample_fn(params, noise, key, labels))

    # The jitted sampler alone, for tracing it with jax.eval_shape: a jit with compiler options
    # may not be traced inside another function.
    sample_and_decode.sampler = sample_fn
    return sample_and_decode


def sampling_shardings(diffusion: Diffusion, param_shardings: Any, mesh: Any) -> Any:
    """The shardings of `diffusion.sampling_params`: the params', and the frozen encoder replicated for a run
    on cached text embeddings (whose params lack it)."""
    if diffusion.frozen_text is None:
        return param_shardings
    return {**param_shardings, "text": jax.tree.map(lambda _: parallel.replicated(mesh), diffusion.frozen_text)}


def frozen_text_on_devices(diffusion: Diffusion, param_shardings: Any) -> Diffusion:
    """`diffusion` with the frozen encoder of a run on cached text embeddings put on the devices once (as
    `sampling_shardings` places it), so that each sampling call does not copy it from the host again."""
    if diffusion.frozen_text is None:
        return diffusion
    return dataclasses.replace(diffusion, frozen_text=jax.device_put(diffusion.frozen_text, param_shardings["text"]))


def default_labels(num_samples: int, num_classes: int) -> np.ndarray | None:
    """Class labels cycling 0..num_classes-1 for conditional models (None when unconditional)."""
    return (np.arange(num_samples) % num_classes).astype(np.int32) if num_classes else None


@dataclasses.dataclass
class Inference:
    """A run's weights at one checkpoint, ready to sample from."""

    config: Any
    step: int
    diffusion: Diffusion
    params: Any  # {"net": ..., "schedule": ...}: the EMA weights unless use_ema=False
    mesh: Any
    _sample: Callable  # make_sample_fn's sample(params, noise, key, labels)
    tokenizer: Any = None  # text models: prompts -> tokens

    @property
    def is_text(self) -> bool:
        return self.diffusion.null_tokens is not None

    def prompt_tokens(self, prompts: list[str]) -> np.ndarray:
        """int32 [N, 2, L]: the tokens of `prompts` for `draw(labels=...)`; an error for a model without text."""
        if not self.is_text:
            raise UserError("Prompts were given, but this run is not a text-to-image model (config.text.encoder is "
                            "empty): drop --prompt / --prompts, or sample a text run.")
        from diffax.training import text

        return text.tokens_of(self.tokenizer, prompts)

    def sample_fn(self, noise, key, labels=None):
        """Samples from noise with the config's sampler (jitted and sharded)."""
        return self._sample(self.params, noise, key, labels)

    def apply_fn(self, z_in, c_noise, labels=None):
        return self.diffusion.apply_fn(self.params)(z_in, c_noise, labels)

    def draw(
        self,
        num_samples: int,
        seed: int,
        *,
        batch_size: int | None = None,
        noise: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        progress: bool = True,
    ) -> dict[str, np.ndarray]:
        """Draw `num_samples` in chunks of `batch_size` (default config.sampling.batch_size).

        Labels default to `default_labels` for conditional models. The one way to sample a run
        (training previews, `diffax sample`, the evaluation job); see `samplers.draw_samples`
        for the chunking, seeding and output format.
        """
        if labels is None and self.is_text:
            raise UserError("This is a text-to-image model: give prompts (diffax sample --prompt TEXT or --prompts FILE; "
                            "--prompt '' draws unconditional samples).")
        if labels is None:
            labels = default_labels(num_samples, self.diffusion.num_classes)
        return samplers.draw_samples(
            functools.partial(self._sample, self.params),
            num_samples,
            int(batch_size or self.config.sampling.batch_size),
            self.diffusion.data_shape,
            seed,
            sharding=parallel.batch_sharding(self.mesh),
            labels=labels,
            noise=noise,
            progress=progress,
        )


def load(workdir: str, step: int | None = None, use_ema: bool = True, config: Any | None = None,
         ema_sigma_rel: float | None = None) -> Inference:
    """Load the checkpoint at `step` (default: the latest) of the run in `workdir`.

    The config defaults to the run's own `config.json`; a given config must
    describe the same model (sampling settings may differ). With
    `ema_sigma_rel`, the weights are the post-hoc EMA of that length at
    snapshot `step` instead (posthoc_snapshots.load: read, or reconstructed).
    """
    if config is None:
        config = configuration.load(os.path.join(workdir, "config.json"))
    latent.check_autoencoder(workdir, config)
    mesh = parallel.make_mesh(config.mesh)
    from diffax.training import text as text_lib

    diffusion = build(config, cached_text=text_lib.trained_on_cached_embeddings(workdir))
    _, abstract, shardings = state_layout(diffusion, config, mesh)
    tokenizer, null = text_tokenizer(config, workdir, diffusion)
    param_shardings = sampling_shardings(diffusion, shardings.ema, mesh)
    diffusion = frozen_text_on_devices(diffusion, param_shardings)
    sample = make_sample_fn(diffusion, config, mesh, param_shardings, null_label=null)
    if ema_sigma_rel is not None:
        from diffax.training import posthoc_snapshots

        step, params = posthoc_snapshots.load(
            workdir, ema_sigma_rel, checkpoint.abstract_like(abstract.ema, shardings.ema),
            checkpoint.abstract_like(abstract.posthoc_ema, shardings.posthoc_ema), step)
        return Inference(config=config, step=step, diffusion=diffusion, params=diffusion.sampling_params(params),
                         mesh=mesh, _sample=sample, tokenizer=tokenizer)
    steps = checkpoint.all_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"No checkpoint in {checkpoint.checkpoint_dir(workdir)}: train first, or check --workdir.")
    if step is not None and step not in steps:
        raise ValueError(f"No checkpoint at step {step} in {workdir}; available steps: {steps}.")
    target = checkpoint.abstract_like(abstract, shardings)
    ckpt = checkpoint.Checkpointer(workdir, keep=max(len(steps), 1), async_save=False)
    try:  # the step asked for, or the newest that restores (a damaged one is named, and left alone)
        if step is not None:
            state = ckpt.restore(step, target)
        else:
            step, state = checkpoint.restore_newest(ckpt, target, set_aside=False)
            if step is None:
                raise UserError(f"No checkpoint in {checkpoint.checkpoint_dir(workdir)} can be read (the warnings "
                                "above say why): train again, or point --workdir at another run.")
    finally:
        ckpt.close()
    params = diffusion.sampling_params(state.ema if use_ema else state.params)
    return Inference(config=config, step=step, diffusion=diffusion, params=params, mesh=mesh, _sample=sample,
                     tokenizer=tokenizer)


def text_tokenizer(config: Any, workdir: str, diffusion: Diffusion) -> tuple[Any, Any]:
    """(tokenizer, null condition or None) of a text run: the null is config.sampling.negative_prompt's
    tokens when one is set (else the model's empty prompt). (None, None) for other runs."""
    if diffusion.null_tokens is None:
        return None, None
    from diffax.training import text

    tokenizer = text.load_tokenizer(config, workdir, diffusion)
    negative = str(config.sampling.get("negative_prompt", "") or "")
    return tokenizer, (text.tokens_of(tokenizer, [negative])[0] if negative else None)

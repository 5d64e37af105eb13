"""`sample` (one batch, pure, jit it), `make_sampler` (the same from a config) and `draw_samples` (many
batches, streamed to the host)."""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from diffax.parallel import batch_shards
from diffax.samplers.base import SAMPLERS
from diffax.samplers.guidance import make_denoiser
from diffax.visualize import to_uint8

Array = jax.Array


def sample(
    name: str,
    schedule: Any,
    parameterization: Any,
    apply_fn: Callable,
    noise: Array,
    key: Array,
    *,
    labels: Array | None = None,
    null_label: int | None = None,
    guidance_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    clip_x0: bool = False,
    dynamic_threshold: float = 0.0,
    clip_rederives_eps: bool = True,
    **options: Any,
) -> Array:
    """Draw x0 samples from standard-normal `noise` [B, ...] with the sampler `name` and its `options`.

    Pure and jittable: the step loop is a lax.scan on the device, so compile time does not depend
    on the number of steps. `apply_fn(z_in, c_noise, labels)` is the network; `labels` int32 [B]
    or None; `null_label` (= num_classes) is needed for classifier-free guidance. The guidance
    and clipping arguments are `make_denoiser`'s, `options` the sampler function's keyword
    arguments (e.g. steps=50, eta=0.0 for ddim). Float32 output.
    """
    fn = SAMPLERS.get(name)
    denoise = make_denoiser(
        apply_fn, schedule, parameterization, guidance_scale=guidance_scale, guidance_interval=guidance_interval,
        null_label=null_label, clip_x0=clip_x0, dynamic_threshold=dynamic_threshold,
        clip_rederives_eps=clip_rederives_eps,
    )
    return fn(lambda z, t, c_noise=None: denoise(z, t, labels, c_noise), schedule, noise, key, **options)


# config.sampling fields whose sampler argument has another name
_CONFIG_FIELD = {"solver": "ode_solver", "rtol": "ode_rtol", "atol": "ode_atol"}


def sampler_options(name: str, sampling_cfg: Any) -> dict[str, Any]:
    """The keyword arguments of sampler `name` read from config.sampling (each argument from the field of the
    same name, the ode solver's from ode_solver / ode_rtol / ode_atol)."""
    fn = SAMPLERS.get(name)
    options = {}
    for arg in inspect.signature(fn).parameters.values():
        if arg.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        field = _CONFIG_FIELD.get(arg.name, arg.name)
        if field not in sampling_cfg and arg.default is inspect.Parameter.empty:
            raise ValueError(f"config.sampling.{field} is needed by the {name} sampler: add it to the config")
        value = sampling_cfg.get(field, arg.default)  # a run saved before the field existed: its default
        options[arg.name] = tuple(value) if isinstance(value, (list, tuple)) else value
    return options


def make_sampler(config: Any) -> Callable:
    """Read config.sampling and config.diffusion once: a sampler
    fn(schedule, parameterization, apply_fn, noise, key, labels=None, *, null_label=None) -> x
    equal to `sample` with the config's sampler name, its options, guidance and x0 clipping."""
    s, d = config.sampling, config.diffusion
    name = str(s.sampler)
    options = sampler_options(name, s)
    guidance = dict(guidance_scale=float(s.guidance_scale), clip_x0=bool(d.clip_x0),
                    guidance_interval=tuple(float(v) for v in s.guidance_interval),
                    dynamic_threshold=float(d.dynamic_threshold),
                    clip_rederives_eps=bool(d.get("clip_rederives_eps", True)))  # a run saved before the field

    def sampler(schedule, parameterization, apply_fn, noise, key, labels=None, *, null_label=None):
        return sample(name, schedule, parameterization, apply_fn, noise, key, labels=labels, null_label=null_label,
                      **guidance, **options)

    return sampler


def _batch_sharding(sharding: Any, ndim: int) -> Any:
    if sharding is None:
        return None
    if not isinstance(sharding, NamedSharding):
        raise TypeError(f"sharding must be a jax.sharding.NamedSharding, got {type(sharding).__name__}")
    lead = sharding.spec[0] if len(sharding.spec) else None
    return NamedSharding(sharding.mesh, PartitionSpec(lead, *([None] * (ndim - 1))))


def _put(x: np.ndarray, sharding: Any) -> Array:
    if sharding is None:
        return jnp.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _fetch(x: Array) -> np.ndarray:
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def draw_samples(
    sample_fn: Callable,
    num_samples: int,
    batch_size: int,
    shape: tuple[int, ...],
    seed: int,
    *,
    sharding: Any = None,
    labels: np.ndarray | None = None,
    noise: np.ndarray | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Draw `num_samples` samples in fixed-size chunks of `batch_size` with `sample_fn(noise, key, labels)`.

    Chunk c uses key fold_in(PRNGKey(seed), c): its initial noise is normal(fold_in(key_c, 0)) unless
    `noise` [num_samples, *shape] is given, and the sampler gets fold_in(key_c, 1), so the output is
    a deterministic function of (seed, batch_size). The last chunk is padded to batch_size (one
    compiled shape) and trimmed; fewer than `batch_size` samples run as one chunk of `num_samples` (rounded
    up to a multiple of the data axis). With a NamedSharding the batch is split over its first mesh axis
    (the data axis). The next chunk is dispatched before the previous one is copied to the host.
    Returns {"images": uint8 NHWC (round(clip((x+1)*127.5))) for image data (len(shape) == 3) or float32
    otherwise, "labels": int32 [num_samples] (text models: tokens [num_samples, 2, L]) or None}.
    """
    from tqdm.auto import tqdm

    shape = tuple(int(s) for s in shape)
    num_samples, batch_size = int(num_samples), int(batch_size)
    if noise is not None:
        noise = np.asarray(noise, np.float32)
        if noise.shape != (num_samples, *shape):
            raise ValueError(f"noise has shape {noise.shape}, expected {(num_samples, *shape)}")
    if labels is not None:  # class labels [N], or a text model's tokens [N, 2, max_length]
        labels = np.asarray(labels, np.int32)
        if labels.shape[:1] != (num_samples,):
            raise ValueError(f"labels has shape {labels.shape}, expected ({num_samples}, ...)")
    x_sharding = _batch_sharding(sharding, 1 + len(shape))
    l_sharding = _batch_sharding(sharding, 1 if labels is None else labels.ndim)
    n_shards = 1
    if sharding is not None:
        n_shards = batch_shards(x_sharding)
        if batch_size % n_shards:
            raise ValueError(f"batch_size {batch_size} must be divisible by the data axis size {n_shards}")
    batch_size = min(batch_size, max(1, math.ceil(num_samples / n_shards)) * n_shards)  # draw only what is needed
    make_noise = jax.jit(
        lambda k: jax.random.normal(k, (batch_size, *shape), jnp.float32),
        out_shardings=x_sharding,
    )
    root = jax.random.PRNGKey(int(seed))
    n_chunks = max(1, math.ceil(num_samples / batch_size))
    outputs: list[np.ndarray] = []
    bar = tqdm(total=num_samples, desc="sampling", unit="img", disable=not progress or jax.process_index() != 0)
    pending = None
    for c in range(n_chunks + 1):
        if c < n_chunks:
            lo, hi = c * batch_size, min((c + 1) * batch_size, num_samples)
            key = jax.random.fold_in(root, c)
            if noise is None:
                z = make_noise(jax.random.fold_in(key, 0))
            else:
                chunk = np.zeros((batch_size, *shape), np.float32)
                chunk[: hi - lo] = noise[lo:hi]
                z = _put(chunk, x_sharding)
            lab = None
            if labels is not None:
                lab_np = np.zeros((batch_size, *labels.shape[1:]), np.int32)
                lab_np[: hi - lo] = labels[lo:hi]
                lab = _put(lab_np, l_sharding)
            out = sample_fn(z, jax.random.fold_in(key, 1), lab)
        if pending is not None:  # copy the previous chunk while this one runs
            prev, n_valid = pending
            outputs.append(_fetch(prev)[:n_valid])
            bar.update(n_valid)
        pending = (out, hi - lo) if c < n_chunks else None
    bar.close()
    x = np.concatenate(outputs)[:num_samples] if outputs else np.zeros((0, *shape), np.float32)
    images = to_uint8(x) if len(shape) == 3 else x.astype(np.float32)
    return {"images": images, "labels": labels}

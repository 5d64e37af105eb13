"""The denoiser every sampler calls: network -> (x0, eps), with guidance and x0 clipping.

`make_denoiser` turns `apply_fn(z_in, c_noise, labels)` into `denoise(z, t, labels)
-> (x0, eps)` in float32 through the parameterization (so every sampler works with
every prediction target and schedule), applies classifier-free guidance (Ho &
Salimans 2022) optionally restricted to an interval of t (Kynkaanniemi et al. 2024),
then x0 clipping or dynamic thresholding (Saharia et al. 2022), re-deriving eps from
the clipped x0 as guided-diffusion does (diffusers' `use_clipped_model_output=True`).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffax import parameterization as param_lib
from diffax.samplers.base import bcast

Array = jax.Array


def _raw_denoiser(apply_fn: Callable, schedule: Any, parameterization: Any) -> Callable:
    """(z, t[B], labels) -> (x0, eps, v): one network call, no guidance, no clipping."""

    def net(z: Array, t: Array, labels: Array | None):
        z_in, c_noise = parameterization.model_inputs(z, t, schedule)
        out = jnp.asarray(apply_fn(z_in, c_noise, labels)).astype(jnp.float32)
        v = None
        if out.shape != z.shape:  # the model also predicts the variance (Nichol & Dhariwal 2021)
            out, v = param_lib.split_learned_variance(out, z.shape[-1])
            out = out.astype(jnp.float32)
            v = None if v is None else v.astype(jnp.float32)
        x0, eps = parameterization.to_x0_eps(out, z, t, schedule)
        return jnp.asarray(x0, jnp.float32), jnp.asarray(eps, jnp.float32), v

    return net


def make_denoiser(
    apply_fn: Callable,
    schedule: Any,
    parameterization: Any,
    sampling_cfg: Any,
    diffusion_cfg: Any,
    *,
    null_label: int | None = None,
    return_variance: bool = False,
) -> Callable:
    """The sampler's view of the network: denoise(z, t, labels=None) -> (x0, eps), float32.

    t is a scalar or per-example [B] time. With config.sampling.guidance_scale w != 1,
    the conditional and unconditional (label = `null_label`, i.e. num_classes) outputs
    come from one batched call and are mixed as eps = eps_u + w (eps_c - eps_u) (Ho &
    Salimans 2022, Eq. 6; the same affine mix for x0, which keeps z = alpha x0 + sigma
    eps exact), only for t inside config.sampling.guidance_interval (Kynkaanniemi et al.
    2024) and with w = 1 (purely conditional, one network call) outside it. Then x0 is clipped or
    thresholded per config.diffusion.clip_x0 / dynamic_threshold and eps re-derived from
    it. With `return_variance`, a third output is the learned-variance interpolation v
    in [-1, 1] (Nichol & Dhariwal 2021, Eq. 15) or None.
    """
    net = _raw_denoiser(apply_fn, schedule, parameterization)
    scale = float(sampling_cfg.guidance_scale)
    lo, hi = (float(v) for v in sampling_cfg.guidance_interval)
    guided = scale != 1.0
    clip, dynamic = bool(diffusion_cfg.clip_x0), float(diffusion_cfg.dynamic_threshold)
    clipping = clip or dynamic > 0

    def denoise(z: Array, t: Array | float, labels: Array | None = None):
        z = jnp.asarray(z, jnp.float32)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), z.shape[:1])
        if guided:
            if labels is None or null_label is None:
                raise ValueError(
                    "Classifier-free guidance (config.sampling.guidance_scale != 1) needs class labels and "
                    "null_label (= config.data.num_classes); set guidance_scale = 1 for an unconditional model."
                )
            labels = jnp.asarray(labels, jnp.int32)
            inside = (t >= lo) & (t <= hi)

            def guide(_):
                both = jnp.concatenate([labels, jnp.full_like(labels, int(null_label))])
                x0, eps, v = net(jnp.concatenate([z, z]), jnp.concatenate([t, t]), both)
                b = z.shape[0]
                w = bcast(jnp.where(inside, scale, 1.0), z)
                v = None if v is None else v[:b]  # the conditional variance, as GLIDE
                return x0[b:] + w * (x0[:b] - x0[b:]), eps[b:] + w * (eps[:b] - eps[b:]), v

            if lo <= 0.0 and hi >= 1.0:
                x0, eps, v = guide(None)
            else:  # outside the interval only the conditional half is evaluated
                x0, eps, v = jax.lax.cond(jnp.any(inside), guide, lambda _: net(z, t, labels), None)
        else:
            x0, eps, v = net(z, t, labels)
        if clipping:
            x0 = param_lib.threshold_x0(x0, clip=clip, dynamic=dynamic)
            a, s = (jnp.asarray(u, jnp.float32) for u in schedule.alpha_sigma(t))
            a, s = bcast(a, z), bcast(s, z)
            eps = jnp.where(s > 0, (z - a * x0) / jnp.where(s > 0, s, 1.0), eps)
        return (x0, eps, v) if return_variance else (x0, eps)

    return denoise

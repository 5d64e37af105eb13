"""The denoiser every sampler calls: network -> Denoised(x0, eps), with guidance and x0 clipping.

`make_denoiser` turns `apply_fn(z_in, c_noise, labels)` into `denoise(z, t, labels, c_noise=None)
-> Denoised` in float32 through the parameterization (so every sampler works with every
prediction target and schedule), applies classifier-free guidance (Ho & Salimans 2022)
optionally restricted to an interval of t (Kynkaanniemi et al. 2024), then x0 clipping or
dynamic thresholding (Saharia et al. 2022), re-deriving eps from the clipped x0 as
guided-diffusion does (diffusers' `use_clipped_model_output=True`).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffax import parameterization as param_lib
from diffax.samplers.base import Denoised

Array = jax.Array


def raw_denoiser(apply_fn: Callable, schedule: Any, parameterization: Any) -> Callable:
    """net(z, t[B], labels, c_noise=None) -> Denoised: one network call, no guidance, no clipping.

    `c_noise` [B] replaces the parameterization's noise input (a sampler on diffusers' grid passes
    diffusers' exact timesteps); the conversion to (x0, eps) always uses the schedule at t.
    """

    def net(z: Array, t: Array, labels: Array | None, c_noise: Array | None = None) -> Denoised:
        z_in, c = parameterization.model_inputs(z, t, schedule)
        if c_noise is not None:
            c = jnp.broadcast_to(jnp.asarray(c_noise, jnp.float32), z.shape[:1])
        out = jnp.asarray(apply_fn(z_in, c, labels)).astype(jnp.float32)
        var_interp = None
        if out.shape != z.shape:  # the model also predicts the variance (Nichol & Dhariwal 2021)
            out, var_interp = param_lib.split_learned_variance(out, z.shape[-1])
            var_interp = None if var_interp is None else var_interp.astype(jnp.float32)
        x0, eps = parameterization.to_x0_eps(out.astype(jnp.float32), z, t, schedule)
        return Denoised(jnp.asarray(x0, jnp.float32), jnp.asarray(eps, jnp.float32), var_interp)

    return net


def make_denoiser(
    apply_fn: Callable,
    schedule: Any,
    parameterization: Any,
    *,
    guidance_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    null_label: Any = None,
    clip_x0: bool = False,
    dynamic_threshold: float = 0.0,
    clip_rederives_eps: bool = True,
) -> Callable:
    """The sampler's view of the network: denoise(z, t, labels=None, c_noise=None) -> Denoised, float32.

    t is a scalar or per-example [B] time. With `guidance_scale` w != 1, the conditional and
    unconditional (label = `null_label`, i.e. num_classes) outputs come from one batched call
    and are mixed as eps = eps_u + w (eps_c - eps_u) (Ho & Salimans 2022, Eq. 6; the same
    affine mix for x0, which keeps z = alpha x0 + sigma eps exact), only for t inside
    `guidance_interval` (Kynkaanniemi et al. 2024) and with w = 1 (purely conditional, one
    network call) outside it. Then x0 is clipped to [-1, 1] (`clip_x0`) or dynamically
    thresholded at the quantile `dynamic_threshold` in (0, 1] (Saharia et al. 2022), and eps
    re-derived from it (guided-diffusion's DDIM), or with `clip_rederives_eps=False` the network's eps
    kept beside the clipped x0 (diffusers' DDIMScheduler.step without use_clipped_model_output). A learned-variance model's `var_interp` is the conditional one, as GLIDE.
    For a text model `labels` are its embeddings {"hidden" [B, L, D], "mask" [B, L], "pooled" [B, P]}
    (or tokens [B, 2, L]) and `null_label` the same without B for the empty (or the negative) prompt,
    the unconditional input of text guidance (Nichol et al. 2022, GLIDE).
    """
    net = raw_denoiser(apply_fn, schedule, parameterization)
    scale = float(guidance_scale)
    lo, hi = (float(v) for v in guidance_interval)
    guided = scale != 1.0
    clip, dynamic = bool(clip_x0), float(dynamic_threshold)
    if not 0.0 <= dynamic <= 1.0:
        raise ValueError(
            f"config.diffusion.dynamic_threshold={dynamic} must be a quantile in (0, 1] (e.g. 0.995), or 0 for off"
        )

    def denoise(z: Array, t: Array | float, labels: Array | None = None, c_noise: Array | None = None) -> Denoised:
        z = jnp.asarray(z, jnp.float32)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), z.shape[:1])
        if guided:
            if labels is None or null_label is None:
                raise ValueError(
                    "Classifier-free guidance (config.sampling.guidance_scale != 1) needs class labels and "
                    "null_label (= config.data.num_classes); set guidance_scale = 1 for an unconditional model."
                )
            if not isinstance(labels, dict):  # class labels or tokens; a dict is a text model's embeddings
                labels = jnp.asarray(labels, jnp.int32)
            inside = (t >= lo) & (t <= hi)

            def guide(_):
                both = jax.tree.map(  # [labels; null]: both halves in one batch (any pytree of conditions)
                    lambda y, n: jnp.concatenate([y, jnp.broadcast_to(jnp.asarray(n, y.dtype), y.shape)]),
                    labels, null_label)
                c2 = None if c_noise is None else jnp.concatenate([jnp.broadcast_to(c_noise, t.shape)] * 2)
                out = net(jnp.concatenate([z, z]), jnp.concatenate([t, t]), both, c2)
                b = z.shape[0]
                w = param_lib.batch_broadcast(jnp.where(inside, scale, 1.0), z)
                mix = lambda u: u[b:] + w * (u[:b] - u[b:])  # noqa: E731
                var_interp = None if out.var_interp is None else out.var_interp[:b]
                return Denoised(mix(out.x0), mix(out.eps), var_interp)

            if lo <= 0.0 and hi >= 1.0:
                out = guide(None)
            else:  # outside the interval only the conditional half is evaluated
                out = jax.lax.cond(jnp.any(inside), guide, lambda _: net(z, t, labels, c_noise), None)
        else:
            out = net(z, t, labels, c_noise)
        if clip or dynamic > 0:
            x0 = param_lib.threshold_x0(out.x0, clip=clip, dynamic=dynamic)
            eps = out.eps
            if clip_rederives_eps:
                a, s = param_lib.coefficients(z, t, schedule)
                eps = jnp.where(s > 0, (z - a * x0) / jnp.where(s > 0, s, 1.0), out.eps)
            out = Denoised(x0, eps, out.var_interp)
        return out

    return denoise

"""Import a diffusers `UNet2DModel` checkpoint (config.json + safetensors) into the diffax UNet.

Reads the weights with safetensors.numpy (no PyTorch). The diffax UNet expresses what
UNet2DModel does with DownBlock2D / AttnDownBlock2D / ResnetDownsampleBlock2D,
UpBlock2D / AttnUpBlock2D / ResnetUpsampleBlock2D and UNetMidBlock2D, so the mapping is
one tensor to one parameter (q, k, v are concatenated into one qkv kernel). Whatever
cannot be mapped raises `UnsupportedDiffusersConfig` naming it, and every tensor of the
checkpoint must be consumed: nothing is silently dropped.

Timesteps: diffusers feeds the integer step index i to the UNet; with a discrete diffax
schedule (config.diffusion.num_steps = T > 0) c_noise is exactly that index
(diffax/parameterization.py), so an imported model needs no rescaling.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from diffax.errors import UserError
from diffax.models import build_model
from diffax.models.unet import UNet

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
SCHEDULER_NAME = "scheduler_config.json"

# UNet2DModel.__init__ defaults (diffusers 0.2x-0.4x): used for keys an older config.json lacks.
UNET2D_DEFAULTS: dict[str, Any] = dict(
    sample_size=None,
    in_channels=3,
    out_channels=3,
    center_input_sample=False,
    time_embedding_type="positional",
    time_embedding_dim=None,
    freq_shift=0,
    flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D",
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896),
    layers_per_block=2,
    mid_block_scale_factor=1,
    downsample_padding=1,
    downsample_type="conv",
    upsample_type="conv",
    dropout=0.0,
    act_fn="silu",
    attention_head_dim=8,
    norm_num_groups=32,
    attn_norm_num_groups=None,
    norm_eps=1e-5,
    resnet_time_scale_shift="default",
    add_attention=True,
    class_embed_type=None,
    num_class_embeds=None,
    num_train_timesteps=None,
)

DOWN_BLOCKS = {"DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D"}
UP_BLOCKS = {"UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"}


class UnsupportedDiffusersConfig(ValueError):
    """A diffusers architecture, option or tensor that the diffax UNet cannot represent."""


def class_options(cfg: dict[str, Any], cls: str, defaults: dict[str, Any], what: str) -> dict[str, Any]:
    """A config.json that must be of diffusers class `cls` -> its options over the class's defaults.
    `what` completes the error of another class: "only UNet2DModel can be imported", say."""
    found = cfg.get("_class_name", cls)
    if found != cls:
        raise UnsupportedDiffusersConfig(f"diffusers class {found!r} is not supported; {what}")
    return with_defaults(cfg, defaults, cls)


def require(cls: str, options: dict[str, Any], key: str, ok: bool, what: str) -> None:
    """UnsupportedDiffusersConfig naming the option `key` of `cls` and why, unless ok."""
    if not ok:
        raise UnsupportedDiffusersConfig(f"{cls} option {key}={options[key]!r} is not supported: {what}")


def with_defaults(cfg: dict[str, Any], defaults: dict[str, Any], cls: str) -> dict[str, Any]:
    """A diffusers config.json's options over its class's constructor defaults (as diffusers itself reads
    it), after checking that the class takes every key (else UnsupportedDiffusersConfig naming them)."""
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in defaults)
    if unknown:
        raise UnsupportedDiffusersConfig(f"unknown {cls} config keys: {', '.join(unknown)}")
    return {**defaults, **{k: v for k, v in cfg.items() if not k.startswith("_")}}


# --------------------------------------------------------------------------- config mapping


def _block_kind(name: str, valid: set[str], where: str) -> str:
    kind = name[len("UNetRes") :] if name.startswith("UNetRes") else name
    if kind not in valid:
        raise UnsupportedDiffusersConfig(
            f"diffusers {where} type {name!r} is not supported by the diffax UNet "
            f"(supported: {', '.join(sorted(valid))})"
        )
    return kind


def unet_config_to_diffax(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A UNet2DModel config.json -> (config.model fields, config.data fields) of the equivalent diffax UNet.

    Raises UnsupportedDiffusersConfig naming any class, block type or option diffax cannot map.
    """
    c = class_options(cfg, "UNet2DModel", UNET2D_DEFAULTS, "only UNet2DModel can be imported")
    check = functools.partial(require, "UNet2DModel", c)

    check("center_input_sample", not c["center_input_sample"], "diffax feeds inputs in [-1, 1] unchanged")
    check("time_embedding_type", c["time_embedding_type"] == "positional", "only 'positional' is mapped")
    check("mid_block_type", c["mid_block_type"] == "UNetMidBlock2D", "only 'UNetMidBlock2D' is mapped")
    check("mid_block_scale_factor", float(c["mid_block_scale_factor"]) == 1.0, "only 1 is mapped")
    check("act_fn", c["act_fn"] in ("silu", "swish"), "only silu / swish")
    check("class_embed_type", c["class_embed_type"] is None, "class embeddings are not mapped")
    check("num_class_embeds", c["num_class_embeds"] is None, "class embeddings are not mapped")
    check("norm_num_groups", isinstance(c["norm_num_groups"], int), "needs an integer group count")
    check("layers_per_block", isinstance(c["layers_per_block"], int), "needs one count for every level")
    check("resnet_time_scale_shift", c["resnet_time_scale_shift"] in ("default", "scale_shift"), "")
    check("downsample_type", c["downsample_type"] in ("conv", "resnet"), "only conv / resnet")
    check("upsample_type", c["upsample_type"] in ("conv", "resnet"), "only conv / resnet")
    check("downsample_padding", c["downsample_padding"] in (0, 1), "only 0 or 1")
    boc = [int(b) for b in c["block_out_channels"]]
    ch = boc[0]
    check("block_out_channels", all(b % ch == 0 for b in boc), "every width must be a multiple of the first")
    check(
        "time_embedding_dim", c["time_embedding_dim"] in (None, 4 * ch), f"the UNet's time embedding is 4 x {ch}"
    )
    scale_shift = c["resnet_time_scale_shift"] == "scale_shift"
    if c["add_attention"]:
        attn_groups = c["attn_norm_num_groups"]
        check(
            "attn_norm_num_groups",
            attn_groups == c["norm_num_groups"] or (attn_groups is None and not scale_shift),
            "the mid-block attention must have a GroupNorm with norm_num_groups groups "
            "(diffusers drops it for scale_shift models unless attn_norm_num_groups is set)",
        )
    size = c["sample_size"]
    if isinstance(size, (list, tuple)):
        check("sample_size", len(size) == 2 and size[0] == size[1], "only square images")
        size = size[0]
    check("sample_size", isinstance(size, int), "needed to place attention by resolution")
    in_ch, out_ch = int(c["in_channels"]), int(c["out_channels"])
    check("out_channels", out_ch in (in_ch, 2 * in_ch), "must equal in_channels (or 2x for learned sigma)")

    downs, ups = list(c["down_block_types"]), list(c["up_block_types"])
    n = len(boc)
    if len(downs) != n or len(ups) != n:
        raise UnsupportedDiffusersConfig("down_block_types / up_block_types / block_out_channels differ in length")
    attn_down, attn_up, resamplers = [], [], []
    for i, name in enumerate(downs):
        kind = _block_kind(name, DOWN_BLOCKS, "down block")
        if kind == "AttnDownBlock2D":
            attn_down.append(size >> i)
        if i != n - 1:
            resamplers.append(
                (name, {"DownBlock2D": "conv", "ResnetDownsampleBlock2D": "resnet"}.get(kind, c["downsample_type"]))
            )
    for i, name in enumerate(ups):
        kind = _block_kind(name, UP_BLOCKS, "up block")
        if kind == "AttnUpBlock2D":
            attn_up.append(size >> (n - 1 - i))
        if i != n - 1:
            resamplers.append(
                (name, {"UpBlock2D": "conv", "ResnetUpsampleBlock2D": "resnet"}.get(kind, c["upsample_type"]))
            )
    kinds = {k for _, k in resamplers}
    if len(kinds) > 1:
        detail = ", ".join(f"{name}: {k}" for name, k in resamplers)
        raise UnsupportedDiffusersConfig(
            f"mixed conv and resnet (BigGAN) resampling is not supported by the diffax UNet ({detail})"
        )
    head_dim = c["attention_head_dim"]
    model = dict(
        name="unet",
        channels=ch,
        channel_mult=tuple(b // ch for b in boc),
        num_res_blocks=int(c["layers_per_block"]),
        attention_resolutions=tuple(attn_down),
        up_attention_resolutions=None if sorted(attn_up) == sorted(attn_down) else tuple(attn_up),
        mid_attention=bool(c["add_attention"]),
        num_heads=1,
        head_channels=int(head_dim) if head_dim is not None else -1,
        dropout=float(c["dropout"]),
        resblock_updown=kinds == {"resnet"},
        scale_shift_norm=scale_shift,
        norm_groups=int(c["norm_num_groups"]),
        norm_eps=float(c["norm_eps"]),
        downsample_padding=int(c["downsample_padding"]),
        learn_sigma=out_ch == 2 * in_ch,
        embedding="sinusoidal",
        flip_sin_to_cos=bool(c["flip_sin_to_cos"]),
        freq_shift=float(c["freq_shift"]),
        fourier_scale=16.0,
        dtype="float32",
        param_dtype="float32",
        remat=False,
    )
    data = dict(image_size=int(size), channels=in_ch)
    return model, data


_BETAS = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", trained_betas=None,
              prediction_type="epsilon", rescale_betas_zero_snr=False, timestep_spacing="leading", steps_offset=0)
_CLIP = dict(clip_sample=True, clip_sample_range=1.0, thresholding=False, dynamic_thresholding_ratio=0.995,
             sample_max_value=1.0)
_SIGMAS = dict(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
# The constructors' defaults (diffusers 0.42): what a scheduler_config.json without the key means.
SCHEDULER_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDPMScheduler": dict(_BETAS, **_CLIP, variance_type="fixed_small"),
    "DDIMScheduler": dict(_BETAS, **_CLIP, set_alpha_to_one=True),
    "PNDMScheduler": dict(_BETAS, skip_prk_steps=False, set_alpha_to_one=False),
    "EulerDiscreteScheduler": dict(_BETAS, **_SIGMAS, timestep_spacing="linspace", interpolation_type="linear",
                                   sigma_min=None, sigma_max=None, timestep_type="discrete", final_sigmas_type="zero"),
    "HeunDiscreteScheduler": dict(_BETAS, **_SIGMAS, beta_start=0.00085, beta_end=0.012, timestep_spacing="linspace",
                                  clip_sample=False, clip_sample_range=1.0),
    "DPMSolverMultistepScheduler": dict(
        _BETAS, **_SIGMAS, **{k: v for k, v in _CLIP.items() if not k.startswith("clip")}, timestep_spacing="linspace",
        solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
        euler_at_final=False, use_lu_lambdas=False, use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero",
        lambda_min_clipped=-float("inf"), variance_type=None, use_dynamic_shifting=False,
        time_shift_type="exponential"),
    "EDMEulerScheduler": dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, sigma_schedule="karras",
                              num_train_timesteps=1000, prediction_type="epsilon", rho=7.0, final_sigmas_type="zero"),
    "FlowMatchEulerDiscreteScheduler": dict(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None, **_SIGMAS,
        time_shift_type="exponential", stochastic_sampling=False),
    "FlowMatchHeunDiscreteScheduler": dict(num_train_timesteps=1000, shift=1.0),
}
# Options diffax reproduces only at these values (anything else is an error naming the option).
_ONLY = dict(trained_betas=None, clip_sample_range=1.0, sample_max_value=1.0, interpolation_type="linear",
             use_exponential_sigmas=False, use_beta_sigmas=False, sigma_min=None, sigma_max=None,
             timestep_type="discrete", final_sigmas_type="zero", solver_type="midpoint", lower_order_final=True,
             euler_at_final=False, use_lu_lambdas=False, use_flow_sigmas=False, lambda_min_clipped=-float("inf"),
             variance_type=None, use_dynamic_shifting=False, sigma_schedule="karras", invert_sigmas=False,
             shift_terminal=None, time_shift_type="exponential", stochastic_sampling=False, use_karras_sigmas=False)
_ONLY_EXCEPT = {  # per class, options from _ONLY that it does support
    "EulerDiscreteScheduler": {"use_karras_sigmas"}, "HeunDiscreteScheduler": {"use_karras_sigmas"},
    "DPMSolverMultistepScheduler": {"use_karras_sigmas", "final_sigmas_type"},
    "EDMEulerScheduler": {"sigma_min", "sigma_max"}, "FlowMatchEulerDiscreteScheduler": {"use_dynamic_shifting"},
    "DDPMScheduler": {"variance_type"},
}
SCHEDULERS = set(SCHEDULER_DEFAULTS)
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def _betas_to_diffax(cls: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The discrete VP schedule of a DDPM-family scheduler: diffusers 'linear' (Ho et al. 2020) maps to diffax
    'linear' for 1e-4..0.02 and to the discrete 'vp' schedule (betas linspace(beta_min / T, beta_max / T))
    otherwise; 'squaredcos_cap_v2' to 'cosine' (Nichol & Dhariwal 2021); 'scaled_linear' with Stable
    Diffusion's 0.00085..0.012 to 'scaled_linear'. Anything else raises."""
    T = int(cfg["num_train_timesteps"])
    start, end, sched = float(cfg["beta_start"]), float(cfg["beta_end"]), cfg["beta_schedule"]
    diffusion: dict[str, Any] = dict(num_steps=T, zero_terminal_snr=bool(cfg["rescale_betas_zero_snr"]))
    if sched == "linear" and np.isclose(start, 1e-4) and np.isclose(end, 0.02):
        diffusion["schedule"] = "linear"
    elif sched == "linear":
        diffusion.update(schedule="vp", beta_min=start * T, beta_max=end * T)
    elif sched == "squaredcos_cap_v2":
        diffusion["schedule"] = "cosine"
    elif sched == "scaled_linear" and np.isclose(start, 0.00085) and np.isclose(end, 0.012):
        diffusion["schedule"] = "scaled_linear"
    else:
        raise UnsupportedDiffusersConfig(
            f"{cls} beta_schedule={sched!r} (beta_start={start}, beta_end={end}) is not supported"
        )
    if cfg["prediction_type"] not in _PREDICTIONS:
        raise UnsupportedDiffusersConfig(f"{cls} prediction_type={cfg['prediction_type']!r} is not supported")
    diffusion["prediction"] = _PREDICTIONS[cfg["prediction_type"]]
    diffusion["clip_x0"] = bool(cfg.get("clip_sample", False))
    if cfg.get("thresholding", False):
        diffusion["dynamic_threshold"] = float(cfg["dynamic_thresholding_ratio"])
    diffusion["clip_rederives_eps"] = False  # diffusers' steps keep the network's eps beside the clipped x0
    return diffusion


def scheduler_config_to_diffax(
    cfg: dict[str, Any], *, image_seq_len: int | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A diffusers scheduler_config.json -> (config.diffusion fields, config.sampling fields).

    Keys the file lacks take the class's constructor defaults (`SCHEDULER_DEFAULTS`: e.g. DDIM's
    timestep_spacing is 'leading', Euler's and DPM-Solver's 'linspace'), and the sampler is set to
    diffusers' grid (config.sampling.grid = diffusers / diffusers_karras), so diffax draws what the
    diffusers pipeline draws from the same weights and noise:
    DDPMScheduler -> ddpm; DDIMScheduler -> ddim; PNDMScheduler -> pndm (PLMS, or PRK + PLMS);
    EulerDiscreteScheduler / HeunDiscreteScheduler ->
    euler / heun; DPMSolverMultistepScheduler -> dpm_solver (dpmsolver++ or sde-dpmsolver++, orders 1-3);
    EDMEulerScheduler -> euler on the edm schedule with EDM preconditioning; FlowMatchEulerDiscreteScheduler
    / FlowMatchHeunDiscreteScheduler -> flow_euler / flow_heun on rectified_flow with the flow target
    (use_dynamic_shifting needs `image_seq_len`, the number of image tokens, for Flux's shift).
    Options diffax does not reproduce raise UnsupportedDiffusersConfig naming them.
    """
    from diffax.schedules import flux_shift

    cls = cfg.get("_class_name", "DDPMScheduler")
    if cls not in SCHEDULER_DEFAULTS:
        raise UnsupportedDiffusersConfig(
            f"diffusers scheduler {cls!r} is not supported (supported: {', '.join(sorted(SCHEDULERS))})"
        )
    c = with_defaults(cfg, SCHEDULER_DEFAULTS[cls], cls)
    for key, only in _ONLY.items():
        if key in c and key not in _ONLY_EXCEPT.get(cls, ()) and c[key] != only:
            raise UnsupportedDiffusersConfig(f"{cls} option {key}={c[key]!r} is not supported (only {only!r})")
    grid = "diffusers_karras" if c.get("use_karras_sigmas") else "diffusers"
    spacing = dict(spacing=c.get("timestep_spacing", "leading"), steps_offset=int(c.get("steps_offset", 0)))
    if spacing["spacing"] not in ("leading", "trailing", "linspace"):
        raise UnsupportedDiffusersConfig(f"{cls} timestep_spacing={spacing['spacing']!r}")
    if cls == "DDPMScheduler":
        variances = {"fixed_small": "small", "fixed_small_log": "small", "fixed_large": "large",
                     "fixed_large_log": "large", "learned_range": "learned"}  # fmt: skip
        if c["variance_type"] not in variances:
            raise UnsupportedDiffusersConfig(f"{cls} variance_type={c['variance_type']!r} is not supported")
        return _betas_to_diffax(cls, c), dict(sampler="ddpm", variance=variances[c["variance_type"]],
                                              final_alpha_one=True, **spacing)
    if cls == "DDIMScheduler":
        return _betas_to_diffax(cls, c), dict(sampler="ddim", grid="diffusers",
                                              final_alpha_one=bool(c["set_alpha_to_one"]), **spacing)
    if cls == "PNDMScheduler":
        if c["prediction_type"] != "epsilon":  # diffusers combines the raw v outputs; diffax's pndm combines eps
            raise UnsupportedDiffusersConfig(f"{cls} prediction_type={c['prediction_type']!r} is not supported (only "
                                             "epsilon); sample with DDIMScheduler.from_config(...) instead")
        return _betas_to_diffax(cls, c), dict(sampler="pndm", final_alpha_one=bool(c["set_alpha_to_one"]),
                                              skip_prk_steps=bool(c["skip_prk_steps"]), **spacing)
    if cls in ("EulerDiscreteScheduler", "HeunDiscreteScheduler"):
        sampler = "euler" if cls.startswith("Euler") else "heun"
        return _betas_to_diffax(cls, c), dict(sampler=sampler, grid=grid, churn=0.0, **spacing)
    if cls == "DPMSolverMultistepScheduler":
        if c["algorithm_type"] not in ("dpmsolver++", "sde-dpmsolver++"):
            raise UnsupportedDiffusersConfig(f"{cls} algorithm_type={c['algorithm_type']!r} (only dpmsolver++ and "
                                             "sde-dpmsolver++, Lu et al. 2022)")
        if int(c["solver_order"]) not in (1, 2, 3):
            raise UnsupportedDiffusersConfig(f"{cls} solver_order={c['solver_order']} (1, 2 or 3)")
        if c["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise UnsupportedDiffusersConfig(f"{cls} final_sigmas_type={c['final_sigmas_type']!r}")
        sde = c["algorithm_type"].startswith("sde")
        return _betas_to_diffax(cls, c), dict(
            sampler="dpm_solver", grid=grid, order=int(c["solver_order"]), solver_type="sde" if sde else "ode",
            final_alpha_one=c["final_sigmas_type"] == "zero", **spacing)
    if cls == "EDMEulerScheduler":
        if c["prediction_type"] != "epsilon":
            raise UnsupportedDiffusersConfig(f"{cls} prediction_type={c['prediction_type']!r} (only epsilon: EDM's F)")
        diffusion = dict(schedule="edm", num_steps=0, prediction="edm", sigma_min=float(c["sigma_min"]),
                         sigma_max=float(c["sigma_max"]), sigma_data=float(c["sigma_data"]), clip_x0=False)
        return diffusion, dict(sampler="euler", grid="paper", rho=float(c["rho"]), sigma_min=float(c["sigma_min"]),
                               churn=0.0)
    # FlowMatchEulerDiscreteScheduler / FlowMatchHeunDiscreteScheduler
    if int(c["num_train_timesteps"]) != 1000:
        raise UnsupportedDiffusersConfig(f"{cls} num_train_timesteps={c['num_train_timesteps']} (only 1000)")
    shift, grid = float(c["shift"]), "diffusers"
    if c.get("use_dynamic_shifting"):
        grid = "diffusers_dynamic"
        if image_seq_len is None:
            raise UnsupportedDiffusersConfig(
                f"{cls} use_dynamic_shifting needs the number of image tokens; set config.sampling.shift = exp(mu)")
        shift = float(flux_shift(image_seq_len, base_seq_len=int(c["base_image_seq_len"]),
                                 max_seq_len=int(c["max_image_seq_len"]), base_shift=float(c["base_shift"]),
                                 max_shift=float(c["max_shift"])))
    diffusion = dict(schedule="rectified_flow", num_steps=0, prediction="flow", clip_x0=False)
    return diffusion, dict(sampler="flow_euler" if "Euler" in cls else "flow_heun", grid=grid, shift=shift)


# --------------------------------------------------------------------------- weight mapping

_RES = {"norm1": "norm1", "conv1": "conv1", "temb": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
        "skip": "conv_shortcut"}  # fmt: skip
_ATTN_ALIASES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _source(path: tuple) -> tuple[str, str]:
    """diffax parameter path -> (diffusers module prefix, diffax leaf module kind)."""
    p = list(path)
    top = p[0]
    if top in ("conv_in", "conv_out"):
        return top, "conv"
    if top == "norm_out":
        return "conv_norm_out", "norm"
    if top in ("time_mlp1", "time_mlp2"):
        return f"time_embedding.linear_{top[-1]}", "linear"
    if top in ("mid_res1", "mid_res2"):
        sub = p[1]
        return f"mid_block.resnets.{int(top[-1]) - 1}.{_RES[sub]}", _res_kind(sub)
    if top == "mid_attn":
        return "mid_block.attentions.0", "attn:" + p[1]
    if top in ("down", "up"):
        blocks = "down_blocks" if top == "down" else "up_blocks"
        i, part = p[1], p[2]
        if part == "res":
            return f"{blocks}.{i}.resnets.{p[3]}.{_RES[p[4]]}", _res_kind(p[4])
        if part == "attn":
            return f"{blocks}.{i}.attentions.{p[3]}", "attn:" + p[4]
        if part == "resample":
            sampler = "downsamplers" if top == "down" else "upsamplers"
            if p[3] == "conv":  # Downsample / Upsample
                return f"{blocks}.{i}.{sampler}.0.conv", "conv"
            return f"{blocks}.{i}.{sampler}.0.{_RES[p[3]]}", _res_kind(p[3])
    raise UnsupportedDiffusersConfig(f"no diffusers tensor for diffax parameter {'/'.join(map(str, path))}")


_BLOCK_PARTS = {"to_out": "to_out.0", "geglu": "net.0.proj", "out": "net.2"}


def transformer_source(path: tuple, *, linear_projection: bool) -> tuple[str, str]:
    """A SpatialTransformer's (or, from "transformer_blocks" down, a BasicTransformerBlock's) parameter
    path -> (diffusers Transformer2DModel / BasicTransformerBlock tensor prefix, leaf kind).

    The names are diffusers' except to_out (to_out.0), ff.geglu (ff.net.0.proj) and ff.out (ff.net.2).
    """
    p = [str(x) for x in path[:-1]]
    if p[0] in ("proj_in", "proj_out"):
        return p[0], "linear" if linear_projection else "conv"
    if p[0] == "norm" or p[-1].startswith("norm"):
        return ".".join(p), "norm"
    return ".".join(_BLOCK_PARTS.get(x, x) if i == len(p) - 1 else x for i, x in enumerate(p)), "linear"


def _res_kind(sub: str) -> str:
    return {"norm1": "norm", "norm2": "norm", "temb": "linear"}.get(sub, "conv")


class _Tensors:
    """The checkpoint's tensors, remembering which were consumed."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors = tensors
        self.used: set[str] = set()

    def take(self, *names: str) -> np.ndarray:
        for name in names:
            if name in self.tensors:
                self.used.add(name)
                return np.asarray(self.tensors[name], np.float32)
        raise UnsupportedDiffusersConfig(f"checkpoint lacks tensor {names[0]!r} needed by the diffax model")

    def unused(self) -> list[str]:
        return sorted(set(self.tensors) - self.used)


def _conv(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]


def _linear(w: np.ndarray) -> np.ndarray:
    if w.ndim == 4:  # a 1x1 conv used as a linear layer
        w = w[:, :, 0, 0]
    return w.T  # [out, in] -> [in, out]


def _value_for(path: tuple, tensors: _Tensors, source=_source) -> np.ndarray:
    prefix, kind = source(path)
    leaf = path[-1]
    if kind == "conv":
        return _conv(tensors.take(f"{prefix}.weight")) if leaf == "kernel" else tensors.take(f"{prefix}.bias")
    if kind == "linear":
        return _linear(tensors.take(f"{prefix}.weight")) if leaf == "kernel" else tensors.take(f"{prefix}.bias")
    if kind == "norm":
        return tensors.take(f"{prefix}.{'weight' if leaf == 'scale' else 'bias'}")
    sub = kind.split(":")[1]  # attention: norm | qkv | proj
    suffix = "weight" if leaf in ("kernel", "scale") else "bias"
    if sub == "norm":
        return tensors.take(f"{prefix}.group_norm.{suffix}")
    names = ("to_q", "to_k", "to_v") if sub == "qkv" else ("to_out.0",)
    parts = [tensors.take(f"{prefix}.{n}.{suffix}", f"{prefix}.{_ATTN_ALIASES[n]}.{suffix}") for n in names]
    if suffix == "weight":
        parts = [_linear(w) for w in parts]
    return np.concatenate(parts, axis=-1)


def load_unet_weights(model: UNet, tensors: dict[str, np.ndarray]) -> None:
    """Copy a UNet2DModel state dict (numpy) into a diffax UNet built from unet_config_to_diffax, in place.

    Every diffax parameter must be found with the right shape and every checkpoint tensor
    must be used; otherwise UnsupportedDiffusersConfig names the offenders.
    """
    load_weights(model, tensors, source=_source, what="UNet")


def load_weights(model: nnx.Module, tensors: dict[str, np.ndarray], *, source, what: str) -> None:
    """Copy a diffusers state dict into `model` in place; source(path) -> (diffusers prefix, leaf kind).

    Every parameter must be found with the right shape and every tensor must be used;
    otherwise UnsupportedDiffusersConfig names the offenders.
    """
    store = _Tensors(tensors)
    copy_params(model, lambda path: _value_for(path, store, source), origin=lambda path: source(path)[0])
    require_used(store, what)


def read_weights(path: str) -> dict[str, np.ndarray]:
    """A diffusers safetensors file as numpy arrays; a missing or unreadable file is a UserError saying what to do."""
    from safetensors.numpy import load_file

    if not os.path.exists(path):
        raise UserError(f"{path} not found: save the model with safe_serialization=True (diffusers' default); "
                        "PyTorch .bin files are not read")
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for truncated or invalid files
        raise UserError(f"{path} cannot be read as safetensors ({type(e).__name__}: {e}); it may be truncated. "
                        "Download or copy it again.") from None


def copy_params(model: nnx.Module, value_of: Any, origin: Any = None) -> None:
    """Set every nnx.Param of `model` to value_of(path), a checkpoint array of the same shape (origin(path):
    the diffusers name, for the error)."""
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Param):
            continue
        value = value_of(tuple(path))
        if value.shape != var.shape:
            where = f" (from {origin(tuple(path))})" if origin is not None else ""
            raise UnsupportedDiffusersConfig(f"shape mismatch for {'/'.join(map(str, path))}{where}: "
                                             f"checkpoint {value.shape}, diffax {var.shape}")
        var.value = jnp.asarray(value, var.dtype)


def require_used(store: Any, what: str) -> None:
    """Every checkpoint tensor must have found its place in the diffax `what`."""
    unused = store.unused()
    if unused:
        raise UnsupportedDiffusersConfig(
            f"{len(unused)} checkpoint tensors have no place in the diffax {what}: {', '.join(unused[:20])}"
        )


def component_dir(src_dir: str, component: str, what_to_pass: str) -> str:
    """The folder of a model's config.json + safetensors: src_dir itself, or a pipeline's component/ inside it.
    FileNotFoundError naming the missing file and what_to_pass if neither has them."""
    folder = src_dir
    if not os.path.exists(os.path.join(src_dir, CONFIG_NAME)) and os.path.isdir(os.path.join(src_dir, component)):
        folder = os.path.join(src_dir, component)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.exists(os.path.join(folder, name)):
            raise FileNotFoundError(f"{os.path.join(folder, name)} not found: {what_to_pass}")
    return folder


def _locate(src_dir: str) -> tuple[str, str | None]:
    """(directory with config.json + weights, scheduler_config.json path or None) for a pipeline or unet dir."""
    unet_dir = component_dir(src_dir, "unet", "pass a diffusers pipeline directory (with unet/) or a UNet2DModel "
                             "directory saved with safe_serialization=True")
    candidates = [
        os.path.join(unet_dir, SCHEDULER_NAME),
        os.path.join(src_dir, "scheduler", SCHEDULER_NAME),
        os.path.join(os.path.dirname(os.path.abspath(unet_dir)), "scheduler", SCHEDULER_NAME),
    ]
    return unet_dir, next((p for p in candidates if os.path.exists(p)), None)


def load_diffusers_unet(src_dir: str) -> tuple[ml_collections.ConfigDict, UNet]:
    """Load a diffusers UNet2DModel (Ho et al. 2020 / Dhariwal & Nichol 2021 layouts) as a diffax UNet.

    src_dir: a pipeline directory (unet/ and scheduler/ inside, e.g. a download of
    google/ddpm-cifar10-32) or a UNet2DModel directory. Returns (overrides, model):
    overrides.model holds every config.model field of the UNet, overrides.data the image
    size and channels, and, when a scheduler_config.json is found, overrides.diffusion
    (schedule, num_steps, prediction, ...) and overrides.sampling (sampler, spacing, variance).
    The model is in float32; its output on (x NHWC, c_noise = step index) equals
    UNet2DModel(x NCHW, timestep).sample transposed. Unmappable options raise
    UnsupportedDiffusersConfig naming them; unused tensors are an error too.
    """
    unet_dir, scheduler_path = _locate(src_dir)
    model_fields, data_fields = unet_config_to_diffax(_read_json(os.path.join(unet_dir, CONFIG_NAME)))
    overrides = ml_collections.ConfigDict({"model": model_fields, "data": data_fields})
    if scheduler_path is not None:
        diffusion, sampling = scheduler_config_to_diffax(_read_json(scheduler_path))
        overrides.diffusion = diffusion
        overrides.sampling = sampling
    shape = (data_fields["image_size"], data_fields["image_size"], data_fields["channels"])
    model = build_model(overrides.model, data_shape=shape, num_classes=0, rngs=nnx.Rngs(0))
    load_unet_weights(model, read_weights(os.path.join(unet_dir, WEIGHTS_NAME)))
    return overrides, model


def _read_json(path: str) -> dict[str, Any]:
    """A diffusers JSON file; a malformed one is an error naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); it may be truncated. Download or copy it again.") from None


def model_tensors(model: nnx.Module, source: Callable[[tuple], tuple[str, str]]) -> dict[str, np.ndarray]:
    """A diffax model's parameters as diffusers tensors (torch layouts), through source(path) -> (prefix, kind):
    the inverse of load_weights."""
    out: dict[str, np.ndarray] = {}
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Param):
            continue
        prefix, kind = source(tuple(path))
        value, leaf = np.asarray(var[...], np.float32), path[-1]
        suffix = "weight" if leaf in ("kernel", "scale") else "bias"
        if kind == "conv":
            out[f"{prefix}.{suffix}"] = value.transpose(3, 2, 0, 1) if leaf == "kernel" else value
        elif kind == "linear":
            out[f"{prefix}.{suffix}"] = value.T if leaf == "kernel" else value
        elif kind == "norm":
            out[f"{prefix}.{suffix}"] = value
        elif kind == "attn:norm":
            out[f"{prefix}.group_norm.{suffix}"] = value
        else:  # attention projections: one [in, 3 out] qkv kernel -> to_q / to_k / to_v, torch's [out, in]
            names = ("to_q", "to_k", "to_v") if kind == "attn:qkv" else ("to_out.0",)
            for name, part in zip(names, np.split(value, len(names), axis=-1)):
                out[f"{prefix}.{name}.{suffix}"] = part.T if suffix == "weight" else part
    return {k: np.ascontiguousarray(v) for k, v in out.items()}

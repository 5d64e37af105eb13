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

import json
import os
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from diffax.models import construct
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
SCHEDULERS = {"DDPMScheduler", "DDIMScheduler"}


class UnsupportedDiffusersConfig(ValueError):
    """A diffusers architecture, option or tensor that the diffax UNet cannot represent."""


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
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise UnsupportedDiffusersConfig(
            f"diffusers model class {cfg['_class_name']!r} is not supported; only UNet2DModel can be imported"
        )
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in UNET2D_DEFAULTS)
    if unknown:
        raise UnsupportedDiffusersConfig(f"unknown UNet2DModel config keys: {', '.join(unknown)}")
    c = {**UNET2D_DEFAULTS, **{k: v for k, v in cfg.items() if not k.startswith("_")}}

    def require(key: str, ok: bool, what: str) -> None:
        if not ok:
            raise UnsupportedDiffusersConfig(f"UNet2DModel option {key}={c[key]!r} is not supported: {what}")

    require("center_input_sample", not c["center_input_sample"], "diffax feeds inputs in [-1, 1] unchanged")
    require("time_embedding_type", c["time_embedding_type"] == "positional", "only 'positional' is mapped")
    require("mid_block_type", c["mid_block_type"] == "UNetMidBlock2D", "only 'UNetMidBlock2D' is mapped")
    require("mid_block_scale_factor", float(c["mid_block_scale_factor"]) == 1.0, "only 1 is mapped")
    require("act_fn", c["act_fn"] in ("silu", "swish"), "only silu / swish")
    require("class_embed_type", c["class_embed_type"] is None, "class embeddings are not mapped")
    require("num_class_embeds", c["num_class_embeds"] is None, "class embeddings are not mapped")
    require("norm_num_groups", isinstance(c["norm_num_groups"], int), "needs an integer group count")
    require("layers_per_block", isinstance(c["layers_per_block"], int), "needs one count for every level")
    require("resnet_time_scale_shift", c["resnet_time_scale_shift"] in ("default", "scale_shift"), "")
    require("downsample_type", c["downsample_type"] in ("conv", "resnet"), "only conv / resnet")
    require("upsample_type", c["upsample_type"] in ("conv", "resnet"), "only conv / resnet")
    require("downsample_padding", c["downsample_padding"] in (0, 1), "only 0 or 1")
    boc = [int(b) for b in c["block_out_channels"]]
    ch = boc[0]
    require("block_out_channels", all(b % ch == 0 for b in boc), "every width must be a multiple of the first")
    require(
        "time_embedding_dim", c["time_embedding_dim"] in (None, 4 * ch), f"the UNet's time embedding is 4 x {ch}"
    )
    scale_shift = c["resnet_time_scale_shift"] == "scale_shift"
    if c["add_attention"]:
        attn_groups = c["attn_norm_num_groups"]
        require(
            "attn_norm_num_groups",
            attn_groups == c["norm_num_groups"] or (attn_groups is None and not scale_shift),
            "the mid-block attention must have a GroupNorm with norm_num_groups groups "
            "(diffusers drops it for scale_shift models unless attn_norm_num_groups is set)",
        )
    size = c["sample_size"]
    if isinstance(size, (list, tuple)):
        require("sample_size", len(size) == 2 and size[0] == size[1], "only square images")
        size = size[0]
    require("sample_size", isinstance(size, int), "needed to place attention by resolution")
    in_ch, out_ch = int(c["in_channels"]), int(c["out_channels"])
    require("out_channels", out_ch in (in_ch, 2 * in_ch), "must equal in_channels (or 2x for learned sigma)")

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
        conv_impl="xla",
        dtype="float32",
        param_dtype="float32",
        remat=False,
    )
    data = dict(image_size=int(size), channels=in_ch)
    return model, data


def scheduler_config_to_diffax(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A DDPMScheduler / DDIMScheduler scheduler_config.json -> (config.diffusion fields, config.sampling fields).

    Betas: diffusers 'linear' (Ho et al. 2020) maps to diffax 'linear' for 1e-4..0.02 and to the
    discrete 'vp' schedule (betas linspace(beta_min / T, beta_max / T)) otherwise;
    'squaredcos_cap_v2' to 'cosine' (Nichol & Dhariwal 2021); 'scaled_linear' with Stable
    Diffusion's 0.00085..0.012 to 'scaled_linear'. Anything else raises.
    """
    cls = cfg.get("_class_name", "DDPMScheduler")
    if cls not in SCHEDULERS:
        raise UnsupportedDiffusersConfig(
            f"diffusers scheduler {cls!r} is not supported (supported: {', '.join(sorted(SCHEDULERS))})"
        )
    known = {
        "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "variance_type",
        "clip_sample", "clip_sample_range", "prediction_type", "thresholding", "dynamic_thresholding_ratio",
        "sample_max_value", "timestep_spacing", "steps_offset", "rescale_betas_zero_snr", "set_alpha_to_one",
    }  # fmt: skip
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in known)
    if unknown:
        raise UnsupportedDiffusersConfig(f"unknown {cls} config keys: {', '.join(unknown)}")
    T = int(cfg.get("num_train_timesteps", 1000))
    start, end = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
    sched = cfg.get("beta_schedule", "linear")
    if cfg.get("trained_betas") is not None:
        raise UnsupportedDiffusersConfig(f"{cls} option trained_betas is not supported")
    diffusion: dict[str, Any] = dict(num_steps=T)
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
    pred = cfg.get("prediction_type", "epsilon")
    predictions = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
    if pred not in predictions:
        raise UnsupportedDiffusersConfig(f"{cls} prediction_type={pred!r} is not supported")
    diffusion["prediction"] = predictions[pred]
    diffusion["zero_terminal_snr"] = bool(cfg.get("rescale_betas_zero_snr", False))
    if cfg.get("clip_sample", True) and float(cfg.get("clip_sample_range", 1.0)) != 1.0:
        raise UnsupportedDiffusersConfig(f"{cls} clip_sample_range={cfg['clip_sample_range']} (only 1.0)")
    diffusion["clip_x0"] = bool(cfg.get("clip_sample", True))
    if cfg.get("thresholding", False):
        if float(cfg.get("sample_max_value", 1.0)) != 1.0:
            raise UnsupportedDiffusersConfig(f"{cls} sample_max_value={cfg['sample_max_value']} (only 1.0)")
        diffusion["dynamic_threshold"] = float(cfg.get("dynamic_thresholding_ratio", 0.995))

    sampling: dict[str, Any] = dict(sampler="ddim" if cls == "DDIMScheduler" else "ddpm")
    variance = cfg.get("variance_type", "fixed_small")
    variances = {"fixed_small": "small", "fixed_small_log": "small", "fixed_large": "large",
                 "fixed_large_log": "large", "learned_range": "learned"}  # fmt: skip
    if cls == "DDPMScheduler":
        if variance not in variances:
            raise UnsupportedDiffusersConfig(f"{cls} variance_type={variance!r} is not supported")
        sampling["variance"] = variances[variance]
    if "timestep_spacing" in cfg:
        if cfg["timestep_spacing"] not in ("leading", "trailing", "linspace"):
            raise UnsupportedDiffusersConfig(f"{cls} timestep_spacing={cfg['timestep_spacing']!r}")
        sampling["spacing"] = cfg["timestep_spacing"]
    if "steps_offset" in cfg:
        sampling["steps_offset"] = int(cfg["steps_offset"])
    if "set_alpha_to_one" in cfg:
        sampling["final_alpha_one"] = bool(cfg["set_alpha_to_one"])
    return diffusion, sampling


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
        raise UnsupportedDiffusersConfig(f"checkpoint lacks tensor {names[0]!r} needed by the diffax UNet")

    def unused(self) -> list[str]:
        return sorted(set(self.tensors) - self.used)


def _conv(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]


def _linear(w: np.ndarray) -> np.ndarray:
    if w.ndim == 4:  # a 1x1 conv used as a linear layer
        w = w[:, :, 0, 0]
    return w.T  # [out, in] -> [in, out]


def _value_for(path: tuple, tensors: _Tensors) -> np.ndarray:
    prefix, kind = _source(path)
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
    store = _Tensors(tensors)
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Param):
            continue
        value = _value_for(tuple(path), store)
        if value.shape != var.shape:
            raise UnsupportedDiffusersConfig(
                f"shape mismatch for {'/'.join(map(str, path))} (from {_source(tuple(path))[0]}): "
                f"checkpoint {value.shape}, diffax {var.shape}"
            )
        var.value = jnp.asarray(value, var.dtype)
    unused = store.unused()
    if unused:
        raise UnsupportedDiffusersConfig(
            f"{len(unused)} checkpoint tensors have no place in the diffax UNet: {', '.join(unused[:20])}"
        )


def _locate(src_dir: str) -> tuple[str, str | None]:
    """(directory with config.json + weights, scheduler_config.json path or None) for a pipeline or unet dir."""
    unet_dir = src_dir
    if not os.path.exists(os.path.join(src_dir, CONFIG_NAME)) and os.path.isdir(os.path.join(src_dir, "unet")):
        unet_dir = os.path.join(src_dir, "unet")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.exists(os.path.join(unet_dir, name)):
            raise FileNotFoundError(
                f"{os.path.join(unet_dir, name)} not found: pass a diffusers pipeline directory (with unet/) "
                f"or a UNet2DModel directory saved with safe_serialization=True"
            )
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
    from safetensors.numpy import load_file

    unet_dir, scheduler_path = _locate(src_dir)
    with open(os.path.join(unet_dir, CONFIG_NAME), encoding="utf-8") as f:
        model_fields, data_fields = unet_config_to_diffax(json.load(f))
    overrides = ml_collections.ConfigDict({"model": model_fields, "data": data_fields})
    if scheduler_path is not None:
        with open(scheduler_path, encoding="utf-8") as f:
            diffusion, sampling = scheduler_config_to_diffax(json.load(f))
        overrides.diffusion = diffusion
        overrides.sampling = sampling
    shape = (data_fields["image_size"], data_fields["image_size"], data_fields["channels"])
    model = construct(lambda r: UNet(overrides.model, data_shape=shape, num_classes=0, rngs=r), nnx.Rngs(0))
    load_unet_weights(model, load_file(os.path.join(unet_dir, WEIGHTS_NAME)))
    return overrides, model

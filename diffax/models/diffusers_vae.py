"""Read and write diffusers `AutoencoderKL` folders (config.json + safetensors) without PyTorch.

diffax's AutoencoderKL (diffax/models/autoencoder.py) keeps diffusers' module names, so the
mapping is one tensor to one parameter (q, k, v of the mid-block attention are concatenated
into one qkv kernel, as for the UNet in diffax/models/diffusers.py, whose helpers this reuses).
Layouts: SD 1.x / 2.x / SDXL (4 latent channels, quant convs, scaling_factor) and SD3 / Flux
(16 channels, no quant convs, scaling_factor and shift_factor). Anything else raises
UnsupportedDiffusersConfig naming the key; every tensor must be used.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any

from flax import nnx

from diffax.models import construct
from diffax.models.autoencoder import AutoencoderKL, LatentScaling
from diffax.models.diffusers import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    class_options,
    component_dir,
    load_weights,
    model_tensors,
    require,
)

# AutoencoderKL.__init__ defaults (diffusers 0.2x-0.4x): used for keys an older config.json lacks.
AUTOENCODER_KL_DEFAULTS: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",),
    up_block_types=("UpDecoderBlock2D",),
    block_out_channels=(64,),
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=32,
    scaling_factor=0.18215,
    shift_factor=None,
    latents_mean=None,
    latents_std=None,
    force_upcast=True,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
)


def autoencoder_config_to_diffax(cfg: dict[str, Any]) -> tuple[dict[str, Any], LatentScaling]:
    """An AutoencoderKL config.json -> (keyword arguments of diffax's AutoencoderKL, its LatentScaling).

    Raises UnsupportedDiffusersConfig naming any class, block type or option diffax cannot map.
    sample_size (a tiling hint) and force_upcast (a dtype hint; diffax's VAE runs in float32)
    do not change the network.
    """
    c = class_options(cfg, "AutoencoderKL", AUTOENCODER_KL_DEFAULTS, "only AutoencoderKL can be imported")
    check = functools.partial(require, "AutoencoderKL", c)

    boc = [int(b) for b in c["block_out_channels"]]
    check("act_fn", c["act_fn"] in ("silu", "swish"), "only silu / swish")
    check("down_block_types", list(c["down_block_types"]) == ["DownEncoderBlock2D"] * len(boc),
            f"only DownEncoderBlock2D, one per block_out_channels entry ({len(boc)})")  # fmt: skip
    check("up_block_types", list(c["up_block_types"]) == ["UpDecoderBlock2D"] * len(boc),
            f"only UpDecoderBlock2D, one per block_out_channels entry ({len(boc)})")  # fmt: skip
    check("layers_per_block", isinstance(c["layers_per_block"], int), "needs one integer count")
    check("norm_num_groups", all(b % int(c["norm_num_groups"]) == 0 for b in boc), "must divide every width")
    check("latents_mean", c["latents_mean"] is None, "per-channel latent statistics are not mapped")
    check("latents_std", c["latents_std"] is None, "per-channel latent statistics are not mapped")
    check("scaling_factor", float(c["scaling_factor"]) > 0, "must be positive")
    kwargs = dict(
        in_channels=int(c["in_channels"]),
        out_channels=int(c["out_channels"]),
        block_out_channels=tuple(boc),
        layers_per_block=int(c["layers_per_block"]),
        latent_channels=int(c["latent_channels"]),
        norm_num_groups=int(c["norm_num_groups"]),
        mid_attention=bool(c["mid_block_add_attention"]),
        use_quant_conv=bool(c["use_quant_conv"]),
        use_post_quant_conv=bool(c["use_post_quant_conv"]),
    )
    shift = c["shift_factor"]
    return kwargs, LatentScaling(scale=float(c["scaling_factor"]), shift=float(shift or 0.0))


def diffax_to_autoencoder_config(kwargs: dict[str, Any], scaling: LatentScaling) -> dict[str, Any]:
    """The inverse of autoencoder_config_to_diffax: the config.json diffusers reads for these weights."""
    n = len(kwargs["block_out_channels"])
    return dict(
        _class_name="AutoencoderKL",
        in_channels=kwargs["in_channels"],
        out_channels=kwargs["out_channels"],
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=list(kwargs["block_out_channels"]),
        layers_per_block=kwargs["layers_per_block"],
        act_fn="silu",
        latent_channels=kwargs["latent_channels"],
        norm_num_groups=kwargs["norm_num_groups"],
        scaling_factor=scaling.scale,
        shift_factor=scaling.shift or None,
        use_quant_conv=kwargs["use_quant_conv"],
        use_post_quant_conv=kwargs["use_post_quant_conv"],
        mid_block_add_attention=kwargs["mid_attention"],
    )


def _source(path: tuple) -> tuple[str, str]:
    """diffax AutoencoderKL parameter path -> (diffusers module prefix, leaf kind), for load_weights."""
    names = ["conv_shortcut" if p == "skip" else str(p) for p in path[:-1]]
    if "attentions" in names:
        i = names.index("attentions") + 2  # ... attentions.0 . norm | qkv | proj
        return ".".join(names[:i]), "attn:" + names[i]
    kind = "norm" if names[-1].startswith("norm") or names[-1] == "conv_norm_out" else "conv"
    return ".".join(names), kind


def locate(src_dir: str) -> str:
    """The folder holding the AutoencoderKL's config.json + weights: src_dir itself or a pipeline's vae/."""
    return component_dir(src_dir, "vae", "config.autoencoder.path must be a diffusers AutoencoderKL folder saved "
                         "with safe_serialization=True, or a pipeline folder with vae/ inside")


def weights_sha256(src_dir: str) -> str:
    """sha256 of the autoencoder's safetensors file: what a latent run and cache record as its identity."""
    h = hashlib.sha256()
    with open(os.path.join(locate(src_dir), WEIGHTS_NAME), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_diffusers_autoencoder(src_dir: str) -> tuple[AutoencoderKL, LatentScaling]:
    """Load a diffusers AutoencoderKL folder (or a pipeline's vae/) as diffax's AutoencoderKL in float32.

    encode(x NHWC) equals diffusers' posterior mean and logvar transposed, decode(z) equals
    vae.decode(z).sample. Returns the model and the LatentScaling of its config.json.
    """
    from safetensors.numpy import load_file

    vae_dir = locate(src_dir)
    with open(os.path.join(vae_dir, CONFIG_NAME), encoding="utf-8") as f:
        kwargs, scaling = autoencoder_config_to_diffax(json.load(f))
    model = construct(lambda r: AutoencoderKL(**kwargs, rngs=r), nnx.Rngs(0))
    load_weights(model, load_file(os.path.join(vae_dir, WEIGHTS_NAME)), source=_source, what="AutoencoderKL")
    return model, scaling


def save_diffusers_autoencoder(model: AutoencoderKL, kwargs: dict[str, Any], scaling: LatentScaling,
                               out_dir: str) -> None:  # fmt: skip
    """Write `model` as a diffusers AutoencoderKL folder (config.json + safetensors) that diffusers and diffax load.

    kwargs are the AutoencoderKL constructor arguments the model was built with.
    """
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file(model_tensors(model, _source), os.path.join(out_dir, WEIGHTS_NAME))
    with open(os.path.join(out_dir, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(diffax_to_autoencoder_config(kwargs, scaling), f, indent=2)

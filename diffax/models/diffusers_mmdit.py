"""Import a diffusers `SD3Transformer2DModel` folder (config.json + safetensors) as a diffax MMDiT.

Stable Diffusion 3 / 3.5's transformer (Esser et al. 2024), read with safetensors.numpy (no
PyTorch). One tensor maps to one parameter, except q, k, v (concatenated into one qkv kernel
per stream), the patch-embedding conv (a matmul on flattened patches here) and the blocks but
the last (stacked on a leading depth axis). SD3's position table (the buffer
pos_embed.pos_embed) is not a parameter in diffax: it is recomputed and checked against the
stored one. Every tensor must be used; options diffax cannot represent (dual_attention_layers
of SD3.5 Medium, a qk_norm other than rms_norm, ...) raise UnsupportedDiffusersConfig naming them.

Timesteps: the SD3 pipeline feeds 1000 t (t = sigma of rectified flow), which is diffax's
c_noise for a continuous-time schedule, so the imported model needs no rescaling. The text
encoders (two CLIPs and T5) are not imported here: pass their states as `context` / `pooled`.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from diffax.models import build_model
from diffax.models.diffusers import (CONFIG_NAME, SCHEDULER_NAME, WEIGHTS_NAME, UnsupportedDiffusersConfig, _read_json,
                                     _Tensors, class_options, component_dir, copy_params, read_weights, require,
                                     require_used, scheduler_config_to_diffax)
from diffax.models.mmdit import MMDiT, sd3_pos_embed

# SD3Transformer2DModel.__init__ defaults (diffusers 0.42): used for keys a config.json lacks.
SD3_DEFAULTS: dict[str, Any] = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=18, attention_head_dim=64, num_attention_heads=18,
    joint_attention_dim=4096, caption_projection_dim=1152, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=96, dual_attention_layers=(), qk_norm=None,
)

# diffax JointBlock stream -> diffusers JointTransformerBlock names, per leaf module
_STREAM = {
    "image": dict(adaln="norm1.linear", qkv=("attn.to_q", "attn.to_k", "attn.to_v"), proj="attn.to_out.0",
                  fc1="ff.net.0.proj", fc2="ff.net.2", norm_q="attn.norm_q", norm_k="attn.norm_k"),
    "text": dict(adaln="norm1_context.linear", qkv=("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                 proj="attn.to_add_out", fc1="ff_context.net.0.proj", fc2="ff_context.net.2",
                 norm_q="attn.norm_added_q", norm_k="attn.norm_added_k"),
}
_TOP = {"time_mlp1": "time_text_embed.timestep_embedder.linear_1",
        "time_mlp2": "time_text_embed.timestep_embedder.linear_2",
        "pooled_embed": "time_text_embed.text_embedder", "context_embedder": "context_embedder",
        "final_adaln": "norm_out.linear", "final_proj": "proj_out"}


def sd3_config_to_diffax(cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, int]]:
    """An SD3Transformer2DModel config.json -> (config.model fields, config.data fields, the text widths
    {context_dim, pooled_dim} the network is built with). Unmappable options raise, naming them."""
    c = class_options(cfg, "SD3Transformer2DModel", SD3_DEFAULTS, "only SD3Transformer2DModel is an MMDiT")
    check = functools.partial(require, "SD3Transformer2DModel", c)
    hidden = int(c["num_attention_heads"]) * int(c["attention_head_dim"])
    check("dual_attention_layers", not c["dual_attention_layers"],
          "SD3.5 Medium's extra image self-attention (MMDiT-X) is not implemented")
    check("qk_norm", c["qk_norm"] in (None, "rms_norm"), "only None or 'rms_norm'")
    check("caption_projection_dim", int(c["caption_projection_dim"]) == hidden,
          f"the joint attention needs it equal to num_attention_heads x attention_head_dim = {hidden}")
    check("out_channels", c["out_channels"] in (None, c["in_channels"]), "must equal in_channels")
    check("sample_size", isinstance(c["sample_size"], int), "needs one integer side")
    check("pos_embed_max_size", bool(c["pos_embed_max_size"]), "SD3's cropped position grid needs a size")
    model = dict(name="mmdit", depth=int(c["num_layers"]), hidden_size=hidden, num_heads=int(c["num_attention_heads"]),
                 head_channels=-1, patch_size=int(c["patch_size"]), mlp_ratio=4.0, qk_norm=c["qk_norm"] or "",
                 pos_embed_max_size=int(c["pos_embed_max_size"]), sample_size=int(c["sample_size"]),
                 dtype="float32", param_dtype="float32", remat=False)
    data = dict(image_size=int(c["sample_size"]), channels=int(c["in_channels"]))
    text = dict(context_dim=int(c["joint_attention_dim"]), pooled_dim=int(c["pooled_projection_dim"]))
    return model, data, text


def _linear(store: _Tensors, prefix: str, leaf: str) -> np.ndarray:
    return store.take(f"{prefix}.weight").T if leaf == "kernel" else store.take(f"{prefix}.bias")


def _block_value(path: tuple, prefix: str, store: _Tensors) -> np.ndarray:
    """One JointBlock parameter (path below the block) from transformer_blocks.i (`prefix`)."""
    stream, part, leaf = (list(path) + [None])[:3]
    name = _STREAM[stream][part]
    if part in ("norm_q", "norm_k"):
        return store.take(f"{prefix}.{name}.weight")
    if part == "qkv":
        return np.concatenate([_linear(store, f"{prefix}.{n}", leaf) for n in name], axis=-1)
    return _linear(store, f"{prefix}.{name}", leaf)


def _value(path: tuple, store: _Tensors, depth: int) -> np.ndarray:
    top = path[0]
    if top == "blocks":  # stacked: transformer_blocks.0 .. depth-2
        return np.stack([_block_value(path[1:], f"transformer_blocks.{i}", store) for i in range(depth - 1)])
    if top == "last_block":
        return _block_value(path[1:], f"transformer_blocks.{depth - 1}", store)
    if top == "patch_embed":  # conv [D, C, p, p] -> a matmul on patches flattened as (row, col, channel)
        if path[-1] == "bias":
            return store.take("pos_embed.proj.bias")
        w = store.take("pos_embed.proj.weight")
        return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])
    if top == "pooled_embed":
        return _linear(store, f"{_TOP[top]}.{path[1]}", path[-1])
    if top in _TOP:
        return _linear(store, _TOP[top], path[-1])
    raise UnsupportedDiffusersConfig(f"no diffusers tensor for diffax parameter {'/'.join(map(str, path))}")


def load_sd3_weights(model: MMDiT, tensors: dict[str, np.ndarray], *, depth: int) -> None:
    """Copy an SD3Transformer2DModel state dict (numpy) into `model` (built from sd3_config_to_diffax), in place.

    Every parameter must be found with its shape and every tensor used; the stored position table must
    equal the one diffax computes. Otherwise UnsupportedDiffusersConfig names the offenders.
    """
    store = _Tensors(tensors)
    copy_params(model, lambda path: _value(path, store, depth))
    if "pos_embed.pos_embed" in tensors:
        stored = store.take("pos_embed.pos_embed")[0]
        max_size, base = model.pos_embed_args
        mine = sd3_pos_embed(model.hidden, max_size, max_size, max_size=max_size, base_size=base)
        if stored.shape != mine.shape or not np.allclose(stored, mine, atol=1e-4):
            raise UnsupportedDiffusersConfig("the checkpoint's pos_embed.pos_embed is not SD3's sin-cos table for "
                                             f"pos_embed_max_size={max_size}, sample_size / patch_size={base}")
    require_used(store, "MMDiT")


def load_diffusers_sd3_transformer(src_dir: str) -> tuple[ml_collections.ConfigDict, MMDiT]:
    """Load a diffusers SD3Transformer2DModel as a diffax MMDiT (float32).

    src_dir: an SD3 pipeline folder (transformer/ inside, scheduler/ beside it) or the transformer
    folder itself. Returns (overrides, model): overrides.model holds the config.model fields,
    overrides.data the latent size and channels, overrides.text_widths the widths of the text states
    and pooled vector the model takes, and with a scheduler_config.json overrides.diffusion and
    overrides.sampling. model(x NHWC, 1000 t, context=..., pooled=...) equals
    SD3Transformer2DModel(x NCHW, timestep=1000 t, ...).sample transposed.
    """
    folder = component_dir(src_dir, "transformer", "pass an SD3 pipeline folder (with transformer/) or an "
                           "SD3Transformer2DModel folder saved with safe_serialization=True")
    model_fields, data_fields, text = sd3_config_to_diffax(_read_json(os.path.join(folder, CONFIG_NAME)))
    overrides = ml_collections.ConfigDict({"model": model_fields, "data": data_fields, "text_widths": text})
    for path in (os.path.join(src_dir, "scheduler", SCHEDULER_NAME),
                 os.path.join(os.path.dirname(os.path.abspath(folder)), "scheduler", SCHEDULER_NAME)):
        if os.path.exists(path):
            overrides.diffusion, overrides.sampling = scheduler_config_to_diffax(_read_json(path))
            break
    size, channels = data_fields["image_size"], data_fields["channels"]
    # abstract shapes only: every parameter is then set from the checkpoint (no random init of 2B weights)
    model = nnx.eval_shape(lambda: build_model(overrides.model, data_shape=(size, size, channels), num_classes=0,
                                               rngs=nnx.Rngs(0), **text))
    load_sd3_weights(model, read_weights(os.path.join(folder, WEIGHTS_NAME)), depth=model_fields["depth"])
    return overrides, model

"""DINOv2 ViT features for FD-DINOv2 (Stein et al. 2023), in Flax NNX, read from a transformers folder.

FD-DINOv2 is the Frechet distance of Heusel et al. (2017) computed on the CLS
token of DINOv2 ViT-L/14 (Oquab et al. 2023) instead of Inception pool3; Stein et
al. (2023, "Exposing flaws of generative model evaluation metrics", dgm-eval)
proposed it and EDM2 (Karras et al. 2024) reports it beside FID.

The network is transformers' `Dinov2Model` (patch embedding, CLS token, learned
position embeddings interpolated bicubically to the input's patch grid, pre-norm
blocks with layer scale, exact-erf GELU MLP, final LayerNorm; the feature is the
pooled output, the normalised CLS token), read from a `save_pretrained` folder
(config.json + model.safetensors, e.g. facebook/dinov2-large) with numpy and
safetensors. The blocks' weights are stacked on a leading depth axis and run
under one `lax.scan` (compile time flat in depth). SwiGLU variants (ViT-g) are
refused with a clear error.

Preprocessing (`PROTOCOL`) is EDM2's DINOv2 detector with resize_mode="torch":
uint8 -> float [0, 255] -> bicubic antialiased resize to 224x224 (torch's
`antialias=True`, PIL's algorithm; `protocols.antialiased_bicubic_matrix`) -> / 255
-> ImageNet mean / std. dgm-eval resizes the uint8 image with PIL and rounds back
to uint8 before that; EDM2 calls the torch path "almost the same". The position
embeddings are interpolated as transformers does (to the exact grid size); the
original torch-hub model adds a 0.1 offset to the scale factor, a small difference.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffax.evaluation import inception, protocols

PROTOCOL = "dinov2-edm2-bicubic224"  # recorded in statistics files beside the extractor
INPUT_SIZE = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
_HIGHEST = jax.lax.Precision.HIGHEST

# transformers v5 renamed the attention projections on load; save_pretrained folders and the hub hold the old names.
_RENAMES = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
            "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense"}


@functools.lru_cache(maxsize=32)
def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] matrix of torch's `F.interpolate(mode='bicubic', align_corners=False)` (no antialiasing).

    src = (dst + 0.5) * in / out - 0.5 (not clamped), taps floor(src) - 1 .. floor(src) + 2
    clamped to the border, Keys' cubic convolution with A = -0.75
    (aten/src/ATen/native/UpSample.h, get_cubic_upsample_coefficients).
    """
    a = -0.75
    src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    lo = np.floor(src).astype(np.int64)
    t = src - lo
    w = np.stack([
        ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
        ((a + 2) * t - (a + 3)) * t * t + 1,
        ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
        ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
    ], axis=1)
    mat = np.zeros((out_size, in_size), np.float64)
    for j in range(4):
        np.add.at(mat, (np.arange(out_size), np.clip(lo - 1 + j, 0, in_size - 1)), w[:, j])
    return mat.astype(np.float32)


def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def _dense(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    return jnp.matmul(x, kernel, precision=_HIGHEST) + bias


_BLOCK_PARAMS = ("norm1_scale", "norm1_bias", "q_kernel", "q_bias", "k_kernel", "k_bias", "v_kernel", "v_bias",
                 "o_kernel", "o_bias", "ls1", "norm2_scale", "norm2_bias", "fc1_kernel", "fc1_bias",
                 "fc2_kernel", "fc2_bias", "ls2")


class Dinov2(nnx.Module):
    """transformers' Dinov2Model: `__call__(pixels [B, H, W, 3] normalised) -> (pooled [B, D], hidden [B, 1 + N, D])`.

    H and W must be multiples of `patch_size`. Block weights are nnx.Params with a
    leading `num_layers` axis (`blocks[name]`), applied under one lax.scan.
    """

    def __init__(self, *, hidden_size: int, num_layers: int, num_heads: int, mlp_ratio: float, patch_size: int,
                 image_size: int, layer_norm_eps: float = 1e-6, num_channels: int = 3, name: str = "dinov2"):
        d, m, p, L = hidden_size, int(hidden_size * mlp_ratio), patch_size, num_layers
        self.hidden_size, self.num_heads, self.patch_size, self.eps, self.name = d, num_heads, p, layer_norm_eps, name
        self.grid = image_size // patch_size
        z = functools.partial(jnp.zeros, dtype=jnp.float32)
        self.patch_kernel = nnx.Param(z((p, p, num_channels, d)))
        self.patch_bias = nnx.Param(z((d,)))
        self.cls_token = nnx.Param(z((d,)))
        self.pos_embed = nnx.Param(z((1 + self.grid * self.grid, d)))
        shapes = {"q_kernel": (d, d), "k_kernel": (d, d), "v_kernel": (d, d), "o_kernel": (d, d),
                  "fc1_kernel": (d, m), "fc1_bias": (m,), "fc2_kernel": (m, d)}
        self.blocks = nnx.Dict({k: nnx.Param(z((L, *shapes.get(k, (d,))))) for k in _BLOCK_PARAMS})
        self.norm_scale = nnx.Param(z((d,)))
        self.norm_bias = nnx.Param(z((d,)))

    def position_embeddings(self, gh: int, gw: int) -> jax.Array:
        """[1 + gh * gw, D]: the CLS position and the patch grid resized bicubically (as transformers does)."""
        pos = self.pos_embed[...]
        if (gh, gw) == (self.grid, self.grid):
            return pos
        grid = pos[1:].reshape(self.grid, self.grid, -1)
        grid = jnp.einsum("oh,hwd->owd", jnp.asarray(torch_bicubic_matrix(self.grid, gh)), grid, precision=_HIGHEST)
        grid = jnp.einsum("pw,owd->opd", jnp.asarray(torch_bicubic_matrix(self.grid, gw)), grid, precision=_HIGHEST)
        return jnp.concatenate([pos[:1], grid.reshape(gh * gw, -1)])

    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        b, h, w, _ = pixels.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"DINOv2 input {h}x{w} is not a multiple of the patch size {p}")
        x = jax.lax.conv_general_dilated(pixels, self.patch_kernel[...], (p, p), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_HIGHEST)
        x = (x + self.patch_bias[...]).reshape(b, -1, self.hidden_size)
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, self.hidden_size))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embeddings(h // p, w // p)
        heads, eps = self.num_heads, self.eps

        def block(x, wt):
            t, d = x.shape[1], x.shape[2]
            y = _layer_norm(x, wt["norm1_scale"], wt["norm1_bias"], eps)
            q, k, v = (_dense(y, wt[f"{n}_kernel"], wt[f"{n}_bias"]).reshape(b, t, heads, d // heads) for n in "qkv")
            logits = jnp.einsum("bqhc,bkhc->bhqk", q, k, precision=_HIGHEST) / np.sqrt(d // heads)
            att = jnp.einsum("bhqk,bkhc->bqhc", jax.nn.softmax(logits, axis=-1), v, precision=_HIGHEST)
            x = x + wt["ls1"] * _dense(att.reshape(b, t, d), wt["o_kernel"], wt["o_bias"])
            y = _layer_norm(x, wt["norm2_scale"], wt["norm2_bias"], eps)
            y = _dense(jax.nn.gelu(_dense(y, wt["fc1_kernel"], wt["fc1_bias"]), approximate=False),
                       wt["fc2_kernel"], wt["fc2_bias"])
            return x + wt["ls2"] * y, None

        x, _ = jax.lax.scan(block, x, {k: v[...] for k, v in self.blocks.items()})
        x = _layer_norm(x, self.norm_scale[...], self.norm_bias[...], eps)
        return x[:, 0], x


def load_dinov2(folder: str) -> Dinov2:
    """Build `Dinov2` from a transformers Dinov2Model folder (config.json + model.safetensors), no PyTorch.

    Accepts the hub's names (`attention.attention.query`, ...) and transformers
    v5's (`attention.q_proj`, ...), with or without a `dinov2.` prefix (a
    Dinov2ForImageClassification folder). Every weight must be used once.
    """
    from safetensors.numpy import load_file

    cfg_path, st_path = os.path.join(folder, "config.json"), os.path.join(folder, "model.safetensors")
    for path in (cfg_path, st_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: config.eval.dinov2_weights must be a transformers Dinov2Model folder with "
                "config.json and model.safetensors (e.g. `huggingface-cli download facebook/dinov2-large "
                "config.json model.safetensors --local-dir DIR`).")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("use_swiglu_ffn") or cfg.get("hidden_act", "gelu") != "gelu" or not cfg.get("qkv_bias", True):
        raise ValueError(f"{cfg_path}: only DINOv2 models with a GELU MLP and qkv biases (ViT-S/B/L) are supported.")
    image_size, patch_size = cfg.get("image_size", 224), cfg.get("patch_size", 14)
    if not isinstance(image_size, int) or not isinstance(patch_size, int):
        raise ValueError(f"{cfg_path}: square image_size and patch_size expected, got {image_size}, {patch_size}")
    model = Dinov2(hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
                   num_heads=cfg["num_attention_heads"], mlp_ratio=cfg.get("mlp_ratio", 4),
                   patch_size=patch_size, image_size=image_size, layer_norm_eps=cfg.get("layer_norm_eps", 1e-6),
                   num_channels=cfg.get("num_channels", 3),
                   name=f"dinov2-{cfg['hidden_size']}x{cfg['num_hidden_layers']}-p{patch_size}/cls")
    tensors = {}
    for key, value in load_file(st_path).items():
        key = key.removeprefix("dinov2.")
        for new, old in _RENAMES.items():
            key = key.replace(new, old)
        tensors[key] = value
    _assign(model, tensors, st_path)
    return model


def _assign(model: Dinov2, t: dict[str, np.ndarray], path: str) -> None:
    used = set()

    def take(key: str) -> np.ndarray:
        if key not in t:
            raise ValueError(f"{path} lacks {key!r}: not a transformers Dinov2Model checkpoint?")
        used.add(key)
        return np.asarray(t[key], np.float32)

    e = "embeddings."
    model.patch_kernel.set_value(jnp.asarray(take(e + "patch_embeddings.projection.weight").transpose(2, 3, 1, 0)))
    model.patch_bias.set_value(jnp.asarray(take(e + "patch_embeddings.projection.bias")))
    model.cls_token.set_value(jnp.asarray(take(e + "cls_token").reshape(-1)))
    pos = take(e + "position_embeddings")
    if pos.shape[1:] != model.pos_embed.shape:
        raise ValueError(f"{path}: position embeddings {pos.shape[1:]}, config implies {model.pos_embed.shape}")
    model.pos_embed.set_value(jnp.asarray(pos[0]))
    used.add(e + "mask_token")  # pre-training only
    depth = model.blocks["ls1"].shape[0]
    sources = {"norm1_scale": "norm1.weight", "norm1_bias": "norm1.bias", "norm2_scale": "norm2.weight",
               "norm2_bias": "norm2.bias", "ls1": "layer_scale1.lambda1", "ls2": "layer_scale2.lambda1",
               "fc1_bias": "mlp.fc1.bias", "fc2_bias": "mlp.fc2.bias", "o_bias": "attention.output.dense.bias",
               **{f"{n}_bias": f"attention.attention.{w}.bias" for n, w in zip("qkv", ("query", "key", "value"))}}
    kernels = {"fc1_kernel": "mlp.fc1.weight", "fc2_kernel": "mlp.fc2.weight", "o_kernel": "attention.output.dense.weight",
               **{f"{n}_kernel": f"attention.attention.{w}.weight" for n, w in zip("qkv", ("query", "key", "value"))}}
    for name in _BLOCK_PARAMS:
        if name in kernels:  # torch Linear [out, in] -> [in, out]
            arr = np.stack([take(f"encoder.layer.{i}.{kernels[name]}").T for i in range(depth)])
        else:
            arr = np.stack([take(f"encoder.layer.{i}.{sources[name]}") for i in range(depth)])
        if arr.shape != model.blocks[name].shape:
            raise ValueError(f"{path}: {name} has shape {arr.shape}, the config implies {model.blocks[name].shape}")
        model.blocks[name].set_value(jnp.asarray(arr))
    model.norm_scale.set_value(jnp.asarray(take("layernorm.weight")))
    model.norm_bias.set_value(jnp.asarray(take("layernorm.bias")))
    extra = sorted(set(t) - used)
    if extra:
        raise ValueError(f"{path}: unexpected weights {extra[:5]} (more layers than config.json says, or another model)")


def extractor_name(model: Dinov2) -> str:
    """What statistics files record as the feature extractor, e.g. 'dinov2-1024x24-p14/cls' for ViT-L/14."""
    return model.name


def preprocess(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """uint8 NHWC (1 or 3 channels) -> float32 [B, size, size, 3]: EDM2's DINOv2 input (module docstring)."""
    x = jnp.asarray(images)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    x = protocols.resize(x.astype(jnp.float32), (size, size), "clean") / 255.0
    return (x - jnp.asarray(MEAN, jnp.float32)) / jnp.asarray(STD, jnp.float32)


@functools.partial(jax.jit, static_argnums=(0,))
def _features(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(preprocess(images))[0]


def make_feature_fn(model: Dinov2, *, devices: Sequence[jax.Device] | None = None
                    ) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """A host function uint8 NHWC images -> {'features': CLS [N, D]}, batches split over `devices` when they divide."""
    graphdef, state = nnx.split(model)
    call = inception.data_parallel(functools.partial(_features, graphdef), state, devices)
    return lambda images: {"features": np.asarray(call(images))}

"""Pretrained CLIP and T5 text encoders read from transformers folders, without PyTorch.

    encoder, tokenizer = load_text_encoder("path/to/text_encoder")
    ids, mask = tokenizer(["a photo of a cat"])
    out = encoder(ids, mask)          # TextEmbedding(hidden [B, L, D], pooled [B, P] or None)

A folder is what transformers' save_pretrained writes (config.json + model.safetensors, or
model.safetensors.index.json + shards; float32, float16 or bfloat16 tensors) and its tokenizer
(tokenizer.json, or for CLIP vocab.json + merges.txt), or a diffusers pipeline's text_encoder*/
folder, whose tokenizer lies in the sibling tokenizer*/ folder. config.json's model_type picks the
encoder:

  clip_text_model   CLIPTextModel (pooled: final state at the end token) or, when config.json's
                    architectures says CLIPTextModelWithProjection, its projected pooled vector
  clip              a full CLIPModel: the text tower and text_projection (vision tensors ignored)
  t5, mt5           T5EncoderModel (or the encoder of T5ForConditionalGeneration / T5Model;
                    decoder tensors ignored); pooled is None

encoder.hidden_size (D) and encoder.pooled_size (P; 0 when pooled is None) size the denoiser's
cross-attention and pooled-vector inputs. Every tensor of the file must find a place in the encoder (an error names those that do not),
except the ones listed above and CLIP's position_ids buffer. Parameters are float32; `dtype`
sets the activations (bfloat16 on accelerators). Freezing the encoder is the caller's business
(e.g. call it on nnx.state(encoder) captured as a constant, or stop_gradient its output).
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffax.errors import UserError
from diffax.models.text.clip import CLIPTextEncoder, clip_kwargs, clip_weights
from diffax.models.text.t5 import T5Encoder, t5_kwargs, t5_weights
from diffax.models.text.tokenizer import TextTokenizer, load_tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"

CLIP_TYPES = ("clip_text_model", "clip")
T5_TYPES = ("t5", "mt5")


# ----------------------------------------------------------------------------- files


def read_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.exists(path):
        raise UserError(f"{path} not found: the text encoder path must be a transformers model folder "
                        "(config.json + model.safetensors), e.g. a diffusers pipeline's text_encoder/")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file as numpy (bfloat16 through ml_dtypes, which safetensors.numpy lacks)."""
    from safetensors.numpy import load_file

    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    if not any(isinstance(v, dict) and v.get("dtype") == "BF16" for v in header.values()):
        return load_file(path)
    import ml_dtypes

    types = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64, "I64": np.int64,
             "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
    start = 8 + size
    data = np.memmap(path, np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in types:
            raise UserError(f"{path}: tensor {name} has dtype {info['dtype']}, which diffax cannot read")
        lo, hi = info["data_offsets"]
        out[name] = np.frombuffer(data[start + lo:start + hi].tobytes(), types[info["dtype"]]).reshape(info["shape"])
    return out


def read_tensors(folder: str) -> dict[str, np.ndarray]:
    """Every tensor of the folder's model.safetensors (or of the shards its index lists)."""
    single, index = os.path.join(folder, WEIGHTS_FILE), os.path.join(folder, WEIGHTS_INDEX)
    if os.path.exists(single):
        return _read_safetensors(single)
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors: dict[str, np.ndarray] = {}
        for shard in shards:
            tensors.update(_read_safetensors(os.path.join(folder, shard)))
        return tensors
    raise UserError(f"{folder}: no {WEIGHTS_FILE} (or {WEIGHTS_INDEX}). Save the model with transformers' "
                    "save_pretrained (safetensors is its default); PyTorch .bin files are not read")


class Tensors:
    """A checkpoint's tensors, each taken at most once, so the ones left over can be named."""

    def __init__(self, tensors: dict[str, np.ndarray], source: str):
        self._tensors, self._used, self.source = tensors, set(), source

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def take(self, name: str) -> np.ndarray:
        if name not in self._tensors:
            raise UserError(f"{self.source}: tensor {name} is missing (the file does not match its config.json)")
        self._used.add(name)
        return self._tensors[name]

    def ignore(self, keep: Callable[[str], bool]) -> None:
        """Mark the tensors for which keep(name) is True as deliberately unused."""
        self._used.update(n for n in self._tensors if keep(n))

    def check_all_used(self) -> None:
        unused = sorted(set(self._tensors) - self._used)
        if unused:
            shown = ", ".join(unused[:20]) + (f" and {len(unused) - 20} more" if len(unused) > 20 else "")
            raise UserError(f"{self.source}: {len(unused)} tensors have no place in the diffax text encoder: {shown}. "
                            "The file does not match its config.json, or holds a model diffax does not read")


def set_params(model: nnx.Module, values: dict[str, np.ndarray], source: str) -> None:
    """Copy {parameter path "a.b.c": value} into every nnx.Param of `model` (built by nnx.eval_shape)."""
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Param):
            continue
        key = ".".join(map(str, path))
        value = values.pop(key)  # a KeyError here is a bug in the name mapping, not the user's
        if tuple(value.shape) != tuple(var.value.shape):
            raise UserError(f"{source}: the tensor for {key} has shape {tuple(value.shape)}, its config.json "
                            f"implies {tuple(var.value.shape)}")
        var.value = jnp.asarray(np.asarray(value, np.float32), var.value.dtype)
    assert not values, f"values with no parameter: {sorted(values)}"


# ----------------------------------------------------------------------------- encoders


def encoder_kind(config: dict[str, Any], source: str) -> str:
    """"clip" or "t5" from config.json's model_type (or architectures when model_type is missing)."""
    model_type = config.get("model_type")
    if model_type is None:
        arch = " ".join(config.get("architectures") or [])
        model_type = "clip_text_model" if "CLIP" in arch else "t5" if "T5" in arch else None
    if model_type in CLIP_TYPES:
        return "clip"
    if model_type in T5_TYPES:
        return "t5"
    raise UserError(f"{source}: model_type {model_type!r} is not a text encoder diffax reads; supported: "
                    f"{', '.join(CLIP_TYPES + T5_TYPES)} (CLIP text models and T5 encoders)")


def _tokenizer_folder(folder: str) -> str:
    """The folder itself when it has tokenizer files, else a diffusers pipeline's sibling tokenizer*/ folder."""
    names = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
    if any(os.path.exists(os.path.join(folder, n)) for n in names):
        return folder
    base = os.path.basename(os.path.normpath(folder))
    if base.startswith("text_encoder"):  # text_encoder_2 -> tokenizer_2
        sibling = os.path.join(os.path.dirname(os.path.normpath(folder)), "tokenizer" + base[len("text_encoder"):])
        if os.path.isdir(sibling):
            return sibling
    return folder


def load_text_encoder(path: str, *, layer: int = -1, final_norm: bool = True, use_mask: bool | None = None,
                      dtype: str = "float32", max_length: int | None = None,
                      tokenizer: str | None = None) -> tuple[CLIPTextEncoder | T5Encoder, TextTokenizer]:  # fmt: skip
    """A pretrained CLIP or T5 text encoder and its tokenizer, read from a transformers folder.

    layer, final_norm: which hidden states the encoder returns (diffax/models/text/clip.py lists
    the Stable Diffusion conventions; default: the last hidden state). use_mask: hide padding in
    the attention; default False for CLIP (what SD pipelines do), True for T5. dtype: activations.
    max_length: tokens per prompt (default: the CLIP folder's 77, 77 for T5). tokenizer: the folder
    holding the tokenizer when it is not `path` or its diffusers sibling. A tokenizer with more
    tokens than the encoder's vocabulary raises UserError ("tokenizer does not match its encoder").
    """
    config_path = os.path.join(path, CONFIG_FILE)
    config = read_config(path)
    kind = encoder_kind(config, config_path)
    full = config.get("model_type") == "clip"  # a whole CLIPModel: its text tower and text_projection
    if kind == "clip":
        projection = full or "CLIPTextModelWithProjection" in (config.get("architectures") or [])
        text_config = dict(config.get("text_config") or {}) if full else config
        if full and "projection_dim" in config:
            text_config["projection_dim"] = config["projection_dim"]
        kwargs = clip_kwargs(text_config, projection=projection)
        kwargs["use_mask"] = bool(config.get("use_attention_mask", False)) if use_mask is None else bool(use_mask)
    else:
        kwargs = t5_kwargs(config)
        kwargs["use_mask"] = True if use_mask is None else bool(use_mask)

    # the tokenizer first: a mismatch is found before a large checkpoint is read
    tok = load_tokenizer(tokenizer or _tokenizer_folder(path), kind=kind, max_length=max_length,
                         max_positions=kwargs.get("max_positions"))  # fmt: skip
    if tok.vocab_size > kwargs["vocab_size"]:
        raise UserError(f"tokenizer does not match its encoder: {tok.source} has {tok.vocab_size} tokens, "
                        f"{config_path} has vocab_size {kwargs['vocab_size']}; pass the tokenizer saved with this "
                        "encoder")

    weights = os.path.join(path, WEIGHTS_FILE)
    tensors = Tensors(read_tensors(path), weights if os.path.exists(weights) else os.path.join(path, WEIGHTS_INDEX))
    options = dict(layer=layer, final_norm=final_norm, dtype=dtype, param_dtype="float32")
    if kind == "clip":
        model = nnx.eval_shape(lambda: CLIPTextEncoder(**kwargs, **options, rngs=nnx.Rngs(0)))
        prefix = "text_model." if any(n.startswith("text_model.") for n in tensors.names()) else ""
        tensors.ignore(lambda n: n.endswith("embeddings.position_ids"))  # a buffer, arange(max_positions)
        if full:
            tensors.ignore(lambda n: n.startswith(("vision_model.", "visual_projection.")) or n == "logit_scale")
        values = clip_weights(tensors.take, prefix, kwargs["num_layers"], kwargs["projection_dim"] > 0)
    else:
        model = nnx.eval_shape(lambda: T5Encoder(**kwargs, **options, rngs=nnx.Rngs(0)))
        tensors.ignore(lambda n: n.startswith(("decoder.", "lm_head.")))  # T5ForConditionalGeneration / T5Model
        values = t5_weights(tensors.take, tensors.has, kwargs["num_layers"], kwargs["gated"])
    tensors.check_all_used()
    set_params(model, values, tensors.source)
    return model, tok


__all__ = ["CLIPTextEncoder", "T5Encoder", "TextTokenizer", "load_text_encoder", "load_tokenizer", "read_tensors"]

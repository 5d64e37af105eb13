"""The T5 encoder (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer", sec. 2.1), as transformers' T5EncoderModel: the text encoder of Imagen
(Saharia et al. 2022, T5-XXL), SD3 and Flux.

Token embedding (no position embedding) -> num_layers pre-norm blocks -> final norm. Differences
from the original Transformer, all in sec. 2.1 of the paper: the norm is RMS-only (a scale, no mean
subtraction, no bias); attention logits are not scaled by 1/sqrt(d_kv) (the scale is folded into
the initialisation of q); position is a learned scalar bias per head and relative-position bucket,
bidirectional, computed by block 0 and shared by every block; no biases anywhere. Feed-forward:
relu (T5) or gated, act(x W0) * (x W1) (T5 v1.1, mT5, FLAN-T5: "gated-gelu" with the tanh gelu;
Shazeer 2020). The blocks' weights are stacked and run under one lax.scan.

`layer` / `final_norm` pick the hidden states as for CLIP (diffax/models/text/clip.py): an index
into [embeddings, block 1, ..., block N] and whether the final norm is applied; the default
(-1, True) is last_hidden_state. pooled is None.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffax.errors import UserError
from diffax.models import layers
from diffax.models.text.base import TextEmbedding
from diffax.models.text.clip import ACTIVATIONS, activation, dense, layer_index, run_layers, stack_layers

Array = jax.Array


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket of (key position - query position) for every [query, key] pair, bidirectional (T5 sec. 2.1).

    Half the buckets for each sign; of those, the first half are exact distances 0, 1, ..., and the
    rest cover distances up to max_distance logarithmically (farther ones share the last bucket).
    The logarithm is taken in float32 and truncated, as Mesh TensorFlow and transformers do, so
    the table is bit-identical to theirs.
    """
    rel = np.arange(length)[None, :] - np.arange(length)[:, None]
    half = num_buckets // 2
    exact = half // 2
    sign_offset = (rel > 0) * half
    n = np.abs(rel)
    with np.errstate(divide="ignore"):  # log(0) at n = 0, where the exact branch is taken
        scaled = (np.log(n.astype(np.float32) / np.float32(exact)) / np.float32(math.log(max_distance / exact))
                  * np.float32(half - exact))  # fmt: skip
    large = exact + np.where(n < exact, 0, scaled).astype(np.int64)
    return (sign_offset + np.where(n < exact, n, np.minimum(large, half - 1))).astype(np.int32)


def rms_norm(x: Array, scale: Array, eps: float, dtype) -> Array:
    """T5's LayerNorm: x / sqrt(mean(x^2) + eps) * scale, no mean subtraction, no bias (float32 statistics)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps, self.dtype = float(eps), dtype

    def __call__(self, x: Array) -> Array:
        return rms_norm(x, self.scale[...], self.eps, self.dtype)


class T5Block(nnx.Module):
    """x + o(attn(norm(x)) + position bias, unscaled), then x + wo(ff(norm(x))) (T5Block of an encoder)."""

    def __init__(self, d_model: int, d_kv: int, d_ff: int, heads: int, eps: float, act: str, gated: bool, *, dtype,
                 param_dtype, rngs):  # fmt: skip
        kw = dict(bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        inner = heads * d_kv
        self.attn_norm = RMSNorm(d_model, eps, dtype=dtype, param_dtype=param_dtype)
        self.q, self.k, self.v = (dense(d_model, inner, **kw) for _ in range(3))
        self.o = dense(inner, d_model, **kw)
        self.ff_norm = RMSNorm(d_model, eps, dtype=dtype, param_dtype=param_dtype)
        self.wi = dense(d_model, d_ff, **kw)
        self.wi_gate = dense(d_model, d_ff, **kw) if gated else None  # the linear half of a gated unit
        self.wo = dense(d_ff, d_model, **kw)
        self.heads, self.d_kv, self.act = heads, d_kv, act

    def __call__(self, x: Array, bias: Array, mask: Array | None) -> Array:
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q, k, v = (f(h).reshape(b, t, self.heads, self.d_kv) for f in (self.q, self.k, self.v))
        out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=1.0)  # bias float32
        x = x + self.o(out.reshape(b, t, self.heads * self.d_kv))
        h = self.ff_norm(x)
        a = ACTIVATIONS[self.act](self.wi(h))
        return x + self.wo(a * self.wi_gate(h) if self.wi_gate is not None else a)


class T5Encoder(nnx.Module):
    """T5 encoder: encoder(ids [B, L], mask [B, L] or None) -> TextEmbedding(hidden [B, L, d_model], None).

    Raffel et al. (2020); the computation of transformers' T5EncoderModel. use_mask: hide padding
    from the attention, as transformers does when given attention_mask (Imagen, PixArt); SD3's and
    Flux's pipelines call T5 without a mask (use_mask=False reproduces them). Activations in
    `dtype`, parameters in `param_dtype`, norms, position bias and softmax in float32.
    """

    def __init__(self, *, vocab_size: int, d_model: int = 512, d_kv: int = 64, d_ff: int = 2048, num_layers: int = 6,
                 num_heads: int = 8, num_buckets: int = 32, max_distance: int = 128, layer_norm_eps: float = 1e-6,
                 ff_act: str = "relu", gated: bool = False, layer: int = -1, final_norm: bool = True,
                 use_mask: bool = True, dtype="float32", param_dtype="float32", rngs: nnx.Rngs):  # fmt: skip
        activation(ff_act, "T5 feed_forward_proj")
        self.dtype = layers.dtype_of(dtype)
        kw = dict(dtype=self.dtype, param_dtype=layers.dtype_of(param_dtype))
        self.token_embedding = nnx.Embed(vocab_size, d_model, param_dtype=kw["param_dtype"], rngs=rngs)
        self.position_bias = nnx.Param(jnp.zeros((num_buckets, num_heads), kw["param_dtype"]))  # [bucket, head]
        self.blocks = stack_layers(
            lambda r: T5Block(d_model, d_kv, d_ff, num_heads, layer_norm_eps, ff_act, gated, rngs=r, **kw),
            num_layers, rngs)  # fmt: skip
        self.final_norm = RMSNorm(d_model, layer_norm_eps, **kw)
        self.num_buckets, self.max_distance = int(num_buckets), int(max_distance)
        self.layer = layer_index(int(layer), int(num_layers), "T5")
        self.apply_final_norm, self.use_mask = bool(final_norm), bool(use_mask)
        self.hidden_size, self.pooled_size = int(d_model), 0  # pooled is None

    def __call__(self, ids: Array, mask: Array | None = None) -> TextEmbedding:
        t = ids.shape[1]
        h = self.token_embedding.embedding[...][jnp.asarray(ids, jnp.int32)].astype(self.dtype)
        buckets = relative_position_buckets(t, self.num_buckets, self.max_distance)
        bias = jnp.transpose(self.position_bias[...].astype(jnp.float32)[buckets], (2, 0, 1))[None]  # [1, N, T, T]
        allowed = (jnp.asarray(mask) > 0)[:, None, None, :] if self.use_mask and mask is not None else None
        h = run_layers(self.blocks, h, 0, self.layer, bias, allowed)
        return TextEmbedding(hidden=self.final_norm(h) if self.apply_final_norm else h, pooled=None)


# ----------------------------------------------------------------------------- transformers folders

T5_DEFAULTS: dict[str, Any] = dict(  # T5Config.__init__ defaults (transformers 4.x / 5)
    vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, layer_norm_epsilon=1e-6, feed_forward_proj="relu",
)


def t5_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """A transformers T5Config (as a dict) -> T5Encoder keyword arguments (no layer / dtype)."""
    c = {**T5_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    parts = str(c["feed_forward_proj"]).split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise UserError(f"T5 feed_forward_proj={c['feed_forward_proj']!r}: expected 'ACT' or 'gated-ACT' "
                        "(e.g. 'relu', 'gated-gelu')")
    act = "gelu_new" if c["feed_forward_proj"] == "gated-gelu" else parts[-1]  # as T5Config maps it
    return dict(vocab_size=int(c["vocab_size"]), d_model=int(c["d_model"]), d_kv=int(c["d_kv"]), d_ff=int(c["d_ff"]),
                num_layers=int(c["num_layers"]), num_heads=int(c["num_heads"]),
                num_buckets=int(c["relative_attention_num_buckets"]),
                max_distance=int(c["relative_attention_max_distance"]),
                layer_norm_eps=float(c["layer_norm_epsilon"]), ff_act=act, gated=len(parts) == 2)


def t5_weights(take: Callable[[str], np.ndarray], has: Callable[[str], bool], num_layers: int,
               gated: bool) -> dict[str, np.ndarray]:  # fmt: skip
    """transformers T5 encoder tensors -> {T5Encoder parameter path: value}; kernels transposed to [in, out].

    The token table is encoder.embed_tokens.weight or the tied shared.weight (a file may hold
    either or both; both must then be equal).
    """
    names = [n for n in ("encoder.embed_tokens.weight", "shared.weight") if has(n)]
    if not names:
        raise UserError("T5: the file has neither shared.weight nor encoder.embed_tokens.weight")
    tables = [take(n) for n in names]
    if len(tables) == 2 and not np.array_equal(tables[0], tables[1]):
        raise UserError("T5: encoder.embed_tokens.weight and shared.weight differ; diffax reads tied embeddings only")
    out = {
        "token_embedding.embedding": tables[0],
        "position_bias": take("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
        "final_norm.scale": take("encoder.final_layer_norm.weight"),
    }
    ff = {"wi": "wi_0", "wi_gate": "wi_1", "wo": "wo"} if gated else {"wi": "wi", "wo": "wo"}
    names = {"attn_norm.scale": "layer.0.layer_norm.weight", "ff_norm.scale": "layer.1.layer_norm.weight",
             **{f"{x}.kernel": f"layer.0.SelfAttention.{x}.weight" for x in "qkvo"},
             **{f"{ours}.kernel": f"layer.1.DenseReluDense.{theirs}.weight" for ours, theirs in ff.items()}}
    for ours, theirs in names.items():
        per_layer = [take(f"encoder.block.{i}.{theirs}") for i in range(num_layers)]
        out[f"blocks.{ours}"] = np.stack([w.T if ours.endswith("kernel") else w for w in per_layer])
    return out

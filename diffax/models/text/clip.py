"""CLIP's text transformer (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision", sec. 2.4), as transformers' CLIPTextModel / CLIPTextModelWithProjection.

Token + learned position embeddings -> num_layers pre-LN blocks (causal self-attention, MLP with
quick_gelu or gelu) -> final LayerNorm. The pooled vector is the final state at the end-of-text
token, optionally through the bias-free text projection (SDXL's second encoder, SD3's pooled
vectors). The blocks' weights are stacked on a leading layer axis and run under one lax.scan.

Which hidden states a denoiser sees (`layer`, `final_norm`): `layer` indexes the list
[embeddings, output of block 1, ..., output of block N] (transformers' hidden_states; negative
from the end), and `final_norm` applies the final LayerNorm to it.

  layer=-1, final_norm=True    last_hidden_state (SD 1.x; SD 2.x from its diffusers folder, whose
                               text_encoder already stops one block early)
  layer=-2, final_norm=True    "clip skip 1" of diffusers' SD 1.x / 2.x pipelines (clip_skip=k:
                               layer=-(k+1)); SD 2.x from a full 24-block OpenCLIP-H (Rombach et al.
                               2022's FrozenOpenCLIPEmbedder, layer="penultimate", then ln_final)
  layer=-2, final_norm=False   SDXL (Podell et al. 2023) and SD3 (Esser et al. 2024), every CLIP
                               encoder: hidden_states[-2]; their pooled vectors are the projected
                               text_embeds of the CLIPTextModelWithProjection encoders

The pooled vector always comes from the last block with the final norm, whatever `layer` is.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffax.errors import UserError
from diffax.models import layers
from diffax.models.text.base import TextEmbedding

Array = jax.Array

# transformers' ACT2FN names -> functions (gelu_new / gelu_pytorch_tanh: the tanh approximation).
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # CLIP's own (Radford et al. 2021)
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str, where: str) -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise UserError(f"{where}: activation {name!r} is not supported; valid: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# ----------------------------------------------------------------------------- shared pieces (CLIP, T5)


def layer_index(layer: int, num_layers: int, where: str) -> int:
    """`layer` (an index into [embeddings, block 1, ..., block N], negative from the end) -> blocks to run."""
    if not -(num_layers + 1) <= layer <= num_layers:
        raise UserError(f"{where}: layer={layer} is outside the encoder's {num_layers} blocks; use -1 (last), "
                        f"-2 (penultimate), ... down to {-(num_layers + 1)} (the embeddings), or 0..{num_layers}")
    return layer % (num_layers + 1)


def stack_layers(make: Callable[[nnx.Rngs], nnx.Module], depth: int, rngs: nnx.Rngs) -> nnx.Module:
    """`depth` copies of make(rngs) as one module whose weights carry a leading layer axis."""

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def build(r: nnx.Rngs) -> nnx.Module:
        return make(r)

    return build(rngs)


def run_layers(stacked: nnx.Module, h: Array, start: int, stop: int, *args) -> Array:
    """h through blocks start..stop-1 of `stack_layers` under one lax.scan: h = block(h, *args)."""
    if stop <= start:
        return h
    graphdef, state = nnx.split(stacked)
    part = jax.tree.map(lambda a: a[start:stop], state)

    def body(h, layer_state):
        return nnx.merge(graphdef, layer_state)(h, *args), None

    h, _ = jax.lax.scan(body, h, part)
    return h


class LayerNorm(nnx.Module):
    """LayerNorm (Ba et al. 2016) with scale and bias, float32 statistics, biased variance (torch's)."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps, self.dtype = float(eps), dtype

    def __call__(self, x: Array) -> Array:
        y = layers.layer_norm(x.astype(jnp.float32), self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


def dense(din: int, dout: int, *, bias: bool, dtype, param_dtype, rngs) -> nnx.Linear:
    """A Linear whose kernel is [in, out] (torch's weight transposed)."""
    return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


# ----------------------------------------------------------------------------- CLIP


class CLIPBlock(nnx.Module):
    """Pre-LN residual block: x + attn(ln1(x)), then x + fc2(act(fc1(ln2(x)))) (CLIPEncoderLayer)."""

    def __init__(self, hidden: int, intermediate: int, heads: int, eps: float, act: str, *, dtype, param_dtype,
                 rngs):  # fmt: skip
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.ln1, self.ln2 = LayerNorm(hidden, eps, **kw), LayerNorm(hidden, eps, **kw)
        self.q, self.k, self.v, self.o = (dense(hidden, hidden, bias=True, rngs=rngs, **kw) for _ in range(4))
        self.fc1 = dense(hidden, intermediate, bias=True, rngs=rngs, **kw)
        self.fc2 = dense(intermediate, hidden, bias=True, rngs=rngs, **kw)
        self.heads, self.act = heads, act

    def __call__(self, x: Array, mask: Array) -> Array:
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (f(h).reshape(b, t, self.heads, d // self.heads) for f in (self.q, self.k, self.v))
        x = x + self.o(jax.nn.dot_product_attention(q, k, v, mask=mask).reshape(b, t, d))  # scale 1/sqrt(head_dim)
        return x + self.fc2(ACTIVATIONS[self.act](self.fc1(self.ln2(x))))


class CLIPTextEncoder(nnx.Module):
    """CLIP text encoder: encoder(ids [B, L], mask [B, L] or None) -> TextEmbedding(hidden [B, L, D], pooled).

    Radford et al. (2021); the computation of transformers' CLIPTextModel(WithProjection). pooled
    is [B, D] (no projection) or [B, projection_dim], taken at the end-of-text token: the argmax of
    the ids when eos_token_id == 2 (configs written before transformers PR #24773, where the
    end-of-text token has the largest id), else the first position whose id is eos_token_id.
    use_mask: also hide padding from the attention (besides the causal mask); Stable Diffusion's
    pipelines (SD 1.x, 2.x, XL, 3) call CLIP without a mask, which changes only the states at
    padded positions. Activations in `dtype`, parameters in `param_dtype`, norms and softmax in
    float32.
    """

    def __init__(self, *, vocab_size: int, hidden_size: int = 512, intermediate_size: int = 2048,
                 num_layers: int = 12, num_heads: int = 8, max_positions: int = 77, hidden_act: str = "quick_gelu",
                 layer_norm_eps: float = 1e-5, eos_token_id: int = 2, projection_dim: int = 0, layer: int = -1,
                 final_norm: bool = True, use_mask: bool = False, dtype="float32", param_dtype="float32",
                 rngs: nnx.Rngs):  # fmt: skip
        if hidden_size % num_heads:
            raise UserError(f"CLIP: {num_heads} attention heads do not divide hidden_size {hidden_size}")
        activation(hidden_act, "CLIP hidden_act")
        self.dtype = layers.dtype_of(dtype)
        kw = dict(dtype=self.dtype, param_dtype=layers.dtype_of(param_dtype))
        self.token_embedding = nnx.Embed(vocab_size, hidden_size, param_dtype=kw["param_dtype"], rngs=rngs)
        self.position_embedding = nnx.Param(jnp.zeros((max_positions, hidden_size), kw["param_dtype"]))
        self.blocks = stack_layers(
            lambda r: CLIPBlock(hidden_size, intermediate_size, num_heads, layer_norm_eps, hidden_act, rngs=r, **kw),
            num_layers, rngs)  # fmt: skip
        self.final_norm = LayerNorm(hidden_size, layer_norm_eps, **kw)
        self.projection = dense(hidden_size, projection_dim, bias=False, rngs=rngs, **kw) if projection_dim else None
        self.num_layers, self.eos_token_id = int(num_layers), int(eos_token_id)
        self.layer = layer_index(int(layer), self.num_layers, "CLIP")
        self.apply_final_norm, self.use_mask = bool(final_norm), bool(use_mask)
        self.hidden_size, self.pooled_size = int(hidden_size), int(projection_dim or hidden_size)

    def __call__(self, ids: Array, mask: Array | None = None) -> TextEmbedding:
        b, t = ids.shape
        max_positions = self.position_embedding.shape[0]
        if t > max_positions:
            raise UserError(f"CLIP: {t} tokens are more than its {max_positions} positions; tokenize to at most "
                            f"{max_positions}")
        ids = jnp.asarray(ids, jnp.int32)
        h = (self.token_embedding.embedding[...][ids] + self.position_embedding[:t]).astype(self.dtype)
        allowed = jnp.tril(jnp.ones((t, t), bool))[None, None]  # [1, 1, query, key]
        if self.use_mask and mask is not None:
            allowed = allowed & (jnp.asarray(mask) > 0)[:, None, None, :]
        h = run_layers(self.blocks, h, 0, self.layer, allowed)
        hidden = self.final_norm(h) if self.apply_final_norm else h
        last = self.final_norm(run_layers(self.blocks, h, self.layer, self.num_layers, allowed))
        if self.eos_token_id == 2:
            eos_at = jnp.argmax(ids, axis=-1)
        else:
            eos_at = jnp.argmax(ids == self.eos_token_id, axis=-1)
        pooled = last[jnp.arange(b), eos_at]
        if self.projection is not None:
            pooled = self.projection(pooled)
        return TextEmbedding(hidden=hidden, pooled=pooled)


# ----------------------------------------------------------------------------- transformers folders

CLIP_TEXT_DEFAULTS: dict[str, Any] = dict(  # CLIPTextConfig.__init__ defaults (transformers 4.x / 5)
    vocab_size=49408, hidden_size=512, intermediate_size=2048, projection_dim=512, num_hidden_layers=12,
    num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    eos_token_id=2,
)


def clip_kwargs(text_config: dict[str, Any], *, projection: bool) -> dict[str, Any]:
    """A transformers CLIPTextConfig (as a dict) -> CLIPTextEncoder keyword arguments (no layer / dtype)."""
    c = {**CLIP_TEXT_DEFAULTS, **{k: v for k, v in text_config.items() if v is not None}}
    return dict(vocab_size=int(c["vocab_size"]), hidden_size=int(c["hidden_size"]),
                intermediate_size=int(c["intermediate_size"]), num_layers=int(c["num_hidden_layers"]),
                num_heads=int(c["num_attention_heads"]), max_positions=int(c["max_position_embeddings"]),
                hidden_act=str(c["hidden_act"]), layer_norm_eps=float(c["layer_norm_eps"]),
                eos_token_id=int(c["eos_token_id"]), projection_dim=int(c["projection_dim"]) if projection else 0)


def clip_weights(take: Callable[[str], np.ndarray], prefix: str, num_layers: int,
                 projection: bool) -> dict[str, np.ndarray]:  # fmt: skip
    """transformers tensors (take(name) -> array) -> {CLIPTextEncoder parameter path: value}.

    prefix: "text_model." (CLIPTextModelWithProjection, CLIPModel, older CLIPTextModel files) or ""
    (CLIPTextModel saved by transformers 5). Linear weights are transposed to [in, out].
    """
    p = prefix
    out = {
        "token_embedding.embedding": take(f"{p}embeddings.token_embedding.weight"),
        "position_embedding": take(f"{p}embeddings.position_embedding.weight"),
        "final_norm.scale": take(f"{p}final_layer_norm.weight"),
        "final_norm.bias": take(f"{p}final_layer_norm.bias"),
    }
    names = {"ln1": "layer_norm1", "ln2": "layer_norm2", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
             "v": "self_attn.v_proj", "o": "self_attn.out_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
    for ours, theirs in names.items():
        norm = ours.startswith("ln")
        for leaf, suffix in (("scale" if norm else "kernel", "weight"), ("bias", "bias")):
            per_layer = [take(f"{p}encoder.layers.{i}.{theirs}.{suffix}") for i in range(num_layers)]
            if leaf == "kernel":
                per_layer = [w.T for w in per_layer]
            out[f"blocks.{ours}.{leaf}"] = np.stack(per_layer)
    if projection:
        out["projection.kernel"] = take("text_projection.weight").T
    return out

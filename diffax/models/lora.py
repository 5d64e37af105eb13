"""LoRA: low-rank adapters on a network's linear layers (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large
Language Models", Eq. 3 and Sec. 4.1).

A frozen nnx.Linear kernel W [in, out] computes x W; LoRA learns A [in, r] and B [r, out] and computes
x (W + (alpha / r) A B). B starts at zero, so the adapted network starts equal to the base (Sec. 4.1), and A
as PEFT's lora_A (Kaiming-uniform with a = sqrt(5) on the torch [r, in] weight: U(-1/sqrt(in), 1/sqrt(in))).
Which layers get adapters is a list of attribute names (config.lora.targets, e.g. the attention projections
to_q, to_k, to_v, to_out of the SD UNet's self- and cross-attention): every nnx.Linear so named, anywhere.

The adapters live beside the network's weights, as the nested dict {module path...: {"a": A, "b": B}} in the
train state's params["lora"]; `merge` adds (alpha / r) A B to the base kernels before the network runs, which
gives the same function as LoRA's side branch x W + (alpha / r) x A B (dropout on the branch's input, which
needs the branch form, is not offered). The same merge gives the exported, merged weights.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


def target_layers(model: nnx.Module, targets: tuple[str, ...] | list[str]) -> list[tuple]:
    """Paths (as nnx.iter_graph gives them) of the nnx.Linear layers whose attribute name is in `targets`."""
    names = set(targets)
    return sorted((tuple(path) for path, node in nnx.iter_graph(model)
                   if isinstance(node, nnx.Linear) and path and path[-1] in names), key=lambda p: tuple(map(str, p)))


def _key(path: tuple) -> tuple[str, ...]:
    return tuple(str(p) for p in path)


def init(model: nnx.Module, targets: tuple[str, ...] | list[str], rank: int, key: Array,
         dtype: Any = jnp.float32) -> dict:
    """Adapters for the `targets` layers of `model`: A ~ U(-1/sqrt(in), 1/sqrt(in)) [in, rank], B = 0 [rank, out]."""
    paths = target_layers(model, targets)
    if not paths:
        raise ValueError(f"config.lora.targets={list(targets)} names no linear layer of the network")
    out: dict = {}
    for i, path in enumerate(paths):
        layer = _layer(model, path)
        din, dout = int(layer.in_features), int(layer.out_features)
        bound = 1.0 / din**0.5
        a = jax.random.uniform(jax.random.fold_in(key, i), (din, int(rank)), dtype, -bound, bound)
        node = out
        for k in _key(path)[:-1]:
            node = node.setdefault(k, {})
        node[_key(path)[-1]] = {"a": a, "b": jnp.zeros((int(rank), dout), dtype)}
    return out


def _layer(model: nnx.Module, path: tuple) -> nnx.Linear:
    node = model
    for k in path:
        node = node[k] if isinstance(k, int) else getattr(node, k)
    return node


def adapters(lora: dict) -> dict[tuple[str, ...], dict]:
    """The flat view {module path (strings): {"a": A, "b": B}} of the nested adapters dict."""
    out = {}

    def walk(node, prefix):
        if set(node) == {"a", "b"} and not isinstance(node["a"], dict):
            out[prefix] = node
            return
        for k, v in node.items():
            walk(v, prefix + (k,))

    walk(lora, ())
    return out


def merge(net_params: Any, lora: dict, scale: float) -> Any:
    """The base weights with every adapted kernel replaced by W + scale A B (scale = alpha / rank), in W's dtype."""
    flat = adapters(lora)
    found = set()

    def add(path, w):
        names = tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
        names = names[:-1] if names[-1] == "value" else names  # nnx.Variable's own pytree level
        ab = flat.get(names[:-1]) if names[-1] == "kernel" else None
        if ab is None:
            return w
        found.add(names[:-1])
        delta = scale * (ab["a"].astype(jnp.float32) @ ab["b"].astype(jnp.float32))
        return (w.astype(jnp.float32) + delta).astype(w.dtype)

    merged = jax.tree_util.tree_map_with_path(add, net_params)
    if len(found) != len(flat):
        missing = sorted(".".join(k) for k in set(flat) - found)
        raise ValueError(f"LoRA adapters without a kernel in the network: {missing[:3]}")
    return merged


def scale_of(lora_cfg: Any) -> float:
    """alpha / rank of config.lora (Hu et al. 2022, Sec. 4.1); alpha = 0 means alpha = rank (scale 1)."""
    rank, alpha = int(lora_cfg.rank), float(lora_cfg.alpha)
    return (alpha or rank) / rank


def enabled(config: Any) -> bool:
    """Whether config.lora asks for adapters (rank > 0)."""
    lora = config.get("lora")
    return lora is not None and int(lora.rank) > 0

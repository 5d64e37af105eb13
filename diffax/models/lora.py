"""LoRA: low-rank adapters on a network's linear layers (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large
Language Models", Eq. 3 and Sec. 4.1).

A frozen nnx.Linear kernel W [in, out] computes x W; LoRA learns A [in, r] and B [r, out] and computes
x (W + (alpha / r) A B). B starts at zero, so the adapted network starts equal to the base (Sec. 4.1), and A
as PEFT's lora_A (Kaiming-uniform with a = sqrt(5) on the torch [r, in] weight: U(-1/sqrt(in), 1/sqrt(in))).
Which layers get adapters is a list of attribute names (config.lora.targets, e.g. the attention projections
to_q, to_k, to_v, to_out of the SD UNet's self- and cross-attention): every nnx.Linear so named, anywhere.

The adapters live beside the network's weights, as the nested dict {module path...: {"a": A, "b": B}} in the
train state's params["lora"]; `merge` adds (alpha / r) A B to the base kernels before the network runs, which
gives the same function as LoRA's side branch x W + (alpha / r) x A B. The same merge gives the exported, merged
weights. Dropout on the branch's input (config.lora.dropout; PEFT's lora_dropout, used by Hu et al. 2022 on
GPT-2, Table 11) needs the branch form: `add_branches` turns the adapted layers of a network merged for one
training call into x W + (alpha / r) dropout(x) A B. Sampling always runs the merged form.
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


class _Branch(nnx.Module):
    """An adapted linear layer in LoRA's side-branch form with inverted dropout on the branch's input:
    base(x) + scale dropout(x) A B (Hu et al. 2022, Eq. 3)."""

    def __init__(self, base: nnx.Linear, a: Array, b: Array, *, scale: float, rate: float, key: Array):
        self.base, self.scale, self.rate = base, scale, rate
        self.a, self.b, self.key = nnx.Variable(a), nnx.Variable(b), nnx.Variable(key)

    def __call__(self, x: Array) -> Array:
        y = self.base(x)
        keep = jax.random.bernoulli(self.key[...], 1.0 - self.rate, x.shape)
        h = jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)
        delta = (h @ self.a[...].astype(x.dtype)) @ self.b[...].astype(x.dtype)
        return y + (self.scale * delta).astype(y.dtype)


def add_branches(model: nnx.Module, lora: dict, scale: float, rate: float, key: Array) -> None:
    """Replace, in place, every adapted nnx.Linear of `model` (the frozen base, merged for one call) by its side
    branch with dropout of `rate` on the branch's input; layer i of the sorted adapters draws its mask from
    fold_in(key, i)."""
    for i, (path, ab) in enumerate(sorted(adapters(lora).items())):
        parent = model
        for k in path[:-1]:
            parent = parent[int(k)] if k.isdigit() and not hasattr(parent, k) else getattr(parent, k)
        branch = _Branch(getattr(parent, path[-1]), ab["a"], ab["b"], scale=scale, rate=rate,
                         key=jax.random.fold_in(key, i))
        setattr(parent, path[-1], branch)


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


def dropout_of(lora_cfg: Any) -> float:
    """config.lora.dropout, checked: a rate in [0, 1)."""
    rate = float(lora_cfg.get("dropout", 0.0))
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"config.lora.dropout={rate}: use a rate in [0, 1) (0 = no dropout)")
    return rate


def enabled(config: Any) -> bool:
    """Whether config.lora asks for adapters (rank > 0)."""
    lora = config.get("lora")
    return lora is not None and int(lora.rank) > 0

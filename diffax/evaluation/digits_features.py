"""An offline feature network for the default digits config: no Inception weights, no download.

A small CNN classifier is trained in seconds (JAX + optax, CPU is enough) on the
training images of the config's dataset with their labels; its 64-d penultimate
activations are the feature space. The Frechet distance there is reported as
"fd_digits" -- the FID recipe (Heusel et al. 2017) with a different feature
network, like the "FD_DINOv2" of Stein et al. (2023) -- and must never be
called or compared with FID. The trained net is cached (an .npz next to the
eval results) so every evaluation of a run uses the same features.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from diffax.evaluation.inception import assign_weights

VERSION = "digits-cnn-v1"
FEATURE_DIM = 64
TRAIN_STEPS = 600  # Adam steps of 128 images: ~99% train accuracy on digits, a few seconds on CPU
_HIGHEST = jax.lax.Precision.HIGHEST


class DigitsFeatureNet(nnx.Module):
    """conv3x3(16)-relu-avgpool2 -> conv3x3(32)-relu-avgpool2 -> dense(64)-relu [features] -> dense(classes).

    Takes uint8 NHWC images (channels averaged to gray) of a fixed size.
    """

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int = 10, *, rngs: nnx.Rngs):
        h, w = int(image_shape[0]), int(image_shape[1])
        self.conv1 = nnx.Conv(1, 16, (3, 3), precision=_HIGHEST, rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), precision=_HIGHEST, rngs=rngs)
        self.dense = nnx.Linear((h // 4) * (w // 4) * 32, FEATURE_DIM, precision=_HIGHEST, rngs=rngs)
        self.head = nnx.Linear(FEATURE_DIM, num_classes, precision=_HIGHEST, rngs=rngs)

    def features(self, images: jax.Array) -> jax.Array:
        x = jnp.asarray(images).astype(jnp.float32) / 127.5 - 1.0
        x = x.mean(axis=-1, keepdims=True)
        x = nnx.avg_pool(jax.nn.relu(self.conv1(x)), (2, 2), (2, 2))
        x = nnx.avg_pool(jax.nn.relu(self.conv2(x)), (2, 2), (2, 2))
        return jax.nn.relu(self.dense(x.reshape(x.shape[0], -1)))

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        f = self.features(images)
        return f, self.head(f)


@functools.lru_cache(maxsize=8)
def _compiled(graphdef, learning_rate: float):
    """(optimizer, jitted train step, jitted forward) for one architecture, compiled once per process."""
    tx = optax.adam(learning_rate)

    def loss_fn(p, x, y):
        _, logits = nnx.merge(graphdef, p)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, opt, x, y):
        upd, opt = tx.update(jax.grad(loss_fn)(p, x, y), opt, p)
        return optax.apply_updates(p, upd), opt

    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    return tx, step, forward


def train_digits_net(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int = 10,
    steps: int | None = None,
    batch_size: int = 128,
    learning_rate: float = 2e-3,
    seed: int = 0,
) -> tuple[DigitsFeatureNet, float]:
    """Train the classifier with Adam (Kingma & Ba 2015) on uint8 images; returns (net, train accuracy).

    Minibatches come from a seeded host permutation, so the result is
    deterministic on a given backend. The step is a Python loop over a jitted
    step: XLA:CPU runs convolutions inside a `lax.scan` body ~20x slower.
    """
    steps = TRAIN_STEPS if steps is None else int(steps)
    images = np.asarray(images, np.uint8)
    labels = np.asarray(labels, np.int32)
    model = DigitsFeatureNet(images.shape[1:], num_classes, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    tx, step, forward = _compiled(graphdef, float(learning_rate))
    rng = np.random.default_rng(seed)
    n, b = len(images), min(batch_size, len(images))
    per_epoch = max(n // b, 1)
    order = np.concatenate([rng.permutation(n) for _ in range(steps // per_epoch + 1)])
    idx = order[: steps * b].reshape(steps, b)
    opt = tx.init(params)
    for i in idx:
        params, opt = step(params, opt, images[i], labels[i])
    model = nnx.merge(graphdef, params)
    _, logits = forward(params, images)
    acc = float(np.mean(np.argmax(np.asarray(logits), -1) == labels))
    return model, acc


def _weights(model: nnx.Module) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}


def feature_space_name(model: DigitsFeatureNet) -> str:
    """'digits-cnn-v1/<hash of the weights>': recorded in statistics files so spaces never mix."""
    h = hashlib.sha256()
    for k, v in sorted(_weights(model).items()):
        h.update(k.encode())
        h.update(np.ascontiguousarray(v, np.float32).tobytes())
    return f"{VERSION}/{h.hexdigest()[:12]}"


def load_or_train(
    cache_path: str,
    fingerprint: dict,
    data_fn: Callable[[], tuple[np.ndarray, np.ndarray]],
    *,
    num_classes: int = 10,
) -> DigitsFeatureNet:
    """The cached digits feature net at `cache_path`, trained first (from `data_fn()`) if absent or stale.

    `fingerprint` (JSON-able, e.g. the data config fields) is stored with the
    weights; a cache made for different data is retrained and overwritten.
    """
    meta = json.dumps({"version": VERSION, **fingerprint}, sort_keys=True)
    if os.path.isfile(cache_path):
        with np.load(cache_path, allow_pickle=False) as f:
            if str(f["__meta__"]) == meta:
                weights = {k: f[k] for k in f.files if not k.startswith("__")}
                shape = tuple(int(s) for s in f["__image_shape__"])
                model = nnx.eval_shape(lambda: DigitsFeatureNet(shape, num_classes, rngs=nnx.Rngs(0)))
                assign_weights(model, weights)
                return model
        logging.info("digits feature net cache %s is for other data; retraining", cache_path)
    images, labels = data_fn()
    model, acc = train_digits_net(images, labels, num_classes=num_classes)
    logging.info("trained the digits feature net on %d images: train accuracy %.4f", len(images), acc)
    os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
    tmp = cache_path + ".tmp.npz"
    np.savez(tmp, __meta__=np.asarray(meta), __image_shape__=np.asarray(images.shape[1:]),
             __train_accuracy__=np.asarray(acc), **_weights(model))
    os.replace(tmp, cache_path)
    return model


def make_feature_fn(model: DigitsFeatureNet) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """A host function uint8 NHWC images -> {'features': [N, 64], 'logits': [N, classes]} (jitted)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))

    def features(images: np.ndarray) -> dict[str, np.ndarray]:
        f, logits = fn(state, jnp.asarray(images))
        return {"features": np.asarray(f), "logits": np.asarray(logits)}

    return features

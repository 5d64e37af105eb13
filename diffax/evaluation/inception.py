"""InceptionV3 exactly as the FID protocol uses it, in Flax NNX (NHWC).

This is pytorch-fid's `fid_inception_v3()` (Seitzer 2020), itself a port of the
TensorFlow graph `inception-2015-12-05` that Heusel et al. (2017) used for FID:
torchvision's Inception3 (Szegedy et al. 2016, "Rethinking the Inception
Architecture") with the FID patches

* FIDInceptionA / FIDInceptionC / FIDInceptionE_1: the pooling branch averages
  with `count_include_pad=False` (TensorFlow ignores the padded zeros),
* FIDInceptionE_2 (Mixed_7c): the pooling branch is a 3x3 *max* pool,
* 1008-way classifier (the TF graph's softmax), 2048-d `pool3` features.

Its input is 299x299 RGB scaled to about [-1, 1]; how uint8 images get there
(resize, scaling) is the FID *protocol*, chosen in `protocols.py` (TF/NVIDIA,
pytorch-fid or clean-fid); the network is the same for all three.

Sub-module names mirror pytorch-fid's state-dict names (`Mixed_5b.branch1x1.conv`
...), so `convert.py` maps weights one to one. Every conv / dense runs at
`Precision.HIGHEST` so GPUs do not silently use TF32.

Weights: `convert.py` reads NVIDIA's TorchScript `inception-2015-12-05.pt` or
pytorch-fid's `.pth` without PyTorch; `weights.py` finds, and on request fetches, them.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffax.evaluation import protocols

# The reference packages' weight files: the same TF graph, converted by NVIDIA (TorchScript, what
# StyleGAN2-ADA, StyleGAN3, EDM and clean-fid load) and by pytorch-fid (a state dict).
NVIDIA_WEIGHTS_NAME = "inception-2015-12-05.pt"
NVIDIA_WEIGHTS_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
NVIDIA_WEIGHTS_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"  # 95,607,719 bytes
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}"
ENV_VAR = "DIFFAX_INCEPTION_WEIGHTS"
EXTRACTOR = "inception-2015-12-05/pool3"  # recorded in statistics files beside the protocol
INPUT_SIZE = 299
NUM_FEATURES = 2048
NUM_CLASSES = 1008
_HIGHEST = jax.lax.Precision.HIGHEST


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


# --------------------------------------------------------------------------- pools
def max_pool(x: jax.Array, window: int = 3, stride: int = 2, padding: int = 0) -> jax.Array:
    """Max pool over H, W (NHWC) with -inf padding, as torch's `F.max_pool2d` (floor mode)."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), pad
    )


def avg_pool_exclude_pad(x: jax.Array, window: int = 3, padding: int = 1) -> jax.Array:
    """Stride-1 average pool that divides by the number of *valid* inputs in each window.

    torch's `F.avg_pool2d(..., count_include_pad=False)`, which is what TensorFlow's
    `avg_pool` with SAME padding computes (the FID patch in pytorch-fid, Seitzer 2020).
    """
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    dims, strides = (1, window, window, 1), (1, 1, 1, 1)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, pad)
    ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, dims, strides, pad)
    return total / count


# --------------------------------------------------------------------------- blocks
class BasicConv2d(nnx.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int | Sequence[int],
        *,
        stride: int = 1,
        padding: int | Sequence[int] = 0,
        rngs: nnx.Rngs,
    ):
        ph, pw = _pair(padding)
        self.conv = nnx.Conv(
            in_ch, out_ch, _pair(kernel_size), strides=stride, padding=((ph, ph), (pw, pw)),
            use_bias=False, precision=_HIGHEST, rngs=rngs,
        )
        self.bn = nnx.BatchNorm(out_ch, epsilon=1e-3, use_running_average=True, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


class InceptionA(nnx.Module):
    """FIDInceptionA (Mixed_5b/c/d): pool branch averages without the padded zeros."""

    def __init__(self, in_ch: int, pool_features: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(in_ch, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv2d(in_ch, pool_features, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """torchvision InceptionB (Mixed_6a): grid reduction 35 -> 17."""

    def __init__(self, in_ch: int, *, rngs: nnx.Rngs):
        self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([b3, bd, max_pool(x, 3, 2)], axis=-1)


class InceptionC(nnx.Module):
    """FIDInceptionC (Mixed_6b..e): factorised 7x7 branches, pool branch excludes padding."""

    def __init__(self, in_ch: int, channels_7x7: int, *, rngs: nnx.Rngs):
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_ch, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch_pool = BasicConv2d(in_ch, 192, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(avg_pool_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
    """torchvision InceptionD (Mixed_7a): grid reduction 17 -> 8."""

    def __init__(self, in_ch: int, *, rngs: nnx.Rngs):
        self.branch3x3_1 = BasicConv2d(in_ch, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return jnp.concatenate([b3, b7, max_pool(x, 3, 2)], axis=-1)


class InceptionE(nnx.Module):
    """FIDInceptionE_1 (pool="avg", Mixed_7b) or FIDInceptionE_2 (pool="max", Mixed_7c).

    The max pool in Mixed_7c is a quirk of the TF graph that FID is defined on
    (pytorch-fid: "likely an error ... other Inception models use average pooling").
    """

    def __init__(self, in_ch: int, *, pool: str, rngs: nnx.Rngs):
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_ch, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv2d(in_ch, 192, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        pooled = avg_pool_exclude_pad(x) if self.pool == "avg" else max_pool(x, 3, 1, padding=1)
        return jnp.concatenate([b1, b3, bd, self.branch_pool(pooled)], axis=-1)


class InceptionV3(nnx.Module):
    """The FID InceptionV3 (Heusel et al. 2017; Szegedy et al. 2016), pytorch-fid's variant.

    `__call__(x)` takes float32 NHWC images already in [-1, 1] at 299x299 (see
    `preprocess`) and returns `(pool3 [N, 2048], logits [N, 1008])`. The logits
    include the classifier bias; the original Inception Score code (Salimans et
    al. 2016) used `pool3 @ W` without it, which is `unbiased_logits`.
    """

    def __init__(self, *, rngs: nnx.Rngs):
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, pool="avg", rngs=rngs)
        self.Mixed_7c = InceptionE(2048, pool="max", rngs=rngs)
        self.fc = nnx.Linear(NUM_FEATURES, NUM_CLASSES, precision=_HIGHEST, rngs=rngs)

    def blocks(self, x: jax.Array) -> list[jax.Array]:
        """Outputs of pytorch-fid's four blocks (64, 192, 768, 2048 channels; the last pooled)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        b0 = max_pool(x, 3, 2)
        b1 = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(b0)), 3, 2)
        x = b1
        for m in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                  self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
            x = m(x)
        b2 = x
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        return [b0, b1, b2, jnp.mean(x, axis=(1, 2))]

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        pool3 = self.blocks(x)[-1]
        return pool3, self.fc(pool3)

    def unbiased_logits(self, pool3: jax.Array) -> jax.Array:
        """`pool3 @ W` without the bias, as in the original TF Inception Score code."""
        return jnp.matmul(pool3, self.fc.kernel[...], precision=_HIGHEST)


# --------------------------------------------------------------------------- weights
def default_weights_path() -> str:
    """Where diffax looks when neither the config nor $DIFFAX_INCEPTION_WEIGHTS names a file."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "diffax", "pt_inception-2015-12-05-6726825d.npz")


def resolve_weights_path(path: str = "") -> str:
    """The weights file to use: `path` (config.eval.inception_weights), else $DIFFAX_INCEPTION_WEIGHTS,
    else `default_weights_path()`. The file may not exist; see `weights_available`."""
    return os.path.expanduser(path or os.environ.get(ENV_VAR, "") or default_weights_path())


def weights_available(path: str = "") -> bool:
    """True if the resolved Inception weights file exists."""
    return os.path.isfile(resolve_weights_path(path))


def missing_weights_message(path: str) -> str:
    """The error text for a missing weights file: which file to get, where from, and the command that converts it."""
    return (
        f"FID Inception weights not found at {path!r} (from config.eval.inception_weights, "
        f"${ENV_VAR}, or the default {default_weights_path()!r}). Get NVIDIA's {NVIDIA_WEIGHTS_NAME} "
        f"({NVIDIA_WEIGHTS_URL}, sha256 {NVIDIA_WEIGHTS_SHA256}) or pytorch-fid's {FID_WEIGHTS_NAME} "
        f"({FID_WEIGHTS_URL}); they hold the same network. Convert it once (no PyTorch needed): "
        f"`diffax convert-inception {NVIDIA_WEIGHTS_NAME} {path}`. On a machine with network access, "
        f"--config.eval.download_weights=True makes `diffax eval` fetch, check and convert it into {path}."
    )


def ensure_weights(path: str = "", *, download: bool = False, url: str = NVIDIA_WEIGHTS_URL,
                   sha256: str = NVIDIA_WEIGHTS_SHA256) -> str:
    """The resolved weights file (see `resolve_weights_path`), fetched and converted first if asked.

    If the file is missing and `download` is set (config.eval.download_weights),
    the reference file at `url` is downloaded next to it, checked against
    `sha256` and converted with `convert.convert_inception`; otherwise a missing
    file raises FileNotFoundError with `missing_weights_message`.
    """
    from diffax.evaluation import convert, download as dl

    path = resolve_weights_path(path)
    if os.path.isfile(path):
        return path
    if not download:
        raise FileNotFoundError(missing_weights_message(path))
    src = dl.fetch(url, os.path.join(os.path.dirname(os.path.abspath(path)), os.path.basename(url)), sha256=sha256)
    convert.convert_inception(src, path)
    return path


def assign_weights(model: nnx.Module, weights: dict[str, np.ndarray]) -> None:
    """Write a flat {'Mixed_5b/branch1x1/conv/kernel': array} dict into `model`'s variables.

    Every variable of the model must be given exactly once with the right shape:
    a missing, extra or mis-shaped entry is an error naming it.
    """
    expected = {}
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable):
            expected["/".join(map(str, path))] = var
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise ValueError(f"Inception weights do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for key, var in expected.items():
        arr = np.asarray(weights[key])
        if arr.shape != tuple(var.shape):
            raise ValueError(f"Inception weight {key}: shape {arr.shape}, model expects {tuple(var.shape)}")
        var.set_value(jnp.asarray(arr, jnp.float32))


def load_inception(path: str = "") -> InceptionV3:
    """Build the FID InceptionV3 and load converted weights (`diffax convert-inception` output).

    `path` resolves as in `resolve_weights_path`. A missing file raises
    FileNotFoundError with `missing_weights_message`; nothing is downloaded.
    """
    path = resolve_weights_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(missing_weights_message(path))
    with np.load(path, allow_pickle=False) as f:
        weights = {k: f[k] for k in f.files if not k.startswith("__")}
    model = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0)))
    assign_weights(model, weights)
    return model


@functools.partial(jax.jit, static_argnums=(0,))
def _pool3_and_logits(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    # Module level, keyed on the graph: every InceptionV3 shares one compiled network.
    m = nnx.merge(graphdef, state)
    pool3 = m.blocks(x)[-1]
    return pool3, m.unbiased_logits(pool3)


_preprocess = jax.jit(protocols.preprocess, static_argnames=("protocol", "size"))


def make_feature_fn(
    model: InceptionV3, protocol: str = protocols.DEFAULT, *, devices: Sequence[jax.Device] | None = None
) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """A host function uint8 NHWC images -> {'features': pool3 [N, 2048], 'logits': [N, 1008] (unbiased)}.

    `protocol` ('tf', 'pytorch_fid' or 'clean', see `protocols.py`) chooses the
    resize and scaling. With several `devices`, each batch is split over them on
    its leading axis (the weights replicated) when they divide it. The
    preprocessing compiles per input size, the network once (its input is always
    299x299). Callers batch with a fixed size (`statistics.accumulate`) to avoid recompiles.
    """
    protocols.check_protocol(protocol, "protocol")
    graphdef, state = nnx.split(model)

    def net(state, x):
        return _pool3_and_logits(graphdef, state, _preprocess(x, protocol=protocol, size=INPUT_SIZE))

    call = data_parallel(net, state, devices)

    def features(images: np.ndarray) -> dict[str, np.ndarray]:
        pool3, logits = call(images)
        return {"features": np.asarray(pool3), "logits": np.asarray(logits)}

    return features


def data_parallel(fn: Callable, state: nnx.State, devices: Sequence[jax.Device] | None) -> Callable:
    """`images -> fn(state, images)` with the batch split over `devices` (state replicated) when they divide it.

    A batch they do not divide runs whole (on every device: correct, not faster), so
    choose config.eval.batch_size as a multiple of the device count. With one device
    (or None) the arrays stay where JAX puts them. Shared by the
    Inception and DINOv2 extractors; `fn` is jitted, so it follows the shardings.
    """
    if devices is None or len(devices) < 2:
        return lambda images: fn(state, jnp.asarray(images))
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.asarray(devices), ("data",))
    batch, state = NamedSharding(mesh, PartitionSpec("data")), jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    return lambda images: fn(state, jnp.asarray(images) if len(images) % len(devices) else jax.device_put(images, batch))

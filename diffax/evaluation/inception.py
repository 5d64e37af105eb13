"""InceptionV3 exactly as the FID protocol uses it, in Flax NNX (NHWC).

This is pytorch-fid's `fid_inception_v3()` (Seitzer 2020), itself a port of the
TensorFlow graph `inception-2015-12-05` that Heusel et al. (2017) used for FID:
torchvision's Inception3 (Szegedy et al. 2016, "Rethinking the Inception
Architecture") with the FID patches

* FIDInceptionA / FIDInceptionC / FIDInceptionE_1: the pooling branch averages
  with `count_include_pad=False` (TensorFlow ignores the padded zeros),
* FIDInceptionE_2 (Mixed_7c): the pooling branch is a 3x3 *max* pool,
* 1008-way classifier (the TF graph's softmax), 2048-d `pool3` features,
* inputs: uint8 -> [0, 1] -> bilinear resize to 299x299 with
  `align_corners=False` and no antialiasing (torch's `F.interpolate`) -> [-1, 1].

Sub-module names mirror pytorch-fid's state-dict names (`Mixed_5b.branch1x1.conv`
...), so `convert.py` maps weights one to one. Every conv / dense runs at
`Precision.HIGHEST` so GPUs do not silently use TF32.

Weights are never downloaded: see `missing_weights_message`.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
ENV_VAR = "DIFFAX_INCEPTION_WEIGHTS"
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


# --------------------------------------------------------------------------- resize
@functools.lru_cache(maxsize=32)
def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] interpolation matrix of torch's bilinear rule with align_corners=False.

    Source coordinate src = (dst + 0.5) * in / out - 0.5, clamped below at 0; the
    lower neighbour is floor(src), the upper min(floor(src) + 1, in - 1); no
    antialiasing when downsampling (aten/src/ATen/native/UpSample.h). torch computes
    src in float32 with a fused multiply-add (one rounding); at src ~ 300 a float32
    ulp is 3e-5, so the rounding shows: we round the exact value once, as FMA does.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float64)
    src = (np.float64(scale) * (dst + 0.5) - 0.5).astype(np.float32)  # exact in float64, one rounding
    src = np.maximum(src, np.float32(0.0))
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    w_hi = (src - lo).astype(np.float32)
    w_lo = np.float32(1.0) - w_hi
    mat = np.zeros((out_size, in_size), np.float32)
    np.add.at(mat, (np.arange(out_size), lo), w_lo)
    np.add.at(mat, (np.arange(out_size), hi), w_hi)
    return mat


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resize NHWC images like torch `F.interpolate(mode='bilinear', align_corners=False)`.

    Separable: rows then columns, each a matmul with a fixed [out, in] matrix, at
    HIGHEST precision. Unlike `jax.image.resize(..., antialias=True)` (its default)
    this does not widen the kernel when downsampling, which is what pytorch-fid does.
    """
    h, w = x.shape[1], x.shape[2]
    if (h, w) == tuple(size):
        return x
    mh = jnp.asarray(_bilinear_matrix(h, size[0]))
    mw = jnp.asarray(_bilinear_matrix(w, size[1]))
    x = jnp.einsum("oh,nhwc->nowc", mh, x, precision=_HIGHEST)
    return jnp.einsum("pw,nowc->nopc", mw, x, precision=_HIGHEST)


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 NHWC images (1 or 3 channels, any size) -> float32 [-1, 1] at 299x299x3.

    Follows pytorch-fid's path exactly: x / 255 (ToTensor), bilinear resize to
    299x299 on [0, 1], then 2x - 1. Grayscale images are repeated to RGB as
    PIL's `convert('RGB')` does.
    """
    x = jnp.asarray(images)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if x.shape[-1] != 3:
        raise ValueError(f"Inception needs 1 or 3 channels, got images of shape {x.shape}")
    x = x.astype(jnp.float32) / 255.0
    x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
    return 2.0 * x - 1.0


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
    """The error text for a missing weights file: which file, where the original comes from, how to convert."""
    return (
        f"FID Inception weights not found at {path!r} (from config.eval.inception_weights, "
        f"${ENV_VAR}, or the default {default_weights_path()!r}). diffax never downloads them. "
        f"Get pytorch-fid's weights {FID_WEIGHTS_NAME} from {FID_WEIGHTS_URL} and convert them once "
        f"(needs PyTorch for this step only): `diffax convert-inception {FID_WEIGHTS_NAME} {path}`; "
        f"then point config.eval.inception_weights or ${ENV_VAR} at the converted file."
    )


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


def count_params(model: nnx.Module) -> tuple[int, int]:
    """(trainable parameters, batch-norm statistics) element counts.

    With pytorch-fid's model these are `sum(p.numel() for p in parameters())` and
    the running mean/var buffers (num_batches_tracked excluded).
    """
    params = sum(int(np.prod(v.shape)) for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Param))
    stats = sum(int(np.prod(v.shape)) for _, v in nnx.iter_graph(model) if isinstance(v, nnx.BatchStat))
    return params, stats


def make_feature_fn(model: InceptionV3) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """A host function uint8 NHWC images -> {'features': pool3 [N, 2048], 'logits': [N, 1008] (unbiased)}.

    `preprocess` is jitted per input size, the network once (its input is always 299x299).
    Callers batch with a fixed size (see `statistics.accumulate`) to avoid recompiles.
    """
    graphdef, state = nnx.split(model)
    prep = jax.jit(preprocess)  # compiled per input size (cheap)

    @jax.jit  # compiled once: its input is always 299x299x3
    def net(state, x):
        m = nnx.merge(graphdef, state)
        pool3 = m.blocks(x)[-1]
        return pool3, m.unbiased_logits(pool3)

    def features(images: np.ndarray) -> dict[str, np.ndarray]:
        pool3, logits = net(state, prep(jnp.asarray(images)))
        return {"features": np.asarray(pool3), "logits": np.asarray(logits)}

    return features

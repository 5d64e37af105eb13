"""Pictures a researcher looks at: image grids and 2-D scatter plots, saved as PNG."""
from __future__ import annotations

import math

import numpy as np


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] to uint8 exactly as a saved PNG holds them: round(clip((x + 1) * 127.5))."""
    x = np.asarray(x, np.float32)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, *, columns: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile N HWC uint8 images into one HWC grid (RGB; grayscale is repeated), with white padding."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"image_grid expects NHWC images, got shape {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, columns)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    return grid


def save_png(image: np.ndarray, path: str, *, scale: int = 1) -> None:
    """Write an HWC uint8 image; `scale` > 1 enlarges small images (nearest neighbour) for viewing."""
    from PIL import Image

    if scale > 1:
        image = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(path)


def save_scatter(samples: np.ndarray, data: np.ndarray, path: str, *, title: str = "") -> np.ndarray:
    """Scatter 2-D samples over data points; save as PNG and return the picture as HWC uint8."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.scatter(data[:, 0], data[:, 1], s=2, alpha=0.4, label="data", color="tab:blue")
    ax.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.6, label="samples", color="tab:orange")
    lim = np.abs(np.concatenate([data, samples])).max() * 1.1
    lim = lim if np.isfinite(lim) else 5.0
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", title=title)
    ax.legend(loc="upper right", markerscale=4)
    fig.tight_layout()
    fig.savefig(path)
    fig.canvas.draw()
    picture = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return picture


def save_samples(samples: np.ndarray, path: str, *, reference: np.ndarray | None = None, title: str = "") -> np.ndarray:
    """Save samples as a PNG a person can judge and return it (HWC uint8): a grid of uint8 images
    (small images enlarged), or for 2-D points a scatter over `reference` data (default: the samples)."""
    samples = np.asarray(samples)
    if samples.ndim == 2:
        return save_scatter(samples, samples if reference is None else reference, path, title=title)
    picture = image_grid(samples)
    save_png(picture, path, scale=max(1, 128 // samples.shape[1]))
    return picture

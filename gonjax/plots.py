"""Pictures a researcher looks at: image grids and loss curves (matplotlib, Agg backend, no display)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def image_grid(images: np.ndarray, columns: int = 8, pad: int = 1, pad_value: float = 1.0) -> np.ndarray:
    """NHWC images in [0, 1] tiled row-major into one (rows*(H+pad)+pad, ..., C) picture."""
    images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
    n, h, w, c = images.shape
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), pad_value, np.float32)
    for i, image in enumerate(images):
        r, k = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        grid[top:top + h, left:left + w] = image
    return grid


def save_grids(path: Path, grids: Sequence[np.ndarray], titles: Sequence[str], scale: int = 3) -> None:
    """Save image grids side by side, each in an equal panel with its title, the largest at `scale` screen pixels
    per image pixel (smaller grids are drawn enlarged, without smoothing)."""
    dpi = 100  # every panel is as large as the largest grid at `scale`, so that one shows pixel for pixel
    panel_height = scale * max(g.shape[0] for g in grids) / dpi
    panel_width = scale * max(g.shape[1] for g in grids) / dpi
    fig, axes = plt.subplots(1, len(grids), squeeze=False,
                             figsize=(len(grids) * (panel_width + 0.2), panel_height + 0.4), dpi=dpi)
    for ax, grid, title in zip(axes[0], grids, titles):
        if grid.shape[-1] == 1:
            ax.imshow(grid[:, :, 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        else:
            ax.imshow(grid, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_reconstructions(path: Path, images: np.ndarray, reconstructions: np.ndarray, title: str = "") -> None:
    """Test images beside their reconstructions, as two 8x8 grids."""
    save_grids(path, [image_grid(images), image_grid(reconstructions)],
               [f"test images {title}".strip(), f"reconstructions {title}".strip()])


def save_curves(path: Path, records: Sequence[dict], metric: str = "sse", ylabel: str = "SSE / image") -> None:
    """Train and test `metric` against epoch, from metrics.jsonl records (log scale when it spans a lot)."""
    epochs = [r["epoch"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for split, style in (("train", "-o"), ("test", "-s")):
        ax.plot(epochs, [r[f"{split}_{metric}"] for r in records], style, markersize=3, label=split)
    values = [r[f"{s}_{metric}"] for r in records for s in ("train", "test")]
    if min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

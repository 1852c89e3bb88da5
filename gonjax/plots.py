"""Pictures a researcher looks at: image grids and loss curves, drawn into files.

Figures are built as `matplotlib.figure.Figure` objects and saved directly, never through pyplot: drawing needs no
display, and importing gonjax leaves pyplot's backend to the user (a notebook keeps showing its own figures).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


FIGURE_LIMIT = 4096  # pixels per side above which save_grids writes a plain PNG instead of a titled figure


def to_uint8(images) -> np.ndarray:
    """Images in [0, 1] (clipped) as uint8 0..255; uint8 images pass through."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.round(np.clip(images.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def image_grid(images: np.ndarray, columns: int = 8, pad: int = 1) -> np.ndarray:
    """NHWC images (floats in [0, 1], clipped, or uint8) tiled row-major into one uint8 picture of
    (rows*(H+pad)+pad, columns*(W+pad)+pad, C) with white padding. Built image by image: memory is the grid's."""
    n, h, w, c = np.shape(images)
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, k = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        grid[top:top + h, left:left + w] = to_uint8(images[i])
    return grid


def save_image(path: Path, grid: np.ndarray) -> None:
    """One uint8 HWC picture as a PNG, pixel for pixel (Pillow; no figure, any size memory allows)."""
    from PIL import Image

    Image.fromarray(grid[:, :, 0] if grid.shape[-1] == 1 else grid).save(path)


def save_grids(path: Path, grids: Sequence[np.ndarray], titles: Sequence[str], scale: int = 3) -> None:
    """Save image grids side by side, each in an equal panel with its title, the largest at `scale` screen pixels
    per image pixel (smaller grids are drawn enlarged, without smoothing). Grids too large for a figure
    (FIGURE_LIMIT) are written side by side as one plain PNG, pixel for pixel and untitled."""
    dpi = 100  # every panel is as large as the largest grid at `scale`, so that one shows pixel for pixel
    largest = max(max(g.shape[:2]) for g in grids)
    if scale * largest > FIGURE_LIMIT:
        scale = 1
    if largest * len(grids) > FIGURE_LIMIT:
        height = max(g.shape[0] for g in grids)
        channels = max(g.shape[2] for g in grids)
        panels = [np.pad(np.broadcast_to(g, (*g.shape[:2], channels)), ((0, height - g.shape[0]), (0, 1), (0, 0)),
                         constant_values=255) for g in grids]
        save_image(path, np.concatenate(panels, axis=1))
        return
    panel_height = scale * max(g.shape[0] for g in grids) / dpi
    panel_width = scale * max(g.shape[1] for g in grids) / dpi
    fig = Figure(figsize=(len(grids) * (panel_width + 0.2), panel_height + 0.4), dpi=dpi)
    axes = fig.subplots(1, len(grids), squeeze=False)
    for ax, grid, title in zip(axes[0], grids, titles):
        if grid.shape[-1] == 1:
            ax.imshow(grid[:, :, 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(grid, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)


def save_reconstructions(path: Path, images: np.ndarray, reconstructions: np.ndarray, title: str = "") -> None:
    """Test images beside their reconstructions, as two 8x8 grids."""
    save_grids(path, [image_grid(images), image_grid(reconstructions)],
               [f"test images {title}".strip(), f"reconstructions {title}".strip()])


def save_curves(path: Path, records: Sequence[dict], metric: str = "sse", ylabel: str = "SSE / image",
                windows: Sequence[dict] = ()) -> None:
    """Train and test `metric` against epoch, from metrics.jsonl records (log scale when it spans a lot), and
    beside it the training loss over windows of steps (train_metrics.jsonl) with the evaluated train loss."""
    epochs = [r["epoch"] for r in records]
    fig = Figure(figsize=(12 if windows else 6, 4), dpi=100)
    axes = fig.subplots(1, 2 if windows else 1, squeeze=False)
    ax = axes[0][0]
    for split, style in (("train", "-o"), ("test", "-s")):
        ax.plot(epochs, [r[f"{split}_{metric}"] for r in records], style, markersize=3, label=split)
    _log_scale_if_wide(ax, [r[f"{s}_{metric}"] for r in records for s in ("train", "test")])
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title("evaluation (full passes)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    if windows:
        ax = axes[0][1]
        ax.plot([w["epoch"] for w in windows], [w["train_loss"] for w in windows], lw=0.8,
                label="training steps (window mean)")
        ax.plot(epochs, [r["train_loss"] for r in records], "o", markersize=3, label="evaluation, train set")
        _log_scale_if_wide(ax, [w["train_loss"] for w in windows] + [r["train_loss"] for r in records])
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        speed = windows[-1]["images_per_s"]
        ax.set_title(f"training loss ({speed:.0f} images/s in the last window)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def _log_scale_if_wide(ax, values: Sequence[float]) -> None:
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")

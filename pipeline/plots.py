"""Matplotlib figures written to PNG files: learning curves, confusion matrix, kernels,
feature maps (the course's "interpreting CNNs"), and the report's comparison plots."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def learning_curves(history: dict[str, list[float]], path: Path, title: str = "") -> Path:
    """Loss and val_loss, accuracy and val_accuracy, per epoch."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(8, 3))
    epochs = np.arange(1, len(history["loss"]) + 1)
    for ax, key in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.plot(epochs, history[key], label=key)
        ax.plot(epochs, history[f"val_{key}"], label=f"val_{key}")
        ax.set_xlabel("epoch")
        ax.legend()
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def confusion_matrix(matrix: np.ndarray, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 5.4))
    ax.imshow(matrix, cmap="Blues")
    n = len(matrix)
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    dark = matrix.max() / 2  # white counts on dark cells, black on light ones
    for (i, j), count in np.ndenumerate(matrix):
        color = "white" if count > dark else "black"
        ax.text(j, i, str(count), ha="center", va="center", fontsize=9, color=color)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("validation confusion matrix")
    return _save(fig, path)


def image_grid(images: np.ndarray, path: Path, title: str) -> Path:
    """A grid of 2-D images (N, H, W), each scaled to its own range.

    The tiles go into one array drawn with a single `imshow`: one axes per image would
    cost about a second per figure, on every tracked run."""
    n, height, width = images.shape
    cols = min(8, n)
    rows = math.ceil(n / cols)
    low = images.min(axis=(1, 2), keepdims=True)
    span = np.maximum(images.max(axis=(1, 2), keepdims=True) - low, 1e-12)
    scaled = (images - low) / span
    mosaic = np.full((rows * (height + 1) - 1, cols * (width + 1) - 1), np.nan)
    for i, tile in enumerate(scaled):
        r, c = divmod(i, cols)
        mosaic[
            r * (height + 1) : r * (height + 1) + height, c * (width + 1) : c * (width + 1) + width
        ] = tile
    fig, ax = plt.subplots(figsize=(cols * 0.9, rows * 0.9 + 0.4))
    ax.imshow(np.ma.masked_invalid(mosaic), cmap="gray", interpolation="nearest")
    ax.axis("off")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def strip_plot(
    groups: dict[str, list[float]], path: Path, title: str, ylabel: str = "val_accuracy"
) -> Path:
    """Box plot per level with every trial drawn as a point."""
    fig, ax = plt.subplots(figsize=(1.4 * max(len(groups), 2) + 1.5, 3.2))
    labels = list(groups)
    data = [groups[k] for k in labels]
    ax.boxplot(data, tick_labels=labels, showfliers=False)
    rng = np.random.default_rng(0)
    for i, values in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.08, 0.08, len(values)), values, s=14, alpha=0.7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)


def curves_by_level(histories: dict[str, dict[str, list[float]]], path: Path, title: str) -> Path:
    """val_loss and val_accuracy of each level's best trial."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(8, 3))
    for level, history in histories.items():
        epochs = np.arange(1, len(history["val_loss"]) + 1)
        ax_loss.plot(epochs, history["val_loss"], label=level)
        ax_acc.plot(epochs, history["val_accuracy"], label=level)
    ax_loss.set_ylabel("val_loss")
    ax_acc.set_ylabel("val_accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def pareto(points: list[tuple[float, float]], front: list[tuple[float, float]], path: Path) -> Path:
    """val_accuracy against parameter count, front highlighted."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    if points:
        ax.scatter(*zip(*points, strict=True), s=14, alpha=0.5, label="trials")
    if front:
        xs, ys = zip(*sorted(front), strict=True)
        ax.plot(xs, ys, "o-", color="C3", label="Pareto front")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no overlapping labels
    ax.set_xlabel("parameters")
    ax.set_ylabel("val_accuracy")
    ax.legend()
    ax.set_title("joint study: accuracy vs size")
    return _save(fig, path)

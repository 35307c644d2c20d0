"""Diagnostic pictures (PNG) written beside a job's assets.

Matplotlib with the non-interactive Agg backend: works headless on compute
nodes.  Only drawing and saving happen here; the numbers come from kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib.pyplot with the headless Agg backend (every diagnostic picture uses it)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_image_png(path: str | Path, image: np.ndarray, title: str = "") -> None:
    """Save a 2D array as a grey-scale PNG (2–98 % percentile contrast)."""
    plt = pyplot()
    lo, hi = np.percentile(image, [2, 98]) if image.size else (0, 1)
    h, w = image.shape
    fig = plt.figure(figsize=(max(4.0, w / 100 * 2 + 0.2), h / 100 * 2 + (0.4 if title else 0.2)), dpi=100)
    ax = fig.add_axes([0, 0, 1, 0.9 if title else 1])
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower", interpolation="nearest")
    ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=8)
    fig.savefig(path, format="png")  # the name may be a staged .part name
    plt.close(fig)


def save_fsc_png(
    path: str | Path,
    resolution_axis: np.ndarray,
    curves: dict[str, np.ndarray],
    pixel_size: float,
    title: str = "",
    thresholds: Sequence[float] = (0.143, 0.5),
) -> None:
    """Plot FSC curves against spatial frequency (1/Å) with threshold lines.

    Parameters
    ----------
    resolution_axis : numpy.ndarray
        Spatial frequency of each shell in 1/Å.
    curves : dict
        Label -> FSC values per shell.
    pixel_size : float
        Å per pixel (sets the Nyquist end of the axis).
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, fsc in curves.items():
        ax.plot(resolution_axis, fsc, label=label)
    for t in thresholds:
        ax.axhline(t, color="grey", lw=0.7, ls="--")
    ax.set_xlim(0, 0.5 / pixel_size)
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlabel("spatial frequency (1/Å) and resolution")
    ax.set_ylabel("FSC")
    ax.set_title(title, fontsize=9)
    # label the frequency axis with resolutions too (Å), which is what users read off
    ticks = np.linspace(0, 0.5 / pixel_size, 6)
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:.3f}\n" + (f"{1 / t:.1f} Å" if t > 0 else "") for t in ticks], fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")  # the name may be a staged .part name
    plt.close(fig)


def save_gallery_png(path: str | Path, images: np.ndarray, labels: Sequence[str] | None = None, columns: int = 10) -> None:
    """A gallery of 2D images (class averages) in a grid, each with its own contrast."""
    plt = pyplot()
    n = len(images)
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.2, rows * 1.3), dpi=100, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < n:
            img = images[i]
            lo, hi = np.percentile(img, [1, 99])
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower")
            if labels is not None:
                ax.set_title(labels[i], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")  # the name may be a staged .part name
    plt.close(fig)

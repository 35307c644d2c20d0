"""Pick exports: RELION coordinate STAR (+ ``autopick.star``), EMAN ``.box``, and the pick overlay PNG.

Coordinates are pixels with 0 = the first pixel (RELION's and cisTEM's
convention, as :mod:`cistem_mpi.io.coordinates` reads them): the files this
module writes read back with :func:`cistem_mpi.io.coordinates.read_coordinates`
to the same positions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["write_coordinate_star", "write_autopick_star", "write_box", "save_picks_png"]


def write_coordinate_star(path: str | os.PathLike, x: np.ndarray, y: np.ndarray, score: np.ndarray) -> None:
    """RELION per-micrograph coordinate STAR: ``_rlnCoordinateX/Y`` (px) and ``_rlnAutopickFigureOfMerit``.

    >>> import tempfile, numpy as np
    >>> from cistem_mpi.io.coordinates import read_coordinates
    >>> p = Path(tempfile.mkdtemp()) / "a.star"
    >>> write_coordinate_star(p, np.array([10.5]), np.array([20.25]), np.array([7.0]))
    >>> r = read_coordinates(p)[0]; (float(r.x[0]), float(r.y[0]), float(r.score[0]))
    (10.5, 20.25, 7.0)
    """
    lines = ["", "# version 30001", "", "data_", "", "loop_", "_rlnCoordinateX #1", "_rlnCoordinateY #2",
             "_rlnClassNumber #3", "_rlnAutopickFigureOfMerit #4", "_rlnAnglePsi #5"]
    for a, b, s in zip(np.asarray(x, float), np.asarray(y, float), np.asarray(score, float)):
        lines.append(f"{a:12.6f} {b:12.6f} {0:6d} {s:12.6f} {-999.0:12.6f}")
    Path(path).write_text("\n".join(lines) + "\n\n")


def write_autopick_star(path: str | os.PathLike, micrographs: Sequence[str], coordinate_files: Sequence[str]) -> None:
    """RELION's list of coordinate files: ``data_coordinate_files`` with micrograph and coordinate paths.

    Paths are written as given (relative ones are looked up beside this file
    by :func:`cistem_mpi.io.coordinates.read_coordinates`).
    """
    lines = ["", "# version 30001", "", "data_coordinate_files", "", "loop_", "_rlnMicrographName #1",
             "_rlnMicrographCoordinates #2"]
    for m, c in zip(micrographs, coordinate_files):
        lines.append(f"{m} {c}")
    Path(path).write_text("\n".join(lines) + "\n\n")


def write_box(path: str | os.PathLike, x: np.ndarray, y: np.ndarray, box: int) -> None:
    """EMAN ``.box``: lower-left corner ``(x - box/2, y - box/2)``, width, height (integers as EMAN writes).

    Read back, the centre is ``corner + box/2``; with an even box the
    centre is the pick rounded to the nearest pixel.
    """
    h = box / 2.0
    with open(path, "w") as fh:
        for a, b in zip(np.asarray(x, float), np.asarray(y, float)):
            fh.write(f"{int(round(a - h))}\t{int(round(b - h))}\t{int(box)}\t{int(box)}\n")


def save_picks_png(path: str | os.PathLike, image: np.ndarray, x_px: np.ndarray, y_px: np.ndarray,
                   radius_px: float, rejected: np.ndarray | None = None, title: str = "") -> None:
    """The (scaled) micrograph with each pick circled and rejected areas shaded red.

    ``x_px, y_px`` and ``radius_px`` are in pixels of ``image``.
    """
    from cistem_mpi.io.plots import pyplot

    plt = pyplot()
    h, w = image.shape
    lo, hi = np.percentile(image, [1, 99]) if image.size else (0, 1)
    scale = max(1.0, 800.0 / max(h, w))
    fig = plt.figure(figsize=(w * scale / 100 + 0.1, h * scale / 100 + (0.4 if title else 0.1)), dpi=100)
    ax = fig.add_axes([0, 0, 1, (h * scale / 100) / (h * scale / 100 + (0.4 if title else 0.1))])
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="bilinear")
    if rejected is not None and rejected.any():
        over = np.zeros((h, w, 4), dtype=np.float32)
        over[rejected] = (1.0, 0.0, 0.0, 0.35)
        ax.imshow(over, interpolation="nearest")
    if len(x_px):
        # all circles as one polyline (NaN-separated): one artist, not one patch per pick (which
        # took seconds per micrograph with thousands of picks)
        t = np.append(np.linspace(0.0, 2.0 * np.pi, 33), np.nan)
        cx = (np.asarray(x_px, float)[:, None] + radius_px * np.cos(t)[None]).ravel()
        cy = (np.asarray(y_px, float)[:, None] + radius_px * np.sin(t)[None]).ravel()
        ax.plot(cx, cy, color="#00e0ff", linewidth=1.0, scalex=False, scaley=False)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, format="png", pil_kwargs={"compress_level": 1})  # fast; the PNG is a picture to look at
    plt.close(fig)

"""Cutting particle boxes out of micrographs (cisTEM's refinement-package extraction).

Conventions (the same in cisTEM and RELION): a particle position is in pixels
with 0 at the first pixel; the box is cut so that its centre index
``box // 2`` lands on the position rounded to the nearest pixel, and pixels
outside the micrograph take a fill value (cisTEM: the mean of the
micrograph's edge pixels).  What rounding leaves over (``|d| <= 0.5`` px) is
returned so the caller can keep it as the particle's starting shift: the
particle sits at ``+d`` from the box centre, which is a cisTEM shift of
``+d * pixel_size`` Å (see :mod:`cistem_mpi.kernels.shifts`).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["edge_mean", "replace_outliers", "box_corners", "cut_boxes", "normalise_boxes"]


@numba.njit(cache=True, nogil=True)
def _moments(flat: np.ndarray) -> tuple[float, float]:
    """Sum and sum of squares in float64, one pass, no float64 copy of the data."""
    s = 0.0
    ss = 0.0
    for v in flat:
        x = np.float64(v)
        s += x
        ss += x * x
    return s, ss


@numba.njit(cache=True, nogil=True)
def _replace_beyond(flat: np.ndarray, mean: float, limit: float) -> None:
    m = np.float32(mean)
    for i in range(flat.size):
        if abs(np.float64(flat[i]) - mean) > limit:
            flat[i] = m


def _mean_sd(a: np.ndarray) -> tuple[float, float]:
    flat = np.ascontiguousarray(a).reshape(-1)
    s, ss = _moments(flat)
    n = flat.size
    mean = s / n
    return mean, float(np.sqrt(max(ss / n - mean * mean, 0.0)))


def edge_mean(image: np.ndarray) -> float:
    """Mean of the pixels on the four edges of ``image`` (each pixel once).

    Parameters
    ----------
    image : (ny, nx) array

    Returns
    -------
    float
        The fill value for box pixels that fall outside the micrograph.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.shape[0] < 3 or img.shape[1] < 3:
        return float(img.mean())
    total = img[0].sum() + img[-1].sum() + img[1:-1, 0].sum() + img[1:-1, -1].sum()
    count = 2 * img.shape[1] + 2 * (img.shape[0] - 2)
    return float(total / count)


def replace_outliers(image: np.ndarray, n_sigma: float = 6.0) -> np.ndarray:
    """Copy of ``image`` with values further than ``n_sigma`` standard deviations
    from the mean replaced by the mean (hot pixels, X-ray hits; cisTEM does
    this to each micrograph before cutting particles).

    Parameters
    ----------
    image : (ny, nx) array
    n_sigma : float
        Threshold in standard deviations of the whole image.

    Returns
    -------
    (ny, nx) float32 array
    """
    img = np.array(image, dtype=np.float32)
    mean, sd = _mean_sd(img)
    if sd > 0:
        _replace_beyond(img.reshape(-1), mean, n_sigma * sd)
    return img


def box_corners(x: np.ndarray, y: np.ndarray, box: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """First pixel of each box and what rounding the centre left over.

    Parameters
    ----------
    x, y : (n,) arrays
        Particle centres in pixels (0 = first pixel).
    box : int
        Box edge in pixels.

    Returns
    -------
    x0, y0 : (n,) int64
        Micrograph index of each box's pixel 0 (may be negative near an edge).
    dx, dy : (n,) float64
        ``x - round(x)``: where the particle sits relative to the box centre, in pixels.
    """
    xf = np.asarray(x, dtype=np.float64)
    yf = np.asarray(y, dtype=np.float64)
    # round half up, as cisTEM's myround does for positive values
    ix = np.floor(xf + 0.5).astype(np.int64)
    iy = np.floor(yf + 0.5).astype(np.int64)
    return ix - box // 2, iy - box // 2, xf - ix, yf - iy


def cut_boxes(image: np.ndarray, x0: np.ndarray, y0: np.ndarray, box: int, fill: float) -> np.ndarray:
    """Boxes ``image[y0:y0+box, x0:x0+box]``, with ``fill`` where a box leaves the image.

    Parameters
    ----------
    image : (ny, nx) array
    x0, y0 : (n,) int arrays
        First pixel of each box (from :func:`box_corners`).
    box : int
    fill : float

    Returns
    -------
    (n, box, box) float32 array
    """
    img = np.asarray(image)
    ny, nx = img.shape
    n = len(x0)
    out = np.full((n, box, box), np.float32(fill), dtype=np.float32)
    for i in range(n):
        xa, ya = int(x0[i]), int(y0[i])
        # the part of the box that lies on the micrograph
        sx0, sx1 = max(xa, 0), min(xa + box, nx)
        sy0, sy1 = max(ya, 0), min(ya + box, ny)
        if sx1 > sx0 and sy1 > sy0:
            out[i, sy0 - ya:sy1 - ya, sx0 - xa:sx1 - xa] = img[sy0:sy1, sx0:sx1]
    return out


def normalise_boxes(boxes: np.ndarray) -> np.ndarray:
    """Each box to mean 0 and standard deviation 1, in place (cisTEM's ZeroFloatAndNormalize).

    A constant box (all fill) becomes zeros.

    Parameters
    ----------
    boxes : (n, box, box) float32 array

    Returns
    -------
    The same array.
    """
    for b in boxes:  # one box at a time: float64 sums without a float64 copy of the stack
        mean, sd = _mean_sd(b)
        b -= np.float32(mean)
        if sd > 0:
            b *= np.float32(1.0 / sd)
    return boxes

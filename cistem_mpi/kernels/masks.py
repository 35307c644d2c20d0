"""Soft-edged real-space masks (spheres, circles, cylinders).

The edge follows cisTEM's ``Image::CosineMask``: the cosine fall-off of
width ``edge`` is centred on ``radius`` -- the mask is 1 up to
``radius - edge/2``, 0 beyond ``radius + edge/2`` and
``(1 + cos(pi * (r - r_in) / edge)) / 2`` in between.  Radii and edges are
in pixels; the centre is ``N//2`` unless given.
"""

from __future__ import annotations

import numpy as np

from cistem_mpi.kernels.grids import radius_2d, radius_3d

__all__ = ["cosine_edge", "sphere_mask", "circle_mask", "cylinder_mask", "apply_mask"]


def cosine_edge(r: np.ndarray, radius: float, edge: float) -> np.ndarray:
    """Soft step of distances ``r``: 1 inside, 0 outside, cosine edge centred on ``radius``."""
    r = np.asarray(r, dtype=np.float32)
    if edge <= 0:
        return (r <= radius).astype(np.float32)
    r_in = max(radius - edge / 2.0, 0.0)
    t = np.clip((r - r_in) / edge, 0.0, 1.0)
    return (0.5 * (1.0 + np.cos(np.pi * t))).astype(np.float32)


def sphere_mask(n: int, radius: float, edge: float = 0.0,
                center: tuple[float, float, float] | None = None) -> np.ndarray:
    """Soft sphere in an n-cube (float32, ``[z, y, x]``; centre (z, y, x))."""
    return cosine_edge(radius_3d(n, center), radius, edge)


def circle_mask(ny: int, radius: float, edge: float = 0.0, nx: int | None = None,
                center: tuple[float, float] | None = None) -> np.ndarray:
    """Soft disc in an image (float32, ``[y, x]``; centre (y, x))."""
    return cosine_edge(radius_2d(ny, nx, center), radius, edge)


def cylinder_mask(n: int, radius: float, height: float, edge: float = 0.0, axis: str = "z",
                  center: tuple[float, float, float] | None = None) -> np.ndarray:
    """Soft cylinder (e.g. for helices / membrane proteins) in an n-cube.

    ``radius`` is measured perpendicular to ``axis`` ("x", "y" or "z") and
    ``height`` is the full length along it; both edges are soft.
    """
    cz, cy, cx = (n // 2,) * 3 if center is None else center
    z = np.arange(n, dtype=np.float32)[:, None, None] - np.float32(cz)
    y = np.arange(n, dtype=np.float32)[None, :, None] - np.float32(cy)
    x = np.arange(n, dtype=np.float32)[None, None, :] - np.float32(cx)
    if axis == "z":
        rad, along = np.sqrt(x * x + y * y), np.abs(z)
    elif axis == "y":
        rad, along = np.sqrt(x * x + z * z), np.abs(y)
    elif axis == "x":
        rad, along = np.sqrt(y * y + z * z), np.abs(x)
    else:
        raise ValueError(f"axis must be x, y or z, got {axis!r}")
    return cosine_edge(rad, radius, edge) * cosine_edge(along, height / 2.0, edge)


def apply_mask(data: np.ndarray, mask: np.ndarray, fill: str | float = 0.0) -> np.ndarray:
    """Multiply by a soft mask, blending towards ``fill`` outside.

    ``fill="mean"`` uses the mean of the data where the mask is 0 (cisTEM's
    behaviour for particle images, avoids a step at the mask edge).
    """
    data = np.asarray(data, dtype=np.float32)
    if isinstance(fill, str):
        if fill != "mean":
            raise ValueError("fill must be a number or 'mean'")
        outside = mask < 1e-6
        value = float(data[outside].mean()) if outside.any() else 0.0
    else:
        value = float(fill)
    return (data * mask + np.float32(value) * (1.0 - mask)).astype(np.float32)

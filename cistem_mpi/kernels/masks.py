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

__all__ = ["cosine_edge", "sphere_mask", "circle_mask", "cylinder_mask", "apply_mask", "enclosing_sphere"]


def cosine_edge(r: np.ndarray, radius: float, edge: float) -> np.ndarray:
    """Soft step of distances ``r``: 1 inside, 0 outside, cosine edge centred on ``radius``."""
    r = np.asarray(r, dtype=np.float32)
    if edge <= 0:
        return (r <= radius).astype(np.float32)
    r_in = max(radius - edge / 2.0, 0.0)
    t = (r - r_in) / np.float32(edge)
    out = (t <= 0).astype(np.float32)
    # the cosine only on the edge (a thin shell of a volume), the same values as on the clipped whole
    band = (t > 0) & (t < 1)
    out[band] = (0.5 * (1.0 + np.cos(np.pi * t[band]))).astype(np.float32)
    return out


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


def enclosing_sphere(mask: np.ndarray, pixel_size: float,
                     level: float = 0.5) -> tuple[tuple[float, float, float], float]:
    """The focus sphere of a 3D mask: its centre of mass and the radius that encloses it.

    * centre: the centre of mass of the mask values (negative values count as 0), in Å from the
      first voxel, ``(x, y, z)`` -- voxel ``[z, y, x]`` sits at ``(x, y, z) * pixel_size`` (cisTEM's
      ``--focus-centre`` convention);
    * radius: the distance from that centre to the farthest voxel centre whose value is at least
      ``level`` times the mask's maximum, in Å.  For cisTEM's soft masks (0..1 with
      a cosine edge centred on the nominal radius, :func:`sphere_mask`) the 0.5 level is the nominal
      surface, so a spherical mask gives its own radius and any other shape the smallest sphere about
      its centre of mass that covers it.

    Parameters
    ----------
    mask : numpy.ndarray
        ``(nz, ny, nx)`` mask values (any scale; finite).
    pixel_size : float
        Å per voxel.
    level : float
        Fraction of the maximum above which a voxel is inside the mask (0 < level <= 1).

    Returns
    -------
    centre : tuple of 3 floats
        ``(x, y, z)`` in Å from the first voxel.
    radius : float
        Å.

    Raises
    ------
    ValueError
        Not a 3D array, non-finite values, or no positive value (an empty mask).

    >>> m = sphere_mask(32, 5.0, center=(16, 12, 20))  # (z, y, x) = (16, 12, 20) voxels
    >>> c, r = enclosing_sphere(m, 2.0)
    >>> [round(v, 1) for v in c], round(r, 1)
    ([40.0, 24.0, 32.0], 10.0)
    """
    m = np.asarray(mask)
    if m.ndim != 3:
        raise ValueError(f"a 3D mask is needed, got shape {m.shape}")
    if not (0.0 < level <= 1.0):
        raise ValueError(f"level must be in (0, 1], got {level}")
    if not np.isfinite(m).all():
        raise ValueError("the mask contains NaN or infinite values")
    w = np.clip(m.astype(np.float64), 0.0, None)
    total = float(w.sum())
    if total <= 0.0:
        raise ValueError("the mask is empty (no positive value)")
    nz, ny, nx = m.shape
    # marginal sums: the centre of mass without index grids the size of the map
    cz = float(np.dot(w.sum(axis=(1, 2)), np.arange(nz))) / total
    cy = float(np.dot(w.sum(axis=(0, 2)), np.arange(ny))) / total
    cx = float(np.dot(w.sum(axis=(0, 1)), np.arange(nx))) / total
    z, y, x = np.nonzero(w >= level * float(w.max()))
    d2 = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2
    radius = float(np.sqrt(d2.max())) * pixel_size
    return (cx * pixel_size, cy * pixel_size, cz * pixel_size), radius

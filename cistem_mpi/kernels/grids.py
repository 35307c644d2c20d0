"""Coordinate grids in real and Fourier space, in the package's layouts.

Fourier layouts (see :mod:`cistem_mpi.kernels.fft`):

* ``half=True``  -- rfft half plane: shape ``(ny, nx//2 + 1)``; x frequencies
  ``0 .. nx//2``, y frequencies in ``fftfreq`` order.
* ``half=False`` -- full plane in ``fftfreq`` order on both axes,
  shape ``(ny, nx)`` (un-shifted; apply ``numpy.fft.fftshift`` to centre).

Frequencies are returned in cycles per pixel (``-0.5 .. 0.5``); divide by the
pixel size to get 1/Å.
"""

from __future__ import annotations

import numpy as np

__all__ = ["fourier_grid_2d", "fourier_grid_3d", "radius_2d", "radius_3d"]


def fourier_grid_2d(ny: int, nx: int | None = None, half: bool = True,
                    dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(fy, fx)`` frequency arrays (cycles/pixel), broadcastable.

    Parameters
    ----------
    ny, nx : int
        Real-space image size (``nx`` defaults to ``ny``).
    half : bool
        rfft half-plane layout (True) or full ``fftfreq`` layout (False).
    dtype : numpy dtype
        float32 (default) or float64 (numpy's own values, for float64 filters).

    Returns
    -------
    fy : ndarray, shape (ny, 1)
    fx : ndarray, shape (1, nx//2+1) or (1, nx)

    Examples
    --------
    >>> fy, fx = fourier_grid_2d(4, 6)
    >>> fy.ravel().tolist(), fx.ravel().tolist()[:2], fx.shape
    ([0.0, 0.25, -0.5, -0.25], [0.0, 0.1666666716337204], (1, 4))
    """
    nx = ny if nx is None else nx
    fy = np.fft.fftfreq(ny).astype(dtype)[:, None]
    fx = (np.fft.rfftfreq(nx) if half else np.fft.fftfreq(nx)).astype(dtype)[None, :]
    return fy, fx


def fourier_grid_3d(n: int, half: bool = True, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(fz, fy, fx)`` for a cubic volume of size ``n`` (cycles/voxel), broadcastable.

    Parameters
    ----------
    n : int
        Volume size.
    half : bool
        rfft half-volume layout (True) or full ``fftfreq`` layout (False).
    dtype : numpy dtype
        float32 (default) or float64.

    Returns
    -------
    fz : ndarray, shape (n, 1, 1)
    fy : ndarray, shape (1, n, 1)
    fx : ndarray, shape (1, 1, n//2+1) or (1, 1, n)

    Examples
    --------
    >>> [a.shape for a in fourier_grid_3d(4)]
    [(4, 1, 1), (1, 4, 1), (1, 1, 3)]
    """
    f = np.fft.fftfreq(n).astype(dtype)
    fx = (np.fft.rfftfreq(n) if half else np.fft.fftfreq(n)).astype(dtype)
    return f[:, None, None], f[None, :, None], fx[None, None, :]


def radius_2d(ny: int, nx: int | None = None, center: tuple[float, float] | None = None) -> np.ndarray:
    """Distance of each pixel from the centre (default ``(ny//2, nx//2)``), float32."""
    nx = ny if nx is None else nx
    cy, cx = (ny // 2, nx // 2) if center is None else center
    y = np.arange(ny, dtype=np.float32)[:, None] - np.float32(cy)
    x = np.arange(nx, dtype=np.float32)[None, :] - np.float32(cx)
    return np.sqrt(x * x + y * y)


def radius_3d(n: int, center: tuple[float, float, float] | None = None) -> np.ndarray:
    """Distance of each voxel of an ``n``-cube from ``center`` (z, y, x; default ``n//2``)."""
    cz, cy, cx = (n // 2,) * 3 if center is None else center
    z = np.arange(n, dtype=np.float32)[:, None, None] - np.float32(cz)
    y = np.arange(n, dtype=np.float32)[None, :, None] - np.float32(cy)
    x = np.arange(n, dtype=np.float32)[None, None, :] - np.float32(cx)
    return np.sqrt(x * x + y * y + z * z)

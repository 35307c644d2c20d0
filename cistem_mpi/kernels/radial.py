"""Radial (shell) averages in real space and on half-layout Fourier grids.

Shell ``s`` holds the frequencies with ``round(|k| * N) == s`` (|k| in
cycles/pixel, N the box size), s = 0 .. N//2; frequencies beyond N//2
(the corners) are left out.  On the rfft half layout every kx > 0 entry
stands for itself and its Friedel mate, so it counts twice
(:func:`half_multiplicity`) and shell averages equal those over the full
transform.
"""

from __future__ import annotations

import numpy as np

from cistem_mpi.kernels.grids import radius_2d, radius_3d

__all__ = ["shell_index", "half_multiplicity", "shell_sum", "shell_average", "radial_average",
           "shell_frequencies"]


def shell_index(shape: tuple[int, ...], half: bool = True) -> np.ndarray:
    """Integer shell of every entry of a (square/cubic) Fourier grid; -1 beyond N//2."""
    n = shape[0]
    f = np.fft.fftfreq(n) * n
    fx = (np.fft.rfftfreq(n) if half else np.fft.fftfreq(n)) * n
    if len(shape) == 2:
        r = np.sqrt(f[:, None] ** 2 + fx[None, :] ** 2)
    elif len(shape) == 3:
        r = np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + fx[None, None, :] ** 2)
    else:
        raise ValueError(f"need a 2D or 3D shape, got {shape}")
    s = np.rint(r).astype(np.int64)
    s[s > n // 2] = -1
    return s


def half_multiplicity(shape: tuple[int, ...]) -> np.ndarray:
    """Weights 2 for 0 < kx < N/2 and 1 on the kx = 0 and kx = N/2 planes (float32)."""
    n = shape[0]
    m = np.full(n // 2 + 1, 2.0, dtype=np.float32)
    m[0] = 1.0
    if n % 2 == 0:
        m[-1] = 1.0
    return np.broadcast_to(m, tuple(shape[:-1]) + (n // 2 + 1,))


def shell_frequencies(n: int) -> np.ndarray:
    """Spatial frequency of each shell (cycles/pixel): ``s / n``."""
    return np.arange(n // 2 + 1, dtype=np.float64) / n


def shell_sum(values: np.ndarray, n: int | None = None, half: bool = True) -> np.ndarray:
    """Sum of ``values`` (a Fourier-grid array) per shell, float64, length N//2+1."""
    values = np.asarray(values)
    n = values.shape[0] if n is None else n
    s = shell_index((n,) * values.ndim, half=half)
    w = half_multiplicity((n,) * values.ndim) if half else 1.0
    v = np.asarray(values, dtype=np.float64) * w
    ok = s >= 0
    return np.bincount(s[ok], weights=v[ok], minlength=n // 2 + 1)[: n // 2 + 1]


def shell_average(values: np.ndarray, half: bool = True) -> np.ndarray:
    """Average of ``values`` per shell (see :func:`shell_sum`)."""
    n = values.shape[0]
    tot = shell_sum(values, n, half)
    cnt = shell_sum(np.ones(values.shape, dtype=np.float64), n, half)
    return np.divide(tot, cnt, out=np.zeros_like(tot), where=cnt > 0)


def radial_average(data: np.ndarray, center: tuple[float, ...] | None = None) -> np.ndarray:
    """Rotational average of a real 2D image or 3D volume about its centre.

    Bin ``i`` averages the pixels with ``round(r) == i``, for i up to the
    largest distance in the array.
    """
    data = np.asarray(data, dtype=np.float64)
    if data.ndim == 2:
        r = radius_2d(data.shape[0], data.shape[1], center)
    elif data.ndim == 3:
        r = radius_3d(data.shape[0], center)
    else:
        raise ValueError("need a 2D or 3D array")
    idx = np.rint(r).astype(np.int64).ravel()
    tot = np.bincount(idx, weights=data.ravel())
    cnt = np.bincount(idx)
    return tot / np.maximum(cnt, 1)

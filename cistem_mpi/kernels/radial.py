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
from numba import njit

from cistem_mpi.kernels.grids import radius_2d, radius_3d

__all__ = ["shell_index", "half_multiplicity", "shell_sum", "half_fsc_sums", "shell_average", "radial_average",
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


@njit(cache=True, inline="always")
def _shell_of(n, z, y, x, nz):
    """Shell of half-layout entry (z, y, x) of an N-grid (nz == 1: a 2D grid, kz = 0); -1 beyond N//2."""
    kz = 0 if nz == 1 else (z if z < (n + 1) // 2 else z - n)
    ky = y if y < (n + 1) // 2 else y - n
    s = int(np.rint(np.sqrt(float(kz * kz + ky * ky + x * x))))
    return s if s <= n // 2 else -1


@njit(cache=True, inline="always")
def _multiplicity(n, x):
    return 1.0 if x == 0 or 2 * x == n else 2.0


@njit(cache=True)
def _half_shell_sum(v, n):
    """:func:`shell_sum` of a (nz, N, N//2+1) half-layout array (nz = 1 for 2D), one pass."""
    out = np.zeros(n // 2 + 1)
    nz = v.shape[0]
    for z in range(nz):
        for y in range(v.shape[1]):
            for x in range(v.shape[2]):
                s = _shell_of(n, z, y, x, nz)
                if s >= 0:
                    out[s] += _multiplicity(n, x) * v[z, y, x]
    return out


@njit(cache=True)
def _half_fsc_sums(f1, f2, n):
    """Shell sums of Re(f1 f2*), |f1|^2 and |f2|^2 over (nz, N, N//2+1) half-layout transforms, one pass."""
    m = n // 2 + 1
    num = np.zeros(m)
    d1 = np.zeros(m)
    d2 = np.zeros(m)
    nz = f1.shape[0]
    for z in range(nz):
        for y in range(f1.shape[1]):
            for x in range(f1.shape[2]):
                s = _shell_of(n, z, y, x, nz)
                if s >= 0:
                    w = _multiplicity(n, x)
                    a = f1[z, y, x]
                    b = f2[z, y, x]
                    num[s] += w * (a.real * b.real + a.imag * b.imag)
                    d1[s] += w * (a.real * a.real + a.imag * a.imag)
                    d2[s] += w * (b.real * b.real + b.imag * b.imag)
    return num, d1, d2


def half_fsc_sums(f1: np.ndarray, f2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per shell: ``sum Re(f1 f2*)``, ``sum |f1|^2``, ``sum |f2|^2`` of two half-layout transforms (2D or 3D).

    The three :func:`shell_sum` calls of an FSC in one pass (numba), float64.

    Parameters
    ----------
    f1, f2 : numpy.ndarray, complex, shape (N, N//2+1) or (N, N, N//2+1)

    Returns
    -------
    (numpy.ndarray, numpy.ndarray, numpy.ndarray), each of length N//2+1

    Examples
    --------
    >>> f = np.fft.rfftn(np.random.default_rng(0).normal(size=(8, 8, 8)))
    >>> num, d1, d2 = half_fsc_sums(f, f)
    >>> bool(np.allclose(num, shell_sum(np.abs(f) ** 2)) and np.allclose(d1, d2))
    True
    """
    a = np.asarray(f1)
    b = np.asarray(f2)
    n = a.shape[0]
    a3 = a[None] if a.ndim == 2 else a
    b3 = b[None] if b.ndim == 2 else b
    return _half_fsc_sums(np.ascontiguousarray(a3), np.ascontiguousarray(b3), n)


def shell_sum(values: np.ndarray, n: int | None = None, half: bool = True) -> np.ndarray:
    """Sum of ``values`` (a Fourier-grid array) per shell, float64, length N//2+1.

    >>> float(shell_sum(np.ones((8, 8, 5)))[0]), float(shell_sum(np.ones((8, 5))).sum())
    (1.0, 59.0)
    """
    values = np.asarray(values)
    n = values.shape[0] if n is None else n
    if (half and values.ndim in (2, 3) and values.shape[-1] == n // 2 + 1 and values.shape[-2] == n
            and (values.ndim == 2 or values.shape[0] == n) and not np.iscomplexobj(values)):
        v = values[None] if values.ndim == 2 else values
        return _half_shell_sum(np.ascontiguousarray(v), n)
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

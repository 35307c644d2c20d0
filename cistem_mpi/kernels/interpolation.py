"""Interpolation kernels on a half-stored 3D Fourier grid (numba), and their
gridding (apodisation) correction.

The 3D transform of a real, padded volume of size P is stored in the rfft half
layout ``F[kz, ky, kx]``, shape ``(P, P, P//2 + 1)``: kx = 0..P//2, ky and kz
in ``fftfreq`` order.  A value at any integer frequency (x, y, z) is found by
periodic reduction of x into ``[-P/2, P/2)`` and, for x < 0, Friedel symmetry
``F(-k) = conj F(k)`` -- :func:`locate`.

Methods (``method`` argument everywhere):

* ``"nearest"`` -- 1 tap,
* ``"linear"``  -- trilinear, 2 taps per axis (cisTEM's
  ``ReturnLinearInterpolatedFourier``),
* ``"cubic"``   -- Keys cubic convolution (a = -0.5), 4 taps per axis; more
  accurate, 8x the work.

Interpolating in Fourier space multiplies the real-space object by the
kernel's continuous Fourier transform (evaluated at x / P); dividing the
volume by :func:`apodization_1d` (per axis) before the FFT (projection) or
after the inverse FFT (reconstruction) undoes it ("gridding correction").
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["METHODS", "method_code", "apodization_1d", "apodization_3d", "kernel_1d", "tap_weights", "n_taps",
           "locate"]

METHODS = {"nearest": 0, "linear": 1, "cubic": 2}


def method_code(method: str) -> int:
    """Integer code of an interpolation method name (ValueError if unknown)."""
    try:
        return METHODS[method]
    except KeyError:
        raise ValueError(f"unknown interpolation method {method!r}; use one of {sorted(METHODS)}") from None


def kernel_1d(method: str, u: np.ndarray) -> np.ndarray:
    """The 1D interpolation kernel h(u) (u in grid units), vectorised."""
    u = np.abs(np.asarray(u, dtype=np.float64))
    if method == "nearest":
        return (u < 0.5).astype(np.float64) + 0.5 * (u == 0.5)
    if method == "linear":
        return np.clip(1.0 - u, 0.0, None)
    if method == "cubic":
        a = -0.5
        out = np.zeros_like(u)
        m1 = u <= 1
        m2 = (u > 1) & (u < 2)
        out[m1] = (a + 2) * u[m1] ** 3 - (a + 3) * u[m1] ** 2 + 1
        out[m2] = a * u[m2] ** 3 - 5 * a * u[m2] ** 2 + 8 * a * u[m2] - 4 * a
        return out
    raise ValueError(f"unknown interpolation method {method!r}")


def apodization_1d(n: int, padded_size: int, method: str) -> np.ndarray:
    """Real-space attenuation caused by Fourier interpolation, per axis.

    Value at voxel ``i`` (0..n-1) of an n-box centred at ``n//2``: the
    continuous Fourier transform of the kernel at ``(i - n//2) / P``:
    ``sinc`` (nearest), ``sinc^2`` (linear), numerically integrated (cubic).
    """
    f = (np.arange(n, dtype=np.float64) - n // 2) / float(padded_size)
    if method == "nearest":
        return np.sinc(f)
    if method == "linear":
        return np.sinc(f) ** 2
    if method == "cubic":
        # H(f) = 2 * int_0^2 h(u) cos(2 pi f u) du, Simpson-like fine sum.
        u = np.linspace(0.0, 2.0, 4001)
        h = kernel_1d("cubic", u)
        wts = np.full(u.size, u[1] - u[0])
        wts[0] = wts[-1] = 0.5 * (u[1] - u[0])
        return 2.0 * (np.cos(2 * np.pi * f[:, None] * u[None, :]) * (h * wts)[None, :]).sum(1)
    raise ValueError(f"unknown interpolation method {method!r}")


def apodization_3d(n: int, padded_size: int, method: str) -> np.ndarray:
    """Separable 3D apodisation ``a(z) a(y) a(x)`` for an n-cube, float32."""
    a = apodization_1d(n, padded_size, method)
    return (a[:, None, None] * a[None, :, None] * a[None, None, :]).astype(np.float32)


# --------------------------------------------------------------------------
# numba helpers shared by projection and backprojection (public: inlined into their loops)
# --------------------------------------------------------------------------

@njit(cache=True, inline="always")
def tap_weights(method: int, t: float, w: np.ndarray) -> int:
    """Fill ``w`` with the tap weights of coordinate ``t``; return the first tap index.

    Parameters
    ----------
    method : int
        :func:`method_code` of the interpolation (0 nearest, 1 linear, 2 cubic).
    t : float
        Coordinate along one axis (grid units).
    w : numpy.ndarray
        At least :func:`n_taps` floats; overwritten.

    Returns
    -------
    int
        Index of the first tap; tap ``i`` sits at ``first + i`` with weight ``w[i]``.

    >>> w = np.zeros(4); tap_weights(1, 2.25, w), w[:2].tolist()
    (2, [0.75, 0.25])
    """
    if method == 1:
        b = np.floor(t)
        f = t - b
        w[0] = 1.0 - f
        w[1] = f
        return int(b)
    if method == 0:
        b = np.floor(t + 0.5)
        w[0] = 1.0
        return int(b)
    # Keys cubic, a = -0.5
    b = np.floor(t)
    f = t - b
    a = -0.5
    d0 = 1.0 + f
    d1 = f
    d2 = 1.0 - f
    d3 = 2.0 - f
    w[0] = a * d0 * d0 * d0 - 5 * a * d0 * d0 + 8 * a * d0 - 4 * a
    w[1] = (a + 2) * d1 * d1 * d1 - (a + 3) * d1 * d1 + 1
    w[2] = (a + 2) * d2 * d2 * d2 - (a + 3) * d2 * d2 + 1
    w[3] = a * d3 * d3 * d3 - 5 * a * d3 * d3 + 8 * a * d3 - 4 * a
    return int(b) - 1


@njit(cache=True, inline="always")
def n_taps(method: int) -> int:
    """Taps per axis of :func:`method_code` ``method`` (1, 2 or 4).

    >>> n_taps(2)
    4
    """
    if method == 0:
        return 1
    if method == 1:
        return 2
    return 4


@njit(cache=True, inline="always")
def locate(x: int, y: int, z: int, p: int, half: int):
    """Stored (z, y, x) index of integer frequency (x, y, z) and a conj flag.

    Parameters
    ----------
    x, y, z : int
        Integer frequency on the padded grid of edge ``p``.
    p : int
        Padded grid size.
    half : int
        ``p // 2``.

    Returns
    -------
    (int, int, int, bool)
        Index ``(z, y, x)`` into the half-stored array and whether the value there must be conjugated.

    >>> locate(-1, 2, 0, 8, 4)
    (0, 6, 1, True)

    ``half`` is ``p // 2``.  x is reduced periodically into [-half, p-half);
    negative x is mapped through Friedel symmetry.
    """
    # conditional wrapping instead of %: coordinates are within a period or
    # two of the origin, and this is the innermost loop of every projector
    xr = x
    while xr >= p - half:
        xr -= p
    while xr < -half:
        xr += p
    conj = False
    if xr < 0:
        xr = -xr
        y = -y
        z = -z
        conj = True
    while y < 0:
        y += p
    while y >= p:
        y -= p
    while z < 0:
        z += p
    while z >= p:
        z -= p
    return z, y, xr, conj

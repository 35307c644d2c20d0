"""Sub-pixel translations by Fourier phase shifts.

Sign convention (cisTEM's ``Image::PhaseShift``): ``phase_shift(f, dx, dy)``
multiplies ``F(k)`` by ``exp(-2 pi i (kx dx / nx + ky dy / ny))``, which
*moves the image content by* ``(+dx, +dy)`` pixels.

Particle shifts: a cisTEM particle with .par ``SHX, SHY`` (Å) is the
reference projection moved by ``(+SHX, +SHY) / pixel_size``; so a simulator
makes it with ``phase_shift(proj, shx/ps, shy/ps)`` and refinement/
reconstruction centres it with ``phase_shift(img, -shx/ps, -shy/ps)`` (as
cisTEM's reconstruct3d does).  RELION's particle sits at ``-rlnOrigin``:
``SHX = -rlnOriginXAngst``.  Proven on RELION's own shifted projections in
tests/test_kernels_projection.py.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from cistem_mpi.kernels import fft as _fft
from cistem_mpi.kernels.grids import fourier_grid_2d

__all__ = ["phase_shift", "shift_image", "shift_phases", "centred_shifted"]


def shift_phases(ny: int, dx: np.ndarray | float, dy: np.ndarray | float, nx: int | None = None,
                 half: bool = True) -> np.ndarray:
    """Phase factors ``exp(-2 pi i (kx dx/nx + ky dy/ny))`` on a Fourier grid.

    ``dx``, ``dy`` may be arrays of length n (one shift per image): the result
    then has shape (n, ny, nx//2+1).
    """
    nx = ny if nx is None else nx
    fy, fx = fourier_grid_2d(ny, nx, half=half)
    dx = np.asarray(dx, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    # separable: exp(a + b) = exp(a) exp(b), so n (ny + nx) complex exponentials instead of n ny nx
    ex = np.exp(-2j * np.pi * fx.astype(np.float64)[0] * dx[..., None])  # (..., nx')
    ey = np.exp(-2j * np.pi * fy.astype(np.float64)[:, 0] * dy[..., None])  # (..., ny)
    return (ey[..., :, None] * ex[..., None, :]).astype(np.complex64)


def phase_shift(f: np.ndarray, dx: np.ndarray | float, dy: np.ndarray | float,
                nx: int | None = None) -> np.ndarray:
    """Shift centred half-layout FT(s) ``f`` (..., ny, nx//2+1) by (dx, dy) pixels.

    Content moves by ``+dx, +dy``.  Per-image shifts: pass arrays matching
    the leading axis of a stack.  ``nx`` defaults to ``ny`` when that fits the
    width (square images, odd boxes included), else ``2 * (width - 1)``.
    """
    f = np.asarray(f)
    ny = f.shape[-2]
    if nx is None:  # square images when that fits the width (odd boxes too), as ift2 infers it
        nx = ny if ny // 2 + 1 == f.shape[-1] else 2 * (f.shape[-1] - 1)
    if f.shape[-1] != nx // 2 + 1:
        raise ValueError("nx does not match the half-layout width")
    return (f * shift_phases(ny, dx, dy, nx=nx)).astype(np.complex64)


@njit(cache=True)
def _centre_shift(f, dx, dy, scale, nx, out):
    """``out[i] = scale[i] * f[i] * exp(-2 pi i (kx dx[i] / nx + ky dy[i] / ny))``, separable factors."""
    ny = f.shape[1]
    nxh = f.shape[2]
    ex = np.empty(nxh, dtype=np.complex128)
    ey = np.empty(ny, dtype=np.complex128)
    for i in range(f.shape[0]):
        for x in range(nxh):
            a = -2.0 * np.pi * x * dx[i] / nx
            ex[x] = complex(np.cos(a), np.sin(a)) * scale[i]
        for y in range(ny):
            ky = y if y < (ny + 1) // 2 else y - ny
            a = -2.0 * np.pi * ky * dy[i] / ny
            ey[y] = complex(np.cos(a), np.sin(a))
        for y in range(ny):
            for x in range(nxh):
                out[i, y, x] = f[i, y, x] * (ey[y] * ex[x])


def centred_shifted(f: np.ndarray, dx: np.ndarray, dy: np.ndarray, scale: np.ndarray | None = None,
                    nx: int | None = None) -> np.ndarray:
    """The centred transforms of :func:`~cistem_mpi.kernels.fft.ft2` from plain ones, moved by (dx, dy) and scaled.

    ``f`` holds ``rfftn`` of images as stored (no centring); the result is
    ``scale * phase_shift(ft2(images), dx, dy)``: the centring (the box
    centre ``N // 2`` moved to the origin) is the shift ``-N // 2``, folded
    into the same phase factors, so it costs no pass over the images.

    Parameters
    ----------
    f : numpy.ndarray, complex, shape (n, ny, nx//2+1)
        Uncentred half-layout transforms.
    dx, dy : numpy.ndarray, shape (n,)
        Shifts in pixels (content moves by ``+dx, +dy``).
    scale : numpy.ndarray, shape (n,), optional
        Factor per image (default 1).
    nx : int, optional
        Real x size (default as :func:`phase_shift`).

    Returns
    -------
    numpy.ndarray, complex64, shape of ``f``

    Examples
    --------
    >>> img = np.random.default_rng(0).normal(size=(2, 8, 8)).astype(np.float32)
    >>> got = centred_shifted(_fft.rfftn(img, axes=(-2, -1)), np.array([0.3, -1.0]), np.array([2.0, 0.5]))
    >>> ref = phase_shift(_fft.ft2(img), np.array([0.3, -1.0]), np.array([2.0, 0.5]))
    >>> bool(np.allclose(got, ref, atol=1e-5))
    True
    """
    f = np.ascontiguousarray(f, dtype=np.complex64)
    n, ny, w = f.shape
    if nx is None:
        nx = ny if ny // 2 + 1 == w else 2 * (w - 1)
    if w != nx // 2 + 1:
        raise ValueError("nx does not match the half-layout width")
    scale = np.ones(n) if scale is None else np.asarray(scale, dtype=np.float64)
    # centring: content moves by -(N // 2) in both axes (numpy.fft.ifftshift)
    sx = np.ascontiguousarray(np.broadcast_to(np.asarray(dx, dtype=np.float64), (n,))) - nx // 2
    sy = np.ascontiguousarray(np.broadcast_to(np.asarray(dy, dtype=np.float64), (n,))) - ny // 2
    out = np.empty_like(f)
    _centre_shift(f, sx, sy, np.ascontiguousarray(np.broadcast_to(scale, (n,))), nx, out)
    return out


def shift_image(img: np.ndarray, dx: np.ndarray | float, dy: np.ndarray | float) -> np.ndarray:
    """Real-space image(s) moved by ``(+dx, +dy)`` pixels (periodic, Fourier)."""
    img = np.asarray(img, dtype=np.float32)
    nx = img.shape[-1]
    return _fft.ift2(phase_shift(_fft.ft2(img), dx, dy, nx=nx), nx=nx).astype(np.float32)

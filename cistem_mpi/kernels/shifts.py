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

from cistem_mpi.kernels import fft as _fft
from cistem_mpi.kernels.grids import fourier_grid_2d

__all__ = ["phase_shift", "shift_image", "shift_phases"]


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
    the leading axis of a stack.
    """
    f = np.asarray(f)
    ny = f.shape[-2]
    nx = 2 * (f.shape[-1] - 1) if nx is None else nx
    if f.shape[-1] != nx // 2 + 1:
        raise ValueError("nx does not match the half-layout width")
    return (f * shift_phases(ny, dx, dy, nx=nx)).astype(np.complex64)


def shift_image(img: np.ndarray, dx: np.ndarray | float, dy: np.ndarray | float) -> np.ndarray:
    """Real-space image(s) moved by ``(+dx, +dy)`` pixels (periodic, Fourier)."""
    img = np.asarray(img, dtype=np.float32)
    nx = img.shape[-1]
    return _fft.ift2(phase_shift(_fft.ft2(img), dx, dy, nx=nx), nx=nx).astype(np.float32)

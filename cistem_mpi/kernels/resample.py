"""Fourier cropping / padding (binning, up-sampling) and real-space crop/pad.

All functions keep the centre at index ``N//2`` and keep the mean value
(a binned image has the same mean density as the original).  Fourier
cropping to size m of an n-box changes the pixel size by ``n / m``.
"""

from __future__ import annotations

import numpy as np

from cistem_mpi.kernels import fft as _fft

__all__ = ["fourier_crop", "fourier_pad", "fourier_resize", "crop_center", "pad_center", "bin_image"]


def _centered_full_ft(a: np.ndarray) -> np.ndarray:
    axes = tuple(range(a.ndim))
    return np.fft.fftshift(_fft.fftn(np.fft.ifftshift(a).astype(np.complex64)), axes=axes)


def _real_from_centered_ft(f: np.ndarray) -> np.ndarray:
    return np.real(np.fft.fftshift(_fft.ifftn(np.fft.ifftshift(f)))).astype(np.float32)


def fourier_resize(a: np.ndarray, new_shape: tuple[int, ...]) -> np.ndarray:
    """Crop or zero-pad the centred Fourier transform of ``a`` to ``new_shape``.

    Works per axis (crop on some, pad on others is allowed); 2D or 3D.
    """
    a = np.asarray(a, dtype=np.float32)
    if len(new_shape) != a.ndim:
        raise ValueError("new_shape must have one size per axis")
    f = _centered_full_ft(a)
    out = np.zeros(new_shape, dtype=np.complex64)
    src, dst = [], []
    for n_old, n_new in zip(a.shape, new_shape):
        m = min(n_old, n_new)
        o_old = n_old // 2 - m // 2
        o_new = n_new // 2 - m // 2
        src.append(slice(o_old, o_old + m))
        dst.append(slice(o_new, o_new + m))
    out[tuple(dst)] = f[tuple(src)]
    scale = float(np.prod(new_shape)) / float(a.size)
    return _real_from_centered_ft(out) * np.float32(scale)


def fourier_crop(a: np.ndarray, new_size: int | tuple[int, ...]) -> np.ndarray:
    """Bin by Fourier cropping to ``new_size`` (int: every axis)."""
    a = np.asarray(a)
    shape = (new_size,) * a.ndim if np.isscalar(new_size) else tuple(new_size)
    if any(s > o for s, o in zip(shape, a.shape)):
        raise ValueError("fourier_crop cannot enlarge; use fourier_pad")
    return fourier_resize(a, shape)


def fourier_pad(a: np.ndarray, new_size: int | tuple[int, ...]) -> np.ndarray:
    """Up-sample by zero-padding the transform to ``new_size`` (int: every axis)."""
    a = np.asarray(a)
    shape = (new_size,) * a.ndim if np.isscalar(new_size) else tuple(new_size)
    if any(s < o for s, o in zip(shape, a.shape)):
        raise ValueError("fourier_pad cannot shrink; use fourier_crop")
    return fourier_resize(a, shape)


def bin_image(a: np.ndarray, factor: float) -> np.ndarray:
    """Fourier-bin by ``factor`` (>= 1); output sizes are ``round(n / factor)``."""
    a = np.asarray(a)
    shape = tuple(max(1, int(round(s / factor))) for s in a.shape)
    return fourier_crop(a, shape)


def crop_center(a: np.ndarray, new_size: int | tuple[int, ...]) -> np.ndarray:
    """Real-space crop keeping the centre voxel ``N//2`` at ``M//2``."""
    a = np.asarray(a)
    shape = (new_size,) * a.ndim if np.isscalar(new_size) else tuple(new_size)
    sl = tuple(slice(n // 2 - m // 2, n // 2 - m // 2 + m) for n, m in zip(a.shape, shape))
    return a[sl].copy()


def pad_center(a: np.ndarray, new_size: int | tuple[int, ...], value: float = 0.0) -> np.ndarray:
    """Real-space pad keeping the centre voxel ``N//2`` at ``M//2``."""
    a = np.asarray(a)
    shape = (new_size,) * a.ndim if np.isscalar(new_size) else tuple(new_size)
    out = np.full(shape, value, dtype=a.dtype)
    sl = tuple(slice(m // 2 - n // 2, m // 2 - n // 2 + n) for n, m in zip(a.shape, shape))
    out[sl] = a
    return out

"""Fourier filters with cosine edges: low-pass, high-pass, band-pass, B-factor.

Cut-offs are spatial frequencies in cycles per pixel (0 .. 0.5); to use Å,
pass ``pixel_size / resolution``.  The cosine edge of width ``width``
(cycles/pixel) is centred on the cut-off, like the masks: a low-pass keeps
1 below ``cutoff - width/2`` and 0 above ``cutoff + width/2``.
"""

from __future__ import annotations

import numpy as np

from cistem_mpi.kernels import fft as _fft
from cistem_mpi.kernels.grids import fourier_grid_2d, fourier_grid_3d
from cistem_mpi.kernels.masks import cosine_edge

__all__ = ["frequency_radius", "lowpass_profile", "highpass_profile", "bandpass_profile",
           "lowpass", "highpass", "bandpass", "apply_bfactor", "filter_ft"]


def frequency_radius(shape: tuple[int, ...], half: bool = True) -> np.ndarray:
    """|k| in cycles/pixel on the Fourier grid of a real array of ``shape`` (2D or 3D, square)."""
    if len(shape) == 2:
        fy, fx = fourier_grid_2d(shape[0], shape[1], half=half)
        return np.sqrt(fy * fy + fx * fx)
    if len(shape) == 3:
        fz, fy, fx = fourier_grid_3d(shape[0], half=half)
        return np.sqrt(fz * fz + fy * fy + fx * fx)
    raise ValueError(f"need a 2D or 3D shape, got {shape}")


def lowpass_profile(freq: np.ndarray, cutoff: float, width: float = 0.0) -> np.ndarray:
    """1 below the cut-off, cosine edge, 0 above."""
    return cosine_edge(freq, cutoff, width)


def highpass_profile(freq: np.ndarray, cutoff: float, width: float = 0.0) -> np.ndarray:
    """0 below the cut-off, cosine edge, 1 above."""
    return (1.0 - cosine_edge(freq, cutoff, width)).astype(np.float32)


def bandpass_profile(freq: np.ndarray, low: float, high: float, width: float = 0.0) -> np.ndarray:
    """Pass ``low .. high`` (cycles/pixel); ``low = 0`` means no high-pass."""
    prof = lowpass_profile(freq, high, width)
    if low > 0:
        prof = prof * highpass_profile(freq, low, width)
    return prof.astype(np.float32)


def filter_ft(ft: np.ndarray, profile: np.ndarray) -> np.ndarray:
    """Multiply a half-layout transform by a real profile (broadcast)."""
    return (ft * profile).astype(ft.dtype)


def _apply(data: np.ndarray, prof_fn, is_volume: bool | None = None) -> np.ndarray:
    data = np.asarray(data, dtype=np.float32)
    if is_volume is None:
        is_volume = data.ndim == 3 and data.shape[0] == data.shape[1] == data.shape[2]
    if is_volume and (data.ndim != 3 or len(set(data.shape)) != 1):
        raise ValueError(f"a volume must be a cube, got {data.shape}")
    shape = data.shape if is_volume else data.shape[-2:]
    if len(shape) == 3:
        f = _fft.ftn(data)
        return _fft.iftn(f * prof_fn(frequency_radius(shape)), nx=shape[-1]).astype(np.float32)
    f = _fft.ft2(data)
    return _fft.ift2(f * prof_fn(frequency_radius(shape)), nx=shape[-1]).astype(np.float32)


def lowpass(data: np.ndarray, cutoff: float, width: float = 0.0, is_volume: bool | None = None) -> np.ndarray:
    """Low-pass an image, an image stack ``(n, y, x)`` or a cubic volume.

    By default a 3D array with three equal sides is treated as a volume and
    any other 3D array as a stack of 2D images; pass ``is_volume`` to say
    which (a stack of 32 images of 32 x 32 needs ``is_volume=False``).
    """
    return _apply(data, lambda f: lowpass_profile(f, cutoff, width), is_volume)


def highpass(data: np.ndarray, cutoff: float, width: float = 0.0, is_volume: bool | None = None) -> np.ndarray:
    """High-pass (see :func:`lowpass` for the accepted shapes)."""
    return _apply(data, lambda f: highpass_profile(f, cutoff, width), is_volume)


def bandpass(data: np.ndarray, low: float, high: float, width: float = 0.0,
             is_volume: bool | None = None) -> np.ndarray:
    """Band-pass (see :func:`lowpass` for the accepted shapes)."""
    return _apply(data, lambda f: bandpass_profile(f, low, high, width), is_volume)


def apply_bfactor(data: np.ndarray, bfactor: float, pixel_size: float, is_volume: bool | None = None) -> np.ndarray:
    """Multiply the transform by ``exp(-B g^2 / 4)`` (g in 1/Å); B < 0 sharpens."""
    return _apply(data, lambda f: np.exp(-bfactor * (f / pixel_size) ** 2 / 4.0).astype(np.float32), is_volume)

"""Fourier shell correlation and resolution estimates.

``FSC(s) = sum Re(F1 F2*) / sqrt(sum |F1|^2 * sum |F2|^2)`` over shell s,
computed on the rfft half layout with Friedel multiplicities so that it
equals the FSC over the full transform.
"""

from __future__ import annotations

import numpy as np

from cistem_mpi.kernels import fft as _fft
from cistem_mpi.kernels.radial import half_fsc_sums, shell_frequencies

__all__ = ["fsc", "fsc_ft", "resolution_at", "part_fsc_to_ssnr"]


def fsc_ft(f1: np.ndarray, f2: np.ndarray) -> np.ndarray:
    """FSC of two half-layout transforms (2D: FRC) of the same box; length N//2+1."""
    num, d1, d2 = half_fsc_sums(f1, f2)
    den = np.sqrt(d1 * d2)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def fsc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """FSC (3D) or FRC (2D) of two real maps, optionally after multiplying by ``mask``.

    Returns
    -------
    freq : ndarray
        Shell frequencies in cycles/pixel (divide by the pixel size for 1/Å).
    curve : ndarray
        Correlation per shell.
    """
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    if a.shape != b.shape:
        raise ValueError(f"maps differ in shape: {a.shape} vs {b.shape}")
    if mask is not None:
        a, b = a * mask, b * mask
    tf = _fft.ftn if a.ndim == 3 else _fft.ft2
    return shell_frequencies(a.shape[0]), fsc_ft(tf(a), tf(b))


def resolution_at(freq: np.ndarray, curve: np.ndarray, threshold: float = 0.143,
                  pixel_size: float = 1.0) -> float:
    """Resolution (Å) where ``curve`` first drops below ``threshold``.

    Linear interpolation between the shells around the crossing; if it
    never drops, the Nyquist resolution ``2 * pixel_size`` is returned.
    Shell 0 is ignored.
    """
    for i in range(1, len(curve)):
        if curve[i] < threshold:
            f0, f1 = freq[i - 1], freq[i]
            c0, c1 = curve[i - 1], curve[i]
            f = f1 if c0 == c1 else f0 + (c0 - threshold) * (f1 - f0) / (c0 - c1)
            return float(pixel_size / f) if f > 0 else float("inf")
    return float(pixel_size / freq[-1])


def part_fsc_to_ssnr(curve: np.ndarray) -> np.ndarray:
    """Spectral SNR of the full data from the half-map FSC: ``2 FSC / (1 - FSC)``."""
    c = np.clip(np.asarray(curve, dtype=np.float64), -0.999, 0.999)
    return np.maximum(2.0 * c / (1.0 - c), 0.0)

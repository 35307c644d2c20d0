"""Power spectra of images: whole-image, tile-averaged (periodogram), radial.

The power spectrum is ``|F|^2 / (ny * nx)`` (so white noise of variance s^2
has a flat spectrum at s^2), returned centred (DC at ``[N//2, N//2]``)
in the full layout, which is what the CTF fitter and the diagnostic pictures
want.
"""

from __future__ import annotations

import numpy as np

from cistem_mpi.kernels import fft as _fft
from cistem_mpi.kernels.radial import shell_average

__all__ = ["power_spectrum", "tiled_power_spectrum", "radial_power", "amplitude_for_display"]


def power_spectrum(img: np.ndarray, subtract_mean: bool = True) -> np.ndarray:
    """Centred full-layout power spectrum ``|F|^2 / npix`` of a 2D image (float32)."""
    img = np.asarray(img, dtype=np.float32)
    if subtract_mean:
        img = img - img.mean()
    f = _fft.fftn(img.astype(np.complex64))
    return np.fft.fftshift((np.abs(f) ** 2) / img.size).astype(np.float32)


def tiled_power_spectrum(img: np.ndarray, box: int, overlap: float = 0.5,
                         taper: bool = True) -> np.ndarray:
    """Average power spectrum of ``box`` x ``box`` tiles (Welch periodogram).

    Tiles step by ``box * (1 - overlap)``; each is mean-subtracted and, with
    ``taper``, multiplied by a 2D Hann window (normalised to keep the noise
    level) to suppress edge artefacts.  Returns a centred (box, box) float32.
    """
    img = np.asarray(img, dtype=np.float32)
    ny, nx = img.shape
    if box > min(ny, nx):
        raise ValueError(f"tile size {box} larger than the image {img.shape}")
    step = max(1, int(box * (1.0 - overlap)))
    win = np.ones((box, box), dtype=np.float32)
    if taper:
        h = np.hanning(box).astype(np.float32)
        win = np.outer(h, h)
        win /= np.sqrt((win ** 2).mean())
    acc = np.zeros((box, box), dtype=np.float64)
    count = 0
    for y in range(0, ny - box + 1, step):
        for x in range(0, nx - box + 1, step):
            t = img[y:y + box, x:x + box]
            t = (t - t.mean()) * win
            f = _fft.fftn(t.astype(np.complex64))
            acc += np.abs(f) ** 2
            count += 1
    return np.fft.fftshift(acc / (count * box * box)).astype(np.float32)


def radial_power(img: np.ndarray) -> np.ndarray:
    """Rotationally averaged power per Fourier shell (N//2+1 values) of a square image."""
    img = np.asarray(img, dtype=np.float32)
    f = _fft.ft2(img - img.mean())
    return shell_average(np.abs(f) ** 2 / img.size)


def amplitude_for_display(spectrum: np.ndarray, clip_sigma: float = 3.0) -> np.ndarray:
    """log(spectrum) scaled to 0..1 with outliers clipped (for PNG diagnostics)."""
    s = np.log(np.maximum(np.asarray(spectrum, dtype=np.float64), 1e-30))
    m, sd = s.mean(), s.std()
    lo, hi = m - clip_sigma * sd, m + clip_sigma * sd
    return np.clip((s - lo) / max(hi - lo, 1e-12), 0.0, 1.0).astype(np.float32)

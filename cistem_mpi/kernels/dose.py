"""Exposure (dose) weighting of movie frames, Grant & Grigorieff (2015).

The critical exposure of a spatial frequency ``k`` (1/Å) at 300 kV is

    N_e(k) = a k^b + c,   a = 0.24499, b = -1.6649, c = 2.8141  (e/Å²)

(eLife 2015;4:e06980, fit to the fading of rotavirus VP6 amplitudes).  At
other voltages cisTEM (``src/core/electron_dose.cpp``) multiplies ``N_e`` by
a voltage scaling factor: 1 at 300 kV, 0.8 at 200 kV and 0.532 at 100 kV; any
other voltage is refused.  The amplitude of frame ``i`` is weighted by

    q_i(k) = exp(-N_i / (2 N_e(k)))

with ``N_i = pre_exposure + (i + 1) * exposure_per_frame`` the exposure at
the *end* of the frame (as cisTEM's unblur); the weight at k = 0 is 1.
"Restore noise power" divides the weighted sum by ``sqrt(sum_i q_i(k)^2)``
so that the noise power of the sum is that of an unweighted sum of frames
with unit weights (cisTEM's unblur, ``should_restore_power``).

Filters are given on the rfft half layout of an ``(ny, nx)`` image (no
centring: frequency 0 at index ``[0, 0]``, rows in ``numpy.fft.fftfreq``
order), which is what :mod:`cistem_mpi.kernels.motion` works with.
"""

from __future__ import annotations

import numpy as np

from cistem_mpi.kernels.grids import fourier_grid_2d

__all__ = [
    "CRITICAL_EXPOSURE_A", "CRITICAL_EXPOSURE_B", "CRITICAL_EXPOSURE_C",
    "voltage_scaling_factor", "critical_exposure", "dose_filter", "frame_exposures",
    "DoseWeighter",
]

CRITICAL_EXPOSURE_A = 0.24499
CRITICAL_EXPOSURE_B = -1.6649
CRITICAL_EXPOSURE_C = 2.8141

_VOLTAGES = ((300.0, 1.0), (200.0, 0.8), (100.0, 0.532))


def voltage_scaling_factor(voltage: float) -> float:
    """cisTEM's scaling of the critical exposure for an acceleration voltage (kV).

    Parameters
    ----------
    voltage : float
        Acceleration voltage in kV; must be within 1 kV of 300, 200 or 100.

    Returns
    -------
    float
        1.0, 0.8 or 0.532.

    Raises
    ------
    ValueError
        Any other voltage (no published curve).

    >>> voltage_scaling_factor(200)
    0.8
    """
    v = float(voltage)
    for nominal, factor in _VOLTAGES:
        if abs(v - nominal) < 1.0:
            return factor
    raise ValueError(f"dose weighting is defined at 300, 200 and 100 kV only, not {v:g} kV")


def critical_exposure(k: np.ndarray | float, voltage: float = 300.0) -> np.ndarray:
    """Critical exposure N_e (e/Å²) at spatial frequency ``k`` (1/Å).

    >>> round(float(critical_exposure(0.25)), 3)
    5.277
    """
    k = np.asarray(k, dtype=np.float64)
    with np.errstate(divide="ignore"):
        ne = CRITICAL_EXPOSURE_A * np.power(k, CRITICAL_EXPOSURE_B) + CRITICAL_EXPOSURE_C
    return ne * voltage_scaling_factor(voltage)


def _k_grid(shape: tuple[int, int], pixel_size: float) -> np.ndarray:
    ny, nx = int(shape[0]), int(shape[1])
    fy, fx = (f / pixel_size for f in fourier_grid_2d(ny, nx, dtype=np.float64))
    return np.sqrt(fx * fx + fy * fy)


def dose_filter(shape: tuple[int, int], pixel_size: float, exposure: float,
                voltage: float = 300.0) -> np.ndarray:
    """Weight ``exp(-exposure / (2 N_e(k)))`` on the rfft half layout of ``shape``.

    Parameters
    ----------
    shape : (ny, nx)
        Real-space image size.
    pixel_size : float
        Å per pixel.
    exposure : float
        Accumulated exposure (e/Å²) at the end of the frame.
    voltage : float
        kV (300, 200 or 100).

    Returns
    -------
    ndarray, float32, (ny, nx // 2 + 1); 1 at frequency 0.

    >>> float(dose_filter((4, 4), 1.0, 0.0).min())
    1.0
    """
    k = _k_grid(shape, pixel_size)
    k[0, 0] = 1.0
    ne = critical_exposure(k, voltage)
    q = np.exp(-float(exposure) / (2.0 * ne))
    q[0, 0] = 1.0
    return q.astype(np.float32)


def frame_exposures(n_frames: int, exposure_per_frame: float, pre_exposure: float = 0.0) -> np.ndarray:
    """Exposure at the end of each frame: ``pre + (i + 1) * per_frame``.

    >>> frame_exposures(3, 1.5, 0.5).tolist()
    [2.0, 3.5, 5.0]
    """
    return pre_exposure + exposure_per_frame * np.arange(1, n_frames + 1, dtype=np.float64)


class DoseWeighter:
    """Per-frame weights on one Fourier grid, and the restore-noise-power divisor.

    The critical exposure grid is computed once; ``weights(i)`` is then one
    ``exp`` per Fourier pixel.

    Parameters
    ----------
    shape : (ny, nx)
        Real-space size of the frames (after any output binning).
    pixel_size : float
        Å per pixel of those frames.
    exposure_per_frame, pre_exposure : float
        e/Å².
    voltage : float
        kV (300, 200 or 100; anything else raises ValueError).

    >>> w = DoseWeighter((8, 8), 1.0, 1.0)
    >>> float(w.weights(0)[0, 0])
    1.0
    """

    def __init__(self, shape: tuple[int, int], pixel_size: float, exposure_per_frame: float,
                 pre_exposure: float = 0.0, voltage: float = 300.0):
        k = _k_grid(shape, pixel_size)
        k[0, 0] = 1.0
        self._minus_half_over_ne = (-0.5 / critical_exposure(k, voltage)).astype(np.float32)
        self.exposure_per_frame = float(exposure_per_frame)
        self.pre_exposure = float(pre_exposure)
        self.sum_sq = np.zeros(k.shape, dtype=np.float64)

    def exposure(self, frame: int) -> float:
        """Exposure (e/Å²) at the end of frame ``frame`` (0-based)."""
        return self.pre_exposure + (frame + 1) * self.exposure_per_frame

    def weights(self, frame: int, accumulate: bool = True) -> np.ndarray:
        """Weight of frame ``frame`` (0-based); adds its square to :attr:`sum_sq`."""
        n = self.exposure(frame)
        q = np.exp(self._minus_half_over_ne * np.float32(n))
        q[0, 0] = 1.0
        if accumulate:
            self.sum_sq += q.astype(np.float64) ** 2
        return q

    def restore_power_divisor(self) -> np.ndarray:
        """``sqrt(sum_i q_i^2)`` (1 where nothing was accumulated), float32."""
        d = np.sqrt(self.sum_sq)
        d[d == 0] = 1.0
        return d.astype(np.float32)

"""The contrast transfer function, evaluated the way cisTEM evaluates it.

cisTEM (``src/core/ctf.cpp``) computes, for a squared spatial frequency
``g2`` (1/Å²) at azimuth ``a`` (radians, ``atan2(gy, gx)``):

    defocus(a) = 0.5 * (df1 + df2 + cos(2 (a - angast)) * (df1 - df2))
    chi        = pi * lambda * g2 * (defocus(a) - 0.5 * lambda**2 * g2 * Cs)
                 + pshift + w
    w          = atan(Q / sqrt(1 - Q**2))      (pi/2 when Q ~ 1)
    CTF        = -sin(chi)

with lambda the relativistic electron wavelength (Å), Cs in Å
(mm * 1e7), defocus in Å (positive = underfocus), ``angast`` the
astigmatism angle of df1 from the x axis and ``pshift`` the extra phase
shift of a phase plate (radians).  cisTEM works in pixel units; the formula
is the same in Å units.  An optional B-factor envelope
``exp(-B * g2 / 4)`` multiplies the CTF (RELION's ``rlnCtfBfactor``
convention).

Unlike cisTEM's ``CTF::Evaluate`` the sentinel "both defoci zero means a
constant -0.7" is *not* reproduced: callers that want no CTF pass none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from cistem_mpi.errors import InputError
from cistem_mpi.kernels.grids import fourier_grid_2d

__all__ = [
    "electron_wavelength", "amplitude_contrast_phase", "ctf_phase", "ctf_1d",
    "ctf_2d", "ctf_2d_stack", "CTFParams",
]


def electron_wavelength(voltage_kv: float) -> float:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV.

    Same expression as cisTEM's ``WavelengthGivenAccelerationVoltage``:
    ``12.2639 / sqrt(V + 0.97845e-6 V^2)`` with V in volts.
    """
    v = 1000.0 * float(voltage_kv)
    return 12.2639 / np.sqrt(v + 0.97845e-6 * v * v)


def amplitude_contrast_phase(amplitude_contrast: float) -> float:
    """Phase term ``atan(Q / sqrt(1 - Q^2))`` of the amplitude contrast Q (radians)."""
    q = float(amplitude_contrast)
    if abs(q - 1.0) < 1e-3:
        return np.pi / 2.0
    return float(np.arctan(q / np.sqrt(1.0 - q * q)))


def ctf_phase(g2: np.ndarray, azimuth: np.ndarray, voltage: float, cs: float,
              amplitude_contrast: float, df1: float, df2: float, angast: float,
              pshift: float = 0.0) -> np.ndarray:
    """Phase aberration chi (radians) including the amplitude-contrast term.

    Parameters
    ----------
    g2 : array
        Squared spatial frequency (1/Å²).
    azimuth : array
        Azimuth of the frequency, radians, ``atan2(gy, gx)``.
    voltage : float
        kV.
    cs : float
        Spherical aberration, mm.
    amplitude_contrast : float
        Fraction 0..1.
    df1, df2 : float
        Defocus 1 and 2 in Å (underfocus positive).
    angast : float
        Astigmatism angle (degrees) of df1 from the x axis.
    pshift : float
        Additional phase shift (radians).
    """
    lam = electron_wavelength(voltage)
    cs_a = cs * 1.0e7
    g2 = np.asarray(g2, dtype=np.float64)
    defocus = _defocus_at(np.asarray(azimuth, dtype=np.float64), df1, df2, angast)
    return (np.pi * lam * g2 * (defocus - 0.5 * lam * lam * g2 * cs_a)
            + pshift + amplitude_contrast_phase(amplitude_contrast))


def _defocus_at(azimuth: np.ndarray | float, df1: float, df2: float, angast: float) -> np.ndarray | float:
    """Defocus (Å) along ``azimuth`` (radians) of an astigmatic CTF (``angast`` in degrees)."""
    return 0.5 * (df1 + df2 + np.cos(2.0 * (azimuth - np.deg2rad(angast))) * (df1 - df2))


def _ctf_values(g2: np.ndarray, azimuth: np.ndarray, voltage: float, cs: float, amplitude_contrast: float,
                df1: float, df2: float, angast: float, pshift: float, bfactor: float) -> np.ndarray:
    """``-sin(chi) * exp(-B g^2 / 4)`` in float32: the one evaluation every CTF function here uses."""
    out = -np.sin(ctf_phase(g2, azimuth, voltage, cs, amplitude_contrast, df1, df2, angast, pshift))
    if bfactor:
        out = out * np.exp(-bfactor * g2 / 4.0)
    return out.astype(np.float32)


def _frequency_grid(ny: int, nx: int | None, pixel_size: float, half: bool) -> tuple[np.ndarray, np.ndarray]:
    """Squared spatial frequency (1/Å²) and azimuth (radians) on a Fourier grid."""
    fy, fx = fourier_grid_2d(ny, nx, half=half)
    gy = fy.astype(np.float64) / pixel_size
    gx = fx.astype(np.float64) / pixel_size
    g2 = gx * gx + gy * gy
    az = np.arctan2(np.broadcast_to(gy, g2.shape), np.broadcast_to(gx, g2.shape))
    return g2, az


def ctf_1d(freq: np.ndarray, voltage: float, cs: float, amplitude_contrast: float,
           defocus: float, pshift: float = 0.0, bfactor: float = 0.0) -> np.ndarray:
    """Radial CTF at spatial frequencies ``freq`` (1/Å) for one defocus (Å).

    Returns float32 values of ``-sin(chi) * exp(-B g^2 / 4)``.
    """
    f = np.asarray(freq, dtype=np.float64)
    g2 = f * f
    return _ctf_values(g2, np.zeros_like(g2), voltage, cs, amplitude_contrast, defocus, defocus, 0.0, pshift,
                       bfactor)


def ctf_2d(ny: int, pixel_size: float, voltage: float, cs: float, amplitude_contrast: float,
           df1: float, df2: float, angast: float, pshift: float = 0.0, bfactor: float = 0.0,
           half: bool = True, nx: int | None = None) -> np.ndarray:
    """CTF on a Fourier grid (rfft half plane by default, or full fftfreq layout).

    Parameters
    ----------
    ny : int
        Image size in y (and x unless ``nx`` is given), pixels.
    pixel_size : float
        Å per pixel.
    voltage, cs, amplitude_contrast, df1, df2, angast, pshift
        See :func:`ctf_phase`.
    bfactor : float
        B-factor of the envelope ``exp(-B g^2/4)`` in Å² (0 = none).
    half : bool
        rfft half-plane layout ``(ny, nx//2+1)`` or full ``(ny, nx)``
        (``fftfreq`` order, un-shifted).

    Returns
    -------
    ndarray, float32
    """
    g2, az = _frequency_grid(ny, nx, pixel_size, half)
    return _ctf_values(g2, az, voltage, cs, amplitude_contrast, df1, df2, angast, pshift, bfactor)


@njit(cache=True, inline="always")
def _sin(x):
    """sin(x) for any float64 x to 1e-9: a reduction to [-pi/2, pi/2] and Taylor to x^15 (no call, so the
    loop around it vectorises; the CTF is stored as float32, whose rounding is 6e-8)."""
    r = x - 2.0 * np.pi * np.floor(x / (2.0 * np.pi) + 0.5)  # [-pi, pi]
    if r > 0.5 * np.pi:
        r = np.pi - r
    elif r < -0.5 * np.pi:
        r = -np.pi - r
    r2 = r * r
    # Horner form of r - r^3/3! + r^5/5! - ... - r^15/15!
    p = -1.0 / 1307674368000.0
    p = p * r2 + 1.0 / 6227020800.0
    p = p * r2 - 1.0 / 39916800.0
    p = p * r2 + 1.0 / 362880.0
    p = p * r2 - 1.0 / 5040.0
    p = p * r2 + 1.0 / 120.0
    p = p * r2 - 1.0 / 6.0
    return r + r * r2 * p


@njit(cache=True)
def _ctf_stack(g2, c2, s2, lam, cs_a, w, df1, df2, angast_rad, pshift, bfactor, out):
    """``-sin(chi) exp(-B g2/4)`` of image i at every grid point, into ``out[i]`` (float64 arithmetic).

    ``c2``, ``s2`` are ``cos 2a``, ``sin 2a`` of each point's azimuth ``a``: the astigmatic defocus
    uses ``cos 2(a - angast) = cos 2a cos 2angast + sin 2a sin 2angast``, so no point needs an
    ``atan2`` or a ``cos``, and the sine is :func:`_sin`.
    """
    for i in range(out.shape[0]):
        ca = np.cos(2.0 * angast_rad[i])
        sa = np.sin(2.0 * angast_rad[i])
        dsum = df1[i] + df2[i]
        ddif = df1[i] - df2[i]
        ph = pshift[i] + w
        for y in range(out.shape[1]):
            for x in range(out.shape[2]):
                q = g2[y, x]
                d = 0.5 * (dsum + (c2[y, x] * ca + s2[y, x] * sa) * ddif)
                out[i, y, x] = -_sin(np.pi * lam * q * (d - 0.5 * lam * lam * q * cs_a) + ph)
            if bfactor != 0.0:
                for x in range(out.shape[2]):
                    out[i, y, x] *= np.exp(-bfactor * g2[y, x] / 4.0)


def _azimuth_terms(ny: int, nx: int, pixel_size: float, half: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Squared frequency (1/Å²) and ``cos 2a``, ``sin 2a`` of the azimuth on a Fourier grid (DC: a = 0)."""
    fy, fx = fourier_grid_2d(ny, nx, half=half)
    gy = np.broadcast_to(fy.astype(np.float64) / pixel_size, (ny, fx.shape[1]))
    gx = np.broadcast_to(fx.astype(np.float64) / pixel_size, (ny, fx.shape[1]))
    g2 = gx * gx + gy * gy
    safe = np.where(g2 > 0, g2, 1.0)
    c2 = np.where(g2 > 0, (gx * gx - gy * gy) / safe, 1.0)  # cos 2a = (x^2 - y^2) / r^2
    s2 = np.where(g2 > 0, 2.0 * gx * gy / safe, 0.0)  # sin 2a = 2 x y / r^2
    return np.ascontiguousarray(g2), np.ascontiguousarray(c2), np.ascontiguousarray(s2)


def ctf_2d_stack(ny: int, pixel_size: float, voltage: float, cs: float, amplitude_contrast: float,
                 df1: np.ndarray, df2: np.ndarray, angast: np.ndarray, pshift: np.ndarray | float = 0.0,
                 bfactor: float = 0.0, half: bool = True, nx: int | None = None) -> np.ndarray:
    """CTFs of many particles at once: per-particle defocus/astigmatism/phase shift (numba).

    The values of :func:`ctf_2d` for each particle (the same formula, to float32 rounding).

    Parameters
    ----------
    ny : int
        Image size in y (and x unless ``nx`` is given), pixels.
    pixel_size : float
        Å per pixel.
    voltage, cs, amplitude_contrast
        See :func:`ctf_phase`.
    df1, df2, angast : numpy.ndarray, shape (n,)
        Defoci (Å) and astigmatism angles (degrees) per particle (scalars broadcast).
    pshift : numpy.ndarray or float
        Extra phase shift (radians) per particle.
    bfactor : float
        Envelope B-factor (Å²).
    half : bool
        rfft half-plane layout or full ``fftfreq`` layout.
    nx : int, optional
        Image size in x (default ``ny``).

    Returns
    -------
    ndarray, shape (n, ny, nx//2+1) (or (n, ny, nx) if not ``half``), float32

    Examples
    --------
    >>> c = ctf_2d_stack(16, 2.0, 300.0, 2.7, 0.07, [15000.0, 20000.0], [14000.0, 20000.0], [30.0, 0.0])
    >>> c.shape, c.dtype.name
    ((2, 16, 9), 'float32')
    >>> bool(np.allclose(c[0], ctf_2d(16, 2.0, 300.0, 2.7, 0.07, 15000.0, 14000.0, 30.0), atol=1e-6))
    True
    """
    df1 = np.atleast_1d(np.asarray(df1, dtype=np.float64))
    n = df1.size
    df2 = np.ascontiguousarray(np.broadcast_to(np.asarray(df2, dtype=np.float64), (n,)))
    angast = np.ascontiguousarray(np.broadcast_to(np.deg2rad(np.asarray(angast, dtype=np.float64)), (n,)))
    pshift = np.ascontiguousarray(np.broadcast_to(np.asarray(pshift, dtype=np.float64), (n,)))
    nx = ny if nx is None else nx
    g2, c2, s2 = _azimuth_terms(ny, nx, pixel_size, half)
    out = np.empty((n,) + g2.shape, dtype=np.float32)
    _ctf_stack(g2, c2, s2, electron_wavelength(voltage), float(cs) * 1.0e7,
               amplitude_contrast_phase(amplitude_contrast), np.ascontiguousarray(df1), df2, angast, pshift,
               float(bfactor), out)
    return out


@dataclass(frozen=True)
class CTFParams:
    """One particle's or micrograph's CTF (units as in the .par file).

    Attributes
    ----------
    voltage : float  (kV)
    cs : float  (mm)
    amplitude_contrast : float  (0..1)
    df1, df2 : float  (Å)
    angast : float  (degrees)
    pshift : float  (radians)
    bfactor : float  (Å², envelope exp(-B g^2/4))

    Raises
    ------
    InputError
        Voltage <= 0, Cs < 0, amplitude contrast outside [0, 1), or any value NaN or infinite (every
        problem in one message).

    Examples
    --------
    >>> CTFParams(df1=20000, df2=18000).amplitude_contrast
    0.07
    >>> CTFParams(voltage=0.0, amplitude_contrast=1.5)
    Traceback (most recent call last):
    ...
    cistem_mpi.errors.InputError: CTF parameters: voltage must be > 0 kV, got 0; amplitude contrast must be in [0, 1), got 1.5
    """

    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.07
    df1: float = 15000.0
    df2: float = 15000.0
    angast: float = 0.0
    pshift: float = 0.0
    bfactor: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        for name in ("voltage", "cs", "amplitude_contrast", "df1", "df2", "angast", "pshift", "bfactor"):
            v = float(getattr(self, name))
            if not np.isfinite(v):
                problems.append(f"{name.replace('_', ' ')} must be a finite number, got {v}")
        if np.isfinite(self.voltage) and not self.voltage > 0:
            problems.append(f"voltage must be > 0 kV, got {self.voltage:g}")
        if np.isfinite(self.cs) and self.cs < 0:
            problems.append(f"Cs must be >= 0 mm, got {self.cs:g}")
        if np.isfinite(self.amplitude_contrast) and not 0.0 <= self.amplitude_contrast < 1.0:
            problems.append(f"amplitude contrast must be in [0, 1), got {self.amplitude_contrast:g}")
        if problems:
            raise InputError("CTF parameters", "; ".join(problems))

    def image(self, ny: int, pixel_size: float, half: bool = True) -> np.ndarray:
        """The CTF on an ``ny`` x ``ny`` Fourier grid (see :func:`ctf_2d`)."""
        return ctf_2d(ny, pixel_size, self.voltage, self.cs, self.amplitude_contrast, self.df1,
                      self.df2, self.angast, self.pshift, self.bfactor, half=half)

    def radial(self, freq: np.ndarray, azimuth_deg: float | None = None) -> np.ndarray:
        """1D CTF at ``freq`` (1/Å) along azimuth (default: mean defocus)."""
        if azimuth_deg is None:
            d = 0.5 * (self.df1 + self.df2)
        else:
            d = float(_defocus_at(np.deg2rad(azimuth_deg), self.df1, self.df2, self.angast))
        return ctf_1d(freq, self.voltage, self.cs, self.amplitude_contrast, d, self.pshift, self.bfactor)

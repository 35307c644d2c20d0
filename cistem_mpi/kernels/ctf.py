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


def ctf_2d_stack(ny: int, pixel_size: float, voltage: float, cs: float, amplitude_contrast: float,
                 df1: np.ndarray, df2: np.ndarray, angast: np.ndarray, pshift: np.ndarray | float = 0.0,
                 bfactor: float = 0.0, half: bool = True) -> np.ndarray:
    """CTFs of many particles at once: per-particle defocus/astigmatism/phase shift.

    Returns
    -------
    ndarray, shape (n, ny, ny//2+1) (or (n, ny, ny) if not ``half``), float32
    """
    df1 = np.atleast_1d(np.asarray(df1, dtype=np.float64))
    n = df1.size
    df2 = np.broadcast_to(np.asarray(df2, dtype=np.float64), (n,))
    angast = np.broadcast_to(np.asarray(angast, dtype=np.float64), (n,))
    pshift = np.broadcast_to(np.asarray(pshift, dtype=np.float64), (n,))
    g2, az = _frequency_grid(ny, ny, pixel_size, half)
    out = np.empty((n,) + g2.shape, dtype=np.float32)
    for i in range(n):
        out[i] = _ctf_values(g2, az, voltage, cs, amplitude_contrast, df1[i], df2[i], angast[i], pshift[i], bfactor)
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

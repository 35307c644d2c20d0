"""Finishing a Fourier reconstruction: half sets, per-shell Wiener normalisation, sharpening.

The accumulators are those of :mod:`cistem_mpi.kernels.backprojection`:
numerator ``D = sum g c F`` and weight ``W = sum g c^2`` on the padded
half layout ``(P, P, P//2+1)``.  Everything here works on a z-slab (rows
``z0:z1``) so each MPI rank can normalise only its own part:

* :func:`slab_shell_sums` gives per-shell sums (FSC numerator, powers,
  mean weight) that ranks add up (a small all-reduce);
* :func:`normalise_slab` divides by ``W + r(s)`` with a per-shell
  regulariser ``r(s)``.

The regulariser is Frealign/cisTEM's: for a map whose spectral SNR in shell
s is ``SSNR(s)``, the Wiener estimate is ``D / (W + <W>_s / SSNR(s))``,
where ``<W>_s`` is the mean weight of the shell.  The SSNR comes from the
FSC of the two half maps (``FSC/(1-FSC)`` for a half map,
``2 FSC/(1-FSC)`` for the full map), estimated by iterating the
normalisation a few times from a flat start (:func:`wiener_regularisers`).
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

from cistem_mpi.kernels import fft as _fft
from cistem_mpi.kernels.filters import frequency_radius, lowpass_profile
from cistem_mpi.kernels.radial import shell_average

__all__ = [
    "HALF_MAP_SSNR_GAIN", "half_sets", "half_lookup", "slab_shell_sums", "fsc_from_sums", "wiener_regularisers",
    "normalise_slab",
    "guinier_bfactor", "sharpen", "score_bfactors",
]


def half_sets(positions: np.ndarray, seed: int = 0) -> np.ndarray:
    """A fixed random split into half sets 1 and 2, a function of the stack position only.

    The same particle lands in the same half in every job, on any number of
    ranks and after any selection (splitmix64 hash of ``position`` and
    ``seed``), so half maps of successive refinement rounds stay independent.
    """
    x = (np.asarray(positions, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15))
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (1 + (x & np.uint64(1))).astype(np.int8)


def half_lookup(positions: np.ndarray, half: np.ndarray | None) -> np.ndarray | None:
    """A table ``table[position] -> half set`` from a stored split (None when there is none).

    Positions missing from the split get the hash of :func:`half_sets`, so a
    table built from one class covers any particle of the same stack.
    """
    if half is None:
        return None
    pos = np.asarray(positions, dtype=np.int64)
    table = half_sets(np.arange(int(pos.max()) + 1))
    table[pos] = np.asarray(half, dtype=np.int8)
    return table


@njit(cache=True, inline="always")
def _row_extent(iz, iy, p, n, nx):
    """``kz^2 + ky^2`` of row (iz, iy) and a count of its first columns that holds every column within shell N//2.

    Shells grow with ``ix``, so no column from the count on is within shell N//2 (the count errs by up
    to two columns on the safe side; the loops test each column they visit).  The shell of column ix is
    ``floor(sqrt(kz^2 + ky^2 + ix^2) * N / P + 0.5)``.
    """
    kz = iz if iz < (p + 1) // 2 else iz - p
    ky = iy if iy < (p + 1) // 2 else iy - p
    c = kz * kz + ky * ky
    # shell s <= N//2  <=>  r * n / p < N//2 + 0.5  <=>  r < (N//2 + 0.5) p / n
    rmax = (n // 2 + 0.5) * p / n
    left = max(rmax * rmax - c, 0.0)
    return c, min(nx, int(np.sqrt(left)) + 2)


@njit(cache=True)
def _sums(d1, w1, d2, w2, z0, p, n, r1, r2, table, out):
    nz, ny, nx = d1.shape
    for jz in range(nz):
        for iy in range(ny):
            c, xend = _row_extent(z0 + jz, iy, p, n, nx)
            for ix in range(xend):
                s = table[c + ix * ix]
                if s < 0:
                    continue
                m = 1.0 if (ix == 0 or 2 * ix == p) else 2.0
                wa = w1[jz, iy, ix]
                wb = w2[jz, iy, ix]
                den1 = wa + r1[s]
                den2 = wb + r2[s]
                # a real reciprocal, not a complex division: D / den with den real
                ia = 1.0 / den1 if den1 > 0 else 0.0
                ib = 1.0 / den2 if den2 > 0 else 0.0
                va = d1[jz, iy, ix]
                vb = d2[jz, iy, ix]
                ar = va.real * ia
                ai = va.imag * ia
                br = vb.real * ib
                bi = vb.imag * ib
                out[0, s] += m * (ar * br + ai * bi)
                out[1, s] += m * (ar * ar + ai * ai)
                out[2, s] += m * (br * br + bi * bi)
                out[3, s] += m * wa
                out[4, s] += m * wb
                out[5, s] += m


@functools.lru_cache(maxsize=8)
def _shell_table(p: int, n: int) -> np.ndarray:
    """Shell (in Fourier pixels of N) of every squared padded radius ``kz^2 + ky^2 + kx^2`` a P-grid holds.

    ``floor(sqrt(I) * N / P + 0.5)``, -1 beyond N//2: the same float64 expression the kernels used per
    voxel, looked up instead of a square root and a division per voxel.
    """
    i = np.arange(3 * (p // 2 + 1) ** 2 + 1, dtype=np.float64)
    s = np.floor(np.sqrt(i) * n / p + 0.5).astype(np.int64)
    s[s > n // 2] = -1
    out = s.astype(np.int32)
    out.flags.writeable = False
    return out


def slab_shell_sums(d1: np.ndarray, w1: np.ndarray, d2: np.ndarray, w2: np.ndarray, z0: int, padded: int,
                    n: int, reg1: np.ndarray, reg2: np.ndarray) -> np.ndarray:
    """Per-shell sums over a slab of the two half-set accumulators.

    Parameters
    ----------
    d1, w1, d2, w2 : ndarray, shape (z1-z0, P, P//2+1)
        Numerators and weights of half sets 1 and 2 (this rank's slab).
    z0 : int
        First row of the slab.
    padded, n : int
        Padded size P and box size N (shells are in Fourier pixels of N).
    reg1, reg2 : ndarray, shape (N//2+1,)
        Per-shell regularisers used to form the half-map estimates.

    Returns
    -------
    ndarray, shape (6, N//2+1), float64
        Rows: sum Re(V1 V2*), sum |V1|^2, sum |V2|^2, sum W1, sum W2, voxel
        count — each with Friedel multiplicity, so they equal sums over the
        full transform.  Sums from all slabs add up to the full-volume sums.
    """
    out = np.zeros((6, n // 2 + 1), dtype=np.float64)
    _sums(d1, w1, d2, w2, int(z0), int(padded), int(n), np.asarray(reg1, np.float64),
          np.asarray(reg2, np.float64), _shell_table(int(padded), int(n)), out)
    return out


def fsc_from_sums(sums: np.ndarray) -> np.ndarray:
    """FSC per shell from (all-reduced) :func:`slab_shell_sums`."""
    den = np.sqrt(sums[1] * sums[2])
    return np.divide(sums[0], den, out=np.zeros(sums.shape[1]), where=den > 0)


#: The half maps' SSNR is taken this many times the whole-box Fourier FSC's: that FSC sees the noise of the
#: whole box while the particle fills only part of it (about 1/8 for a particle of 0.6 box diameters), so it
#: underestimates the SSNR *in the particle* by about that fraction (cisTEM's ``part_SSNR`` corrects the
#: same way).  Too large a regulariser flattens the half maps towards ``D / r``; with the gain the masked
#: half maps' FSC against the truth matches or beats cisTEM's up to Nyquist (test_whitening.py).
HALF_MAP_SSNR_GAIN = 8.0


def wiener_regularisers(sums: np.ndarray, fsc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-shell regularisers for a half map and for the full map.

    ``r_half(s) = <W_half>_s / SSNR_half(s)`` with ``SSNR_half = G FSC/(1-FSC)``
    (``G`` = :data:`HALF_MAP_SSNR_GAIN`) and ``r_full(s) = <W_full>_s / SSNR_full(s)`` with
    ``SSNR_full = 2 FSC/(1-FSC)``.  The FSC is clipped to [1e-3, 0.999] so a
    shell without signal is damped hard but finitely.
    """
    f = np.clip(np.asarray(fsc, dtype=np.float64), 1e-3, 0.999)
    count = np.maximum(sums[5], 1.0)
    mean_half = 0.5 * (sums[3] + sums[4]) / count
    mean_full = (sums[3] + sums[4]) / count
    r_half = mean_half * (1.0 - f) / (HALF_MAP_SSNR_GAIN * f)
    r_full = mean_full * (1.0 - f) / (2.0 * f)
    return r_half, r_full


@njit(cache=True)
def _normalise(d, w, z0, p, n, reg, table, out):
    nz, ny, nx = d.shape
    for jz in range(nz):
        for iy in range(ny):
            c, xend = _row_extent(z0 + jz, iy, p, n, nx)
            for ix in range(xend):
                s = table[c + ix * ix]
                den = w[jz, iy, ix] + (reg[s] if s >= 0 else 0.0)
                if s < 0 or den <= 0:
                    out[jz, iy, ix] = 0j
                else:
                    inv = 1.0 / den  # a real reciprocal, not a complex division
                    v = d[jz, iy, ix]
                    out[jz, iy, ix] = complex(v.real * inv, v.imag * inv)
            for ix in range(xend, nx):
                out[jz, iy, ix] = 0j


def normalise_slab(d: np.ndarray, w: np.ndarray, z0: int, padded: int, n: int, reg: np.ndarray,
                   out: np.ndarray | None = None) -> np.ndarray:
    """``D / (W + reg[shell])`` on a slab; zero beyond the N//2 shell (complex64).

    ``out`` (complex64, ``d``'s shape) receives the result; it may be ``d`` itself (each voxel is read
    before it is written), which saves a slab-sized array when the sums are not needed afterwards.

    >>> d = np.ones((4, 4, 3), np.complex64); w = np.ones((4, 4, 3), np.float32)
    >>> g = normalise_slab(d, w, 0, 4, 4, np.ones(3), out=d)
    >>> g is d, complex(d[0, 0, 1])
    (True, (0.5+0j))
    """
    if out is None:
        out = np.empty(d.shape, dtype=np.complex64)
    elif out.shape != d.shape or out.dtype != np.complex64:
        raise ValueError("normalise_slab: out must be complex64 of the slab's shape")
    _normalise(d, w, int(z0), int(padded), int(n), np.asarray(reg, np.float64), _shell_table(int(padded), int(n)),
               out)
    return out


def guinier_bfactor(volume: np.ndarray, pixel_size: float, low_resolution: float = 10.0,
                    high_resolution: float | None = None, shell_weights: np.ndarray | None = None) -> float:
    """B-factor (Å^2) from the slope of ln(amplitude) against s^2 (Guinier plot).

    The rotationally averaged amplitude falls as ``exp(-B s^2 / 4)``; a
    straight-line fit of ``ln A`` against ``s^2`` between ``low_resolution``
    and ``high_resolution`` (Å; default Nyquist) gives ``B = -4 * slope``.
    ``shell_weights`` (per shell, e.g. the Wiener filter's SNR weighting
    ``2 FSC / (1 + FSC)``) are divided out first, so the fit measures the
    signal's fall-off rather than the filter's.
    """
    n = volume.shape[0]
    amp = np.abs(_fft.ftn(volume.astype(np.float32)))
    prof = shell_average(amp)
    if shell_weights is not None:
        prof = prof / np.maximum(np.asarray(shell_weights, dtype=np.float64)[: len(prof)], 0.05)
    s = np.arange(len(prof)) / (n * pixel_size)
    hi = 1.0 / high_resolution if high_resolution else s[-1]
    sel = (s >= 1.0 / low_resolution) & (s <= hi) & (prof > 0)
    if sel.sum() < 3:
        return 0.0
    slope = np.polyfit(s[sel] ** 2, np.log(prof[sel]), 1)[0]
    return float(-4.0 * slope)


def sharpen(volume: np.ndarray, pixel_size: float, bfactor: float, resolution: float,
            edge_width: float = 0.02) -> np.ndarray:
    """Sharpen a (Wiener-filtered) map by ``exp(+B s^2/4)`` and low-pass it at ``resolution`` Å.

    The Wiener map is already weighted by the per-shell SNR (FSC weighting),
    so sharpening boosts only shells that carry signal; the low-pass removes
    what lies beyond the FSC resolution.
    """
    v = np.asarray(volume, dtype=np.float32)
    freq = frequency_radius(v.shape)  # cycles/pixel
    # one round trip: the B-factor and the low-pass multiply the same transform
    profile = lowpass_profile(freq, min(0.5, pixel_size / resolution), edge_width)
    if bfactor:
        profile = profile * np.exp(float(bfactor) * (freq / pixel_size) ** 2 / 4.0).astype(np.float32)
    return _fft.iftn(_fft.ftn(v) * profile, nx=v.shape[-1]).astype(np.float32)


def score_bfactors(scores: np.ndarray, conversion: float) -> np.ndarray:
    """Per-particle B-factors (Å^2) from scores, as Frealign's score weighting.

    ``B_i = -conversion * (score_i - mean score)``: a particle that scores
    above average gets a negative B (its high frequencies count more).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if conversion == 0 or scores.size == 0:
        return np.zeros(scores.shape, dtype=np.float32)
    return (-conversion * (scores - scores.mean())).astype(np.float32)


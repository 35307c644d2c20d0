"""CTF estimation from an image's Thon rings, the way ctffind 4/5 does it.

The steps follow ctffind (``src/programs/ctffind/ctffind.cpp`` and
``src/core/ctf.cpp`` in cisTEM); the code is our own:

1. **Average amplitude spectrum** of ``box`` x ``box`` tiles (50 % overlap when
   fewer than 9 tiles fit, else none).  When the pixel is smaller than ``target_pixel_size`` (1.4 Å)
   the tiles are cut larger (``box * 1.4 / pixel``, rounded down to a fast FFT
   size) and the centre ``box`` x ``box`` of their spectrum is kept, so the
   rings are fitted at a pixel size of about 1.4 Å
   (:func:`fitting_geometry`), as ctffind's resampling does.
2. **Background subtraction** (:func:`filter_spectrum`): divide by the
   spread in the fitting annulus, damp the central cross, subtract a box
   convolution of side ``N * pixel / min_res * sqrt(2)`` that skips the
   central cross and leaves the low-resolution disc alone.
3. **Initial astigmatism angle**: half the rotation that best matches the
   spectrum with its mirror (:func:`mirror_astigmatism_angle`).
4. **1D exhaustive search** of defocus (and phase shift with a phase plate)
   against the rotational average; score ``sum(s |CTF|) / sqrt(sum s^2
   sum CTF^2)`` as ctffind's ``CtffindCurveObjectiveFunction``; refined
   locally.
5. **2D refinement** of DF1, DF2, ANGAST (and PSHIFT) against the 2D
   spectrum, score the normalised cross-correlation of the spectrum with
   ``|CTF|`` (ctffind's ``QuickCorrelationWithCTF``) minus the optional
   astigmatism restraint ``astig^2 / (2 tol^2 n)``; a coarse local grid over
   astigmatism then Nelder–Mead.
6. **Fit resolution**: the equiphase average of the spectrum (every pixel
   binned at the frequency that has its CTF phase along the mean-defocus
   azimuth), renormalised between extrema, against the fit; a windowed
   correlation (FRC) per bin; the first bin where it falls below 0.1 (after
   > 3 bins above 0.1) or below 0.5 (after > 3 bins above 0.66), as ctffind.
   The reported fit resolution is the spacing of the last bin that passed
   (ctffind reports the first that failed, up to a bin optimistic).  The
   scan stops at the spectrum's Nyquist (bin ``box / 2``, ``2 x`` the fitted
   pixel size): ctffind's bins run out to the corner, so a fit that stays
   good to the edge would be reported up to ``sqrt 2`` finer than Nyquist.
7. **CTF aliasing**: the frequency past which two CTF extrema are fewer
   than 4 bins apart.
8. **No fit**: a best score below ``6 / sqrt(pixels)`` (the reach of noise
   for a normalised cross-correlation maximised over the search) or an FRC
   that never passes 0.5 raises ``ValueError`` (the job skips the image).
9. **Tilt** (optional, ``tilt=True``): the mean defocus of 3 x 3
   half-overlapping regions, fitted by a plane (:func:`estimate_tilt`).
10. **Thickness** (optional, ``thickness=True``): ctffind5's node model
   (:func:`slab_power`, McMullan et al. 2015: the CTF^2 averaged over a
   slab of thickness t, ``0.5 (1 - sinc(pi lambda g^2 t) cos 2 chi)``),
   fitted after the defocus by a 1D brute-force search over thickness and
   defocus, then a 2D refinement of DF1, DF2, ANGAST and t
   (:func:`estimate_thickness`), 30–3 Å.
11. **Frames** (optional): the spectrum can be the average over sums of
   a few aligned frames (:func:`frame_group_spectrum`) instead of the
   image's (``raw_spectrum``).

Every CTF value comes from :func:`cistem_mpi.kernels.ctf.ctf_phase`
(cisTEM's formula).  Its phase is linear in mean defocus, the two
astigmatism components and the phase shift, so the hot loops evaluate
``|sin(base + m A + dx Ac + dy As + p)|`` from basis arrays built once by
:func:`ctf_phase` (:func:`phase_basis`).

Conventions: DF1 >= DF2 in Å, ANGAST in degrees in (-90, 90] (the angle of
DF1 from the x axis of the image's FFT, ``atan2(ky, kx)`` as
:func:`cistem_mpi.kernels.ctf.ctf_2d`), PSHIFT in radians in [0, pi).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from cistem_mpi.kernels import fft as _fft
from cistem_mpi.kernels.ctf import ctf_phase

__all__ = [
    "CtffindOptions", "CtffindResult", "fitting_geometry", "average_amplitude_spectrum",
    "box_convolve_spectrum", "filter_spectrum", "mirror_astigmatism_angle", "rotational_average",
    "phase_basis", "score_1d", "search_1d", "score_2d", "refine_2d", "equiphase_average",
    "renormalise_for_frc", "frc_with_fit", "fit_resolution_bin", "aliasing_bin", "number_of_extrema",
    "diagnostic_spectrum", "estimate_ctf", "estimate_tilt", "good_fft_size",
    "slab_power", "first_node_thickness", "score_thickness_1d", "search_thickness_1d", "refine_thickness_2d",
    "estimate_thickness", "frame_group_spectrum",
]


@dataclass(frozen=True)
class CtffindOptions:
    """Search settings (ctffind's defaults).

    Attributes
    ----------
    box : int
        Side of the fitted spectrum, pixels (512).
    min_resolution, max_resolution : float
        Fitting range, Å (30 and 5).
    min_defocus, max_defocus, defocus_step : float
        1D search range and step, Å (5,000, 50,000, 100).
    phase_plate : bool
        Search an additional phase shift (``min_phase_shift`` .. ``max_phase_shift``
        in steps of ``phase_shift_step`` radians).
    astigmatism_tolerance : float
        Expected astigmatism in Å for the restraint; 0 = no restraint.
    resample : bool
        Fit at about ``target_pixel_size`` when the pixel is smaller.
    tilt : bool
        Also estimate the specimen tilt (:func:`estimate_tilt`; off by default).
    thickness : bool
        Also estimate the sample thickness from the Thon-ring nodes
        (:func:`estimate_thickness`, ctffind5's model; off by default).
    thickness_min_resolution, thickness_max_resolution : float
        Fitting range of the thickness fit, Å (ctffind5: 30 and 3; the high
        end is held inside 2.1 fitting pixels).
    min_thickness, max_thickness, thickness_step : float
        1D search range and step of the thickness, Å (ctffind5: 500–4000 in 10).
    thickness_2d : bool
        Refine DF1, DF2, ANGAST and thickness against the 2D spectrum after the 1D search (ctffind5's default).
    tile_overlap : float or None
        Fraction of overlap between tiles; None: 0.5 when fewer than 9
        tiles fit side by side, else 0 (the FFTs dominate the cost, and
        untapered overlapping tiles add little).
    """

    box: int = 512
    min_resolution: float = 30.0
    max_resolution: float = 5.0
    min_defocus: float = 5000.0
    max_defocus: float = 50000.0
    defocus_step: float = 100.0
    phase_plate: bool = False
    min_phase_shift: float = 0.0
    max_phase_shift: float = math.pi
    phase_shift_step: float = 0.1
    astigmatism_tolerance: float = 0.0
    resample: bool = True
    target_pixel_size: float = 1.4
    tile_overlap: float | None = None
    tilt: bool = False
    thickness: bool = False
    thickness_min_resolution: float = 30.0
    thickness_max_resolution: float = 3.0
    min_thickness: float = 500.0
    max_thickness: float = 4000.0
    thickness_step: float = 10.0
    thickness_2d: bool = True


@dataclass
class CtffindResult:
    """One image's fit and its diagnostics.

    Attributes
    ----------
    df1, df2, angast, pshift : float
        The fit (Å, Å, degrees, radians).
    score : float
        Normalised cross-correlation of the 2D spectrum with |CTF|.
    fit_resolution : float
        Å up to which the rings are fitted (FRC thresholds).
    aliasing_resolution : float
        Å from which CTF aliasing is apparent; 0 when none.
    pixel_size_for_fitting : float
        Å per pixel of the fitted spectrum.
    spectrum : ndarray
        The background-subtracted spectrum (box x box, centred), float32.
    frequency, avrot_no_astig, avrot, fit, frc, frc_sigma : ndarray
        The 1D profiles of ctffind's ``_avrot`` file (1/Å; rotational
        average; equiphase average; |CTF| fit (the slab power with the
        thickness fit); FRC; 2 sigma of noise).
    tilt_axis, tilt_angle : float
        Degrees (NaN unless ``tilt``).
    thickness : float
        Sample thickness, Å (NaN unless ``thickness``; the lower bound,
        400 Å, when no node lies in the fitting range).
    """

    df1: float
    df2: float
    angast: float
    pshift: float
    score: float
    fit_resolution: float
    aliasing_resolution: float
    pixel_size_for_fitting: float
    spectrum: np.ndarray = field(repr=False)
    frequency: np.ndarray = field(repr=False)
    avrot_no_astig: np.ndarray = field(repr=False)
    avrot: np.ndarray = field(repr=False)
    fit: np.ndarray = field(repr=False)
    frc: np.ndarray = field(repr=False)
    frc_sigma: np.ndarray = field(repr=False)
    tilt_axis: float = float("nan")
    tilt_angle: float = float("nan")
    thickness: float = float("nan")


# --------------------------------------------------------------------------- spectrum


def _smooth(m: int) -> bool:
    if m % 2:
        return False
    for p in (2, 3, 5, 7):
        while m % p == 0:
            m //= p
    return m == 1


def good_fft_size(n: int, below: bool = False) -> int:
    """Nearest even size whose prime factors are 2, 3, 5 and 7 only: >= n (or <= n with ``below``).

    >>> good_fft_size(1075), good_fft_size(1075, below=True)
    (1080, 1050)
    """
    m = max(2, int(n))
    while not _smooth(m):
        m += -1 if below and m > 2 else 1
    return m


def fitting_geometry(shape: tuple[int, int], pixel_size: float, box: int = 512, resample: bool = True,
                     target_pixel_size: float = 1.4, max_resolution: float = 5.0) -> tuple[int, float]:
    """Tile size cut from the image and the pixel size of the fitted spectrum.

    Parameters
    ----------
    shape : (ny, nx) of the image
    pixel_size : Å per pixel of the image
    box : side of the fitted spectrum
    resample : fit at about ``target_pixel_size`` when the pixel is smaller (ctffind)
    target_pixel_size : Å; lowered when its Nyquist (x 1.1) would cut ``max_resolution``
    max_resolution : Å, the high-resolution end of the fit

    Returns
    -------
    (tile, pixel_size_for_fitting)

    >>> fitting_geometry((4096, 4096), 0.6666)
    (1050, 1.36705078125)
    >>> fitting_geometry((4096, 4096), 1.5)
    (512, 1.5)
    """
    target = min(float(target_pixel_size), float(max_resolution) / 2.2)
    if not resample or pixel_size >= target:
        return int(box), float(pixel_size)
    # the largest fast size that keeps the fitted pixel at or below the target (Nyquist <= 2 target)
    tile = good_fft_size(int(math.floor(box * target / pixel_size)), below=True)
    tile = min(tile, min(shape) - min(shape) % 2)
    tile = max(tile, int(box))
    return int(tile), float(pixel_size) * tile / box


def average_amplitude_spectrum(image: np.ndarray, tile: int, box: int | None = None,
                               overlap: float = 0.5) -> np.ndarray:
    """Average amplitude spectrum ``|F|`` of ``tile`` x ``tile`` tiles, centred.

    Parameters
    ----------
    image : 2D array (ny, nx)
    tile : tile side cut from the image (pixels)
    box : side of the returned spectrum (the centre of the tile spectrum is
        kept: resampling to a coarser pixel); default ``tile``
    overlap : fraction of overlap between neighbouring tiles

    Returns
    -------
    ndarray (box, box), float32, DC at ``[box//2, box//2]`` and set to 0.

    >>> average_amplitude_spectrum(np.ones((64, 64), np.float32), 32).shape
    (32, 32)
    """
    img = np.asarray(image, dtype=np.float32)
    ny, nx = img.shape
    box = tile if box is None else int(box)
    if tile > min(ny, nx):
        raise ValueError(f"tile {tile} larger than the image {img.shape}")
    step = max(1, int(tile * (1.0 - overlap)))
    ys = _tile_starts(ny, tile, step)
    xs = _tile_starts(nx, tile, step)
    half = np.zeros((tile, tile // 2 + 1), dtype=np.float64)
    stack = np.empty((len(xs), tile, tile), dtype=np.float32)
    for y in ys:
        for k, x in enumerate(xs):
            stack[k] = img[y:y + tile, x:x + tile]
        f = _fft.rfftn(stack, axes=(1, 2))
        half += np.abs(f).sum(axis=0)
    half /= len(ys) * len(xs) * float(tile)
    half[0, 0] = 0.0
    full = _full_from_half(half, tile)
    c = tile // 2
    h = box // 2
    return np.ascontiguousarray(full[c - h:c - h + box, c - h:c - h + box]).astype(np.float32)


def _tile_starts(n: int, tile: int, step: int) -> list[int]:
    """Tile origins covering ``0..n`` evenly (the last tile ends at the edge)."""
    if n == tile:
        return [0]
    count = (n - tile) // step + 1
    if (count - 1) * step < n - tile:
        count += 1
    return [int(round(i * (n - tile) / (count - 1))) for i in range(count)]


def _full_from_half(half: np.ndarray, n: int) -> np.ndarray:
    """Centred full ``n`` x ``n`` array from an rfft-layout half of a Hermitian |F|."""
    full = np.empty((n, n), dtype=half.dtype)
    nh = n // 2 + 1
    full[:, :nh] = half
    ky = (-np.arange(n)) % n
    cols = np.arange(nh, n)
    full[:, nh:] = half[ky][:, n - cols]
    return np.fft.fftshift(full)


def _box_sum_periodic(a: np.ndarray, half_width: int) -> np.ndarray:
    """Sum over a (2h+1) x (2h+1) window with wrap-around (separable running means)."""
    from scipy.ndimage import uniform_filter1d

    size = 2 * int(half_width) + 1
    out = np.asarray(a, dtype=np.float64)
    for axis in (0, 1):
        out = uniform_filter1d(out, size, axis=axis, mode="wrap") * size
    return out


def box_convolve_spectrum(spectrum: np.ndarray, size: int, minimum_radius: float) -> np.ndarray:
    """Box-average a centred spectrum, skipping the central cross (ctffind's ``SpectrumBoxConvolution``).

    Each output pixel is the mean over a ``size`` x ``size`` window (wrapping
    round the edges) of the pixels that are not within one pixel of the
    central row or column; pixels within ``minimum_radius`` of the centre are
    copied unchanged.

    Parameters
    ----------
    spectrum : (N, N) centred
    size : odd window side
    minimum_radius : pixels

    >>> float(box_convolve_spectrum(np.ones((16, 16)), 3, 2.0).mean())
    1.0
    """
    s = np.asarray(spectrum, dtype=np.float64)
    n0, n1 = s.shape
    c0, c1 = n0 // 2, n1 // 2
    row_ok = np.ones(n0)
    row_ok[max(0, c0 - 1):c0 + 2] = 0.0
    col_ok = np.ones(n1)
    col_ok[max(0, c1 - 1):c1 + 2] = 0.0
    w = row_ok[:, None] * col_ok[None, :]
    h = (int(size) - 1) // 2
    num = _box_sum_periodic(s * w, h)
    den = _box_sum_periodic(w, h)
    out = np.where(den > 0.5, num / np.maximum(den, 1.0), s)
    yy, xx = np.ogrid[:n0, :n1]
    inner = (yy - c0) ** 2 + (xx - c1) ** 2 <= minimum_radius ** 2
    out[inner] = s[inner]
    return out


def _annulus_stats(spectrum: np.ndarray, r_min: float, r_max: float, cross_half_width: int = 0) -> tuple[float, float]:
    n = spectrum.shape[0]
    c = n // 2
    yy, xx = np.ogrid[:n, :n]
    r2 = (yy - c) ** 2 + (xx - c) ** 2
    sel = (r2 >= r_min ** 2) & (r2 <= r_max ** 2)
    if cross_half_width:
        sel &= (np.abs(yy - c) > cross_half_width) & (np.abs(xx - c) > cross_half_width)
    v = spectrum[sel]
    if v.size < 2:
        v = spectrum.ravel()
    return float(v.mean()), float(v.std())


def filter_spectrum(spectrum: np.ndarray, pixel_size: float, min_resolution: float) -> np.ndarray:
    """Background-subtracted spectrum for fitting (ctffind's filtered amplitude spectrum).

    Divide by the spread between ``min_resolution`` and the edge (outside a
    central cross of half-width 12), cap the central cross at mean + 10,
    subtract the box convolution of side ``N * pixel / min_res * sqrt 2``
    (odd), and cap the values at the maximum found 3 pixels away from the
    centre and the edges.

    Returns
    -------
    ndarray (N, N) float32

    >>> filter_spectrum(np.random.default_rng(0).random((64, 64)), 2.0, 30.0).shape
    (64, 64)
    """
    s = np.asarray(spectrum, dtype=np.float64).copy()
    n = s.shape[0]
    c = n // 2
    r_min = n * pixel_size / min_resolution
    mean, sigma = _annulus_stats(s, r_min, float(n), 12)
    if sigma > 0:
        s /= sigma
        mean /= sigma
    cross = np.zeros_like(s, dtype=bool)
    cross[c, :] = True
    cross[:, c] = True
    s[cross] = np.minimum(s[cross], mean + 10.0)
    size = int(n * pixel_size / min_resolution * math.sqrt(2.0))
    if size % 2 == 0:
        size += 1
    s = s - box_convolve_spectrum(s, size, r_min)
    yy, xx = np.ogrid[:n, :n]
    sel = ((yy - c) ** 2 + (xx - c) ** 2 >= 9) & (yy >= 3) & (yy < n - 3) & (xx >= 3) & (xx < n - 3)
    s = np.minimum(s, s[sel].max())
    return s.astype(np.float32)


def mirror_astigmatism_angle(spectrum: np.ndarray, pixel_size: float, min_resolution: float,
                             max_resolution: float, step_deg: float = 1.0) -> float:
    """Astigmatism angle (degrees, 0..180) from the spectrum against its mirror.

    The spectrum mirrored across the x axis is rotated until it matches the
    spectrum (correlation in polar coordinates between ``min_resolution``
    and ``max_resolution``); the astigmatism axis is half that rotation.

    >>> round(mirror_astigmatism_angle(np.ones((64, 64)), 2.0, 30.0, 5.0)) in range(0, 181)
    True
    """
    s = np.asarray(spectrum, dtype=np.float64)
    n = s.shape[0]
    c = n // 2
    r0 = max(1.0, n * pixel_size / min_resolution)
    r1 = min(n / 2 - 1.0, n * pixel_size / max_resolution)
    if r1 <= r0 + 1:
        return 0.0
    nang = int(round(360.0 / step_deg))
    theta = np.arange(nang) * (2 * np.pi / nang)
    radii = np.arange(r0, r1, 1.0)
    yy = c + radii[:, None] * np.sin(theta)[None, :]
    xx = c + radii[:, None] * np.cos(theta)[None, :]
    polar = _bilinear(s, yy, xx)
    polar -= polar.mean(axis=1, keepdims=True)
    # mirror across x: theta -> -theta
    mirrored = polar[:, (-np.arange(nang)) % nang]
    # cc(phi) = sum_r sum_t P(t) M(t - phi)
    fp = np.fft.rfft(polar, axis=1)
    fm = np.fft.rfft(mirrored, axis=1)
    cc = np.fft.irfft((fp * np.conj(fm)).sum(axis=0), n=nang)
    k = int(np.argmax(cc))
    # parabolic refinement
    a, b, d = cc[(k - 1) % nang], cc[k], cc[(k + 1) % nang]
    den = a - 2 * b + d
    off = 0.5 * (a - d) / den if den < 0 else 0.0
    phi = (k + off) * 360.0 / nang
    return float((0.5 * phi) % 180.0)


def _bilinear(img: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    y0 = np.floor(y).astype(np.int64)
    x0 = np.floor(x).astype(np.int64)
    fy, fx = y - y0, x - x0
    n0, n1 = img.shape
    y0c, x0c = np.clip(y0, 0, n0 - 1), np.clip(x0, 0, n1 - 1)
    y1c, x1c = np.clip(y0 + 1, 0, n0 - 1), np.clip(x0 + 1, 0, n1 - 1)
    return ((1 - fy) * (1 - fx) * img[y0c, x0c] + (1 - fy) * fx * img[y0c, x1c]
            + fy * (1 - fx) * img[y1c, x0c] + fy * fx * img[y1c, x1c])


def rotational_average(spectrum: np.ndarray, n_bins: int | None = None) -> np.ndarray:
    """Rotational average of a centred spectrum, linear interpolation between bins.

    Bin ``k`` is radius ``k`` pixels; ``n_bins`` defaults to
    ``ceil(N / sqrt 2)`` (ctffind: up to the corner).

    >>> rotational_average(np.ones((32, 32)))[:3]
    array([1., 1., 1.])
    """
    s = np.asarray(spectrum, dtype=np.float64)
    n = s.shape[0]
    nb = int(math.ceil(n / math.sqrt(2.0))) if n_bins is None else int(n_bins)
    c = n // 2
    yy, xx = np.mgrid[:n, :n]
    r = np.sqrt((yy - c) ** 2 + (xx - c) ** 2).ravel()
    k0 = np.floor(r).astype(np.int64)
    f = r - k0
    v = s.ravel()
    def bc(idx, w):
        return np.bincount(idx, weights=w, minlength=nb + 2)[:nb]

    tot = bc(k0, (1 - f) * v) + bc(k0 + 1, f * v)
    cnt = bc(k0, 1 - f) + bc(k0 + 1, f)
    return tot / np.maximum(cnt, 1e-12)


# --------------------------------------------------------------------------- CTF basis


def phase_basis(g2: np.ndarray, azimuth: np.ndarray, voltage: float, cs: float,
                amplitude_contrast: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Arrays ``(base, a, ac, as_)`` with chi = base + m a + dx ac + dy as_ + pshift.

    For a CTF of mean defocus ``m`` and astigmatism ``(dx, dy) = ((df1 - df2) / 2)
    (cos 2 angast, sin 2 angast)``, the phase of :func:`ctf_phase` is linear in
    ``m``, ``dx``, ``dy`` and the phase shift; the basis is read off
    :func:`ctf_phase` itself (no second copy of the formula).

    >>> b = phase_basis(np.array([0.01]), np.array([0.3]), 300, 2.7, 0.07)
    >>> chi = b[0] + 12000 * b[1] + 300 * b[2] - 100 * b[3]
    >>> df1, df2 = 12000 + np.hypot(300, 100), 12000 - np.hypot(300, 100)
    >>> ang = np.degrees(0.5 * np.arctan2(-100, 300))
    >>> bool(np.allclose(chi, ctf_phase(np.array([0.01]), np.array([0.3]), 300, 2.7, 0.07, df1, df2, ang)))
    True
    """
    g2 = np.asarray(g2, dtype=np.float64)
    az = np.asarray(azimuth, dtype=np.float64)
    base = ctf_phase(g2, az, voltage, cs, amplitude_contrast, 0.0, 0.0, 0.0)
    a = ctf_phase(g2, az, voltage, cs, amplitude_contrast, 1.0, 1.0, 0.0) - base
    ac = ctf_phase(g2, az, voltage, cs, amplitude_contrast, 1.0, -1.0, 0.0) - base
    as_ = ctf_phase(g2, az, voltage, cs, amplitude_contrast, 1.0, -1.0, 45.0) - base
    return base, a, ac, as_


def _params_to_linear(df1: float, df2: float, angast: float) -> tuple[float, float, float]:
    m = 0.5 * (df1 + df2)
    h = 0.5 * (df1 - df2)
    t = 2.0 * math.radians(angast)
    return m, h * math.cos(t), h * math.sin(t)


def _linear_to_params(m: float, dx: float, dy: float) -> tuple[float, float, float]:
    h = math.hypot(dx, dy)
    ang = 0.5 * math.degrees(math.atan2(dy, dx)) if h > 0 else 0.0
    df1, df2 = m + h, m - h
    ang = ang - 180.0 * round(ang / 180.0)
    if ang <= -90.0:
        ang += 180.0
    return df1, df2, ang


# --------------------------------------------------------------------------- |sin| table

#: ``|sin|`` on [0, pi] in 4096 steps: the hot loops interpolate it linearly
#: (error < 1e-7, a fifth of the cost of ``sin``).
_TABLE_SIZE = 4096
_ABS_SIN = np.abs(np.sin(np.arange(_TABLE_SIZE + 1) * (np.pi / _TABLE_SIZE)))
_ABS_SIN[-1] = 0.0


@njit(cache=True, inline="always")
def _abs_sin(x, table):
    t = x * (4096.0 / math.pi)
    k = math.floor(t)
    j = int(k) & 4095
    return table[j] + (t - k) * (table[j + 1] - table[j])


# --------------------------------------------------------------------------- 1D search


@njit(cache=True)
def _score_1d_grid(curve, base, a, defoci, phases, table=_ABS_SIN):
    nd = defoci.shape[0]
    npz = phases.shape[0]
    nb = curve.shape[0]
    out = np.empty((nd, npz), dtype=np.float64)
    ncurve = 0.0
    for k in range(nb):
        ncurve += curve[k] * curve[k]
    for i in range(nd):
        for j in range(npz):
            cross = 0.0
            nctf = 0.0
            for k in range(nb):
                v = _abs_sin(base[k] + defoci[i] * a[k] + phases[j], table)
                cross += curve[k] * v
                nctf += v * v
            out[i, j] = cross / math.sqrt(nctf * ncurve) if nctf > 0 and ncurve > 0 else 0.0
    return out


def score_1d(curve: np.ndarray, frequency: np.ndarray, voltage: float, cs: float, amplitude_contrast: float,
             defoci: np.ndarray, phases: np.ndarray, low_freq: float, high_freq: float) -> np.ndarray:
    """ctffind's 1D score for every (defocus, phase shift) pair.

    ``sum(c |CTF|) / sqrt(sum c^2 sum CTF^2)`` over the bins with
    ``low_freq < f < high_freq`` (1/Å).

    Returns
    -------
    ndarray (len(defoci), len(phases))

    >>> f = np.arange(100) / 400.0
    >>> c = np.abs(np.sin(ctf_phase(f * f, 0 * f, 300, 2.7, 0.07, 15000, 15000, 0)))
    >>> s = score_1d(c, f, 300, 2.7, 0.07, np.array([10000., 15000.]), np.array([0.]), 1 / 30, 1 / 5)
    >>> bool(s[1, 0] > 0.99 > s[0, 0])
    True
    """
    f = np.asarray(frequency, dtype=np.float64)
    sel = (f * f > low_freq ** 2) & (f * f < high_freq ** 2)
    g2 = f[sel] ** 2
    base, a, _, _ = phase_basis(g2, np.zeros_like(g2), voltage, cs, amplitude_contrast)
    return _score_1d_grid(np.asarray(curve, np.float64)[sel], base, a,
                          np.asarray(defoci, np.float64), np.atleast_1d(np.asarray(phases, np.float64)))


def search_1d(curve: np.ndarray, frequency: np.ndarray, voltage: float, cs: float, amplitude_contrast: float,
              opts: CtffindOptions, low_freq: float, high_freq: float) -> tuple[float, float, float]:
    """Exhaustive 1D search then local refinement: ``(defocus, phase_shift, score)``.

    >>> f = np.arange(200) / 700.0
    >>> c = np.abs(np.sin(ctf_phase(f * f, 0 * f, 300, 2.7, 0.07, 21234, 21234, 0)))
    >>> d, p, s = search_1d(c, f, 300, 2.7, 0.07, CtffindOptions(), 1 / 30, 1 / 5)
    >>> abs(d - 21234) < 10
    True
    """
    from scipy.optimize import minimize

    defoci = np.arange(opts.min_defocus, opts.max_defocus + 0.5 * opts.defocus_step, opts.defocus_step)
    if opts.phase_plate:
        phases = np.arange(opts.min_phase_shift, opts.max_phase_shift + 1e-9, opts.phase_shift_step)
    else:
        phases = np.array([0.0])
    f = np.asarray(frequency, dtype=np.float64)
    sel = (f * f > low_freq ** 2) & (f * f < high_freq ** 2)
    if sel.sum() < 3:
        raise ValueError("fewer than 3 spectrum bins inside the fitting range")
    g2 = f[sel] ** 2
    base, a, _, _ = phase_basis(g2, np.zeros_like(g2), voltage, cs, amplitude_contrast)
    c = np.asarray(curve, np.float64)[sel]
    grid = _score_1d_grid(c, base, a, defoci, phases)
    i, j = np.unravel_index(int(np.argmax(grid)), grid.shape)
    x0 = [defoci[i]] + ([phases[j]] if opts.phase_plate else [])

    def fun(x):
        p = x[1] if opts.phase_plate else 0.0
        return -_score_1d_grid(c, base, a, np.array([x[0]]), np.array([p]))[0, 0]

    simplex = np.array([x0, [x0[0] + opts.defocus_step] + x0[1:]] +
                       ([[x0[0], x0[1] + opts.phase_shift_step]] if opts.phase_plate else []))
    res = minimize(fun, np.array(x0), method="Nelder-Mead",
                   options=dict(initial_simplex=simplex, xatol=1.0, fatol=1e-9, maxiter=400))
    x = res.x if res.fun <= -grid[i, j] else np.array(x0)
    return float(x[0]), float(x[1]) if opts.phase_plate else 0.0, float(-min(res.fun, -grid[i, j]))


# --------------------------------------------------------------------------- 2D score


@njit(cache=True, fastmath=True)
def _ncc_2d(values, base, a, ac, as_, m, dx, dy, p, norm_s, mean_s, table=_ABS_SIN):
    n = values.shape[0]
    cross = 0.0
    nctf = 0.0
    sctf = 0.0
    for i in range(n):
        v = _abs_sin(base[i] + m * a[i] + dx * ac[i] + dy * as_[i] + p, table)
        cross += values[i] * v
        nctf += v * v
        sctf += v
    den = norm_s * (nctf - sctf * sctf / n)
    if den <= 0.0:
        return 0.0
    return (cross - mean_s * sctf) / math.sqrt(den)


class _Scorer2D:
    """The fitting-annulus pixels of a spectrum with their CTF phase basis."""

    def __init__(self, spectrum: np.ndarray, pixel_size: float, voltage: float, cs: float,
                 amplitude_contrast: float, low_freq: float, high_freq: float):
        n = spectrum.shape[0]
        c = n // 2
        k = (np.arange(n) - c) / (n * pixel_size)
        gy, gx = np.meshgrid(k, k, indexing="ij")
        g2 = gx * gx + gy * gy
        # half plane (the spectrum is centrosymmetric)
        half = (gx > 0) | ((gx == 0) & (gy > 0))
        sel = half & (g2 > low_freq ** 2) & (g2 < high_freq ** 2)
        self.values = np.asarray(spectrum, np.float64)[sel]
        self.g2 = np.ascontiguousarray(g2[sel])
        self.n = int(self.values.size)
        if self.n < 10:
            raise ValueError("too few spectrum pixels inside the fitting range")
        self.basis = phase_basis(g2[sel], np.arctan2(gy[sel], gx[sel]), voltage, cs, amplitude_contrast)
        self._stats()

    def _stats(self) -> None:
        self.mean = float(self.values.mean())
        self.norm = float(((self.values - self.mean) ** 2).sum())

    def subset(self, stride: int) -> "_Scorer2D":
        """Every ``stride``-th pixel (a cheaper score for coarse grids)."""
        out = object.__new__(_Scorer2D)
        out.values = np.ascontiguousarray(self.values[::stride])
        out.g2 = np.ascontiguousarray(self.g2[::stride])
        out.basis = tuple(np.ascontiguousarray(b[::stride]) for b in self.basis)
        out.n = int(out.values.size)
        out._stats()
        return out

    def score(self, m: float, dx: float, dy: float, p: float, tolerance: float = 0.0) -> float:
        s = _ncc_2d(self.values, *self.basis, float(m), float(dx), float(dy), float(p), self.norm, self.mean)
        if tolerance > 0:
            astig = 2.0 * math.hypot(dx, dy)
            s -= astig * astig * 0.5 / (tolerance * tolerance) / self.n
        return s


def score_2d(spectrum: np.ndarray, pixel_size: float, voltage: float, cs: float, amplitude_contrast: float,
             df1: float, df2: float, angast: float, pshift: float, low_freq: float, high_freq: float,
             astigmatism_tolerance: float = 0.0) -> float:
    """Normalised cross-correlation of a centred spectrum with ``|CTF|`` in the fitting annulus.

    ctffind's ``QuickCorrelationWithCTF`` (half plane), minus
    ``astig^2 / (2 tol^2 n)`` when a tolerance is given.

    >>> from cistem_mpi.kernels.ctf import ctf_2d
    >>> s = np.fft.fftshift(np.abs(ctf_2d(128, 2.0, 300, 2.7, 0.07, 15000, 14000, 30, half=False)))
    >>> round(score_2d(s, 2.0, 300, 2.7, 0.07, 15000, 14000, 30, 0, 1 / 30, 1 / 5), 4)
    1.0
    """
    sc = _Scorer2D(spectrum, pixel_size, voltage, cs, amplitude_contrast, low_freq, high_freq)
    m, dx, dy = _params_to_linear(df1, df2, angast)
    return sc.score(m, dx, dy, pshift, astigmatism_tolerance)


def refine_2d(spectrum: np.ndarray, pixel_size: float, voltage: float, cs: float, amplitude_contrast: float,
              defocus: float, pshift: float, angle_guess: float, opts: CtffindOptions,
              low_freq: float, high_freq: float) -> tuple[float, float, float, float, float]:
    """2D refinement from the 1D result: ``(df1, df2, angast, pshift, score)``.

    A coarse grid over mean defocus (+-200 Å), astigmatism (0–3000 Å) and
    angle (every 15° plus the mirror estimate and its perpendicular) gives
    the start of a Nelder–Mead search over (mean, astigmatism vector
    [, phase shift]).

    >>> from cistem_mpi.kernels.ctf import ctf_2d
    >>> s = np.fft.fftshift(np.abs(ctf_2d(256, 2.0, 300, 2.7, 0.07, 15400, 14600, 30, half=False)))
    >>> r = refine_2d(s, 2.0, 300, 2.7, 0.07, 15000, 0, 30, CtffindOptions(), 1 / 30, 1 / 5)
    >>> abs(r[0] - 15400) < 20 and abs(r[1] - 14600) < 20 and abs(r[2] - 30) < 1
    True
    """
    from scipy.optimize import minimize

    sc = _Scorer2D(spectrum, pixel_size, voltage, cs, amplitude_contrast, low_freq, high_freq)
    coarse = sc.subset(4) if sc.n > 4000 else sc
    tol = float(opts.astigmatism_tolerance)
    best = (-np.inf, defocus, 0.0, 0.0)
    angles = sorted(set(np.round(np.concatenate([np.arange(0.0, 180.0, 15.0),
                                                 [angle_guess % 180.0, (angle_guess + 90.0) % 180.0]]), 3)))
    for dm in (-200.0, -100.0, 0.0, 100.0, 200.0):
        m = defocus + dm
        s = coarse.score(m, 0.0, 0.0, pshift, tol)
        if s > best[0]:
            best = (s, m, 0.0, 0.0)
        for astig in (200.0, 400.0, 700.0, 1000.0, 1500.0, 2000.0, 3000.0):
            h = 0.5 * astig
            for ang in angles:
                t = 2.0 * math.radians(ang)
                dx, dy = h * math.cos(t), h * math.sin(t)
                s = coarse.score(m, dx, dy, pshift, tol)
                if s > best[0]:
                    best = (s, m, dx, dy)
    x0 = [best[1], best[2], best[3]] + ([pshift] if opts.phase_plate else [])

    def fun(x):
        p = x[3] if opts.phase_plate else pshift
        return -sc.score(x[0], x[1], x[2], p, tol)

    steps = [100.0, 100.0, 100.0] + ([0.1] if opts.phase_plate else [])
    simplex = np.array([x0] + [np.array(x0) + np.eye(len(x0))[k] * steps[k] for k in range(len(x0))])
    res = minimize(fun, np.array(x0), method="Nelder-Mead",
                   options=dict(initial_simplex=simplex, xatol=0.5, fatol=1e-10, maxiter=2000))
    # one restart from the optimum (Nelder-Mead can stall on ridges)
    simplex = np.array([res.x] + [res.x + np.eye(len(x0))[k] * 0.5 * steps[k] for k in range(len(x0))])
    res = minimize(fun, res.x, method="Nelder-Mead",
                   options=dict(initial_simplex=simplex, xatol=0.5, fatol=1e-10, maxiter=2000))
    x = res.x
    df1, df2, ang = _linear_to_params(x[0], x[1], x[2])
    p = float(x[3]) if opts.phase_plate else float(pshift)
    p = p % math.pi
    return df1, df2, ang, p, float(-res.fun)


# --------------------------------------------------------------------------- fit resolution


def _chi_1d_coefficients(voltage, cs, amplitude_contrast, defocus, pshift):
    """chi(g2) = c0 + c1 g2 + c2 g2^2 along the mean-defocus azimuth (from ctf_phase)."""
    z = np.array([0.0, 1.0, 2.0])
    v = ctf_phase(z, np.zeros(3), voltage, cs, amplitude_contrast, defocus, defocus, 0.0, pshift)
    c0 = v[0]
    c2 = 0.5 * (v[2] - 2.0 * v[1] + v[0])
    c1 = v[1] - v[0] - c2
    return float(c0), float(c1), float(c2)


def number_of_extrema(chi: np.ndarray, g2: np.ndarray, g2_extremum: float, chi_extremum: float) -> np.ndarray:
    """CTF extrema passed below each frequency (ctffind's ``ReturnNumberOfExtremaBeforeSquaredSpatialFrequency``).

    ``floor(chi / pi + 1/2)``, folded back past the extremum of chi.

    >>> number_of_extrema(np.array([0.1, 1.7, 4.8]), np.array([0.0, 0.1, 0.2]), 1.0, 10.0).tolist()
    [0.0, 1.0, 2.0]
    """
    chi = np.asarray(chi, np.float64)
    n = np.floor(chi / np.pi + 0.5)
    n_ext = math.floor(chi_extremum / math.pi + 0.5)
    post = np.asarray(g2) > g2_extremum
    n = np.where(post, n_ext + np.abs(n - n_ext), n)
    return np.abs(n).astype(np.float64)


def equiphase_average(spectrum: np.ndarray, pixel_size: float, voltage: float, cs: float, amplitude_contrast: float,
                      df1: float, df2: float, angast: float, pshift: float, n_bins: int) -> np.ndarray:
    """Average of the spectrum along the equiphase lines of the fitted CTF.

    Every pixel is placed (linear interpolation between bins) at the
    frequency that has its CTF phase on the mean-defocus azimuth; bin ``k``
    is ``k / (N pixel)`` 1/Å.  Empty bins are interpolated.

    >>> from cistem_mpi.kernels.ctf import ctf_2d
    >>> s = np.fft.fftshift(np.abs(ctf_2d(256, 2.0, 300, 2.7, 0.07, 15000, 14000, 30, half=False)))
    >>> e = equiphase_average(s, 2.0, 300, 2.7, 0.07, 15000, 14000, 30, 0, 64)
    >>> f = np.arange(64) / 512.0
    >>> ref = np.abs(np.sin(ctf_phase(f * f, 0 * f, 300, 2.7, 0.07, 14500, 14500, 0)))
    >>> bool(np.abs(e[5:60] - ref[5:60]).max() < 0.1)
    True
    """
    s = np.asarray(spectrum, np.float64)
    n = s.shape[0]
    c = n // 2
    k = (np.arange(n) - c) / (n * pixel_size)
    # the right half-plane (kx >= 0) only: the spectrum is centrosymmetric
    gy, gx = np.meshgrid(k, k[c:], indexing="ij")
    s = s[:, c:]
    g2 = (gx * gx + gy * gy).ravel()
    az = np.arctan2(gy, gx).ravel()
    chi = ctf_phase(g2, az, voltage, cs, amplitude_contrast, df1, df2, angast, pshift)
    mean = 0.5 * (df1 + df2)
    c0, c1, c2 = _chi_1d_coefficients(voltage, cs, amplitude_contrast, mean, pshift)
    # each pixel's own chi extremum: decides the branch of the inverse
    chi_zero = ctf_phase(g2, az, voltage, cs, amplitude_contrast, 0.0, 0.0, 0.0, pshift)
    chi_local_c1 = (chi - chi_zero) / np.maximum(g2, 1e-30)
    if c2 < 0:
        g2_ext_local = -chi_local_c1 / (2 * c2)
        post = g2 > g2_ext_local
        disc = np.maximum(c1 * c1 - 4 * c2 * (c0 - chi), 0.0)
        root = np.where(post, (-c1 - np.sqrt(disc)) / (2 * c2), (-c1 + np.sqrt(disc)) / (2 * c2))
    else:
        root = (chi - c0) / c1 if c1 != 0 else g2
    g_eq = np.sqrt(np.maximum(root, 0.0))
    pos = g_eq * n * pixel_size
    k0 = np.floor(pos).astype(np.int64)
    f = pos - k0
    ok = (k0 >= 0) & (k0 + 1 < n_bins + 1)
    k0, f, v = k0[ok], f[ok], s.ravel()[ok]
    tot = np.bincount(k0, (1 - f) * v, n_bins + 2) + np.bincount(k0 + 1, f * v, n_bins + 2)
    cnt = np.bincount(k0, 1 - f, n_bins + 2) + np.bincount(k0 + 1, f, n_bins + 2)
    tot, cnt = tot[:n_bins], cnt[:n_bins]
    good = cnt > 1e-6
    out = np.zeros(n_bins)
    if good.any():
        idx = np.arange(n_bins)
        out = np.interp(idx, idx[good], tot[good] / cnt[good])
    return out


def renormalise_for_frc(average: np.ndarray, fit: np.ndarray, extrema: np.ndarray) -> np.ndarray:
    """Map each oscillation of a 1D spectrum to 0..1 (ctffind's ``Renormalize1DSpectrumForFRC``).

    Between consecutive CTF extrema: with fewer than 7 extrema, values are
    replaced by their rank (down-slope to the zero of the fit, then
    up-slope), shaped by ``sin(rank pi / 2)``; further out the interval is
    scaled to its min..max.

    >>> renormalise_for_frc(np.array([0, 1, .5, 0, .5, 1, .5, 0.]), np.array([0, 1, .5, 0, .5, 1, .5, 0.]),
    ...                     np.array([0, 1, 1, 1, 1, 2, 2, 2.])).shape
    (8,)
    """
    avg = np.asarray(average, np.float64).copy()
    fit = np.asarray(fit, np.float64)
    ext = np.asarray(extrema, np.float64)
    nb = avg.size
    prev = 0
    for b in range(1, nb):
        delta = ext[b] - ext[b - 1]
        if 0.9 <= delta <= 1.9:
            cur = b - 1
            if prev > 0:
                if ext[b] < 7:
                    zero = (cur - prev) // 2 + prev
                    for i in range(prev, cur):
                        if 0 < i < nb - 1 and fit[i] < fit[i - 1] and fit[i] < fit[i + 1]:
                            zero = i
                    seg = avg[prev:zero + 1]
                    if seg.size > 1:
                        ranks = np.argsort(np.argsort(seg, kind="stable"), kind="stable")
                        avg[prev:zero + 1] = np.sin(ranks / (seg.size - 1) * np.pi * 0.5)
                    seg = avg[zero + 1:cur]
                    if seg.size > 0:
                        ranks = np.argsort(np.argsort(seg, kind="stable"), kind="stable")
                        avg[zero + 1:cur] = np.sin((ranks + 1) / (seg.size + 1) * np.pi * 0.5)
                else:
                    seg = avg[prev:cur]
                    lo, hi = min(seg.min(), 1.0), max(seg.max(), 0.0)
                    seg = seg - lo
                    if hi - lo > 1e-4:
                        seg = seg / (hi - lo)
                    avg[prev:cur] = seg
            prev = cur
    return avg


def frc_with_fit(average: np.ndarray, fit: np.ndarray, extrema: np.ndarray,
                 first_fit_bin: int, window_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Windowed correlation of a 1D spectrum with the fit (ctffind's ``ComputeFRCBetween1DSpectrumAndFit``).

    The half-width of the window around a bin grows with the distance
    between CTF extrema there (``(1 + 0.1 n_extrema) * spacing``, at least
    ``n_bins / 40``), times ``window_scale`` (ctffind5 widens it 1.5 times
    with its thickness model, to bridge the nodes).  Returns ``(frc, 2 sigma
    of noise)``; bins before ``first_fit_bin`` have FRC 1.

    >>> x = np.abs(np.sin(np.arange(200) / 6.0))
    >>> frc, sig = frc_with_fit(x, x, np.floor(np.arange(200) / 6.0 / np.pi + 0.5), 10)
    >>> bool(np.allclose(frc[10:], 1.0))
    True
    """
    avg = np.asarray(average, np.float64)
    fit = np.asarray(fit, np.float64)
    ext = np.asarray(extrema, np.float64)
    nb = avg.size
    minw = nb // 40
    hw = np.full(nb, minw, dtype=np.int64)
    prev = 0
    for b in range(1, nb):
        if ext[b] != ext[b - 1]:
            w = max(minw, int((1.0 + 0.1 * ext[b]) * (b - prev + 1)))
            hw[prev:b] = min(w, nb // 2 - 1)
            prev = b
    hw[0] = hw[1] if nb > 1 else hw[0]
    if prev > 0:
        hw[prev:] = hw[prev - 1]
    if window_scale != 1.0:
        hw = np.minimum((hw * float(window_scale)).astype(np.int64), nb // 2 - 1)
    frc = np.ones(nb)
    sigma = np.zeros(nb)
    for b in range(first_fit_bin, nb):
        h = int(hw[b])
        lo, hi = b - h, b + h
        if lo < first_fit_bin:
            lo, hi = first_fit_bin, first_fit_bin + 2 * h + 1
        if hi >= nb:
            hi, lo = nb - 1, nb - 2 - 2 * h
        lo = max(lo, 0)
        a = avg[lo:hi + 1]
        f = fit[lo:hi + 1]
        a = a - a.mean()
        f = f - f.mean()
        den = math.sqrt((a * a).sum() * (f * f).sum())
        frc[b] = float((a * f).sum() / den) if den > 0 else 0.0
        sigma[b] = 2.0 / math.sqrt(2 * h + 1)
    return frc, sigma


def fit_resolution_bin(frc: np.ndarray, last_bin: int | None = None) -> int:
    """Last bin with a good fit, ctffind's thresholds (0.1, 0.5, 0.66), held at Nyquist.

    Scanning from 10 % of the bins: stop at the first bin below 0.1 once
    more than 3 bins were above 0.1, or below 0.5 once more than 3 were
    above 0.66.  All above 0.5 -> ``last_bin``; none -> bin 1.

    Parameters
    ----------
    frc : FRC per bin (bins out to the spectrum's corner, as ctffind's)
    last_bin : the last bin that may be reported, the spectrum's Nyquist
        bin ``box // 2`` (default: the last bin).  ctffind scans out to
        the corner of the spectrum (``sqrt 2`` times Nyquist), so a fit
        that stays good to the edge was reported finer than Nyquist; the
        scan stops here instead.

    Returns
    -------
    int
        The first bin that failed (ctffind's ``last_bin_with_good_fit``),
        ``last_bin`` when none failed up to it.

    >>> fit_resolution_bin(np.r_[np.ones(50), np.zeros(50)])
    50
    >>> fit_resolution_bin(np.ones(100), last_bin=70)
    70
    """
    frc = np.asarray(frc, np.float64)
    nb = frc.size
    stop = nb - 1 if last_bin is None else int(min(max(last_bin, 1), nb - 1))
    first = int(0.1 * nb)
    if first > stop:
        return 1
    above_low = above_sig = above_high = 0
    last = -1
    for b in range(first, stop + 1):
        if (above_low > 3 and frc[b] < 0.1) or (above_high > 3 and frc[b] < 0.5):
            last = b
            break
        above_low += frc[b] > 0.1
        above_sig += frc[b] > 0.5
        above_high += frc[b] > 0.66
    if above_sig == stop + 1 - first:
        last = stop
    if above_sig == 0:
        last = 1
    if last < 1:
        last = stop
    return int(min(last, stop))


def aliasing_bin(extrema: np.ndarray) -> int:
    """First bin from which CTF extrema are fewer than 4 bins apart; 0 when none (ctffind).

    >>> aliasing_bin(np.floor(np.arange(300) ** 2 / 3000.0))
    0
    >>> aliasing_bin(np.floor(np.arange(400) ** 2 / 300.0)) > 0
    True
    """
    ext = np.asarray(extrema, np.float64)
    prev = 0
    for b in range(1, ext.size):
        if ext[b] - ext[b - 1] >= 0.9:
            if b - prev < 4:
                return int(prev)
            prev = b
    return 0


def _profiles(spectrum, pf, voltage, cs, ac, df1, df2, angast, pshift, low_freq):
    n = spectrum.shape[0]
    nb = int(math.ceil(n / math.sqrt(2.0)))
    freq = np.arange(nb) / (n * pf)
    g2 = freq * freq
    mean = 0.5 * (df1 + df2)
    chi = ctf_phase(g2, np.zeros(nb), voltage, cs, ac, mean, mean, 0.0, pshift)
    fit = np.abs(np.sin(chi))
    c0, c1, c2 = _chi_1d_coefficients(voltage, cs, ac, mean, pshift)
    g2_ext = -c1 / (2 * c2) if c2 < 0 else np.inf
    chi_ext = c0 + c1 * g2_ext + c2 * g2_ext ** 2 if np.isfinite(g2_ext) else np.inf
    ext = number_of_extrema(chi, g2, g2_ext, chi_ext)
    epa = equiphase_average(spectrum, pf, voltage, cs, ac, df1, df2, angast, pshift, nb)
    avrot0 = rotational_average(spectrum, nb)
    # scale the EPA (and the plain average) to the fit in the fitting range for the plots/_avrot
    first_fit = int(np.searchsorted(freq, low_freq))
    renorm = renormalise_for_frc(epa, fit, ext)
    frc, sig = frc_with_fit(renorm, fit, ext, first_fit)
    return freq, avrot0, epa, fit, ext, frc, sig


def _scale_to_fit(curve: np.ndarray, fit: np.ndarray, sel: np.ndarray) -> np.ndarray:
    c = np.asarray(curve, np.float64)
    if sel.sum() < 2:
        return c
    a, b = c[sel], fit[sel]
    sa = a.std()
    if sa <= 0:
        return c - a.mean() + b.mean()
    return (c - a.mean()) / sa * b.std() + b.mean()


def diagnostic_spectrum(result: CtffindResult, voltage: float, cs: float, amplitude_contrast: float,
                        min_resolution: float, max_resolution: float | None = None,
                        zoom_resolution: float | None = None) -> np.ndarray:
    """The spectrum (left half) beside the fitted ``|CTF|`` (right half), both 0..1, centred.

    The spectrum is smoothed along the rings (average of rotations by up to
    +-8 degrees) and normalised ring by ring (mean 0.5, 2.5 sigma to the
    ends); the fit is drawn from ``min_resolution`` to the
    better of the fit resolution and ``max_resolution``; the rest is grey.

    >>> from cistem_mpi.kernels.ctf import ctf_2d
    >>> s = np.fft.fftshift(np.abs(ctf_2d(64, 2.0, 300, 2.7, 0.07, 15000, 14000, 30, half=False)))
    >>> r = CtffindResult(15000, 14000, 30, 0, 1, 6, 0, 2.0, s, *([np.zeros(3)] * 6))
    >>> diagnostic_spectrum(r, 300, 2.7, 0.07, 30.0).shape
    (64, 64)
    """
    from scipy.ndimage import uniform_filter

    from cistem_mpi.kernels.ctf import ctf_2d

    s0 = np.asarray(result.spectrum, np.float64)
    n = s0.shape[0]
    c = n // 2
    pf = result.pixel_size_for_fitting
    yy, xx = np.mgrid[:n, :n]
    # smooth along the rings (rotations of +-8 degrees about the centre), then lightly
    s = np.zeros_like(s0)
    dy, dx = yy - c, xx - c
    angles = np.deg2rad(np.linspace(-8.0, 8.0, 9))
    for a in angles:
        s += _bilinear(s0, c + dy * math.cos(a) - dx * math.sin(a), c + dy * math.sin(a) + dx * math.cos(a))
    s = uniform_filter(s / len(angles), 2, mode="wrap")
    r = np.sqrt((yy - c) ** 2 + (xx - c) ** 2)
    ri = np.rint(r).astype(np.int64)
    cnt = np.bincount(ri.ravel())
    mean = np.bincount(ri.ravel(), s.ravel()) / np.maximum(cnt, 1)
    var = np.bincount(ri.ravel(), (s * s).ravel()) / np.maximum(cnt, 1) - mean ** 2
    sd = np.sqrt(np.maximum(var, 1e-30))
    disp = np.clip((s - mean[ri]) / (5.0 * sd[ri]) + 0.5, 0.0, 1.0)
    fit = np.fft.fftshift(np.abs(ctf_2d(n, pf, voltage, cs, amplitude_contrast, result.df1, result.df2,
                                        result.angast, result.pshift, half=False)))
    r0 = n * pf / min_resolution
    best = result.fit_resolution if np.isfinite(result.fit_resolution) else np.inf
    if max_resolution is not None:
        best = min(best, max_resolution)
    r1 = n * pf / best if np.isfinite(best) and best > 0 else n
    out = disp.copy()
    right = (xx >= c)
    out[right] = np.where((r[right] <= r1), fit[right], 0.5)
    out[r < r0] = 0.5
    if zoom_resolution is not None and zoom_resolution > 2 * pf:
        h = int(min(c, math.ceil(n * pf / zoom_resolution)))
        out = out[c - h:c + h, c - h:c + h]
    return out.astype(np.float32)


# --------------------------------------------------------------------------- driver of the steps

#: A fit whose score is below this many 1/sqrt(pixels) is noise ("no fit inside the range").
NO_FIT_SIGMAS = 6.0


def _fitted_pixel_count(n: int, pixel_size: float, low_freq: float, high_freq: float) -> int:
    k = (np.arange(n) - n // 2) / (n * pixel_size)
    g2 = k[:, None] ** 2 + k[None, :] ** 2
    return int(((g2 > low_freq ** 2) & (g2 < high_freq ** 2)).sum() // 2)



def estimate_ctf(image: np.ndarray, pixel_size: float, voltage: float, cs: float, amplitude_contrast: float,
                 opts: CtffindOptions = CtffindOptions(), raw_spectrum: np.ndarray | None = None) -> CtffindResult:
    """Fit the CTF of one image (see the module docstring for the steps).

    Parameters
    ----------
    image : 2D array
    pixel_size : Å per pixel
    voltage : kV; cs : mm; amplitude_contrast : 0..1
    opts : search settings
    raw_spectrum : optional (box, box) amplitude spectrum to fit instead of
        the image's tile average (e.g. :func:`frame_group_spectrum` of the
        movie's frames, cut at :func:`fitting_geometry`); the image still
        gives the tilt regions

    Returns
    -------
    CtffindResult

    Raises
    ------
    ValueError
        No fit inside the range: too few pixels in range, a best score
        below ``NO_FIT_SIGMAS / sqrt(pixels)`` (noise), or no FRC bin above
        0.5.

    >>> from cistem_mpi.kernels.ctf import ctf_2d
    >>> rng = np.random.default_rng(0)
    >>> noise = np.fft.rfft2(rng.normal(size=(512, 512)).astype(np.float32))
    >>> img = np.fft.irfft2(noise * ctf_2d(512, 2.0, 300, 2.7, 0.07, 20000, 19000, 40), s=(512, 512))
    >>> img = img + rng.normal(size=img.shape) * 0.5
    >>> r = estimate_ctf(img, 2.0, 300, 2.7, 0.07, CtffindOptions(box=256))
    >>> abs(r.df1 - 20000) < 200 and abs(r.df2 - 19000) < 200
    True
    """
    img = np.asarray(image, dtype=np.float32)
    tile, pf = fitting_geometry(img.shape, pixel_size, opts.box, opts.resample, opts.target_pixel_size,
                                opts.max_resolution)
    overlap = opts.tile_overlap
    if overlap is None:
        overlap = 0.5 if (img.shape[0] // tile) * (img.shape[1] // tile) < 9 else 0.0
    if raw_spectrum is None:
        raw = average_amplitude_spectrum(img, tile, opts.box, overlap)
    else:
        raw = np.asarray(raw_spectrum, np.float32)
        if raw.shape != (opts.box, opts.box):
            raise ValueError(f"raw_spectrum is {raw.shape}, not the box {opts.box}")
    spec = filter_spectrum(raw, pf, opts.min_resolution)
    n = spec.shape[0]
    low_f, high_f = 1.0 / opts.min_resolution, 1.0 / opts.max_resolution
    angle0 = mirror_astigmatism_angle(spec, pf, opts.min_resolution, opts.max_resolution)
    nb = int(math.ceil(n / math.sqrt(2.0)))
    curve = rotational_average(spec, nb)
    freq = np.arange(nb) / (n * pf)
    d1, p1, _ = search_1d(curve, freq, voltage, cs, amplitude_contrast, opts, low_f, high_f)
    df1, df2, ang, p, score = refine_2d(spec, pf, voltage, cs, amplitude_contrast, d1, p1, angle0, opts,
                                        low_f, high_f)
    if not (score > 0 and np.isfinite(score)):
        raise ValueError(f"no CTF fit inside the range (best score {score:.3g})")
    freq, avrot0, epa, fit, ext, frc, sig = _profiles(spec, pf, voltage, cs, amplitude_contrast, df1, df2, ang, p,
                                                     low_f)
    # bins run out to the corner of the spectrum; the fit resolution stops at its Nyquist (2 pf)
    last = fit_resolution_bin(frc, last_bin=n // 2)
    # no fit: the score is within the reach of noise (the best of many trials of an NCC over n pixels
    # has a spread of about 1 / sqrt(n)), or no bin of the FRC passed 0.5
    n_pix = _fitted_pixel_count(n, pf, low_f, high_f)
    noise_level = NO_FIT_SIGMAS / math.sqrt(max(n_pix, 1))
    if score < noise_level:
        raise ValueError(f"no CTF fit inside the range: score {score:.4f} is at the noise level "
                         f"({noise_level:.4f} for {n_pix} pixels)")
    if last <= 1:
        raise ValueError("no CTF fit inside the range: the fit matches no Thon ring (FRC never above 0.5)")
    # the last bin that passed (ctffind reports the first that failed: up to a bin optimistic)
    good = max(last - 1, 1)
    fit_res = float(1.0 / freq[good])
    alias = aliasing_bin(ext)
    alias_res = float(1.0 / freq[alias]) if alias > 0 else 0.0
    sel = (freq > low_f) & (freq < high_f)
    result = CtffindResult(
        df1=float(df1), df2=float(df2), angast=float(ang), pshift=float(p), score=float(score),
        fit_resolution=fit_res, aliasing_resolution=alias_res, pixel_size_for_fitting=float(pf), spectrum=spec,
        frequency=freq, avrot_no_astig=_scale_to_fit(avrot0, fit, sel), avrot=_scale_to_fit(epa, fit, sel),
        fit=fit, frc=frc, frc_sigma=sig)
    if opts.thickness:
        result = estimate_thickness(spec, pf, voltage, cs, amplitude_contrast, result, opts)
    if opts.tilt:
        result.tilt_axis, result.tilt_angle = estimate_tilt(img, pixel_size, voltage, cs, amplitude_contrast,
                                                            result, opts)
    return result


def estimate_tilt(image: np.ndarray, pixel_size: float, voltage: float, cs: float, amplitude_contrast: float,
                  fit: CtffindResult, opts: CtffindOptions = CtffindOptions(),
                  regions: int = 3) -> tuple[float, float]:
    """Specimen tilt (axis, angle in degrees) from the defocus of sub-regions (ctffind5's tile idea).

    The image is cut into ``regions`` x ``regions`` half-overlapping
    regions; each region's spectrum (tiles of half the box) is fitted for
    its mean defocus alone (astigmatism and phase shift kept from ``fit``),
    and a plane ``defocus = d0 + gx X + gy Y`` (X, Y in Å from the image
    centre) is fitted to them, weighted by each region's score.  The
    convention is the simulator's (:func:`cistem_mpi.kernels.simulate.specimen_height`):
    the defocus change is ``tan(angle) (-X sin(axis) + Y cos(axis))``,
    angle >= 0, axis in [0, 360).

    Returns
    -------
    (tilt_axis, tilt_angle) in degrees

    >>> # see tests/test_ctffind_accuracy.py::test_tilt
    """
    from scipy.optimize import minimize_scalar

    img = np.asarray(image, dtype=np.float32)
    ny, nx = img.shape
    sub_box = max(128, opts.box // 2)
    tile, pf = fitting_geometry(img.shape, pixel_size, sub_box, opts.resample, opts.target_pixel_size,
                                opts.max_resolution)
    size = min(ny, nx) * 2 // (regions + 1)
    size = max(size, tile)
    if size > min(ny, nx):
        raise ValueError("image too small for a tilt estimate")
    m0, dx, dy = _params_to_linear(fit.df1, fit.df2, fit.angast)
    low_f, high_f = 1.0 / opts.min_resolution, 1.0 / opts.max_resolution
    xs, ys, ds, ws = [], [], [], []
    for y0 in np.linspace(0, ny - size, regions).astype(int):
        for x0 in np.linspace(0, nx - size, regions).astype(int):
            spec = filter_spectrum(average_amplitude_spectrum(img[y0:y0 + size, x0:x0 + size], tile, sub_box, 0.5),
                                   pf, opts.min_resolution)
            sc = _Scorer2D(spec, pf, voltage, cs, amplitude_contrast, low_f, high_f)
            # coarse scan then a bounded refinement of the mean defocus (+-3000 Å)
            grid = np.arange(m0 - 3000.0, m0 + 3001.0, 100.0)
            vals = [sc.score(m, dx, dy, fit.pshift) for m in grid]
            k = int(np.argmax(vals))
            res = minimize_scalar(lambda m: -sc.score(m, dx, dy, fit.pshift),
                                  bounds=(grid[max(k - 1, 0)], grid[min(k + 1, grid.size - 1)]), method="bounded",
                                  options=dict(xatol=1.0))
            xs.append((x0 + size / 2 - nx / 2) * pixel_size)
            ys.append((y0 + size / 2 - ny / 2) * pixel_size)
            ds.append(float(res.x))
            ws.append(max(float(-res.fun), 0.0))
    w = np.sqrt(np.asarray(ws))
    a = np.column_stack([np.ones(len(xs)), xs, ys]) * w[:, None]
    coef, *_ = np.linalg.lstsq(a, np.asarray(ds) * w, rcond=None)
    gx, gy = float(coef[1]), float(coef[2])
    angle = math.degrees(math.atan(math.hypot(gx, gy)))
    axis = math.degrees(math.atan2(-gx, gy)) % 360.0 if angle > 0 else 0.0
    return float(axis), float(angle)


# --------------------------------------------------------------------------- sample thickness (ctffind5)


def slab_power(g2: np.ndarray, chi: np.ndarray, thickness: float, voltage: float,
               bfactor: float = 0.0) -> np.ndarray:
    """CTF^2 averaged over defocus across a slab: ``0.5 (1 - E sinc(pi lambda g^2 t) cos 2 chi)``.

    ``sinc(x) = sin(x) / x``; McMullan et al. (2015), the model ctffind5
    fits (cisTEM's ``CTF::EvaluatePowerspectrumWithThickness``).  ``chi`` is
    the phase at the slab's centre (:func:`cistem_mpi.kernels.ctf.ctf_phase`);
    ``t = 0`` gives ``sin^2 chi``.  Nodes (no Thon rings) where
    ``lambda g^2 t`` is a whole number; past an odd node the rings are inverted.
    ``E = exp(-bfactor g^2 / 4)`` (1 by default, ctffind5's model) damps the
    rings' modulation: our addition, so that the decay of real rings with
    frequency (envelope, detector) is not read as thickness.

    >>> g2 = np.array([0.0, 0.01, 0.02])
    >>> bool(np.allclose(slab_power(g2, np.array([0.3, 1.0, 2.0]), 0.0, 300.0), np.sin([0.3, 1.0, 2.0]) ** 2))
    True
    """
    from cistem_mpi.kernels.ctf import electron_wavelength

    g2 = np.asarray(g2, np.float64)
    x = np.pi * electron_wavelength(voltage) * g2 * float(thickness)
    s = np.sinc(x / np.pi) * np.exp(-0.25 * float(bfactor) * g2)  # numpy's sinc is sin(pi x) / (pi x)
    return 0.5 * (1.0 - s * np.cos(2.0 * np.asarray(chi, np.float64)))


def first_node_thickness(frequency: float, voltage: float) -> float:
    """Thickness (Å) whose first node is at ``frequency`` (1/Å): ``1 / (lambda g^2)`` (ctffind5's first guess).

    >>> round(first_node_thickness(1 / 5.0, 300.0))
    1270
    """
    from cistem_mpi.kernels.ctf import electron_wavelength

    return float(1.0 / (electron_wavelength(voltage) * frequency * frequency))


@njit(cache=True)
def _score_slab_grid(curve, chi0, a, sinc_table, defoci):
    # Pearson correlation of the curve with 0.5 (1 - sinc cos 2 chi) for every (defocus, thickness)
    nb = curve.shape[0]
    nt = sinc_table.shape[0]
    nd = defoci.shape[0]
    out = np.empty((nd, nt), dtype=np.float64)
    sx = 0.0
    sxx = 0.0
    for k in range(nb):
        sx += curve[k]
        sxx += curve[k] * curve[k]
    vx = sxx - sx * sx / nb
    c2 = np.empty(nb)
    for i in range(nd):
        for k in range(nb):
            c2[k] = math.cos(2.0 * (chi0[k] + defoci[i] * a[k]))
        for j in range(nt):
            sy = 0.0
            syy = 0.0
            sxy = 0.0
            for k in range(nb):
                y = 0.5 * (1.0 - sinc_table[j, k] * c2[k])
                sy += y
                syy += y * y
                sxy += curve[k] * y
            vy = syy - sy * sy / nb
            den = vx * vy
            out[i, j] = (sxy - sx * sy / nb) / math.sqrt(den) if den > 0.0 else 0.0
    return out


def _sinc_table(g2: np.ndarray, thicknesses: np.ndarray, voltage: float, bfactors: np.ndarray) -> np.ndarray:
    """(len(bfactors) * len(thicknesses), bins): exp(-B g^2 / 4) sinc(pi lambda g^2 t), B slowest."""
    from cistem_mpi.kernels.ctf import electron_wavelength

    g2 = np.asarray(g2, np.float64)
    x = np.pi * electron_wavelength(voltage) * np.asarray(thicknesses, np.float64)[:, None] * g2[None, :]
    env = np.exp(-0.25 * np.asarray(bfactors, np.float64)[:, None] * g2[None, :])
    return (env[:, None, :] * np.sinc(x / np.pi)[None, :, :]).reshape(-1, g2.size)


def score_thickness_1d(curve: np.ndarray, frequency: np.ndarray, voltage: float, cs: float,
                       amplitude_contrast: float, defoci: np.ndarray, thicknesses: np.ndarray, pshift: float,
                       low_freq: float, high_freq: float, bfactors: np.ndarray = (0.0,)) -> np.ndarray:
    """Correlation of a 1D spectrum with :func:`slab_power` for every (defocus, B, thickness).

    Pearson correlation over the bins with ``low_freq < f < high_freq``
    (the spectrum's background and scale do not matter).

    Returns
    -------
    ndarray (len(defoci), len(bfactors), len(thicknesses))

    >>> f = np.arange(300) / 900.0
    >>> chi = ctf_phase(f * f, 0 * f, 300, 2.7, 0.07, 15000, 15000, 0)
    >>> c = slab_power(f * f, chi, 2000.0, 300.0)
    >>> s = score_thickness_1d(c, f, 300, 2.7, 0.07, np.array([15000.]), np.array([1000., 2000.]), 0, 1 / 30, 1 / 3.2)
    >>> bool(s[0, 0, 1] > 0.999 > s[0, 0, 0])
    True
    """
    f = np.asarray(frequency, dtype=np.float64)
    sel = (f * f > low_freq ** 2) & (f * f < high_freq ** 2)
    g2 = f[sel] ** 2
    base, a, _, _ = phase_basis(g2, np.zeros_like(g2), voltage, cs, amplitude_contrast)
    thick = np.atleast_1d(np.asarray(thicknesses, np.float64))
    bf = np.atleast_1d(np.asarray(bfactors, np.float64))
    out = _score_slab_grid(np.asarray(curve, np.float64)[sel], base + float(pshift), a,
                           _sinc_table(g2, thick, voltage, bf), np.atleast_1d(np.asarray(defoci, np.float64)))
    return out.reshape(out.shape[0], bf.size, thick.size)


def _detrend(curve: np.ndarray, freq: np.ndarray, sel: np.ndarray, degree: int = 3) -> np.ndarray:
    """The curve minus a cubic fitted in the fitting range (ctffind5 lines the spectrum up with its model so)."""
    c = np.asarray(curve, np.float64)
    if sel.sum() <= degree + 1:
        return c
    x = freq[sel]
    coef = np.polynomial.polynomial.polyfit(x, c[sel], degree)
    return c - np.polynomial.polynomial.polyval(freq, coef)


def search_thickness_1d(curve: np.ndarray, frequency: np.ndarray, voltage: float, cs: float,
                        amplitude_contrast: float, defocus: float, pshift: float, opts: CtffindOptions,
                        low_freq: float, high_freq: float) -> tuple[float, float, float, float]:
    """ctffind5's 1D brute-force search: ``(thickness, defocus, bfactor, score)``.

    Thickness ``opts.min_thickness`` .. ``opts.max_thickness`` in
    ``opts.thickness_step`` Å steps and the defocus within +-1000 Å of
    ``defocus`` in 20 Å steps, against the (detrended) equiphase average;
    also the ring envelope B over :data:`THICKNESS_BFACTORS` (not in ctffind5).

    >>> f = np.arange(300) / 900.0
    >>> c = slab_power(f * f, ctf_phase(f * f, 0 * f, 300, 2.7, 0.07, 15100, 15100, 0), 1800.0, 300.0)
    >>> t, d, b, s = search_thickness_1d(c, f, 300, 2.7, 0.07, 15000, 0, CtffindOptions(), 1 / 30, 1 / 3.2)
    >>> abs(t - 1800) <= 30 and abs(d - 15100) <= 20
    True
    """
    f = np.asarray(frequency, dtype=np.float64)
    sel = (f * f > low_freq ** 2) & (f * f < high_freq ** 2)
    if sel.sum() < 8:
        raise ValueError("fewer than 8 spectrum bins inside the thickness fitting range")
    c = _detrend(curve, f, sel)
    thick = np.arange(opts.min_thickness, opts.max_thickness + 0.5 * opts.thickness_step, opts.thickness_step)
    defoci = defocus + np.arange(-1000.0, 1000.0 + 1e-6, 20.0)
    defoci = defoci[defoci > 0]
    bf = np.asarray(THICKNESS_BFACTORS, np.float64)
    grid = score_thickness_1d(c, f, voltage, cs, amplitude_contrast, defoci, thick, pshift, low_freq, high_freq, bf)
    i, k, j = np.unravel_index(int(np.argmax(grid)), grid.shape)
    return float(thick[j]), float(defoci[i]), float(bf[k]), float(grid[i, k, j])


#: Envelopes (Å^2) of the rings tried by the 1D thickness search.
THICKNESS_BFACTORS = (0.0, 10.0, 20.0, 30.0, 40.0, 60.0, 80.0, 100.0, 130.0, 160.0, 200.0, 250.0, 300.0, 400.0)


@njit(cache=True, fastmath=True)
def _ncc_2d_slab(values, base, a, ac, as_, g2, m, dx, dy, p, tk, qb, norm_s, mean_s):
    n = values.shape[0]
    cross = 0.0
    nctf = 0.0
    sctf = 0.0
    for i in range(n):
        chi = base[i] + m * a[i] + dx * ac[i] + dy * as_[i] + p
        x = tk * g2[i]
        s = math.sin(x) / x if x > 1e-8 else 1.0
        v = 0.5 * (1.0 - s * math.exp(-qb * g2[i]) * math.cos(2.0 * chi))
        cross += values[i] * v
        nctf += v * v
        sctf += v
    den = norm_s * (nctf - sctf * sctf / n)
    if den <= 0.0:
        return 0.0
    return (cross - mean_s * sctf) / math.sqrt(den)


def refine_thickness_2d(spectrum: np.ndarray, pixel_size: float, voltage: float, cs: float,
                        amplitude_contrast: float, df1: float, df2: float, angast: float, pshift: float,
                        thickness: float, opts: CtffindOptions, low_freq: float,
                        high_freq: float, bfactor: float = 0.0) -> tuple[float, float, float, float, float, float]:
    """2D refinement of DF1, DF2, ANGAST, thickness (and B) with :func:`slab_power`: ``(df1, df2, angast, t, B, score)``.

    Normalised cross-correlation with the 2D spectrum (as :func:`score_2d`),
    Nelder–Mead from the 1D result (ctffind5 refines DF1, DF2, ANGAST and t
    by conjugate gradients; we also refine the envelope B, held >= 0); the
    thickness is held in [400, 50000] Å as ctffind5 does.

    >>> from cistem_mpi.kernels.ctf import ctf_2d
    >>> n, px = 256, 1.5
    >>> k = (np.arange(n) - n // 2) / (n * px); gy, gx = np.meshgrid(k, k, indexing="ij")
    >>> chi = ctf_phase(gx ** 2 + gy ** 2, np.arctan2(gy, gx), 300, 2.7, 0.07, 15300, 14700, 30)
    >>> s = slab_power(gx ** 2 + gy ** 2, chi, 2000.0, 300.0)
    >>> r = refine_thickness_2d(s, px, 300, 2.7, 0.07, 15250, 14750, 28, 0, 1900, CtffindOptions(), 1 / 30, 1 / 3.2)
    >>> abs(r[0] - 15300) < 20 and abs(r[1] - 14700) < 20 and abs(r[3] - 2000) < 30
    True
    """
    from scipy.optimize import minimize

    from cistem_mpi.kernels.ctf import electron_wavelength

    sc = _Scorer2D(spectrum, pixel_size, voltage, cs, amplitude_contrast, low_freq, high_freq)
    pil = math.pi * electron_wavelength(voltage)

    def score(m, dx, dy, t, b):
        t = min(max(t, 400.0), 50000.0)
        return _ncc_2d_slab(sc.values, *sc.basis, sc.g2, float(m), float(dx), float(dy), float(pshift),
                            pil * t, 0.25 * max(b, 0.0), sc.norm, sc.mean)

    m0, dx0, dy0 = _params_to_linear(df1, df2, angast)
    x0 = np.array([m0, dx0, dy0, thickness, bfactor])
    steps = np.array([50.0, 50.0, 50.0, 100.0, 20.0])

    def fun(x):
        return -score(*x)

    res = minimize(fun, x0, method="Nelder-Mead",
                   options=dict(initial_simplex=np.vstack([x0, x0 + np.diag(steps)]), xatol=0.5, fatol=1e-10,
                                maxiter=2000))
    res = minimize(fun, res.x, method="Nelder-Mead",
                   options=dict(initial_simplex=np.vstack([res.x, res.x + np.diag(0.5 * steps)]), xatol=0.5,
                                fatol=1e-10, maxiter=2000))
    x = res.x
    d1, d2, ang = _linear_to_params(x[0], x[1], x[2])
    return d1, d2, ang, float(min(max(x[3], 400.0), 50000.0)), float(max(x[4], 0.0)), float(-res.fun)


def estimate_thickness(spectrum: np.ndarray, pixel_size: float, voltage: float, cs: float,
                       amplitude_contrast: float, fit: CtffindResult,
                       opts: CtffindOptions = CtffindOptions()) -> CtffindResult:
    """Sample thickness from the Thon-ring nodes, after the defocus fit (ctffind5's steps).

    1. The equiphase average of the spectrum (with ``fit``'s CTF), detrended
       by a cubic, against :func:`slab_power` by a brute-force search over
       thickness and mean defocus (:func:`search_thickness_1d`);
    2. with ``opts.thickness_2d``, DF1, DF2, ANGAST and thickness refined
       against the 2D spectrum (:func:`refine_thickness_2d`);
    3. the fit resolution again from the FRC of the equiphase average with
       the slab model (window 1.5 times wider, as ctffind5).

    The fitting range is ``opts.thickness_min_resolution`` ..
    ``opts.thickness_max_resolution`` (held inside 2.1 fitting pixels).

    Returns
    -------
    CtffindResult
        A copy of ``fit`` with the new DF1, DF2, ANGAST, ``thickness`` (Å),
        fit resolution and 1D profiles (``fit`` is then the slab power
        ``0.5 (1 - sinc cos 2 chi)``); score, PSHIFT and aliasing are kept.

    >>> # see tests/test_ctffind_thickness.py
    """
    import dataclasses

    n = spectrum.shape[0]
    pf = float(pixel_size)
    nb = int(math.ceil(n / math.sqrt(2.0)))
    freq = np.arange(nb) / (n * pf)
    low_f = 1.0 / opts.thickness_min_resolution
    high_f = min(1.0 / opts.thickness_max_resolution, 1.0 / (2.1 * pf))
    epa = equiphase_average(spectrum, pf, voltage, cs, amplitude_contrast, fit.df1, fit.df2, fit.angast,
                            fit.pshift, nb)
    mean = 0.5 * (fit.df1 + fit.df2)
    t, m, b, _ = search_thickness_1d(epa, freq, voltage, cs, amplitude_contrast, mean, fit.pshift, opts, low_f,
                                     high_f)
    df1, df2, ang = fit.df1 + (m - mean), fit.df2 + (m - mean), fit.angast
    if opts.thickness_2d:
        df1, df2, ang, t, b, _ = refine_thickness_2d(spectrum, pf, voltage, cs, amplitude_contrast, df1, df2, ang,
                                                     fit.pshift, t, opts, low_f, high_f, b)
    g2 = freq * freq
    mean = 0.5 * (df1 + df2)
    chi = ctf_phase(g2, np.zeros(nb), voltage, cs, amplitude_contrast, mean, mean, 0.0, fit.pshift)
    model = slab_power(g2, chi, t, voltage, b)
    c0, c1, c2 = _chi_1d_coefficients(voltage, cs, amplitude_contrast, mean, fit.pshift)
    g2_ext = -c1 / (2 * c2) if c2 < 0 else np.inf
    chi_ext = c0 + c1 * g2_ext + c2 * g2_ext ** 2 if np.isfinite(g2_ext) else np.inf
    ext = number_of_extrema(chi, g2, g2_ext, chi_ext)
    epa = equiphase_average(spectrum, pf, voltage, cs, amplitude_contrast, df1, df2, ang, fit.pshift, nb)
    avrot0 = rotational_average(spectrum, nb)
    low_fit = 1.0 / opts.min_resolution
    first_fit = int(np.searchsorted(freq, low_fit))
    frc, sig = frc_with_fit(renormalise_for_frc(epa, model, ext), model, ext, first_fit, window_scale=1.5)
    last = fit_resolution_bin(frc, last_bin=n // 2)
    fit_res = float(1.0 / freq[max(last - 1, 1)]) if last > 1 else fit.fit_resolution
    sel = (freq > low_fit) & (freq < high_f)
    return dataclasses.replace(fit, df1=float(df1), df2=float(df2), angast=float(ang), thickness=float(t),
                               fit_resolution=fit_res, avrot_no_astig=_scale_to_fit(avrot0, model, sel),
                               avrot=_scale_to_fit(epa, model, sel), fit=model, frc=frc, frc_sigma=sig)


def frame_group_spectrum(frames, shifts: np.ndarray, group: int, tile: int, box: int | None = None,
                         overlap: float = 0.5) -> np.ndarray:
    """Average amplitude spectrum of sums of ``group`` consecutive aligned frames (cisTEM fits 3-frame averages).

    Each frame is moved by its shift (``shifts[i] = (x, y)`` pixels, the
    align-movies convention: the shift that aligns it), ``group``
    consecutive frames are summed, and the tile-averaged amplitude spectra
    of the sums (:func:`average_amplitude_spectrum`) are averaged; the last
    ``n mod group`` frames join the last sum (every sum has at least
    ``group`` frames).  Shifts between sums do not matter: a spectrum does
    not see a shift.

    Parameters
    ----------
    frames : iterable of 2D arrays (gain-corrected frames, in order)
    shifts : ndarray (n_frames, 2)
    group : frames per sum (>= 1)
    tile, box, overlap : as :func:`average_amplitude_spectrum`

    Returns
    -------
    ndarray (box, box), float32, centred

    >>> rng = np.random.default_rng(0)
    >>> fr = [rng.poisson(2.0, (64, 64)).astype(np.float32) for _ in range(7)]
    >>> frame_group_spectrum(fr, np.zeros((7, 2)), 3, 32).shape
    (32, 32)
    """
    from cistem_mpi.kernels.motion import phase_shift_half

    shifts = np.asarray(shifts, np.float64)
    n = shifts.shape[0]
    group = max(1, int(group))
    n_groups = max(1, n // group)
    total = None
    acc = None
    count = 0
    done = 0
    for i, frame in enumerate(frames):
        if i >= n:
            raise ValueError(f"more frames than the {n} shifts")
        f = np.asarray(frame, np.float32)
        ny, nx = f.shape
        ft = _fft.rfftn(f)
        ft = phase_shift_half(ft, ny, nx, float(shifts[i, 0]), float(shifts[i, 1]), out=ft)
        acc = ft if acc is None else acc + ft
        count += 1
        last_group = done == n_groups - 1
        if (not last_group and count == group) or (last_group and i == n - 1):
            img = _fft.irfftn(acc, nx).astype(np.float32)
            s = average_amplitude_spectrum(img, tile, box, overlap).astype(np.float64)
            total = s if total is None else total + s
            done += 1
            acc, count = None, 0
    if total is None or done != n_groups:
        raise ValueError(f"{n} shifts but the frames ended early")
    return (total / done).astype(np.float32)

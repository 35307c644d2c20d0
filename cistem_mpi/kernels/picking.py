"""Particle picking: cisTEM's template-free matched filter and reference-based picking.

The steps follow cisTEM's ``find_particles`` (``src/core/particle_finder.cpp``):

1. the micrograph is resampled (Fourier crop) to about half the highest
   resolution used per pixel, phase-flipped with its CTF and high-passed
   with a cosine from 0 at DC to 1 at 20/N (removes ice-thickness ramps);
2. the template is a disc of the characteristic radius with a 5-pixel
   cosine edge (template-free) or each reference at each in-plane rotation;
   its radial amplitude spectrum (normalised to a maximum of 1) band-passes
   the micrograph, whose local mean and local standard deviation over a
   square of side twice the maximum radius give the area statistics;
3. the noise spectrum is the radial power spectrum averaged over the boxes
   (side 2 r_max + 2) of lowest local standard deviation (plain ice; each
   box blanks only itself, so boxes may overlap as in cisTEM); its inverse
   square root whitens the micrograph (unit-variance white noise);
4. each template is multiplied by |CTF| and by the whitening filter, made
   zero at its edge and of unit sum of squares (Sigworth 2004's matched
   filter), so its cross-correlation with the whitened micrograph is the
   score in units of the noise standard deviation;
5. areas whose local mean lies outside ``mode +/- k FWHM`` of the local
   means, or whose local standard deviation exceeds ``mode + k FWHM`` of
   theirs (carbon, contamination, thick ice), get score 0 (k = 2 as in
   cisTEM);
6. peaks are taken greedily from the highest, each above the threshold and
   at least ``edge`` original pixels from the border, each blanking a disc
   of twice the maximum radius.

All coordinates returned are in Å from the first pixel of the original
micrograph (x along columns, y along rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numba import njit

from cistem_mpi.kernels import fft as _fft
from cistem_mpi.kernels.fft import nice_size
from cistem_mpi.kernels.ctf import ctf_2d
from cistem_mpi.kernels.grids import fourier_grid_2d

__all__ = [
    "PickingParams", "PickResult", "nice_size", "resampled_shape", "fourier_resample",
    "prepare_micrograph", "disc_template", "radial_power_spectrum", "radial_filter", "local_mean_sigma",
    "mode_and_fwhm", "background_boxes", "prepare_template", "correlate", "greedy_peaks",
    "rotate_image", "find_particles", "threshold_report",
]


@dataclass
class PickingParams:
    """Options of :func:`find_particles` (defaults: cisTEM's GUI).

    Attributes
    ----------
    characteristic_radius : float
        Å, radius of the disc template, at the middle of its 5-pixel cosine
        edge as cisTEM's (80).
    maximum_radius : float
        Å; picks are at least twice this apart, boxes for the statistics
        have side twice this (120).
    threshold : float
        Minimum peak height in noise standard deviations (6.0).
    edge : int
        Minimum distance of a pick from the border, original pixels (128).
    highest_resolution : float
        Å; the micrograph is resampled to half this per pixel (30).
    n_background_boxes : int
        Boxes of lowest variance used for the noise spectrum (50).
    avoid_high_variance, avoid_abnormal_mean : bool
        Reject areas by local standard deviation (off) / local mean (on), as cisTEM's GUI.
    k_fwhm : float
        Bounds are ``mode +/- k_fwhm * FWHM`` (2, cisTEM's).
    n_rotations : int
        In-plane rotations per reference (36 = 10°); template-free uses 1.
    reject_margin : float
        Beyond cisTEM: rejected patches smaller than a disc of the maximum
        radius are dropped (chance excursions of the local mean, often a
        cluster of particles) and the others grown by this many maximum
        radii, so that picks do not sit on the rim of contamination or
        carbon (0: cisTEM's bare bounds).
    area_statistics : str
        Image whose local mean is tested: "raw" (beyond cisTEM, default) the
        resampled micrograph before phase flip and high-pass, where carbon,
        contamination and thick ice are darker; "cistem" the band-passed,
        phase-flipped micrograph, as cisTEM.  The local standard deviation
        is always that of the band-passed micrograph (as cisTEM).
    """

    characteristic_radius: float = 80.0
    maximum_radius: float = 120.0
    threshold: float = 6.0
    edge: int = 128
    highest_resolution: float = 30.0
    n_background_boxes: int = 50
    avoid_high_variance: bool = False
    avoid_abnormal_mean: bool = True
    k_fwhm: float = 2.0
    n_rotations: int = 36
    reject_margin: float = 0.5
    area_statistics: str = "raw"


@dataclass
class PickResult:
    """What :func:`find_particles` found on one micrograph.

    Attributes
    ----------
    x, y : ndarray float64
        Pick positions, Å from the first pixel of the original micrograph.
    score : ndarray float32
        Peak heights (noise sigma), descending.
    template, rotation : ndarray
        Best reference (index; 0 template-free) and its in-plane rotation (degrees).
    pixel_size : float
        Å per pixel of the resampled micrograph.
    image : ndarray float32
        The resampled, phase-flipped, high-passed micrograph (for the overlay).
    rejected : ndarray bool
        Rejected areas on the resampled grid.
    score_map : ndarray float32
        Best score per resampled pixel (0 in rejected areas).
    peak_scores : ndarray float32
        Heights of every greedy peak above ``report_floor`` (for the threshold report).
    stats : dict
        Modes, FWHMs and bounds of the local mean and standard deviation.
    """

    x: np.ndarray
    y: np.ndarray
    score: np.ndarray
    template: np.ndarray
    rotation: np.ndarray
    pixel_size: float
    image: np.ndarray
    rejected: np.ndarray
    score_map: np.ndarray
    peak_scores: np.ndarray
    stats: dict = field(default_factory=dict)


# --------------------------------------------------------------------------
# sizes and resampling
# --------------------------------------------------------------------------

def resampled_shape(shape: tuple[int, int], pixel_size: float, highest_resolution: float) -> tuple[int, int]:
    """Size of the micrograph resampled to ~``highest_resolution / 2`` Å per pixel (never enlarged).

    As cisTEM: the shorter side becomes the next factorisable size of
    ``side * pixel / (resolution / 2)``, the other keeps the aspect ratio.

    >>> resampled_shape((4096, 4096), 1.0, 30.0)
    (288, 288)
    """
    ny, nx = shape
    target = pixel_size / (highest_resolution / 2.0)
    if target >= 1.0:
        return ny, nx
    if nx == ny:
        s = min(nice_size(int(nx * target)), nx)
        return s, s
    if nx > ny:
        sy = min(nice_size(int(ny * target)), ny)
        return sy, min(int(round(sy / ny * nx)), nx)
    sx = min(nice_size(int(nx * target)), nx)
    return min(int(round(sx / nx * ny)), ny), sx


def fourier_resample(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resample by cropping (or zero-padding) the Fourier transform; pixel 0 stays put.

    The mean is preserved.  ``shape`` (ny, nx), each even or equal to the input.

    >>> import numpy as np
    >>> a = np.ones((8, 8), np.float32)
    >>> float(fourier_resample(a, (4, 4)).mean())
    1.0
    """
    ny, nx = image.shape
    if tuple(shape) == (ny, nx):
        return np.asarray(image, dtype=np.float32).copy()
    return _resample_ft(_cropped_or_kept_ft(image, shape), (ny, nx), shape)


def _cropped_or_kept_ft(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """What :func:`_resample_ft` needs of ``image``'s rfft: only the kept block when shrinking (5x faster)."""
    ny, nx = image.shape
    my, mx = shape
    if my <= ny and mx <= nx and my % 2 == 0:
        return _fft.rfft2_crop(image, (my, mx))
    return _fft.rfftn(np.asarray(image, dtype=np.float32))


def _resample_ft(f: np.ndarray, full: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """:func:`fourier_resample` from the image's rfft ``f`` (of an image of shape ``full``), or from the
    block of it that the crop keeps (:func:`cistem_mpi.kernels.fft.rfft2_crop`, shape ``(my, mx//2+1)``)."""
    ny, nx = full
    my, mx = shape
    out = np.zeros((my, mx // 2 + 1), dtype=np.complex64)
    if f.shape == out.shape and my <= ny and mx <= nx:
        out[...] = f  # the kept block (or, cropping nothing, the same values)
    else:
        hy = min(ny, my) // 2
        hx = min(nx // 2 + 1, mx // 2 + 1)
        out[:hy, :hx] = f[:hy, :hx]
        out[my - hy:, :hx] = f[ny - hy:, :hx]
    if my < ny:  # the new Nyquist row gets both halves' content folded (real signal): keep it simple, zero it
        out[my // 2, :] = 0
    if mx < nx:
        out[:, mx // 2] = 0
    res = _fft.irfftn(out, mx) * np.float32(my * mx / (ny * nx))
    return res.astype(np.float32)


# --------------------------------------------------------------------------
# filters on radial curves
# --------------------------------------------------------------------------

def _radius_grid(ny: int, nx: int) -> np.ndarray:
    fy, fx = fourier_grid_2d(ny, nx, dtype=np.float64)
    return np.sqrt(fx * fx + fy * fy)


def radial_power_spectrum(image: np.ndarray, n_bins: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Rotationally averaged power spectrum ``|FT|^2 / N_pixels`` (white unit noise -> 1).

    Returns (bin centres in cycles/pixel from 0 to sqrt(2)/2, mean power per bin).
    Empty bins are filled from their neighbours.
    """
    ny, nx = image.shape
    f = _fft.rfftn(np.asarray(image, dtype=np.float32))
    p = (f.real.astype(np.float64) ** 2 + f.imag.astype(np.float64) ** 2) / (ny * nx)
    w = np.ones_like(p)
    if nx % 2 == 0:
        w[:, 1:-1] = 2.0
    else:
        w[:, 1:] = 2.0
    r = _radius_grid(ny, nx)
    edges = np.linspace(0.0, np.sqrt(2.0) * 0.5, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, r.ravel(), side="right") - 1, 0, n_bins - 1)
    s = np.bincount(idx, weights=(p * w).ravel(), minlength=n_bins)
    c = np.bincount(idx, weights=w.ravel(), minlength=n_bins)
    centres = 0.5 * (edges[1:] + edges[:-1])
    good = c > 0
    vals = np.interp(centres, centres[good], s[good] / c[good])
    return centres, vals


def radial_filter(ny: int, nx: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A radial curve (x in cycles/pixel, values y) on the rfft half grid of (ny, nx), linear interpolation."""
    return np.interp(_radius_grid(ny, nx), x, y).astype(np.float32)


def _cosine_highpass(ny: int, nx: int) -> np.ndarray:
    """cisTEM's high-pass (``CosineMask(10/N, 20/N, invert)``): a cosine from 0 at DC to 1 at 20/N
    cycles/pixel, one half at 10/N (N = x size)."""
    r = _radius_grid(ny, nx)
    hi = 20.0 / nx
    m = np.where(r >= hi, 1.0, 0.5 * (1.0 - np.cos(np.pi * r / hi)))
    return m.astype(np.float32)


def prepare_micrograph(image: np.ndarray, pixel_size: float, highest_resolution: float, voltage: float,
                       cs: float, amplitude_contrast: float, df1: float, df2: float, angast: float,
                       pshift: float = 0.0, image_ft: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
    """Resample to ~resolution/2 per pixel, phase-flip with the CTF, cosine high-pass.

    ``image_ft``, if given, is ``kernels.fft.rfftn(image)`` or the block of it the resampling keeps
    (``kernels.fft.rfft2_crop(image, shape)``): it saves that transform.

    Returns
    -------
    image : ndarray float32
        The prepared micrograph (protein bright: the phase flip turns the
        dark-in-underfocus particles positive).
    pixel_x, pixel_y : float
        Å per pixel of the result along x and y.

    >>> import numpy as np
    >>> m, px, py = prepare_micrograph(np.random.default_rng(0).random((256, 256)), 1.0, 8.0, 300, 2.7,
    ...                                0.07, 15000, 15000, 0)
    >>> m.shape, px
    ((64, 64), 4.0)
    """
    ny, nx = image.shape
    my, mx = resampled_shape((ny, nx), pixel_size, highest_resolution)
    if image_ft is not None and (my, mx) != (ny, nx):
        small = _resample_ft(image_ft, (ny, nx), (my, mx))
    else:
        small = fourier_resample(image, (my, mx))
    px, py = pixel_size * nx / mx, pixel_size * ny / my
    f = _fft.rfftn(small)
    # CTF on the anisotropic grid of the resampled image (px == py to < 1 % in practice)
    c = ctf_2d(my, 0.5 * (px + py), voltage, cs, amplitude_contrast, df1, df2, angast, pshift, half=True, nx=mx)
    f *= np.where(c < 0, -1.0, 1.0).astype(np.float32)
    f *= _cosine_highpass(my, mx)
    return _fft.irfftn(f, mx).astype(np.float32), px, py


def disc_template(box: int, radius_px: float, edge_px: float = 5.0) -> np.ndarray:
    """A disc of radius ``radius_px`` with a cosine edge of width ``edge_px`` centred on that radius
    (cisTEM's ``CosineMask(radius, edge)``: 1 inside ``radius - edge/2``, 0.5 at ``radius``, 0 beyond
    ``radius + edge/2``; centre box//2).

    >>> t = disc_template(32, 8.0)
    >>> float(t[16, 16]), float(t[16, 24]), float(t[16, 30])
    (1.0, 0.5, 0.0)
    """
    y, x = np.mgrid[0:box, 0:box] - box // 2
    r = np.sqrt(x * x + y * y)
    r0 = max(radius_px - 0.5 * edge_px, 0.0)
    t = np.where(r <= r0, 1.0,
                 np.where(r >= r0 + edge_px, 0.0, 0.5 * (1.0 + np.cos(np.pi * (r - r0) / edge_px))))
    return t.astype(np.float32)


# --------------------------------------------------------------------------
# local statistics and areas
# --------------------------------------------------------------------------

def local_mean_sigma(image: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over a ``side`` x ``side`` square around every pixel.

    Box sums by cumulative sums with the image mirrored at its borders
    (float64 accumulation).

    >>> import numpy as np
    >>> m, s = local_mean_sigma(np.arange(16.0).reshape(4, 4), 1)
    >>> float(s.max())
    0.0
    """
    side = max(1, int(side))
    a = np.asarray(image, dtype=np.float64)
    h0 = side // 2
    h1 = side - h0
    pad = np.pad(a, ((h0, h1), (h0, h1)), mode="reflect")

    def box_sum(v: np.ndarray) -> np.ndarray:
        c = np.zeros((v.shape[0] + 1, v.shape[1] + 1))
        c[1:, 1:] = v.cumsum(0).cumsum(1)
        ny, nx = a.shape
        return c[side:side + ny, side:side + nx] - c[:ny, side:side + nx] - c[side:side + ny, :nx] + c[:ny, :nx]

    n = float(side * side)
    m = box_sum(pad) / n
    v = box_sum(pad * pad) / n - m * m
    return m.astype(np.float32), np.sqrt(np.clip(v, 0.0, None)).astype(np.float32)


def mode_and_fwhm(values: np.ndarray, n_bins: int = 100) -> tuple[float, float]:
    """Mode and full width at half maximum of the histogram of ``values``.

    The histogram spans the 0.5-99.5 percentiles in ``n_bins`` bins; the
    FWHM is measured between the outermost bins, on either side of the mode,
    still at or above half the peak (linearly interpolated).

    >>> import numpy as np
    >>> m, w = mode_and_fwhm(np.random.default_rng(0).normal(3.0, 1.0, 200000))
    >>> abs(m - 3.0) < 0.15, abs(w - 2.355) < 0.15
    (True, True)
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = np.percentile(v, [0.5, 99.5])
    if hi <= lo:
        return float(lo), 0.0
    h, e = np.histogram(v, bins=n_bins, range=(lo, hi))
    c = 0.5 * (e[1:] + e[:-1])
    k = int(np.argmax(h))
    half = 0.5 * h[k]
    i = k
    while i > 0 and h[i - 1] >= half:
        i -= 1
    j = k
    while j < n_bins - 1 and h[j + 1] >= half:
        j += 1
    # interpolate the crossings
    left = c[i] if i == 0 else c[i - 1] + (half - h[i - 1]) / max(h[i] - h[i - 1], 1e-12) * (c[i] - c[i - 1])
    right = c[j] if j == n_bins - 1 else c[j] + (h[j] - half) / max(h[j] - h[j + 1], 1e-12) * (c[j + 1] - c[j])
    return float(c[k]), float(right - left)


@njit(cache=True)
def _lowest_boxes(sig, n_boxes, half, edge):
    # greedy: lowest local sigma, each blanking its own box (side 2*half+1), as cisTEM's
    # SetAreaToIgnore: boxes may overlap by up to half their side, so that they all come from
    # the emptiest areas even on a small micrograph
    ny, nx = sig.shape
    work = sig.copy()
    out = np.empty((n_boxes, 2), np.int64)
    m = 0
    big = np.inf
    for b in range(n_boxes):
        best = big
        by, bx = -1, -1
        for y in range(edge, ny - edge):
            for x in range(edge, nx - edge):
                if work[y, x] < best:
                    best = work[y, x]
                    by, bx = y, x
        if by < 0:
            break
        out[m, 0], out[m, 1] = by, bx
        m += 1
        for y in range(max(0, by - half), min(ny, by + half + 1)):
            for x in range(max(0, bx - half), min(nx, bx + half + 1)):
                work[y, x] = big
    return out[:m]


def background_boxes(local_sigma: np.ndarray, box: int, n_boxes: int) -> np.ndarray:
    """Centres (y, x) of up to ``n_boxes`` ``box``-sized areas of lowest local sigma (cisTEM).

    Each chosen centre blanks its own box, so the next centre lies outside
    it (boxes overlap by at most half their side).

    >>> import numpy as np
    >>> s = np.ones((40, 40), np.float32); s[20, 20] = 0
    >>> background_boxes(s, 8, 1).tolist()
    [[20, 20]]
    """
    half = box // 2
    return _lowest_boxes(np.ascontiguousarray(local_sigma, dtype=np.float32), int(n_boxes), half, half)


# --------------------------------------------------------------------------
# templates and correlation
# --------------------------------------------------------------------------

def rotate_image(image: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotate a centred box by ``angle_deg`` (counter-clockwise for x right, y down... i.e. the
    standard mathematical sense in (x, y) with y the row index) about ``N//2``; cubic spline, zero outside.

    >>> import numpy as np
    >>> a = np.zeros((9, 9), np.float32); a[4, 6] = 1
    >>> int(np.argmax(rotate_image(a, 90.0)))  # (x=6,y=4) -> (x=4,y=6)
    58
    """
    from scipy.ndimage import affine_transform

    n = image.shape[0]
    t = np.deg2rad(angle_deg)
    c, s = np.cos(t), np.sin(t)
    # output (y, x) samples input at R^-1 (out - centre) + centre; rows are y
    m = np.array([[c, -s], [s, c]])  # (y, x) <- inverse rotation in (y, x) order
    ctr = np.array([n // 2, n // 2], dtype=np.float64)
    off = ctr - m @ ctr
    return affine_transform(np.asarray(image, dtype=np.float32), m, offset=off, order=3, mode="constant",
                            cval=0.0).astype(np.float32)


def prepare_template(template: np.ndarray, abs_ctf: np.ndarray, whitening: np.ndarray) -> np.ndarray:
    """Sigworth's matched filter: template x |CTF| x whitening, zero at the edge, unit sum of squares.

    Parameters
    ----------
    template : ndarray (T, T)
        Centred template (edge mean is subtracted first).
    abs_ctf, whitening : ndarray (T, T//2+1)
        |CTF| and the whitening filter on the template's rfft grid.

    Returns
    -------
    ndarray float32 (T, T)
    """
    t = np.asarray(template, dtype=np.float32)
    t = t - _edge_mean(t)
    f = _fft.ft2(t) * abs_ctf * whitening
    out = _fft.ift2(f, nx=t.shape[1]).astype(np.float32)
    out -= _edge_mean(out)
    ss = float(np.sum(out.astype(np.float64) ** 2))
    return (out / np.float32(np.sqrt(ss))).astype(np.float32) if ss > 0 else out


def _edge_mean(a: np.ndarray) -> np.float32:
    return np.float32(np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]]).mean())


def correlate(image_ft: np.ndarray, template: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Cross-correlation ``s(p) = sum_q T(q - p + c) M(q)`` of a centred template (centre c = T//2).

    ``image_ft`` = ``kernels.fft.rfftn(M)`` of the (ny, nx) image.

    >>> import numpy as np
    >>> from cistem_mpi.kernels import fft
    >>> m = np.zeros((16, 16), np.float32); m[5, 9] = 1
    >>> t = np.zeros((4, 4), np.float32); t[2, 2] = 1
    >>> s = correlate(fft.rfftn(m), t, (16, 16))
    >>> np.unravel_index(np.argmax(s), s.shape)
    (np.int64(5), np.int64(9))
    """
    ny, nx = shape
    tb = template.shape[0]
    c = tb // 2
    big = np.zeros((ny, nx), dtype=np.float32)
    # wrap the template so that its centre sits at index 0
    ys = (np.arange(tb) - c) % ny
    xs = (np.arange(tb) - c) % nx
    big[np.ix_(ys, xs)] = template
    f = np.conj(_fft.rfftn(big)) * image_ft
    return _fft.irfftn(f, nx).astype(np.float32)


@njit(cache=True)
def _greedy(score, order_y, order_x, floor, radius2):
    ny, nx = score.shape
    blocked = np.zeros((ny, nx), np.bool_)
    r = int(np.sqrt(radius2)) + 1
    picks = np.empty((order_y.size, 2), np.int64)
    m = 0
    for i in range(order_y.size):
        y, x = order_y[i], order_x[i]
        if score[y, x] < floor:
            break
        if blocked[y, x]:
            continue
        picks[m, 0], picks[m, 1] = y, x
        m += 1
        for yy in range(max(0, y - r), min(ny, y + r + 1)):
            dy2 = (yy - y) * (yy - y)
            for xx in range(max(0, x - r), min(nx, x + r + 1)):
                if dy2 + (xx - x) * (xx - x) <= radius2:
                    blocked[yy, xx] = True
    return picks[:m]


def greedy_peaks(score: np.ndarray, floor: float, exclusion_radius_px: float, edge_y: int = 0,
                 edge_x: int = 0) -> np.ndarray:
    """Peaks from the highest down, each >= ``floor`` and blanking a disc of ``exclusion_radius_px``.

    Pixels within ``edge_y`` / ``edge_x`` of the border are never picked.
    Equivalent to repeatedly taking the maximum and blanking around it
    (ties broken by raster order).  Returns (m, 2) int (y, x).

    >>> import numpy as np
    >>> s = np.zeros((20, 20), np.float32); s[5, 5] = 3; s[6, 6] = 2; s[15, 15] = 1
    >>> greedy_peaks(s, 0.5, 4.0).tolist()
    [[5, 5], [15, 15]]
    """
    s = np.array(score, dtype=np.float32)
    ny, nx = s.shape
    if edge_y > 0:
        s[:edge_y] = -np.inf
        s[ny - edge_y:] = -np.inf
    if edge_x > 0:
        s[:, :edge_x] = -np.inf
        s[:, nx - edge_x:] = -np.inf
    flat = s.ravel()
    cand = np.nonzero(flat >= floor)[0]
    order = cand[np.argsort(-flat[cand], kind="stable")]
    return _greedy(s, (order // nx).astype(np.int64), (order % nx).astype(np.int64), np.float32(floor),
                   float(exclusion_radius_px) ** 2)


def _subpixel(score: np.ndarray, y: int, x: int) -> tuple[float, float]:
    ny, nx = score.shape
    dy = dx = 0.0
    if 0 < y < ny - 1:
        a, b, c = score[y - 1, x], score[y, x], score[y + 1, x]
        den = a - 2 * b + c
        if den < 0:
            dy = float(np.clip(0.5 * (a - c) / den, -0.5, 0.5))
    if 0 < x < nx - 1:
        a, b, c = score[y, x - 1], score[y, x], score[y, x + 1]
        den = a - 2 * b + c
        if den < 0:
            dx = float(np.clip(0.5 * (a - c) / den, -0.5, 0.5))
    return y + dy, x + dx


def threshold_report(peak_scores: np.ndarray, thresholds: np.ndarray) -> list[tuple[float, int]]:
    """Number of picks at each threshold (greedy picks above t are those above any lower floor).

    >>> threshold_report(np.array([9.0, 7.0, 5.0]), np.array([4.0, 6.0, 8.0]))
    [(4.0, 3), (6.0, 2), (8.0, 1)]
    """
    s = np.asarray(peak_scores)
    return [(float(t), int(np.count_nonzero(s >= t))) for t in thresholds]


# --------------------------------------------------------------------------
# the whole picker
# --------------------------------------------------------------------------

def find_particles(image: np.ndarray, pixel_size: float, voltage: float, cs: float, amplitude_contrast: float,
                   df1: float, df2: float, angast: float, pshift: float = 0.0,
                   params: PickingParams | None = None, references: np.ndarray | None = None,
                   reference_pixel_size: float | None = None, report_floor: float | None = None) -> PickResult:
    """Pick particles in one micrograph (see the module docstring for the steps).

    Parameters
    ----------
    image : ndarray (ny, nx)
        The micrograph (any scale; particles dark as recorded).
    pixel_size : float
        Å per pixel.
    voltage, cs, amplitude_contrast, df1, df2, angast, pshift
        Its CTF (kV, mm, fraction, Å, Å, degrees, radians).
    params : PickingParams
        Radii, threshold, edge, resolution, area rejection.
    references : ndarray (n, T, T), optional
        Reference images (protein positive, no CTF: 2D class averages or
        projections of a map); each is tried at ``params.n_rotations``
        in-plane rotations.  Default: template-free (the disc).
    reference_pixel_size : float
        Å per pixel of the references (default ``pixel_size``).
    report_floor : float, optional
        Peaks down to this height are kept in ``peak_scores`` (default
        ``min(3, threshold)``).

    Returns
    -------
    PickResult

    >>> import numpy as np
    >>> r = find_particles(np.random.default_rng(0).normal(size=(512, 512)), 4.0, 300, 2.7, 0.07,
    ...                    15000, 15000, 0, params=PickingParams(edge=16))
    >>> len(r.x)  # pure noise: nothing at 6 sigma
    0
    """
    p = PickingParams() if params is None else params
    ny, nx = image.shape
    image = np.asarray(image, dtype=np.float32)
    # one transform of the micrograph (its kept block) serves the picking image and the raw area statistics
    kept_ft = None
    shape = resampled_shape((ny, nx), pixel_size, p.highest_resolution)
    if shape != (ny, nx):
        kept_ft = _cropped_or_kept_ft(image, shape)
    mic, px, py = prepare_micrograph(image, pixel_size, p.highest_resolution, voltage, cs, amplitude_contrast,
                                     df1, df2, angast, pshift, image_ft=kept_ft)
    my, mx = mic.shape
    ps = 0.5 * (px + py)
    rmax = p.maximum_radius / ps
    rchar = p.characteristic_radius / ps
    # template box: the object plus its CTF delocalisation at the highest resolution (cisTEM)
    from cistem_mpi.kernels.ctf import electron_wavelength

    deloc = max(df1, df2) * electron_wavelength(voltage) / p.highest_resolution / ps
    # (and at least the disc with its 5-pixel edge and a margin, so that its edge is zero)
    need = max(2 * (int(rmax) + int(deloc)) + 2, 2 * int(np.ceil(rchar + 5.0)) + 6)
    tbox = max(min(nice_size(need), (min(my, mx) // 2) * 2), 8)
    # templates at the resampled pixel size
    if references is None:
        temps = [disc_template(tbox, rchar, 5.0)]
        rotations = [0.0]
    else:
        rps = pixel_size if reference_pixel_size is None else reference_pixel_size
        temps = [_template_to_box(np.asarray(r, dtype=np.float32), rps, ps, tbox) for r in references]
        rotations = [360.0 * k / p.n_rotations for k in range(max(1, p.n_rotations))]
    # band-pass by the templates' mean amplitude spectrum (normalised to max 1)
    spec = None
    for t in temps:
        xs, pw = radial_power_spectrum(t - _edge_mean(t), n_bins=tbox)
        spec = pw if spec is None else spec + pw
    amp = np.sqrt(spec / max(float(spec.max()), 1e-30))
    mf = _fft.rfftn(mic)
    bp = _fft.irfftn(mf * radial_filter(my, mx, xs, amp), mx)
    side = max(2, int(round(2 * rmax)))
    lmean, lsig = local_mean_sigma(bp, side)
    if p.area_statistics == "raw":
        raw = (_resample_ft(kept_ft, (ny, nx), (my, mx)) if kept_ft is not None
               else fourier_resample(image, (my, mx)))
        lmean, _ = local_mean_sigma(raw, side)
    elif p.area_statistics != "cistem":
        raise ValueError("area_statistics must be 'raw' or 'cistem'")
    inner = (slice(min(side // 2, my // 4), my - min(side // 2, my // 4)),
             slice(min(side // 2, mx // 4), mx - min(side // 2, mx // 4)))
    mean_mode, mean_fwhm = mode_and_fwhm(lmean[inner])
    sig_mode, sig_fwhm = mode_and_fwhm(lsig[inner])
    # noise spectrum from the lowest-variance boxes of the (not band-passed) micrograph
    bbox = int(2 * rmax + 2)
    bbox += bbox % 2
    bbox = min(bbox, (min(my, mx) // 2) * 2)
    centres = background_boxes(lsig, bbox, p.n_background_boxes)
    ps_sum = None
    h = bbox // 2
    for cy, cx in centres:
        y0, x0 = max(0, min(my - bbox, cy - h)), max(0, min(mx - bbox, cx - h))
        _, pw = radial_power_spectrum(mic[y0:y0 + bbox, x0:x0 + bbox], n_bins=bbox)
        ps_sum = pw if ps_sum is None else ps_sum + pw
    if ps_sum is None:
        raise ValueError("micrograph too small for one background box")
    bg = ps_sum / len(centres)
    wx = np.linspace(0.0, np.sqrt(2.0) * 0.5, bbox + 1)
    wx = 0.5 * (wx[1:] + wx[:-1])
    # 1 / sqrt(noise power), 0 where there is none (cisTEM: no cap, so the whitening also restores
    # the frequencies the high-pass only attenuated)
    wcurve = np.where(bg > 0, 1.0 / np.sqrt(np.maximum(bg, 1e-30)), 0.0)
    whitened = mf * radial_filter(my, mx, wx, wcurve)
    # template grid filters
    c = ctf_2d(tbox, ps, voltage, cs, amplitude_contrast, df1, df2, angast, pshift, half=True)
    abs_c = np.abs(c).astype(np.float32)
    w_t = radial_filter(tbox, tbox, wx, wcurve)
    best = np.full((my, mx), -np.inf, dtype=np.float32)
    best_t = np.zeros((my, mx), dtype=np.int32)
    best_r = np.zeros((my, mx), dtype=np.float32)
    for ti, t in enumerate(temps):
        for rot in rotations:
            tt = t if rot == 0.0 else rotate_image(t, rot)
            m = prepare_template(tt, abs_c, w_t)
            s = correlate(whitened, m, (my, mx))
            upd = s > best
            best[upd] = s[upd]
            best_t[upd] = ti
            best_r[upd] = rot
    # area rejection
    rejected = np.zeros((my, mx), dtype=bool)
    lo_m, hi_m = mean_mode - p.k_fwhm * mean_fwhm, mean_mode + p.k_fwhm * mean_fwhm
    hi_s = sig_mode + p.k_fwhm * sig_fwhm
    if p.avoid_abnormal_mean:
        rejected |= (lmean < lo_m) | (lmean > hi_m)
    if p.avoid_high_variance:
        rejected |= lsig > hi_s
    if p.reject_margin > 0 and rejected.any():
        rejected = _clean_rejected(rejected, rmax, p.reject_margin)
    score = np.where(rejected, np.float32(0.0), best).astype(np.float32)
    floor = min(3.0, p.threshold) if report_floor is None else float(report_floor)
    edge_y = int(np.ceil(p.edge * pixel_size / py)) + 1 if p.edge > 0 else 0
    edge_x = int(np.ceil(p.edge * pixel_size / px)) + 1 if p.edge > 0 else 0
    edge_y, edge_x = min(edge_y, my // 2), min(edge_x, mx // 2)
    peaks = greedy_peaks(score, floor, 2.0 * rmax, edge_y, edge_x)
    heights = score[peaks[:, 0], peaks[:, 1]] if len(peaks) else np.zeros(0, np.float32)
    keep = heights >= p.threshold
    sel = peaks[keep]
    xs_, ys_ = [], []
    for y, x in sel:
        sy, sx = _subpixel(score, int(y), int(x))
        ys_.append(sy * py)
        xs_.append(sx * px)
    stats = {"local_mean_mode": mean_mode, "local_mean_fwhm": mean_fwhm, "local_mean_bounds": [lo_m, hi_m],
             "local_sigma_mode": sig_mode, "local_sigma_fwhm": sig_fwhm, "local_sigma_max": hi_s,
             "rejected_fraction": float(rejected.mean()), "n_background_boxes": int(len(centres)),
             "template_box": int(tbox), "resampled_shape": [int(my), int(mx)]}
    return PickResult(np.array(xs_, dtype=np.float64), np.array(ys_, dtype=np.float64),
                      heights[keep].astype(np.float32), best_t[sel[:, 0], sel[:, 1]] if len(sel) else np.zeros(0, np.int32),
                      best_r[sel[:, 0], sel[:, 1]] if len(sel) else np.zeros(0, np.float32), ps, mic, rejected,
                      score, heights.astype(np.float32), stats)


def _clean_rejected(rejected: np.ndarray, rmax: float, margin: float) -> np.ndarray:
    """Drop rejected patches smaller than a disc of ``rmax`` px; grow the rest by ``margin * rmax`` px."""
    from scipy.ndimage import distance_transform_edt, label

    lab, n = label(rejected)
    if n == 0:
        return rejected
    sizes = np.bincount(lab.ravel())
    keep = sizes >= np.pi * rmax * rmax
    keep[0] = False
    big = keep[lab]
    if not big.any():
        return big
    return distance_transform_edt(~big) <= margin * rmax


def _template_to_box(ref: np.ndarray, ref_pixel: float, pixel: float, box: int) -> np.ndarray:
    """A reference resampled to ``pixel`` Å/px (Fourier crop/pad) and centred in a ``box`` box."""
    n = ref.shape[0]
    m = int(round(n * ref_pixel / pixel))
    m += m % 2
    m = max(m, 2)
    r = ref - _edge_mean(ref)
    if m != n:
        r = _fft.ift2(_resize_ft(_fft.ft2(r), n, m), nx=m) * np.float32((m * m) / (n * n))
    out = np.zeros((box, box), dtype=np.float32)
    # centre m//2 -> box//2
    if m <= box:
        o = box // 2 - m // 2
        out[o:o + m, o:o + m] = r
    else:
        o = m // 2 - box // 2
        out[:] = r[o:o + box, o:o + box]
    return out


def _resize_ft(f: np.ndarray, n: int, m: int) -> np.ndarray:
    """Centred rfft-half FT (n, n//2+1) cropped or padded to (m, m//2+1)."""
    out = np.zeros((m, m // 2 + 1), dtype=np.complex64)
    h = min(n, m) // 2
    hx = min(n // 2, m // 2) + 1
    out[:h, :hx] = f[:h, :hx]
    out[m - h:, :hx] = f[n - h:, :hx]
    return out

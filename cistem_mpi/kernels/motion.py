"""Movie alignment: full-frame (cisTEM's unblur) and local (patch) motion, and the sums.

Everything here is pure numerics on arrays; the driver streams the frames.

Layout and sign conventions
---------------------------
* Frames are ``[y, x]`` float32.  Fourier transforms are the rfft half layout
  *without* centring (frequency 0 at ``[0, 0]``), as :func:`cistem_mpi.kernels.fft.rfftn`.
* A shift ``(sx, sy)`` of a frame is the shift *applied* to it to bring it
  onto the reference, in pixels: the aligned frame is ``frame(x - sx, y - sy)``
  (content moves by ``+s``), as cisTEM's ``Image::PhaseShift`` and the shifts
  unblur reports.  A frame that shows the specimen moved by ``+d`` is aligned
  by ``s = -d`` (plus the common offset that puts the middle frame at 0).
* The local model gives, at every pixel, the residual shift to apply on top of
  the frame's global shift.

Algorithm (unblur, ``src/programs/unblur/unblur.cpp``)
------------------------------------------------------
Frames are pre-binned (Fourier-cropped) to about 5 Å/px.  Each frame is aligned
to the sum of all the others, with a B-factor of 1500 Å² on that reference and
its Fourier central cross (the lines kx = 0 and ky = 0) set to zero, by the
sub-pixel (3 x 3 parabola) peak of the cross-correlation within the maximum
shift.  The first round ignores peaks nearer than the minimum shift and
smooths the trajectory with a polynomial; later rounds smooth it with a
Savitzky-Golay filter (window ``5 / exposure per frame`` frames, at least 5).
After every round the trajectory is re-centred on the middle frame (index
``n // 2``), the frames are shifted, and the rounds stop when no frame moved
by more than the threshold (1 Å) or at the iteration limit.  Then the shifts
are refined the same way on finer frames.

The finer frames are not the full-resolution ones: the 1500 Å² B-factor
leaves nothing of the cross-correlation beyond 1/(3 Å) (the weight is
``exp(-1500 k^2 / 4) < 1e-10`` at k = 1/3 Å⁻¹), so aligning frames Fourier-cropped
to ``refine_pixel`` (default 1.5 Å, or the pixel size if larger) gives the
same correlation peaks while keeping only a fraction of the movie in memory.

Local motion: the globally aligned refine frames are cut into a grid of
patches; each patch stack is aligned as above; the patch trajectories are
fitted by a model smooth in space and time (MotionCor2's form): the residual
shift ``r(u, v, t) = sum_{s, j} c_{s j} S_s(u, v) T_j(t)`` with
``S = (1, u, v, u², uv, v²)`` (``u, v`` in [-1, 1] across the frame) and
``T = (τ, τ², τ³)``, ``τ = (t - n//2) / n`` (zero at the middle frame), i.e.
18 coefficients per axis, fitted by least squares with one round of outlier
rejection.  It is interpolated to every pixel (bicubic) when summing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from cistem_mpi.kernels import fft as _fft

__all__ = [
    "AlignmentSettings", "replace_outliers", "fill_defects", "prepare_frame",
    "fourier_crop_half", "bfactor_filter", "ssnr_filter", "peak_parabola", "savitzky_golay", "polynomial_smooth",
    "phase_shift_half", "align_stack", "MovieAligner", "DeformationModel", "fit_deformation",
    "held_out_ratio", "LOCAL_MODEL_MAX_RATIO",
    "patch_layout", "align_patches", "warp_add", "warp_add_pair", "MovieSummer", "trajectory_rms", "good_fft_size",
]


# --------------------------------------------------------------------------
# frame preparation
# --------------------------------------------------------------------------

def replace_outliers(frame: np.ndarray, n_sigma: float = 12.0) -> np.ndarray:
    """Replace pixels beyond ``mean +/- n_sigma * sd`` by the mean, in place (cisTEM's 12 sigma).

    Parameters
    ----------
    frame : ndarray, float32, 2D
    n_sigma : float

    Returns
    -------
    ndarray
        ``frame`` itself.

    >>> f = np.zeros((50, 50), np.float32); f[3, 3] = 1e6
    >>> float(replace_outliers(f)[3, 3]) < 1e6
    True
    """
    mean = float(frame.mean(dtype=np.float64))
    sd = float(frame.std(dtype=np.float64))
    lo, hi = mean - n_sigma * sd, mean + n_sigma * sd
    bad = (frame > hi) | (frame < lo)
    if bad.any():
        frame[bad] = np.float32(mean)
    return frame


@njit(cache=True)
def _fill_defects(out, mask, ys, xs):
    ny, nx = out.shape
    total_good = 0.0
    n_good = 0
    for y in range(ny):
        for x in range(nx):
            if not mask[y, x]:
                total_good += out[y, x]
                n_good += 1
    fallback = total_good / n_good if n_good > 0 else 0.0
    for k in range(ys.size):
        y, x = ys[k], xs[k]
        done = False
        for r in (1, 2, 3):
            s = 0.0
            c = 0
            for yy in range(max(0, y - r), min(ny, y + r + 1)):
                for xx in range(max(0, x - r), min(nx, x + r + 1)):
                    if not mask[yy, xx]:
                        s += out[yy, xx]
                        c += 1
            if c > 0:
                out[y, x] = s / c
                done = True
                break
        if not done:
            out[y, x] = fallback


def fill_defects(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Fill masked pixels (bad pixels, rows, columns) with the mean of good neighbours, in place.

    The 3 x 3 neighbourhood first, then 5 x 5 and 7 x 7 (a bad row or column
    is filled from the rows or columns beside it); the mean of all good
    pixels if none.

    >>> f = np.ones((5, 5), np.float32); f[:, 2] = 99; m = np.zeros((5, 5), bool); m[:, 2] = True
    >>> float(fill_defects(f, m)[:, 2].max())
    1.0
    """
    ys, xs = np.nonzero(mask)
    if ys.size:
        _fill_defects(frame, mask, ys.astype(np.int64), xs.astype(np.int64))
    return frame


def prepare_frame(raw: np.ndarray, gain: np.ndarray | None = None, dark: np.ndarray | None = None,
                  defects: np.ndarray | None = None, outlier_sigma: float = 12.0) -> np.ndarray:
    """One integer frame to a float32 frame: ``(raw - dark) * gain``, defects, outliers.

    Parameters
    ----------
    raw : ndarray
        The frame as stored (integers stay integers until here).
    gain, dark : ndarray, optional
        Multiplicative gain reference and dark reference of the frame's shape.
    defects : ndarray of bool, optional
        True = defective pixel (filled from its neighbours).
    outlier_sigma : float
        Pixels beyond this many standard deviations become the mean (0: off).

    >>> float(prepare_frame(np.full((4, 4), 2, np.uint16), gain=np.full((4, 4), 0.5, np.float32)).mean())
    1.0
    """
    raw = np.ascontiguousarray(raw)
    if raw.ndim != 2 or raw.dtype.kind not in "uif" or (gain is not None and gain.shape != raw.shape) \
            or (dark is not None and dark.shape != raw.shape):
        return _prepare_frame_numpy(raw, gain, dark, defects, outlier_sigma)
    f = np.empty(raw.shape, np.float32)
    one = np.ones((1, 1), np.float32)
    g = one if gain is None else np.ascontiguousarray(gain, dtype=np.float32)
    d = one if dark is None else np.ascontiguousarray(dark, dtype=np.float32)
    # one pass over the integers: (raw - dark) * gain in float32 and the frame's sum and sum of squares
    s1, s2 = _correct_frame(raw, g, d, gain is not None, dark is not None, f)
    if defects is not None:
        fill_defects(f, defects)
    if outlier_sigma and outlier_sigma > 0:
        if defects is not None:
            s1, s2 = _frame_moments(f)
        npx = f.size
        mean = s1 / npx
        sd = math.sqrt(max(s2 / npx - mean * mean, 0.0))
        _clip_outliers(f, mean - outlier_sigma * sd, mean + outlier_sigma * sd, np.float32(mean))
    return f


def _prepare_frame_numpy(raw, gain, dark, defects, outlier_sigma):
    f = np.asarray(raw, dtype=np.float32)
    if f is raw:
        f = f.copy()
    if dark is not None:
        f = np.subtract(f, dark, dtype=np.float32)
    if gain is not None:
        f = np.multiply(f, gain, dtype=np.float32)
    if defects is not None:
        fill_defects(f, defects)
    if outlier_sigma and outlier_sigma > 0:
        replace_outliers(f, outlier_sigma)
    return f


@njit(cache=True)
def _correct_frame(raw, gain, dark, has_gain, has_dark, out):
    ny, nx = raw.shape
    s1 = 0.0
    s2 = 0.0
    for y in range(ny):
        r1 = 0.0
        r2 = 0.0
        for x in range(nx):
            v = np.float32(raw[y, x])
            if has_dark:
                v = v - dark[y, x]
            if has_gain:
                v = v * gain[y, x]
            out[y, x] = v
            r1 += v
            r2 += v * np.float64(v)
        s1 += r1
        s2 += r2
    return s1, s2


@njit(cache=True)
def _frame_moments(f):
    ny, nx = f.shape
    s1 = 0.0
    s2 = 0.0
    for y in range(ny):
        for x in range(nx):
            v = np.float64(f[y, x])
            s1 += v
            s2 += v * v
    return s1, s2


@njit(cache=True)
def _clip_outliers(f, lo, hi, mean):
    ny, nx = f.shape
    for y in range(ny):
        for x in range(nx):
            v = f[y, x]
            if v > hi or v < lo:
                f[y, x] = mean


# --------------------------------------------------------------------------
# Fourier helpers (non-centred half layout)
# --------------------------------------------------------------------------

def fourier_crop_half(f: np.ndarray, ny: int, nx: int, my: int, mx: int) -> np.ndarray:
    """Crop the half-layout transform of an (ny, nx) image to that of an (my, mx) image.

    The result is scaled so that the inverse transform keeps the mean
    (binning by Fourier cropping).  ``my <= ny`` and ``mx <= nx``.

    >>> a = np.random.default_rng(0).random((8, 8)).astype(np.float32)
    >>> b = _fft.irfftn(fourier_crop_half(_fft.rfftn(a), 8, 8, 4, 4), 4)
    >>> bool(abs(b.mean() - a.mean()) < 1e-6)
    True
    """
    if my > ny or mx > nx:
        raise ValueError("fourier_crop_half cannot enlarge")
    out = np.empty((my, mx // 2 + 1), dtype=np.complex64)
    top = (my + 1) // 2  # frequencies 0 .. top-1
    bottom = my - top    # frequencies -bottom .. -1
    w = mx // 2 + 1
    out[:top] = f[:top, :w]
    if bottom:
        out[top:] = f[ny - bottom:, :w]
    out *= np.float32((my * mx) / (ny * nx))
    return out


def _freq2(ny: int, nx: int) -> np.ndarray:
    fy = np.fft.fftfreq(ny).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(nx).astype(np.float32)[None, :]
    return fx * fx + fy * fy


def bfactor_filter(ny: int, nx: int, unitless_bfactor: float, mask_cross: bool = True,
                   vertical_half_width: int = 1, horizontal_half_width: int = 1) -> np.ndarray:
    """``exp(-B k² / 4)`` (k in cycles/pixel) with the central cross zeroed, half layout.

    ``unitless_bfactor`` = B (Å²) / pixel size². The cross: the columns
    |kx| < vertical_half_width and the rows |ky| < horizontal_half_width
    (half-width 1: the lines kx = 0 and ky = 0), as cisTEM's ``MaskCentralCross``.

    >>> float(bfactor_filter(8, 8, 10.0)[0, 3])
    0.0
    """
    filt = np.exp(-np.float32(unitless_bfactor) * _freq2(ny, nx) * np.float32(0.25)).astype(np.float32)
    if mask_cross:
        ky = np.rint(np.fft.fftfreq(ny) * ny).astype(int)
        filt[np.abs(ky) < max(1, horizontal_half_width), :] = 0.0
        filt[:, :max(1, vertical_half_width)] = 0.0
    return filt


def ssnr_filter(stack: np.ndarray, ny: int, nx: int, mask_cross: bool = True, vertical_half_width: int = 1,
                horizontal_half_width: int = 1, smooth_rings: int = 5) -> np.ndarray:
    """Wiener filter of the reference "sum minus one frame", measured on the aligned frames.

    Why: unblur's fixed B-factor (1500 Å²) is right for the coarse rounds,
    where the frames are far apart, but it throws away shells that hold
    signal and keeps shells that hold none, whatever the dose and the
    specimen.  Here the signal is measured: the Fourier ring correlation of
    the sums of the even and the odd frames gives the SSNR of a half sum,
    ``FRC / (1 - FRC)``, so each frame's SSNR is ``s = SSNR_half / (n / 2)``
    and the reference of ``n - 1`` frames has ``(n - 1) s``.  Weighting each
    ring of the cross-correlation by the reference's Wiener factor
    ``(n - 1) s / (1 + (n - 1) s)`` keeps the rings where the reference is
    reliable and drops those where it is noise.  The frames must be aligned
    already (the FRC of misaligned halves underestimates the signal).

    Parameters
    ----------
    stack : ndarray, complex, (n, ny, nx // 2 + 1)
        Half-layout transforms of the (aligned) frames, n >= 2.
    ny, nx : int
        Real-space frame size.
    mask_cross, vertical_half_width, horizontal_half_width
        The central cross mask, as :func:`bfactor_filter`.
    smooth_rings : int
        Width of the running mean over rings applied to the FRC (noise).

    Returns
    -------
    ndarray, float32, (ny, nx // 2 + 1)
        Filter in [0, 1).

    >>> rng = np.random.default_rng(0)
    >>> sig = np.fft.rfft2(rng.standard_normal((32, 32)))
    >>> st = np.stack([sig + np.fft.rfft2(rng.standard_normal((32, 32))) for _ in range(8)])
    >>> f = ssnr_filter(st, 32, 32)
    >>> 0.7 < float(np.median(f[f > 0])) < 0.95    # per-frame SSNR 1: (7 x 1) / (1 + 7)
    True
    """
    n = stack.shape[0]
    if n < 2:
        raise ValueError("ssnr_filter: needs at least 2 frames")
    even = stack[0::2].sum(axis=0)
    odd = stack[1::2].sum(axis=0)
    nb = int(min(ny, nx) // 2)
    ring = np.minimum((np.sqrt(_freq2(ny, nx)) * 2 * nb).astype(np.int64), nb).ravel()
    num = np.bincount(ring, (even * np.conj(odd)).real.ravel(), nb + 1)
    pe = np.bincount(ring, (np.abs(even) ** 2).ravel(), nb + 1)
    po = np.bincount(ring, (np.abs(odd) ** 2).ravel(), nb + 1)
    frc = num / np.sqrt(np.maximum(pe * po, 1e-30))
    if smooth_rings > 1:
        frc = np.convolve(frc, np.ones(smooth_rings) / smooth_rings, mode="same")
    # rings below the noise level keep their small weights on purpose: one by one they hold little
    # signal, but together (the shift information grows with k^2) they sharpen the peak
    frc = np.clip(frc, 0.0, 0.999)
    per_frame = frc / (1.0 - frc) / (n / 2.0)
    w = (n - 1) * per_frame / (1.0 + (n - 1) * per_frame)
    filt = w[ring].reshape(ny, nx // 2 + 1).astype(np.float32)
    if mask_cross:
        ky = np.rint(np.fft.fftfreq(ny) * ny).astype(int)
        filt[np.abs(ky) < max(1, horizontal_half_width), :] = 0.0
        filt[:, :max(1, vertical_half_width)] = 0.0
    return filt


def _phase_vectors(ny: int, nx: int, sx: float, sy: float) -> tuple[np.ndarray, np.ndarray]:
    fy = np.fft.fftfreq(ny)
    fx = np.fft.rfftfreq(nx)
    py = np.exp(-2j * np.pi * fy * sy).astype(np.complex64)
    px = np.exp(-2j * np.pi * fx * sx).astype(np.complex64)
    return py, px


@njit(cache=True)
def _phase_shift_inplace(f, py, px):
    ny, w = f.shape
    for y in range(ny):
        a = py[y]
        for x in range(w):
            f[y, x] = f[y, x] * a * px[x]


def phase_shift_half(f: np.ndarray, ny: int, nx: int, sx: float, sy: float, out: np.ndarray | None = None) -> np.ndarray:
    """Multiply a non-centred half-layout FT by the phases that move the image by (+sx, +sy) px.

    ``out`` (complex64, may be ``f`` itself) receives the result; a new array otherwise.

    >>> f = _fft.rfftn(np.eye(4, dtype=np.float32))
    >>> bool(np.allclose(_fft.irfftn(phase_shift_half(f, 4, 4, 1.0, 0.0), 4), np.roll(np.eye(4), 1, axis=1), atol=1e-6))
    True
    """
    py, px = _phase_vectors(ny, nx, sx, sy)
    if out is None:
        out = np.array(f, dtype=np.complex64, copy=True)
    elif out is not f:
        out[...] = f
    _phase_shift_inplace(out, py, px)
    return out


def good_fft_size(n: float, up: bool = True) -> int:
    """The even size nearest ``n`` (at least / at most, ``up``) whose only prime factors are 2, 3, 5 and 7.

    FFTW is several times slower on sizes with a large prime factor (1366 = 2 x 683).

    >>> good_fft_size(1365.3), good_fft_size(1365.3, up=False), good_fft_size(410)
    (1372, 1350, 420)
    """
    m = max(2, int(math.ceil(n)) if up else int(math.floor(n)))
    step = 1 if up else -1
    while True:
        if m % 2 == 0:
            k = m
            for p in (2, 3, 5, 7):
                while k % p == 0:
                    k //= p
            if k == 1:
                return m
        m += step
        if m < 2:
            return 2


# --------------------------------------------------------------------------
# peak search
# --------------------------------------------------------------------------

@njit(cache=True)
def _peak_parabola(cc, rmin, rmax):
    ny, nx = cc.shape
    r = int(math.ceil(rmax))
    ry = min(r, ny // 2 - 1)
    rx = min(r, nx // 2 - 1)
    best = -np.inf
    by, bx = 0, 0
    found = False
    rmin2 = rmin * rmin
    rmax2 = rmax * rmax
    for dy in range(-ry, ry + 1):
        for dx in range(-rx, rx + 1):
            d2 = dx * dx + dy * dy
            if d2 < rmin2 or d2 > rmax2:
                continue
            v = cc[dy % ny, dx % nx]
            if v > best:
                best = v
                by, bx = dy, dx
                found = True
    if not found:
        return 0.0, 0.0, 0.0
    # least-squares quadratic on the 3x3 neighbourhood (orthogonal design)
    sb = 0.0
    sc = 0.0
    sd = 0.0
    se = 0.0
    sg = 0.0
    for j in range(-1, 2):
        for i in range(-1, 2):
            v = cc[(by + j) % ny, (bx + i) % nx]
            sb += i * v
            sc += j * v
            sd += (i * i - 2.0 / 3.0) * v
            sg += (j * j - 2.0 / 3.0) * v
            se += i * j * v
    b = sb / 6.0
    c = sc / 6.0
    d = sd / 2.0
    g = sg / 2.0
    e = se / 4.0
    den = 4.0 * d * g - e * e
    ox = 0.0
    oy = 0.0
    if den != 0.0:
        ox = (e * c - 2.0 * g * b) / den
        oy = (e * b - 2.0 * d * c) / den
        if ox > 1.05 or ox < -1.05:
            ox = 0.0
        if oy > 1.05 or oy < -1.05:
            oy = 0.0
    return bx + ox, by + oy, best


def peak_parabola(cc: np.ndarray, min_radius: float, max_radius: float) -> tuple[float, float]:
    """Sub-pixel peak (x, y) of a non-centred correlation map within an annulus.

    The highest pixel with ``min_radius <= r <= max_radius`` (offsets
    wrapped, so index ``-1`` is offset -1), refined by a least-squares
    quadratic on its 3 x 3 neighbourhood; an offset of more than 1.05 px
    from the integer peak is discarded, as cisTEM's ``FindPeakWithParabolaFit``.

    >>> y, x = np.mgrid[-8:8, -8:8]; cc = np.exp(-((x - 2.3) ** 2 + (y + 1.2) ** 2) / 4.0)
    >>> px, py = peak_parabola(np.fft.ifftshift(cc), 0.0, 6.0)
    >>> round(px, 1), round(py, 1)
    (2.3, -1.2)
    """
    x, y, _ = _peak_parabola(np.ascontiguousarray(cc, dtype=np.float32), float(min_radius), float(max_radius))
    return float(x), float(y)


# --------------------------------------------------------------------------
# trajectory smoothing
# --------------------------------------------------------------------------

def savitzky_golay(y: np.ndarray, window: int, order: int = 1) -> np.ndarray:
    """Savitzky-Golay smoothing: a least-squares polynomial of ``order`` over a window per point.

    The window (odd) is centred on each point, and moved inwards at the ends
    (so the end points get the fit of the first/last full window).  If the
    window is not smaller than the number of points, ``y`` is returned.

    >>> savitzky_golay(np.arange(7.0), 5, 1).round(6).tolist()
    [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    """
    y = np.asarray(y, dtype=np.float64)
    n = y.size
    w = int(window) | 1
    if w >= n:
        return y.copy()
    h = w // 2
    out = np.empty(n)
    t = np.arange(n, dtype=np.float64)
    for i in range(n):
        lo = min(max(0, i - h), n - w)
        tt = t[lo:lo + w] - i
        a = np.vander(tt, order + 1, increasing=True)
        coef, *_ = np.linalg.lstsq(a, y[lo:lo + w], rcond=None)
        out[i] = coef[0]
    return out


_WHITTAKER_HAT: dict[tuple[int, float, float], tuple[np.ndarray, float]] = {}


def _whittaker_hat(n: int, early_frames: float, lmb: float) -> tuple[np.ndarray, float]:
    """The smoother matrix ``(I + lmb D'D)^-1`` and its trace, cached (the same few for every stack)."""
    key = (n, early_frames, lmb)
    hit = _WHITTAKER_HAT.get(key)
    if hit is not None:
        return hit
    d = np.diff(np.eye(n), 2, axis=0)
    if early_frames:
        # beam-induced motion is fastest at first: let the first frames bend more
        j = np.arange(1, n - 1, dtype=np.float64)
        w = np.minimum(1.0, (j / float(early_frames)) ** 2)
        d = d * w[:, None]
    p = d.T @ d
    eye = np.eye(n)
    h = np.linalg.solve(eye + lmb * p, eye)
    h.setflags(write=False)
    if len(_WHITTAKER_HAT) > 2000:
        _WHITTAKER_HAT.clear()
    _WHITTAKER_HAT[key] = (h, float(np.trace(h)))
    return _WHITTAKER_HAT[key]


def whittaker_smooth(y: np.ndarray, lam: float | None = None, early_frames: float = 0.0) -> tuple[np.ndarray, float]:
    """Penalised least squares with a second-difference penalty (Whittaker-Henderson smoother).

    Minimises ``|y - z|² + lam |D2 z|²`` column by column (``y`` may be
    (n,) or (n, k)); ``lam=None`` chooses it by generalised cross-validation
    (the same ``lam`` for every column, from 10^-2 .. 10^6).  Unlike a
    Savitzky-Golay window, the ends of the trajectory are supported by all
    the frames the data allow (a straight end is extrapolated from the whole
    straight part), which is where unblur's trajectories are worst.

    Returns
    -------
    z : ndarray like ``y``
    lam : float
        The smoothing parameter used.

    >>> z, _ = whittaker_smooth(np.arange(8.0), 100.0); bool(np.allclose(z, np.arange(8.0)))
    True
    """
    y = np.asarray(y, dtype=np.float64)
    y2 = y.reshape(len(y), -1)
    n = y2.shape[0]
    if n < 4:
        return y.copy(), 0.0
    def solve(lmb):
        h, tr = _whittaker_hat(n, float(early_frames), float(lmb))
        return h @ y2, tr

    if lam is None:
        best = None
        for lmb in 10.0 ** np.arange(-2.0, 6.01, 0.25):
            z, tr = solve(lmb)
            rss = float(((y2 - z) ** 2).sum())
            gcv = n * rss / max((n - tr) ** 2, 1e-12)
            if best is None or gcv < best[0]:
                best = (gcv, lmb, z)
        _, lam, z = best
    else:
        z, _ = solve(lam)
    return z.reshape(y.shape), float(lam)


def polynomial_smooth(y: np.ndarray, degree: int = 4) -> np.ndarray:
    """Least-squares polynomial of ``degree`` (at most n - 1) through all points.

    >>> (polynomial_smooth(np.array([0.0, 1, 4, 9]), 2).round(6) + 0.0).tolist()
    [0.0, 1.0, 4.0, 9.0]
    """
    y = np.asarray(y, dtype=np.float64)
    n = y.size
    if n <= 2:
        return y.copy()
    deg = min(degree, n - 1)
    t = (np.arange(n) - (n - 1) / 2.0) / max(1.0, (n - 1) / 2.0)
    coef = np.polynomial.polynomial.polyfit(t, y, deg)
    return np.polynomial.polynomial.polyval(t, coef)


# --------------------------------------------------------------------------
# the unblur iteration
# --------------------------------------------------------------------------

#: "auto" final stage: used below this exposure per frame (e/Å²), where frames are noise-limited.
FINAL_FILTER_MAX_EXPOSURE = 2.0


@dataclass
class AlignmentSettings:
    """Options of the alignment, with cisTEM's command-line defaults (Å unless said).

    Attributes
    ----------
    min_shift, max_shift : float
        Minimum shift of the first round and maximum shift of every round (2, 80).
    bfactor : float
        B-factor applied to the reference (1500 Å²).
    termination : float
        Stop when no frame moves by more than this (1 Å).
    max_iterations : int
        Iteration limit per stage (20).
    mask_cross, vertical_half_width, horizontal_half_width
        Central cross mask (on, 1, 1).
    coarse_pixel : float
        Pre-binning target (5 Å/px, ``round(5 / pixel)``, as unblur).
    refine_pixel : float
        Pixel size of the refinement stage (see module notes).
    smoothing_window : int or None
        Savitzky-Golay window in frames (default ``round(5 / exposure per frame)``, >= 5, odd).
    smoothing_order : int
        Savitzky-Golay polynomial order (1, as unblur).
    smoothing : str
        "whittaker" (default: penalised, GCV, see :func:`whittaker_smooth`; lower error than unblur's
        smoother on simulated movies) or "savitzky-golay" (unblur).
    patches : tuple[int, int] or None
        Patch grid (columns, rows), None for full-frame only.
    patch_max_shift : float
        Maximum residual shift searched in a patch (Å).
    patch_overlap : float
        Patch size relative to the grid cell (2: patches twice the cell, overlapping).
    patch_pixel : float
        Pixel size the patch stacks are kept at (Å; Fourier-cropped, memory and time / 4 at 1.5 Å refine).
    patch_smoothing : str
        Smoother of the patch trajectories (default "whittaker"; "none": only the deformation model smooths).
    final_filter : str
        "ssnr": after unblur's rounds, a last stage at the refine pixel size weights the
        correlation by the reference's measured Wiener filter (:func:`ssnr_filter`) instead of the
        B-factor, searching ``final_max_shift`` around the converged shifts; "none": unblur's rounds
        only; "auto" (default): "ssnr" below ``FINAL_FILTER_MAX_EXPOSURE`` e/Å² per frame, else "none"
        (measured on simulated 2048² x 30 movies: at 1 e/Å² per frame the stage lowered the RMS error
        on 8 of 8 movies, mean 0.49 -> 0.36 px; at 3 e/Å² on 2 of 4, mean 0.41 -> 0.42 px).
    final_max_shift : float
        Search radius of that stage (Å, 6).
    """

    min_shift: float = 2.0
    max_shift: float = 80.0
    bfactor: float = 1500.0
    termination: float = 1.0
    max_iterations: int = 20
    mask_cross: bool = True
    vertical_half_width: int = 1
    horizontal_half_width: int = 1
    coarse_pixel: float = 5.0
    refine_pixel: float = 1.5
    smoothing_window: int | None = None
    smoothing_order: int = 1
    smoothing: str = "whittaker"
    patches: tuple[int, int] | None = None
    patch_max_shift: float = 20.0
    patch_overlap: float = 2.0
    patch_smoothing: str = "whittaker"
    patch_pixel: float = 3.0
    patch_iterations: int = 10
    final_filter: str = "auto"
    final_max_shift: float = 6.0

    def window(self, exposure_per_frame: float) -> int:
        """Savitzky-Golay window for this exposure per frame."""
        if self.smoothing_window:
            w = int(self.smoothing_window)
        else:
            w = int(round(5.0 / exposure_per_frame)) if exposure_per_frame > 0 else 5
        w = max(w, 5)
        return w if w % 2 else w + 1


def align_stack(stack: np.ndarray, ny: int, nx: int, shifts: np.ndarray, *, max_iterations: int,
                unitless_bfactor: float, min_radius: float, max_radius: float, threshold: float,
                window: int, order: int = 1, mask_cross: bool = True, vertical_half_width: int = 1,
                horizontal_half_width: int = 1, smoothing: str = "savitzky-golay",
                filt: np.ndarray | None = None) -> int:
    """unblur's alignment loop on a stack of half-layout frame transforms, in place.

    Parameters
    ----------
    stack : ndarray, complex64, (n, ny, nx // 2 + 1)
        Frame transforms; they are phase-shifted in place by each round's shifts.
    ny, nx : int
        Real-space frame size.
    shifts : ndarray, float64, (n, 2)
        Accumulated (sx, sy) in pixels of this stack; updated in place.
    max_iterations : int
    unitless_bfactor : float
        B / pixel².
    min_radius, max_radius : float
        Peak search annulus (pixels); ``min_radius > 0`` means a first round
        (polynomial smoothing instead of Savitzky-Golay).
    threshold : float
        Convergence: largest shift of a round (pixels).
    window, order : int
        Savitzky-Golay window and order.
    smoothing : {"savitzky-golay", "whittaker", "none"}
        Smoother of the later rounds (unblur: Savitzky-Golay).
    filt : ndarray, optional
        Filter of the correlation (half layout) used instead of the B-factor filter
        (e.g. :func:`ssnr_filter`); ``unitless_bfactor`` and the cross options are then unused.

    Returns
    -------
    int
        Iterations done.
    """
    n = stack.shape[0]
    if filt is None:
        filt = bfactor_filter(ny, nx, unitless_bfactor, mask_cross, vertical_half_width, horizontal_half_width)
    mid = n // 2
    it = 0
    total = stack.sum(axis=0)
    for it in range(1, max_iterations + 1):
        cur = np.zeros((n, 2))
        buf = np.empty_like(total)
        for i in range(n):
            _xcorr_spectrum(total, stack[i], filt, buf)
            cc = _fft.irfftn(buf, nx)
            cur[i] = peak_parabola(cc, min_radius, max_radius)
        acc = shifts + cur
        if min_radius > 0:
            sm = np.stack([polynomial_smooth(acc[:, 0], 4), polynomial_smooth(acc[:, 1], 4)], axis=1)
        elif smoothing == "none":
            sm = acc
        elif smoothing == "whittaker":
            sm, _ = whittaker_smooth(acc, early_frames=4.0)
        else:
            sm = np.stack([savitzky_golay(acc[:, 0], window, order),
                           savitzky_golay(acc[:, 1], window, order)], axis=1)
        cur = sm - shifts
        cur -= cur[mid]
        biggest = float(np.sqrt((cur ** 2).sum(axis=1)).max())
        for i in range(n):
            if cur[i, 0] != 0.0 or cur[i, 1] != 0.0:
                phase_shift_half(stack[i], ny, nx, cur[i, 0], cur[i, 1], out=stack[i])
        shifts += cur
        if biggest <= threshold:
            break
        total = stack.sum(axis=0)
    return it


def _even(v: float) -> int:
    return max(2, int(round(v / 2.0)) * 2)


@njit(cache=True)
def _xcorr_spectrum(total, f, filt, out):
    """out = (total - f) * filt * conj(f): the spectrum of frame ``f``'s correlation with the others."""
    ny, w = f.shape
    for y in range(ny):
        for x in range(w):
            a = f[y, x]
            out[y, x] = (total[y, x] - a) * filt[y, x] * np.conj(a)


class MovieAligner:
    """Collects a movie's frames one at a time at two resolutions, then aligns them.

    Parameters
    ----------
    shape : (ny, nx)
        Frame size (full resolution).
    n_frames : int
    pixel_size : float
        Å per pixel of the frames.
    exposure_per_frame : float
        e/Å² (sets the smoothing window).
    settings : AlignmentSettings

    Notes
    -----
    Memory: ``n_frames`` transforms at the coarse and the refine pixel size
    (for a 4k x 4k x 40 movie at 1 Å/px about 1.2 GB at 1.5 Å refine pixels, plus as much again
    for the patch stacks of local motion); with ``keep_full`` also the full-resolution transforms
    (complex64, as much as unblur's float frame stack), so that the sums need no second read.
    The binned sizes are FFT-friendly (:func:`good_fft_size`: factors 2, 3, 5, 7), so their
    pixel is a little finer than ``coarse_pixel`` / ``refine_pixel``.

    >>> al = MovieAligner((64, 64), 3, 5.0, 1.0, AlignmentSettings())
    >>> for k in range(3): al.add(k, np.random.default_rng(k).random((64, 64)).astype(np.float32))
    >>> al.align().shape
    (3, 2)
    """

    def __init__(self, shape: tuple[int, int], n_frames: int, pixel_size: float, exposure_per_frame: float,
                 settings: AlignmentSettings, keep_full: bool = False):
        self.ny, self.nx = int(shape[0]), int(shape[1])
        self.n = int(n_frames)
        self.pixel_size = float(pixel_size)
        self.exposure_per_frame = float(exposure_per_frame)
        self.s = settings
        self.prebin = max(1, int(round(settings.coarse_pixel / pixel_size)))
        if self.prebin > 1:
            # FFT-friendly sizes (2, 3, 5, 7 only): the pixel is a little finer than the target
            self.cy = min(self.ny, good_fft_size(self.ny / self.prebin))
            self.cx = min(self.nx, good_fft_size(self.nx / self.prebin))
        else:
            self.cy, self.cx = self.ny, self.nx
        rf = max(1.0, settings.refine_pixel / pixel_size)
        if rf > 1.0:
            self.ry, self.rx = min(self.ny, good_fft_size(self.ny / rf)), min(self.nx, good_fft_size(self.nx / rf))
        else:
            self.ry, self.rx = self.ny, self.nx
        self.coarse = np.zeros((self.n, self.cy, self.cx // 2 + 1), np.complex64) if self.prebin > 1 else None
        self.refine = np.zeros((self.n, self.ry, self.rx // 2 + 1), np.complex64)
        # keep_full: the full-resolution transforms too (n x ny x (nx/2+1) complex64, as much memory as
        # unblur's frame stack), so that the sums need no second read, preparation and forward FFT
        self.full = np.zeros((self.n, self.ny, self.nx // 2 + 1), np.complex64) if keep_full else None
        self.shifts = np.zeros((self.n, 2))  # full-resolution pixels
        self.iterations: list[int] = []
        self.model: DeformationModel | None = None
        self.local_ratio: float | None = None  # held_out_ratio of the local model (align_local)
        self.local_accepted = False
        self.patch_shifts: np.ndarray | None = None
        self.patch_centres: np.ndarray | None = None

    @property
    def refine_pixel_size(self) -> tuple[float, float]:
        """(x, y) pixel size of the refine frames (Å)."""
        return self.pixel_size * self.nx / self.rx, self.pixel_size * self.ny / self.ry

    def add(self, index: int, frame: np.ndarray) -> None:
        """Add prepared frame ``index`` (float32, full size)."""
        f = _fft.rfftn(np.asarray(frame, dtype=np.float32))
        f[0, 0] = 0.0
        self.add_ft(index, f)

    def add_ft(self, index: int, f: np.ndarray) -> None:
        """Add the half-layout transform of prepared frame ``index``."""
        if self.full is not None:
            self.full[index] = f
        if self.coarse is not None:
            self.coarse[index] = fourier_crop_half(f, self.ny, self.nx, self.cy, self.cx)
        if (self.ry, self.rx) != (self.ny, self.nx):
            self.refine[index] = fourier_crop_half(f, self.ny, self.nx, self.ry, self.rx)
        else:
            self.refine[index] = f

    def _stage(self, stack, ny, nx, px, shifts, first: bool) -> None:
        s = self.s
        window = s.window(self.exposure_per_frame)
        ub = s.bfactor / px ** 2
        rmax = s.max_shift / px
        thr = s.termination / px
        if first:
            rmin = max(s.min_shift / px, 1.01)
            self.iterations.append(align_stack(
                stack, ny, nx, shifts, max_iterations=1, unitless_bfactor=ub, min_radius=rmin, max_radius=rmax,
                threshold=thr, window=window, order=s.smoothing_order, mask_cross=s.mask_cross,
                vertical_half_width=s.vertical_half_width, horizontal_half_width=s.horizontal_half_width,
                smoothing=s.smoothing))
        self.iterations.append(align_stack(
            stack, ny, nx, shifts, max_iterations=s.max_iterations, unitless_bfactor=ub, min_radius=0.0,
            max_radius=rmax, threshold=thr, window=window, order=s.smoothing_order, mask_cross=s.mask_cross,
            vertical_half_width=s.vertical_half_width, horizontal_half_width=s.horizontal_half_width,
            smoothing=s.smoothing))

    def align(self) -> np.ndarray:
        """Full-frame alignment; returns the (n, 2) shifts in full-resolution pixels."""
        if self.coarse is not None:
            cpx = self.pixel_size * self.nx / self.cx
            cs = np.zeros((self.n, 2))
            s = self.s
            window = s.window(self.exposure_per_frame)
            ub = s.bfactor / cpx ** 2
            rmax = s.max_shift / cpx
            thr = max(s.termination / cpx, 1.0)  # unblur: no sub-pixel insistence on binned frames
            rmin = max(s.min_shift / cpx, 1.01)
            kw = dict(unitless_bfactor=ub, max_radius=rmax, threshold=thr, window=window, order=s.smoothing_order,
                      mask_cross=s.mask_cross, vertical_half_width=s.vertical_half_width,
                      horizontal_half_width=s.horizontal_half_width, smoothing=s.smoothing)
            self.iterations.append(align_stack(self.coarse, self.cy, self.cx, cs, max_iterations=1,
                                               min_radius=rmin, **kw))
            self.iterations.append(align_stack(self.coarse, self.cy, self.cx, cs,
                                               max_iterations=s.max_iterations, min_radius=0.0, **kw))
            self.coarse = None  # free it
            rs = np.empty_like(cs)
            rs[:, 0] = cs[:, 0] * self.rx / self.cx
            rs[:, 1] = cs[:, 1] * self.ry / self.cy
            for i in range(self.n):
                phase_shift_half(self.refine[i], self.ry, self.rx, rs[i, 0], rs[i, 1], out=self.refine[i])
            px = min(self.refine_pixel_size)
            self._stage(self.refine, self.ry, self.rx, px, rs, first=False)
        else:
            rs = np.zeros((self.n, 2))
            px = min(self.refine_pixel_size)
            self._stage(self.refine, self.ry, self.rx, px, rs, first=True)
        if self.final_filter_used == "ssnr" and self.n >= 4:
            self._final_stage(rs, min(self.refine_pixel_size))
        self.shifts = np.stack([rs[:, 0] * self.nx / self.rx, rs[:, 1] * self.ny / self.ry], axis=1)
        return self.shifts.copy()

    @property
    def final_filter_used(self) -> str:
        """"ssnr" or "none": the settings' ``final_filter`` with "auto" resolved for this movie's exposure."""
        f = self.s.final_filter
        if f == "auto":
            return "ssnr" if self.exposure_per_frame < FINAL_FILTER_MAX_EXPOSURE else "none"
        return f

    def _final_stage(self, rs: np.ndarray, px: float) -> None:
        """Polish the converged shifts with the measured-SSNR filter (see ``final_filter``).

        The stage runs on the refine frames at their full size.  (Cropping them to the band where the
        filter is non-zero would be cheaper, but noise keeps the filter above zero out to the refine
        Nyquist on any real movie, so that path never ran; it was removed rather than left untested.)
        """
        s = self.s
        filt = ssnr_filter(self.refine, self.ry, self.rx, s.mask_cross, s.vertical_half_width,
                           s.horizontal_half_width)
        if not np.any(filt > 0.05):
            return  # no measurable signal: unblur's result stands
        cs = rs.copy()
        # a small radius: the coarse rounds already found the peak, and far noise peaks must not win
        self.iterations.append(align_stack(
            self.refine, self.ry, self.rx, cs, max_iterations=s.max_iterations, unitless_bfactor=0.0,
            min_radius=0.0, max_radius=max(1.5, s.final_max_shift / px), threshold=0.02,
            window=s.window(self.exposure_per_frame), order=s.smoothing_order, smoothing=s.smoothing, filt=filt))
        rs[:] = cs

    def align_local(self, grid: tuple[int, int] = (5, 5)) -> "DeformationModel":
        """Patch alignment on the globally aligned refine frames (call :meth:`align` first).

        Returns the fitted model; ``local_accepted`` says whether it predicts held-out patches
        (:func:`held_out_ratio` below :data:`LOCAL_MODEL_MAX_RATIO`, in ``local_ratio``), i.e. whether it
        should be used for the sums.
        """
        s = self.s
        rpx = self.refine_pixel_size
        px = min(rpx)
        boxes, centres = patch_layout(self.ry, self.rx, grid, self.s.patch_overlap)
        rshifts = align_patches(self.refine, self.ry, self.rx, boxes, s, px, self.exposure_per_frame)
        # to full-resolution pixels
        full = np.empty_like(rshifts)
        full[..., 0] = rshifts[..., 0] * self.nx / self.rx
        full[..., 1] = rshifts[..., 1] * self.ny / self.ry
        cfull = np.stack([centres[:, 0] * self.nx / self.rx, centres[:, 1] * self.ny / self.ry], axis=1)
        self.patch_shifts = full
        self.patch_centres = cfull
        self.model = fit_deformation(cfull, full, self.ny, self.nx)
        # used only if it predicts patches it was not fitted to (below LOCAL_MODEL_MAX_RATIO); the caller
        # sums with the global trajectory otherwise
        self.local_ratio = held_out_ratio(cfull, full, self.ny, self.nx, self.model.inliers)
        self.local_accepted = bool(self.local_ratio < LOCAL_MODEL_MAX_RATIO)
        return self.model

    def release(self) -> None:
        """Free the frame stacks."""
        self.coarse = None
        self.full = None
        self.refine = np.zeros((0, 1, 1), np.complex64)


# --------------------------------------------------------------------------
# patches and the deformation model
# --------------------------------------------------------------------------

def patch_layout(ny: int, nx: int, grid: tuple[int, int], overlap: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Patch boxes ``(x0, y0, size)`` and centres ``(x, y)`` (pixels) of a grid over a frame.

    ``grid = (columns, rows)``; patches are square, of the even size nearest to
    ``overlap * min(nx / columns, ny / rows)`` (at least 32, at most half the
    frame), centred on the grid cells and moved inside the frame where needed.

    >>> b, c = patch_layout(100, 100, (2, 2)); b[0].tolist(), c[0].tolist()
    ([0, 0, 50], [25.0, 25.0])
    """
    gx, gy = int(grid[0]), int(grid[1])
    size = max(32, good_fft_size(overlap * min(nx / gx, ny / gy), up=False))
    size = min(size, (min(nx, ny) // 2) * 2)
    boxes, centres = [], []
    for j in range(gy):
        for i in range(gx):
            cx = (i + 0.5) * nx / gx
            cy = (j + 0.5) * ny / gy
            x0 = int(min(max(round(cx - size / 2), 0), nx - size))
            y0 = int(min(max(round(cy - size / 2), 0), ny - size))
            boxes.append((x0, y0, size))
            centres.append((x0 + size / 2, y0 + size / 2))
    return np.array(boxes, dtype=np.int64), np.array(centres, dtype=np.float64)


def align_patches(stack: np.ndarray, ny: int, nx: int, boxes: np.ndarray, settings: AlignmentSettings,
                  pixel_size: float, exposure_per_frame: float) -> np.ndarray:
    """Residual shifts (n_patches, n_frames, 2) of every patch of aligned frame transforms.

    Frames are brought back to real space one at a time and cut into patches;
    each patch stack is aligned with :func:`align_stack` (no minimum shift,
    maximum ``settings.patch_max_shift``).
    """
    n = stack.shape[0]
    npatch = len(boxes)
    size = int(boxes[0, 2])
    # the 1500 A^2 B-factor leaves nothing beyond ~1/4 A: keep the patches at settings.patch_pixel
    psz = min(size, good_fft_size(size * pixel_size / max(settings.patch_pixel, pixel_size)))
    pst = np.empty((npatch, n, psz, psz // 2 + 1), np.complex64)
    if psz != size:
        # cut the patches from the frame binned (Fourier-cropped) to the patch pixel: one small inverse
        # FFT per frame and no cropping per patch
        by, bx = min(ny, _even(ny * psz / size)), min(nx, _even(nx * psz / size))
        if by < psz or bx < psz:
            by, bx = ny, nx
    else:
        by, bx = ny, nx
    tsz = psz if (by, bx) != (ny, nx) else size
    ppx = pixel_size * size / psz
    scale_x, scale_y = (nx / bx, ny / by) if tsz == psz else (size / psz, size / psz)
    edge = max(2, tsz // 8)
    ramp = np.ones(tsz, np.float32)
    ramp[:edge] = 0.5 - 0.5 * np.cos(np.pi * (np.arange(edge) + 0.5) / edge)
    ramp[-edge:] = ramp[:edge][::-1]
    taper = np.outer(ramp, ramp)  # soft edges: the patch border does not move with the specimen
    origins = []
    for (x0, y0, _sz) in boxes:
        if tsz == size:
            origins.append((int(x0), int(y0)))
        else:
            origins.append((int(min(max(round(x0 * bx / nx), 0), bx - tsz)),
                            int(min(max(round(y0 * by / ny), 0), by - tsz))))
    for i in range(n):
        if tsz == size:
            img = _fft.irfftn(stack[i], nx)
        else:
            img = _fft.irfftn(fourier_crop_half(stack[i], ny, nx, by, bx), bx)
        for p, (x0, y0) in enumerate(origins):
            tile = img[y0:y0 + tsz, x0:x0 + tsz]
            tile = (tile - tile.mean()) * taper
            f = _fft.rfftn(np.ascontiguousarray(tile, dtype=np.float32))
            f[0, 0] = 0.0
            pst[p, i] = fourier_crop_half(f, tsz, tsz, psz, psz) if psz != tsz else f
    out = np.zeros((npatch, n, 2))
    window = settings.window(exposure_per_frame)
    for p in range(npatch):
        sh = np.zeros((n, 2))
        align_stack(pst[p], psz, psz, sh, max_iterations=settings.patch_iterations,
                    unitless_bfactor=settings.bfactor / ppx ** 2, min_radius=0.0,
                    max_radius=min(settings.patch_max_shift / ppx, psz / 4),
                    threshold=0.05 * pixel_size / ppx, window=window, order=settings.smoothing_order,
                    mask_cross=settings.mask_cross, vertical_half_width=settings.vertical_half_width,
                    horizontal_half_width=settings.horizontal_half_width, smoothing=settings.patch_smoothing)
        out[p, :, 0] = sh[:, 0] * scale_x
        out[p, :, 1] = sh[:, 1] * scale_y
    return out


@dataclass
class DeformationModel:
    """Residual local shift ``r(x, y, t) = sum_{s,j} c[axis, s, j] S_s(u, v) T_j(t)`` (pixels).

    ``u = 2 x / nx - 1``, ``v = 2 y / ny - 1`` (x, y in full-resolution pixels
    from the first pixel), ``S = (1, u, v, u², uv, v²)``, ``T = (τ, τ², τ³)``,
    ``τ = (t - n // 2) / n``.

    Attributes
    ----------
    coeffs : ndarray (2, 6, 3)
        x and y coefficients.
    ny, nx, n_frames : int
    rms_fit : float
        RMS of the patch shifts about the model (pixels).
    """

    coeffs: np.ndarray
    ny: int
    nx: int
    n_frames: int
    rms_fit: float = 0.0
    inliers: np.ndarray | None = field(default=None, repr=False)

    def time_basis(self, t: np.ndarray | float) -> np.ndarray:
        tau = (np.asarray(t, dtype=np.float64) - self.n_frames // 2) / self.n_frames
        return np.stack([tau, tau ** 2, tau ** 3], axis=-1)

    @staticmethod
    def space_basis(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return np.stack([np.ones_like(u), u, v, u * u, u * v, v * v], axis=-1)

    def frame_coefficients(self, t: int) -> np.ndarray:
        """(2, 6) spatial coefficients of frame ``t``."""
        return np.einsum("asj,j->as", self.coeffs, self.time_basis(float(t)))

    def shift_at(self, x: np.ndarray, y: np.ndarray, t: np.ndarray | float) -> np.ndarray:
        """Residual shift(s) (..., 2) at pixel positions and frame(s)."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        u = 2.0 * x / self.nx - 1.0
        v = 2.0 * y / self.ny - 1.0
        sb = self.space_basis(u, v)
        tb = self.time_basis(np.broadcast_to(np.asarray(t, dtype=np.float64), u.shape))
        return np.einsum("...s,...j,asj->...a", sb, tb, self.coeffs)


def fit_deformation(centres: np.ndarray, patch_shifts: np.ndarray, ny: int, nx: int,
                    reject_sigma: float = 3.0) -> DeformationModel:
    """Least-squares fit of :class:`DeformationModel` to patch trajectories.

    Parameters
    ----------
    centres : ndarray (p, 2)
        Patch centres (x, y), full-resolution pixels.
    patch_shifts : ndarray (p, n, 2)
        Residual shifts of each patch and frame (pixels).
    ny, nx : int
        Frame size.
    reject_sigma : float
        Patch samples further than this many RMS from the first fit are left
        out of a second fit (0: no rejection).

    >>> c = np.array([[x, y] for y in (10, 50, 90) for x in (10, 50, 90)], float)
    >>> m = fit_deformation(c, np.zeros((9, 5, 2)), 100, 100); float(abs(m.coeffs).max())
    0.0
    """
    p, n, _ = patch_shifts.shape
    u = 2.0 * centres[:, 0] / nx - 1.0
    v = 2.0 * centres[:, 1] / ny - 1.0
    sb = DeformationModel.space_basis(u, v)  # (p, 6)
    model = DeformationModel(np.zeros((2, 6, 3)), ny, nx, n)
    tb = model.time_basis(np.arange(n))      # (n, 3)
    a = np.einsum("ps,nj->pnsj", sb, tb).reshape(p * n, 18)
    b = patch_shifts.reshape(p * n, 2)
    keep = np.ones(p * n, dtype=bool)
    coef = np.zeros((18, 2))
    for _round in range(2 if reject_sigma > 0 else 1):
        coef, *_ = np.linalg.lstsq(a[keep], b[keep], rcond=None)
        res = np.sqrt(((a @ coef - b) ** 2).sum(axis=1))
        rms = float(np.sqrt((res[keep] ** 2).mean())) if keep.any() else 0.0
        new_keep = res <= max(reject_sigma * rms, 1e-6)
        if reject_sigma <= 0 or new_keep.sum() < 18 or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    res = np.sqrt(((a @ coef - b) ** 2).sum(axis=1))
    model.coeffs = coef.T.reshape(2, 6, 3).copy()
    model.rms_fit = float(np.sqrt((res[keep] ** 2).mean()))
    model.inliers = keep.reshape(p, n)
    return model


#: A local model is used only when, fitted to every other patch, it predicts the remaining patches' shifts
#: with less than this fraction of their mean square (see :func:`held_out_ratio`).  A choice between the
#: measured cases: 0.11 where the model recovers a deformation to 0.2 px, 0.92-1.41 where it made the
#: trajectory worse than none (2048² and 4096² movies at 1-3 e/Å² per frame).
LOCAL_MODEL_MAX_RATIO = 0.8


def held_out_ratio(centres: np.ndarray, patch_shifts: np.ndarray, ny: int, nx: int,
                   inliers: np.ndarray | None = None) -> float:
    """How well a deformation model predicts patches it was not fitted to: below 1 it has found motion.

    Each patch in turn is left out, the model is fitted to the others and predicts the left-out patch's
    residual shifts.  Returned: the summed squared error of those predictions over the summed squared
    shifts (the error of predicting no local motion at all).  Patches are left out, not frames: each
    patch's trajectory is smoothed over time, so its frames share their noise, while different patches
    share none.  At realistic exposures on small frames the patch shifts are mostly noise (2048² x 30 at 1
    e/Å² per frame, 5 x 5 patches: 2.5 px RMS about the global trajectory) and a model fitted to them put
    1.5 px of error into a trajectory that was right to 0.36 px.

    Parameters
    ----------
    centres : ndarray (p, 2)
        Patch centres (x, y), full-resolution pixels.
    patch_shifts : ndarray (p, n, 2)
        Residual shifts per patch and frame (pixels).
    ny, nx : int
        Frame size.
    inliers : ndarray (p, n) of bool, optional
        Samples to score (default all); the full fit's outliers are best left out of both sums.

    Returns
    -------
    float
        inf for fewer than 7 patches (the quadratic model needs 6 to be fitted without the left-out one).

    Examples
    --------
    >>> c = np.array([[x, y] for y in range(50, 500, 100) for x in range(50, 500, 100)], float)
    >>> tilt = np.stack([0.004 * c[:, 0], np.zeros(25)], -1)[:, None, :] * np.linspace(-1, 1, 9)[None, :, None]
    >>> held_out_ratio(c, tilt, 500, 500) < 0.01
    True
    >>> noise = np.random.default_rng(0).normal(size=(25, 9, 2))
    >>> held_out_ratio(c, noise, 500, 500) > 1
    True
    """
    p, n, _ = patch_shifts.shape
    if p < 7:
        return float("inf")
    keep = np.ones((p, n), dtype=bool) if inliers is None else np.asarray(inliers, dtype=bool)
    t = np.arange(n, dtype=np.float64)
    err = total = 0.0
    for j in range(p):
        others = np.arange(p) != j
        m = fit_deformation(centres[others], patch_shifts[others], ny, nx)
        pred = m.shift_at(np.full(n, centres[j, 0]), np.full(n, centres[j, 1]), t)  # (n, 2)
        k = keep[j]
        err += float(((patch_shifts[j] - pred) ** 2).sum(-1)[k].sum())
        total += float((patch_shifts[j] ** 2).sum(-1)[k].sum())
    return err / total if total > 0 else float("inf")


# --------------------------------------------------------------------------
# summing
# --------------------------------------------------------------------------

@njit(cache=True)
def _keys(t):
    a = -0.5
    t = abs(t)
    if t <= 1.0:
        return (a + 2.0) * t * t * t - (a + 3.0) * t * t + 1.0
    if t < 2.0:
        return a * t * t * t - 5.0 * a * t * t + 8.0 * a * t - 4.0 * a
    return 0.0


@njit(cache=True)
def _warp_add(img, out, cx, cy, nx_full, ny_full, scale_x, scale_y):
    ny, nx = img.shape
    for y in range(ny):
        v = 2.0 * (y * scale_y) / ny_full - 1.0
        for x in range(nx):
            u = 2.0 * (x * scale_x) / nx_full - 1.0
            sx = (cx[0] + cx[1] * u + cx[2] * v + cx[3] * u * u + cx[4] * u * v + cx[5] * v * v) / scale_x
            sy = (cy[0] + cy[1] * u + cy[2] * v + cy[3] * u * u + cy[4] * u * v + cy[5] * v * v) / scale_y
            xs = x - sx
            ys = y - sy
            ix = int(math.floor(xs))
            iy = int(math.floor(ys))
            fx = xs - ix
            fy = ys - iy
            acc = 0.0
            for j in range(-1, 3):
                wy = _keys(fy - j)
                yy = min(max(iy + j, 0), ny - 1)
                row = 0.0
                for i in range(-1, 3):
                    xx = min(max(ix + i, 0), nx - 1)
                    row += _keys(fx - i) * img[yy, xx]
                acc += wy * row
            out[y, x] += acc


@njit(cache=True)
def _warp_add_pair(img_a, img_b, out_a, out_b, cx, cy, nx_full, ny_full, scale_x, scale_y):
    # as _warp_add for two images with the same shift field: the Keys (a = -0.5, Catmull-Rom) weights
    # in closed form, computed once per pixel for both images; no clamping away from the edges
    ny, nx = img_a.shape
    for y in range(ny):
        v = 2.0 * (y * scale_y) / ny_full - 1.0
        for x in range(nx):
            u = 2.0 * (x * scale_x) / nx_full - 1.0
            sx = (cx[0] + cx[1] * u + cx[2] * v + cx[3] * u * u + cx[4] * u * v + cx[5] * v * v) / scale_x
            sy = (cy[0] + cy[1] * u + cy[2] * v + cy[3] * u * u + cy[4] * u * v + cy[5] * v * v) / scale_y
            xs = x - sx
            ys = y - sy
            ix = int(math.floor(xs))
            iy = int(math.floor(ys))
            t = xs - ix
            t2 = t * t
            t3 = t2 * t
            wx0 = 0.5 * (-t3 + 2.0 * t2 - t)
            wx1 = 0.5 * (3.0 * t3 - 5.0 * t2 + 2.0)
            wx2 = 0.5 * (-3.0 * t3 + 4.0 * t2 + t)
            wx3 = 0.5 * (t3 - t2)
            t = ys - iy
            t2 = t * t
            t3 = t2 * t
            wy0 = 0.5 * (-t3 + 2.0 * t2 - t)
            wy1 = 0.5 * (3.0 * t3 - 5.0 * t2 + 2.0)
            wy2 = 0.5 * (-3.0 * t3 + 4.0 * t2 + t)
            wy3 = 0.5 * (t3 - t2)
            if ix >= 1 and ix + 2 < nx:
                x0, x1, x2, x3 = ix - 1, ix, ix + 1, ix + 2
            else:
                x0 = min(max(ix - 1, 0), nx - 1)
                x1 = min(max(ix, 0), nx - 1)
                x2 = min(max(ix + 1, 0), nx - 1)
                x3 = min(max(ix + 2, 0), nx - 1)
            acc_a = 0.0
            acc_b = 0.0
            for j in range(4):
                yy = min(max(iy + j - 1, 0), ny - 1)
                wy = wy0 if j == 0 else (wy1 if j == 1 else (wy2 if j == 2 else wy3))
                acc_a += wy * (wx0 * img_a[yy, x0] + wx1 * img_a[yy, x1] + wx2 * img_a[yy, x2] + wx3 * img_a[yy, x3])
                acc_b += wy * (wx0 * img_b[yy, x0] + wx1 * img_b[yy, x1] + wx2 * img_b[yy, x2] + wx3 * img_b[yy, x3])
            out_a[y, x] += acc_a
            out_b[y, x] += acc_b


def warp_add_pair(img_a: np.ndarray, img_b: np.ndarray, out_a: np.ndarray, out_b: np.ndarray,
                  frame_coeffs: np.ndarray, full_shape: tuple[int, int]) -> None:
    """:func:`warp_add` of two images with one shift field (the unweighted and the weighted frame).

    >>> a = np.ones((8, 8), np.float32); oa = np.zeros_like(a); ob = np.zeros_like(a)
    >>> warp_add_pair(a, 2 * a, oa, ob, np.zeros((2, 6)), (8, 8)); float(ob.mean())
    2.0
    """
    ny, nx = img_a.shape
    _warp_add_pair(np.ascontiguousarray(img_a, dtype=np.float32), np.ascontiguousarray(img_b, dtype=np.float32),
                   out_a, out_b, np.ascontiguousarray(frame_coeffs[0], np.float64),
                   np.ascontiguousarray(frame_coeffs[1], np.float64), float(full_shape[1]), float(full_shape[0]),
                   float(full_shape[1] / nx), float(full_shape[0] / ny))


@njit(cache=True)
def _accumulate(f, py, px, unw):
    ny, w = f.shape
    for y in range(ny):
        a = py[y]
        for x in range(w):
            unw[y, x] += f[y, x] * a * px[x]


@njit(cache=True)
def _accumulate_weighted(f, py, px, minus_half_over_ne, exposure, unw, wtd, sum_sq):
    # shift, dose weight exp(-N / (2 N_e(k))) (1 at k = 0) and both sums in one pass
    ny, w = f.shape
    for y in range(ny):
        a = py[y]
        for x in range(w):
            g = f[y, x] * a * px[x]
            q = np.float32(math.exp(minus_half_over_ne[y, x] * exposure))
            if y == 0 and x == 0:
                q = np.float32(1.0)
            unw[y, x] += g
            wtd[y, x] += g * q
            sum_sq[y, x] += np.float64(q) * np.float64(q)


def warp_add(img: np.ndarray, out: np.ndarray, frame_coeffs: np.ndarray, full_shape: tuple[int, int]) -> None:
    """``out(x) += img(x - r(x))`` with the residual shift field of one frame (bicubic, Keys).

    Parameters
    ----------
    img, out : ndarray float32 (ny, nx)
        Image (possibly binned relative to the model's frame size) and accumulator.
    frame_coeffs : ndarray (2, 6)
        :meth:`DeformationModel.frame_coefficients` (full-resolution pixels).
    full_shape : (ny, nx)
        Frame size the model refers to.
    """
    ny, nx = img.shape
    sx = full_shape[1] / nx
    sy = full_shape[0] / ny
    _warp_add(np.ascontiguousarray(img, dtype=np.float32), out, np.ascontiguousarray(frame_coeffs[0], np.float64),
              np.ascontiguousarray(frame_coeffs[1], np.float64), float(full_shape[1]), float(full_shape[0]),
              float(sx), float(sy))


class MovieSummer:
    """Aligned sums of frames added one at a time: dose-weighted and unweighted.

    Parameters
    ----------
    shape : (ny, nx)
        Full-resolution frame size.
    out_shape : (my, mx)
        Output size (``shape`` unless binned by ``--output-binning``).
    weighter : cistem_mpi.kernels.dose.DoseWeighter or None
        Built for ``out_shape`` and the output pixel size; None: no weighted sum.
    model : DeformationModel, optional
        Local motion; without it the sums are made in Fourier space.
    restore_power : bool
        Divide the weighted sum by ``sqrt(sum q²)`` (cisTEM's default).

    >>> s = MovieSummer((8, 8), (8, 8), None); s.add(0, np.ones((8, 8), np.float32), 0.0, 0.0)
    >>> s.finish()[1].shape
    (8, 8)
    """

    def __init__(self, shape: tuple[int, int], out_shape: tuple[int, int], weighter, model=None,
                 restore_power: bool = True):
        self.ny, self.nx = int(shape[0]), int(shape[1])
        self.my, self.mx = int(out_shape[0]), int(out_shape[1])
        self.w = weighter
        self.model = model
        self.restore_power = restore_power
        half = (self.my, self.mx // 2 + 1)
        if model is None:
            self.unw = np.zeros(half, np.complex64)
            self.wtd = np.zeros(half, np.complex64) if weighter is not None else None
        else:
            self.unw = np.zeros((self.my, self.mx), np.float32)
            self.wtd = np.zeros((self.my, self.mx), np.float32) if weighter is not None else None

    def add(self, index: int, frame: np.ndarray, sx: float, sy: float) -> None:
        """Add prepared frame ``index`` with its global shift (full-resolution pixels)."""
        f = _fft.rfftn(np.asarray(frame, dtype=np.float32))
        f[0, 0] = 0.0
        self.add_ft(index, f, sx, sy)

    def add_ft(self, index: int, f: np.ndarray, sx: float, sy: float) -> None:
        """As :meth:`add`, given the frame's half-layout transform."""
        if (self.my, self.mx) != (self.ny, self.nx):
            f = fourier_crop_half(f, self.ny, self.nx, self.my, self.mx)
        if self.model is None:
            # shift, weight and add in one pass over the transform (no temporaries)
            py, px = _phase_vectors(self.my, self.mx, sx * self.mx / self.nx, sy * self.my / self.ny)
            f = np.ascontiguousarray(f, dtype=np.complex64)
            if self.w is None:
                _accumulate(f, py, px, self.unw)
            else:
                _accumulate_weighted(f, py, px, self.w._minus_half_over_ne, np.float32(self.w.exposure(index)),
                                     self.unw, self.wtd, self.w.sum_sq)
            return
        f = phase_shift_half(f, self.my, self.mx, sx * self.mx / self.nx, sy * self.my / self.ny)
        q = self.w.weights(index) if self.w is not None else None
        c = self.model.frame_coefficients(index)
        if q is not None:
            warp_add_pair(_fft.irfftn(f, self.mx), _fft.irfftn(f * q, self.mx), self.unw, self.wtd, c,
                          (self.ny, self.nx))
        else:
            warp_add(_fft.irfftn(f, self.mx), self.unw, c, (self.ny, self.nx))

    def finish(self) -> tuple[np.ndarray | None, np.ndarray]:
        """(dose-weighted sum or None, unweighted sum), float32 real images."""
        if self.model is None:
            unw = _fft.irfftn(self.unw, self.mx).astype(np.float32)
            wtd = None
            if self.wtd is not None:
                g = self.wtd / self.w.restore_power_divisor() if self.restore_power else self.wtd
                wtd = _fft.irfftn(g, self.mx).astype(np.float32)
            return wtd, unw
        wtd = self.wtd
        if wtd is not None and self.restore_power:
            g = _fft.rfftn(wtd) / self.w.restore_power_divisor()
            wtd = _fft.irfftn(g, self.mx).astype(np.float32)
        return wtd, self.unw


def trajectory_rms(estimated: np.ndarray, truth: np.ndarray) -> float:
    """RMS distance (pixels) between two (n, 2) trajectories after removing their mean offset.

    >>> trajectory_rms(np.array([[1.0, 0], [2, 0]]), np.array([[0.0, 0], [1, 0]]))
    0.0
    """
    d = np.asarray(estimated, float) - np.asarray(truth, float)
    d -= d.mean(axis=0)
    return float(np.sqrt((d ** 2).sum(axis=-1).mean()))

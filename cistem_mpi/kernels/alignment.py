"""Per-particle alignment against reference projections (cisTEM refine3d / Frealign X).

A particle image is compared with CTF-modulated central sections of a
reference within a resolution band.  Both are Fourier-cropped to the band's
upper limit (``m`` pixels instead of ``N``), which is the same as binning
the images and makes every score proportionally cheaper.

Score: the normalised cross-correlation in the band,
``CC = Re sum x* (c p) / sqrt(sum |x|^2 sum |c p|^2)`` (sums over the full
transform; the half layout counts kx > 0 twice).  cisTEM's SCORE is
``100 CC``.  Shift convention as everywhere: a particle with shift (dx, dy)
is the centred projection moved by +dx, +dy pixels.

* :func:`global_search` scores a set of orientations at once, each with an
  FFT cross-correlation over shifts, and keeps the best few;
* :func:`local_refine` polishes angles and shifts with a continuous optimiser
  (Nelder-Mead) from a start.

Speed: a local refinement makes ~100-250 score evaluations of one particle.
Each is a single compiled pass over the band's frequencies only (rotation,
interpolation from the padded reference, CTF, shift phase and the sums in one
loop, :func:`_band_cc`), and the whole Nelder-Mead search runs compiled
(:func:`_nelder_mead`, scipy's algorithm), so no per-evaluation Python or
array allocation is left.  The reference is read from a compact copy of the
band's ball of the padded transform (:func:`projection.compact_ft`, a few MB
that stay in cache, instead of the whole ``P^2 (P/2+1)`` array): the
reference half of binning to the resolution limit.  The shift does not
change ``sum |c p|^2``, so the denominator needs no phase.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numba import njit

from cistem_mpi.kernels import fft as _fft
from cistem_mpi.kernels.euler import rotation_matrix
from cistem_mpi.kernels.interpolation import method_code, n_taps
from cistem_mpi.kernels.masks import circle_mask
from cistem_mpi.kernels.projection import (
    VolumeFT,
    compact_ft,
    extract_slices,
    extract_slices_cropped,
    interpolate_at,
)

__all__ = [
    "Band", "make_band", "crop_ft", "prepare_particle", "cc", "shift_search", "global_search",
    "local_refine", "orientation_grid", "Alignment", "focused_cc",
]


@dataclass(frozen=True)
class Band:
    """The Fourier region scored, on the cropped ``m``-grid of an ``n``-image.

    Attributes
    ----------
    n, m : int
        Image box and cropped box (even).
    mask : ndarray, bool, (m, m//2+1)
        True inside the resolution band.
    mult : ndarray, float32, (m, m//2+1)
        Friedel multiplicity inside the band (2, or 1 on kx = 0 and kx = m/2), 0 outside.
    """

    n: int
    m: int
    mask: np.ndarray
    mult: np.ndarray


def make_band(n: int, pixel_size: float, high_resolution: float, low_resolution: float = 300.0) -> Band:
    """Resolution band ``low_resolution``..``high_resolution`` (Å) for ``n``-pixel images."""
    r_hi = min(n / 2, n * pixel_size / high_resolution) if high_resolution > 0 else n / 2
    r_lo = n * pixel_size / low_resolution if low_resolution > 0 else 0.0
    m = min(n, 2 * int(np.ceil(r_hi)) + 2)
    m += m % 2
    fy = np.fft.fftfreq(m) * m
    fx = np.arange(m // 2 + 1, dtype=np.float64)
    r = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    mask = (r <= r_hi) & (r >= r_lo)
    mult = np.where(mask, 2.0, 0.0).astype(np.float32)
    mult[:, 0] = np.where(mask[:, 0], 1.0, 0.0)
    if m % 2 == 0:
        mult[:, -1] = np.where(mask[:, -1], 1.0, 0.0)
    return Band(n=n, m=m, mask=mask, mult=mult)


def crop_ft(f: np.ndarray, m: int) -> np.ndarray:
    """Keep the frequencies of an ``m``-box from half-layout FT(s) of an ``n``-box (``m <= n``)."""
    n = f.shape[-2]
    if m == n:
        return f
    h = m // 2
    rows = np.r_[0:h, n - h:n]
    return np.ascontiguousarray(f[..., rows, : h + 1])


def prepare_particle(image: np.ndarray, mask_radius: float, edge: float = 3.0) -> np.ndarray:
    """Normalise (zero mean, unit variance) and apply a soft circular mask (radius in pixels)."""
    img = image.astype(np.float32)
    img = img - img.mean()
    sd = img.std()
    if sd > 0:
        img = img / sd
    if mask_radius > 0:
        img = img * _circle(img.shape[0], float(mask_radius), float(edge))
    return img


@lru_cache(maxsize=8)
def _circle(n: int, radius: float, edge: float) -> np.ndarray:
    # the same soft disc for every particle of a run: build it once (read-only, shared)
    c = circle_mask(n, radius, edge)
    c.setflags(write=False)
    return c


def _phases(m: int, n: int, dx: float, dy: float) -> np.ndarray:
    """exp(-2 pi i k.d / n) on the cropped half grid: content moves by +d (n-pixels)."""
    ky = np.fft.fftfreq(m) * m
    kx = np.arange(m // 2 + 1)
    return np.exp(-2j * np.pi * (ky[:, None] * dy + kx[None, :] * dx) / n).astype(np.complex64)


def cc(x: np.ndarray, model: np.ndarray, band: Band) -> np.ndarray:
    """Band-limited normalised cross-correlation of ``x`` with each ``model`` (..., m, m//2+1)."""
    w = band.mult
    num = np.sum(w * (x.real * model.real + x.imag * model.imag), axis=(-2, -1))
    dx = np.sum(w * (x.real ** 2 + x.imag ** 2), axis=(-2, -1))
    dm = np.sum(w * (model.real ** 2 + model.imag ** 2), axis=(-2, -1))
    den = np.sqrt(dx * dm)
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def shift_search(x: np.ndarray, models: np.ndarray, band: Band, max_shift: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best shift of each model by FFT cross-correlation; returns (cc, dx, dy) in n-pixels.

    ``max_shift`` bounds |dx|, |dy| (n-pixels).  The peak is refined to
    sub-pixel precision with a parabola in each direction.
    """
    m, n = band.m, band.n
    prod = (x[None] * np.conj(models)) * band.mask
    ccmap = np.fft.irfft2(prod, s=(m, m), axes=(-2, -1)) * (m * m)  # sum over the full transform
    w = band.mult
    nx = np.sqrt(np.sum(w * np.abs(x) ** 2))
    nm = np.sqrt(np.sum(w * np.abs(models) ** 2, axis=(-2, -1)))
    scale = m / n  # cropped pixels per image pixel
    lim = max_shift * scale
    t = np.fft.fftfreq(m) * m
    allowed = (np.abs(t)[:, None] <= lim) & (np.abs(t)[None, :] <= lim)
    cm = np.where(allowed[None], ccmap, -np.inf)
    flat = cm.reshape(len(models), -1).argmax(axis=1)
    iy, ix = np.unravel_index(flat, (m, m))
    k = np.arange(len(models))
    peak = ccmap[k, iy, ix]

    def parabola(c_minus: np.ndarray, c0: np.ndarray, c_plus: np.ndarray) -> np.ndarray:
        den = c_minus - 2 * c0 + c_plus
        return np.where(den < 0, 0.5 * (c_minus - c_plus) / np.where(den < 0, den, -1.0), 0.0).clip(-0.5, 0.5)

    oy = parabola(ccmap[k, (iy - 1) % m, ix], peak, ccmap[k, (iy + 1) % m, ix])
    ox = parabola(ccmap[k, iy, (ix - 1) % m], peak, ccmap[k, iy, (ix + 1) % m])
    # the correlation at offset t means the particle = model moved by +t
    dy = (t[iy] + oy) / scale
    dx = (t[ix] + ox) / scale
    den = nx * nm
    score = np.divide(peak, den, out=np.zeros_like(peak), where=den > 0)
    return score, dx, dy


def orientation_grid(step: float, psi_step: float | None = None) -> np.ndarray:
    """Euler angles (phi, theta, psi) in degrees covering SO(3) at about ``step`` degrees.

    Projection directions on a Fibonacci sphere (spacing ~``step``), in-plane
    angles every ``psi_step`` (default ``step``).
    """
    psi_step = step if psi_step is None else psi_step
    area = 4 * np.pi / np.deg2rad(step) ** 2
    n_dir = max(8, int(np.ceil(area * 1.1)))
    i = np.arange(n_dir) + 0.5
    z = 1 - 2 * i / n_dir
    theta = np.degrees(np.arccos(np.clip(z, -1, 1)))
    phi = np.degrees(np.mod(i * np.pi * (3 - np.sqrt(5)), 2 * np.pi))
    psis = np.arange(0.0, 360.0, psi_step)
    out = np.empty((n_dir * len(psis), 3))
    out[:, 0] = np.repeat(phi, len(psis))
    out[:, 1] = np.repeat(theta, len(psis))
    out[:, 2] = np.tile(psis, n_dir)
    return out


@dataclass
class Alignment:
    """Best parameters for one particle against one reference."""

    phi: float
    theta: float
    psi: float
    shx: float  # pixels
    shy: float  # pixels
    cc: float


def _models(vft: VolumeFT, angles: np.ndarray, ctf_c: np.ndarray, band: Band) -> np.ndarray:
    rot = rotation_matrix(angles[:, 0], angles[:, 1], angles[:, 2]).reshape(-1, 3, 3)
    # extracted on the cropped grid directly: the frequencies beyond m/2 are never computed
    return extract_slices_cropped(vft, rot, band.m, max_radius=band.m // 2) * ctf_c


def global_search(x_c: np.ndarray, ctf_c: np.ndarray, vft: VolumeFT, band: Band, grid: np.ndarray,
                  max_shift: float, keep: int = 5, batch: int = 512) -> list[Alignment]:
    """Score every orientation of ``grid`` (with its best shift); return the ``keep`` best.

    Parameters
    ----------
    x_c, ctf_c : ndarray (m, m//2+1)
        Cropped particle FT and its CTF.
    grid : ndarray (k, 3)
        (phi, theta, psi) in degrees (:func:`orientation_grid`).
    max_shift : float
        Largest shift searched (pixels of the n-image).
    """
    best: list[tuple[float, int, float, float]] = []
    for start in range(0, len(grid), batch):
        a = grid[start:start + batch]
        score, dx, dy = shift_search(x_c, _models(vft, a, ctf_c, band), band, max_shift)
        top = np.argsort(score)[::-1][:keep]
        best.extend((float(score[j]), start + int(j), float(dx[j]), float(dy[j])) for j in top)
    best.sort(key=lambda t: -t[0])
    return [Alignment(*grid[i], dx, dy, s) for s, i, dx, dy in best[:keep]]


def local_refine(x_c: np.ndarray, ctf_c: np.ndarray, vft: VolumeFT, band: Band, start: Alignment,
                 angle_step: float = 2.0, shift_step: float = 1.0, max_shift: float | None = None,
                 angles_fixed: bool = False, shifts_fixed: bool = False, max_evaluations: int = 250) -> Alignment:
    """Polish one alignment with Nelder-Mead on (phi, theta, psi, dx, dy).

    Parameters
    ----------
    x_c, ctf_c : ndarray (m, m//2+1)
        Cropped particle FT and its CTF (``band.m``).
    vft : VolumeFT
        Reference.
    band : Band
        Frequencies scored.
    start : Alignment
        Start (angles in degrees, shifts in pixels); the first simplex vertex.
    angle_step, shift_step : float
        Initial simplex edges (degrees, pixels).
    max_shift : float, optional
        Bound on the distance from the start shift (pixels).
    angles_fixed, shifts_fixed : bool
        Keep those parameters at the start.
    max_evaluations : int
        Score evaluations allowed (scipy's ``maxfev``).

    Returns
    -------
    Alignment
        Never worse than the start.
    """
    terms = _band_terms(x_c, ctf_c, band)
    x0 = np.array([start.phi, start.theta, start.psi, start.shx, start.shy], dtype=np.float64)
    free = np.array([not angles_fixed] * 3 + [not shifts_fixed] * 2)
    steps = np.array([angle_step] * 3 + [shift_step] * 2, dtype=np.float64)
    ms = -1.0 if max_shift is None else float(max_shift)
    vol = _volume_for(vft, band, terms[0], terms[1])
    x, f, nfev = _nelder_mead(*vol, method_code(vft.method), vft.size / band.n, band.n, *terms,
                              x0, np.flatnonzero(free), steps, ms, 0.02, 1e-6, int(max_evaluations))
    evaluation_count[0] += nfev
    return Alignment(float(x[0]), float(x[1]), float(x[2]), float(x[3]), float(x[4]), -float(f))


# score evaluations made by local_refine in this process (benchmarks read it)
evaluation_count = [0]


def _volume_for(vft: VolumeFT, band: Band, kx: np.ndarray, ky: np.ndarray):
    """(data, compact?, r, lo, P) for :func:`_band_cc`: the compact block when it is worth it."""
    radius = float(np.sqrt((kx * kx + ky * ky).max())) * vft.size / band.n if kx.size else 0.0
    c = compact_ft(vft, radius)
    if c is None:
        return vft.data, False, 0, 0, vft.size
    return c[0], True, c[1], c[2], vft.size


def _band_terms(x_c: np.ndarray, ctf_c: np.ndarray, band: Band):
    """Per-frequency constants of the score, on the band's points only.

    Returns ``(kx, ky, row, m, Re y, Im y, mult c^2, sum mult |x|^2)`` with
    ``y = mult * c * conj(x)`` per point (``kx`` = its column, ``row`` its
    row on the m-grid, ``ky`` the signed frequency of that row): everything
    of the particle that :func:`_band_cc` needs, computed once per particle.
    """
    iy, ix = np.nonzero(band.mask)
    m = band.m
    ky = np.where(iy < m // 2, iy, iy - m)
    w = band.mult[iy, ix].astype(np.float64)
    c = ctf_c[iy, ix].astype(np.float64) if np.ndim(ctf_c) else np.full(len(iy), float(ctf_c))
    xv = x_c[iy, ix].astype(np.complex128)
    y = w * c * np.conj(xv)
    nx2 = float(np.sum(w * (xv.real ** 2 + xv.imag ** 2)))
    return (ix.astype(np.int64), ky.astype(np.int64), iy.astype(np.int64), m,
            np.ascontiguousarray(y.real), np.ascontiguousarray(y.imag), w * c * c, nx2)


@njit(cache=True)
def _band_cc(vf, compact, cr, clo, p, method, scale, n, ix, ky, iy, m, y_re, y_im, wc2, nx2,
             phi, theta, psi, dx, dy, wx, wy, wz, ex_re, ex_im, ey_re, ey_im):
    """Band CC of the particle with the reference's slice at (phi, theta, psi) moved by (dx, dy).

    One pass over the band's points: the slice value is interpolated as in
    ``projection._extract`` (same taps, same Friedel handling) and never stored.
    """
    d2r = np.pi / 180.0
    cp, sp = np.cos(phi * d2r), np.sin(phi * d2r)
    ct, st = np.cos(theta * d2r), np.sin(theta * d2r)
    cs, ss = np.cos(psi * d2r), np.sin(psi * d2r)
    # first two columns of Rz(phi) Ry(theta) Rz(psi) (euler.rotation_matrix), times P/N
    r00 = (cp * ct * cs - sp * ss) * scale
    r01 = (-cp * ct * ss - sp * cs) * scale
    r10 = (sp * ct * cs + cp * ss) * scale
    r11 = (-sp * ct * ss + cp * cs) * scale
    r20 = (-st * cs) * scale
    r21 = (st * ss) * scale
    # shift phase exp(-2 pi i (kx dx + ky dy) / n) is separable: two small tables
    tw = -2.0 * np.pi / n
    for k in range(m // 2 + 1):
        ex_re[k] = np.cos(tw * k * dx)
        ex_im[k] = np.sin(tw * k * dx)
    for k in range(m):
        kk = k if k < m // 2 else k - m
        ey_re[k] = np.cos(tw * kk * dy)
        ey_im[k] = np.sin(tw * kk * dy)
    half = p // 2
    nt = n_taps(method)
    num = 0.0
    dm = 0.0
    for j in range(ix.shape[0]):
        kx = ix[j]
        kyj = ky[j]
        x = r00 * kx + r01 * kyj
        y = r10 * kx + r11 * kyj
        z = r20 * kx + r21 * kyj
        flip = False
        if x < 0.0:
            x = -x
            y = -y
            z = -z
            flip = True
        if compact and method == 1:
            # trilinear from the compact block: the common case, unrolled (same sums as below)
            fx0 = np.floor(x)
            fy0 = np.floor(y)
            fz0 = np.floor(z)
            tx = x - fx0
            ty = y - fy0
            tz = z - fz0
            xi = int(fx0) + clo
            yi = int(fy0) + cr
            zi = int(fz0) + cr
            v00 = vf[zi, yi, xi] * (1.0 - tx) + vf[zi, yi, xi + 1] * tx
            v01 = vf[zi, yi + 1, xi] * (1.0 - tx) + vf[zi, yi + 1, xi + 1] * tx
            v10 = vf[zi + 1, yi, xi] * (1.0 - tx) + vf[zi + 1, yi, xi + 1] * tx
            v11 = vf[zi + 1, yi + 1, xi] * (1.0 - tx) + vf[zi + 1, yi + 1, xi + 1] * tx
            v = (v00 * (1.0 - ty) + v01 * ty) * (1.0 - tz) + (v10 * (1.0 - ty) + v11 * ty) * tz
            acc_r = v.real
            acc_i = -v.imag if flip else v.imag
        else:
            acc_r, acc_i = interpolate_at(vf, compact, cr, clo, p, half, nt, method, x, y, z, wx, wy, wz)
            if flip:
                acc_i = -acc_i
        # projection value as stored by extract_slices (complex64), so both paths score the same numbers
        acc_r = np.float32(acc_r)
        acc_i = np.float32(acc_i)
        dm += wc2[j] * (acc_r * acc_r + acc_i * acc_i)
        er = ex_re[kx] * ey_re[iy[j]] - ex_im[kx] * ey_im[iy[j]]
        ei = ex_re[kx] * ey_im[iy[j]] + ex_im[kx] * ey_re[iy[j]]
        pr = acc_r * er - acc_i * ei
        pi = acc_r * ei + acc_i * er
        num += y_re[j] * pr - y_im[j] * pi
    den = np.sqrt(nx2 * dm)
    return num / den if den > 0.0 else 0.0


@njit(cache=True)
def _nm_f(v, x0, free, sx0, sy0, max_shift, vf, compact, cr, clo, p, method, scale, n, ix, ky, iy, m, y_re, y_im, wc2, nx2,
          xfull, wx, wy, wz, ex_re, ex_im, ey_re, ey_im):
    # the objective: -CC at the free parameters v (others at x0); 1.0 outside the shift range
    for k in range(5):
        xfull[k] = x0[k]
    for k in range(free.shape[0]):
        xfull[free[k]] = v[k]
    if max_shift >= 0.0 and np.hypot(xfull[3] - sx0, xfull[4] - sy0) > max_shift:
        return 1.0
    return -_band_cc(vf, compact, cr, clo, p, method, scale, n, ix, ky, iy, m, y_re, y_im, wc2, nx2,
                     xfull[0], xfull[1], xfull[2], xfull[3], xfull[4], wx, wy, wz, ex_re, ex_im, ey_re, ey_im)


@njit(cache=True)
def _nelder_mead(vf, compact, cr, clo, p, method, scale, n, ix, ky, iy, m, y_re, y_im, wc2, nx2,
                 x0, free, steps, max_shift, xatol, fatol, maxfev):
    """scipy's Nelder-Mead (non-adaptive; ``initial_simplex`` = start + one step per free parameter).

    The same moves, tests and evaluation budget as ``scipy.optimize.minimize(method="Nelder-Mead")``
    (``xatol``, ``fatol``, ``maxfev``), compiled with the score.  Returns the best full
    parameter vector, its objective (-CC) and the evaluations made.  The start is
    the first vertex, so the result is never worse than it.
    """
    wx = np.zeros(4)
    wy = np.zeros(4)
    wz = np.zeros(4)
    ex_re = np.empty(m // 2 + 1)
    ex_im = np.empty(m // 2 + 1)
    ey_re = np.empty(m)
    ey_im = np.empty(m)
    xfull = np.empty(5)
    sx0 = x0[3]
    sy0 = x0[4]
    nf = free.shape[0]
    best = x0.copy()
    if nf == 0:
        f0 = _nm_f(np.empty(0), x0, free, sx0, sy0, max_shift, vf, compact, cr, clo, p, method, scale, n, ix, ky, iy, m,
                   y_re, y_im, wc2, nx2, xfull, wx, wy, wz, ex_re, ex_im, ey_re, ey_im)
        return best, f0, 1
    sim = np.empty((nf + 1, nf))
    for k in range(nf):
        sim[0, k] = x0[free[k]]
    for i in range(nf):
        for k in range(nf):
            sim[i + 1, k] = sim[0, k] + (steps[free[k]] if k == i else 0.0)
    fsim = np.full(nf + 1, np.inf)
    nfev = 0
    for i in range(nf + 1):
        if nfev >= maxfev:
            break
        fsim[i] = _nm_f(sim[i], x0, free, sx0, sy0, max_shift, vf, compact, cr, clo, p, method, scale, n, ix, ky, iy, m,
                        y_re, y_im, wc2, nx2, xfull, wx, wy, wz, ex_re, ex_im, ey_re, ey_im)
        nfev += 1
    ind = np.argsort(fsim)
    sim = sim[ind]
    fsim = fsim[ind]
    rho, chi, psi, sigma = 1.0, 2.0, 0.5, 0.5
    xbar = np.empty(nf)
    xr = np.empty(nf)
    xe = np.empty(nf)
    while nfev < maxfev:
        conv_x = 0.0
        conv_f = 0.0
        for i in range(1, nf + 1):
            conv_f = max(conv_f, abs(fsim[0] - fsim[i]))
            for k in range(nf):
                conv_x = max(conv_x, abs(sim[i, k] - sim[0, k]))
        if conv_x <= xatol and conv_f <= fatol:
            break
        for k in range(nf):
            acc = 0.0
            for i in range(nf):
                acc += sim[i, k]
            xbar[k] = acc / nf
            xr[k] = (1 + rho) * xbar[k] - rho * sim[nf, k]
        fxr = _nm_f(xr, x0, free, sx0, sy0, max_shift, vf, compact, cr, clo, p, method, scale, n, ix, ky, iy, m,
                    y_re, y_im, wc2, nx2, xfull, wx, wy, wz, ex_re, ex_im, ey_re, ey_im)
        nfev += 1
        if fxr < fsim[0]:
            if nfev < maxfev:
                for k in range(nf):
                    xe[k] = (1 + rho * chi) * xbar[k] - rho * chi * sim[nf, k]
                fxe = _nm_f(xe, x0, free, sx0, sy0, max_shift, vf, compact, cr, clo, p, method, scale, n, ix, ky, iy, m,
                            y_re, y_im, wc2, nx2, xfull, wx, wy, wz, ex_re, ex_im, ey_re, ey_im)
                nfev += 1
                if fxe < fxr:
                    sim[nf] = xe
                    fsim[nf] = fxe
                else:
                    sim[nf] = xr
                    fsim[nf] = fxr
        elif fxr < fsim[nf - 1]:
            sim[nf] = xr
            fsim[nf] = fxr
        elif nfev < maxfev:
            doshrink = False
            if fxr < fsim[nf]:  # outside contraction
                for k in range(nf):
                    xe[k] = (1 + psi * rho) * xbar[k] - psi * rho * sim[nf, k]
                fxc = _nm_f(xe, x0, free, sx0, sy0, max_shift, vf, compact, cr, clo, p, method, scale, n, ix, ky, iy, m,
                            y_re, y_im, wc2, nx2, xfull, wx, wy, wz, ex_re, ex_im, ey_re, ey_im)
                nfev += 1
                if fxc <= fxr:
                    sim[nf] = xe
                    fsim[nf] = fxc
                else:
                    doshrink = True
            else:  # inside contraction
                for k in range(nf):
                    xe[k] = (1 - psi) * xbar[k] + psi * sim[nf, k]
                fxcc = _nm_f(xe, x0, free, sx0, sy0, max_shift, vf, compact, cr, clo, p, method, scale, n, ix, ky, iy, m,
                             y_re, y_im, wc2, nx2, xfull, wx, wy, wz, ex_re, ex_im, ey_re, ey_im)
                nfev += 1
                if fxcc < fsim[nf]:
                    sim[nf] = xe
                    fsim[nf] = fxcc
                else:
                    doshrink = True
            if doshrink:
                for j in range(1, nf + 1):
                    for k in range(nf):
                        sim[j, k] = sim[0, k] + sigma * (sim[j, k] - sim[0, k])
                    if nfev >= maxfev:  # scipy stops mid-shrink with the vertex moved, its value stale
                        break
                    fsim[j] = _nm_f(sim[j], x0, free, sx0, sy0, max_shift, vf, compact, cr, clo, p, method, scale, n, ix, ky,
                                    iy, m, y_re, y_im, wc2, nx2, xfull, wx, wy, wz, ex_re, ex_im, ey_re, ey_im)
                    nfev += 1
        ind = np.argsort(fsim)
        sim = sim[ind]
        fsim = fsim[ind]
    for k in range(nf):
        best[free[k]] = sim[0, k]
    return best, fsim[0], nfev


def _objective(v, x0, free, x_c, ctf_c, vft, band, n, m, start, max_shift):
    # The slow, obvious objective (slice, CTF, phase, cc with numpy): what local_refine computed
    # before it was compiled; the reference of tests/test_refine_speed_paths.py and of the bench's baseline.
    x = x0.copy()
    x[free] = v
    if max_shift is not None and np.hypot(x[3] - start.shx, x[4] - start.shy) > max_shift:
        return 1.0  # outside the allowed shift range: worse than any correlation
    model = _models(vft, x[None, :3], ctf_c, band)[0] * _phases(m, n, x[3], x[4])
    return -float(cc(x_c, model, band))


def focused_cc(particle: np.ndarray, vft: VolumeFT, ctf_full: np.ndarray, alignment: Alignment,
               centre: np.ndarray, radius: float, band: Band) -> float:
    """Score a centred particle against a reference only inside a projected focus sphere.

    Parameters
    ----------
    particle : ndarray (n, n)
        Normalised particle image, already moved back by its shift (centred).
    ctf_full : ndarray (n, n//2+1)
        CTF of the particle.
    centre : ndarray (3,)
        Sphere centre in pixels relative to the volume centre, (x, y, z).
    radius : float
        Sphere radius in pixels: the projected circle has the same radius.
    band : Band
        Resolution band (applied to both images before masking).

    Returns
    -------
    float
        Real-space correlation coefficient inside the projected circle.
    """
    n = particle.shape[0]
    rot = rotation_matrix(alignment.phi, alignment.theta, alignment.psi).reshape(3, 3)
    # A 3D point c appears in the projection at the first two components of R^T c.
    cx, cy, _ = rot.T @ np.asarray(centre, dtype=np.float64)
    circle = circle_mask(n, radius, 2.0, center=(n // 2 + cy, n // 2 + cx))
    proj = extract_slices(vft, rot[None], max_radius=band.m // 2)[0] * ctf_full
    lim = _band_full(n, band)
    ref_img = _fft.ift2(proj * lim, n)
    part_img = _fft.ift2(_fft.ft2(particle) * lim, n)
    a = (ref_img * circle).ravel()
    b = (part_img * circle).ravel()
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt(np.dot(a, a) * np.dot(b, b))
    return float(np.dot(a, b) / den) if den > 0 else 0.0


def _band_full(n: int, band: Band) -> np.ndarray:
    fy = np.fft.fftfreq(n) * n
    fx = np.arange(n // 2 + 1)
    r = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    return (r <= band.m // 2 - 1).astype(np.float32)

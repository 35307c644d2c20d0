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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize

from cistem_mpi.kernels import fft as _fft
from cistem_mpi.kernels.euler import rotation_matrix
from cistem_mpi.kernels.masks import circle_mask
from cistem_mpi.kernels.projection import VolumeFT, extract_slices

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
        img = img * circle_mask(img.shape[0], mask_radius, edge)
    return img


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
    r_hi = band.m // 2
    proj = extract_slices(vft, rot, max_radius=r_hi)
    return crop_ft(proj, band.m) * ctf_c


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

    ``max_shift`` (pixels) bounds the distance from the start shift.
    """
    n, m = band.n, band.m
    x0 = np.array([start.phi, start.theta, start.psi, start.shx, start.shy], dtype=np.float64)
    free = np.array([not angles_fixed] * 3 + [not shifts_fixed] * 2)
    if not free.any():
        s = -_objective(x0[free], x0, free, x_c, ctf_c, vft, band, n, m, start, max_shift)
        return Alignment(*x0, cc=float(s))
    steps = np.array([angle_step] * 3 + [shift_step] * 2)[free]
    simplex = np.vstack([x0[free]] + [x0[free] + np.eye(free.sum())[i] * steps[i] for i in range(free.sum())])
    res = optimize.minimize(
        _objective, x0[free], args=(x0, free, x_c, ctf_c, vft, band, n, m, start, max_shift),
        method="Nelder-Mead",
        options={"initial_simplex": simplex, "xatol": 0.02, "fatol": 1e-6, "maxfev": max_evaluations},
    )
    x = x0.copy()
    x[free] = res.x
    score = -float(res.fun)
    start_score = -_objective(x0[free], x0, free, x_c, ctf_c, vft, band, n, m, start, max_shift)
    if start_score > score:  # the optimiser never makes things worse
        x, score = x0, start_score
    return Alignment(float(x[0]), float(x[1]), float(x[2]), float(x[3]), float(x[4]), score)


def _objective(v, x0, free, x_c, ctf_c, vft, band, n, m, start, max_shift):
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

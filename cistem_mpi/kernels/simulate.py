"""Pure numerical parts of the ground-truth simulator (no files).

Conventions shared with the rest of the package:

* particle = projection of the map with cisTEM matrix ``M``, multiplied by the
  CTF, moved by ``(+SHX, +SHY)/pixel`` (see :mod:`cistem_mpi.kernels.shifts`);
* micrograph intensity ``I = 1 + contrast * (CTF (x) projected potential)`` --
  particles are dark in underfocus, as in real data;
* movie frame f shows the specimen moved by ``+drift[f]`` pixels relative to
  the reference (frame 0 has drift (0, 0)); counts are Poisson with mean
  ``exposure_per_frame * I * sensitivity`` and the gain reference is
  ``1 / sensitivity`` (corrected frame = raw frame * gain reference).

Every function takes a ``numpy.random.Generator`` so results are
reproducible from a seed.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from cistem_mpi.kernels import fft as _fft
from cistem_mpi.kernels.ctf import ctf_2d, ctf_2d_stack
from cistem_mpi.kernels.projection import VolumeFT, extract_slices
from cistem_mpi.kernels.shifts import phase_shift, shift_phases

__all__ = [
    "atoms_to_map", "simulate_particle_images", "add_noise_at_snr", "random_defocus",
    "gaussian_random_field", "compose_micrograph", "drift_trajectory", "exposure_filter",
    "simulate_movie_frames", "gain_reference", "random_positions",
]


# --------------------------------------------------------------------------
# atomic model -> map
# --------------------------------------------------------------------------

@njit(cache=True)
def _splat(coords_px, a, b_px2, n, out, cut):
    four_pi2 = 4.0 * np.pi * np.pi
    for i in range(coords_px.shape[0]):
        cx, cy, cz = coords_px[i, 0], coords_px[i, 1], coords_px[i, 2]
        # radius (voxels) that holds the widest Gaussian of this atom to ~4 sigma
        bmax = 0.0
        for t in range(a.shape[1]):
            if b_px2[i, t] > bmax:
                bmax = b_px2[i, t]
        r = int(np.ceil(cut * np.sqrt(bmax / (8.0 * np.pi * np.pi)))) + 1
        x0, x1 = max(int(np.floor(cx)) - r, 0), min(int(np.floor(cx)) + r + 1, n)
        y0, y1 = max(int(np.floor(cy)) - r, 0), min(int(np.floor(cy)) + r + 1, n)
        z0, z1 = max(int(np.floor(cz)) - r, 0), min(int(np.floor(cz)) + r + 1, n)
        for z in range(z0, z1):
            dz2 = (z - cz) ** 2
            for y in range(y0, y1):
                dy2 = (y - cy) ** 2
                for x in range(x0, x1):
                    d2 = dz2 + dy2 + (x - cx) ** 2
                    v = 0.0
                    for t in range(a.shape[1]):
                        bb = b_px2[i, t]
                        v += a[i, t] * (4.0 * np.pi / bb) ** 1.5 * np.exp(-four_pi2 * d2 / bb)
                    out[z, y, x] += v


def atoms_to_map(coords: np.ndarray, coef_a: np.ndarray, coef_b: np.ndarray, box: int,
                 pixel_size: float, bfactor: float = 0.0, min_sigma_px: float = 0.6,
                 center: np.ndarray | None = None) -> np.ndarray:
    """Coulomb-potential-like map from atoms as sums of per-element Gaussians.

    Each atom contributes ``sum_t a_t (4 pi / B_t)^{3/2} exp(-4 pi^2 r^2 / B_t)``
    with ``B_t = b_t + bfactor`` (Å²), the electron scattering factors being
    ``f(s) = sum_t a_t exp(-b_t s^2 / 4)`` (e.g. gemmi's ``c4322`` table, see
    :func:`cistem_mpi.io.model.scattering_coefficients`).  To keep the map
    free of aliasing each ``B_t`` is raised to at least
    ``8 pi^2 (min_sigma_px * pixel_size)^2`` (Gaussian sigma >= min_sigma_px
    voxels).

    Parameters
    ----------
    coords : ndarray, shape (n, 3)
        x, y, z in Å.
    coef_a, coef_b : ndarray, shape (n, k)
        Per-atom Gaussian amplitudes and widths (Å²).
    box : int
        Output size (cube); the model's ``center`` lands on voxel ``box//2``.
    pixel_size : float
        Å per voxel.
    bfactor : float
        Extra isotropic B (Å²) added to every atom.
    center : ndarray (3,), optional
        Point of the model (Å, x y z) put at the box centre; default: the
        mean of the coordinates.

    Returns
    -------
    ndarray, float32, (box, box, box), ``[z, y, x]``, potential per Å³.
    """
    coords = np.asarray(coords, dtype=np.float64)
    c = coords.mean(axis=0) if center is None else np.asarray(center, dtype=np.float64)
    px = (coords - c) / pixel_size + box // 2
    bmin = 8.0 * np.pi ** 2 * (min_sigma_px * pixel_size) ** 2
    b = np.maximum(np.asarray(coef_b, dtype=np.float64) + bfactor, bmin) / pixel_size ** 2
    a = np.asarray(coef_a, dtype=np.float64) / pixel_size ** 3
    out = np.zeros((box, box, box), dtype=np.float64)
    _splat(np.ascontiguousarray(px), np.ascontiguousarray(a), np.ascontiguousarray(b), box, out, 4.5)
    return out.astype(np.float32)


# --------------------------------------------------------------------------
# particles
# --------------------------------------------------------------------------

def random_defocus(n: int, rng: np.random.Generator, mean: float = 15000.0, spread: float = 5000.0,
                   astig: float = 300.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-particle (df1, df2, angast): df uniform in mean +/- spread, |df1 - df2| up to 2 astig.

    df1 >= df2 (cisTEM's convention) and angast in (-90, 90].
    """
    mid = rng.uniform(mean - spread, mean + spread, n)
    half = rng.uniform(0.0, astig, n)
    ang = rng.uniform(-90.0, 90.0, n)
    return (mid + half).astype(np.float32), (mid - half).astype(np.float32), ang.astype(np.float32)


def simulate_particle_images(vft: VolumeFT, rotmats: np.ndarray, shifts_px: np.ndarray,
                             pixel_size: float, voltage: float, cs: float, amplitude_contrast: float,
                             df1: np.ndarray, df2: np.ndarray, angast: np.ndarray,
                             pshift: np.ndarray | float = 0.0, bfactor: float = 0.0,
                             image_size: int | None = None) -> np.ndarray:
    """Noise-free particle images: project, apply the CTF, move by the shifts.

    Parameters
    ----------
    vft : VolumeFT
        Prepared map (:func:`cistem_mpi.kernels.projection.prepare_volume_ft`).
    rotmats : ndarray (n, 3, 3)
        cisTEM matrices of the particles.
    shifts_px : ndarray (n, 2)
        (SHX, SHY) / pixel_size: the particle is the projection moved by this.
    df1, df2, angast, pshift
        Per-particle CTF (Å, Å, degrees, radians).
    bfactor : float
        CTF envelope B (Å²).

    Returns
    -------
    ndarray, float32, (n, N, N)
    """
    n_img = vft.n if image_size is None else image_size
    f = extract_slices(vft, rotmats, image_size=n_img)
    c = ctf_2d_stack(n_img, pixel_size, voltage, cs, amplitude_contrast, df1, df2, angast, pshift, bfactor)
    s = np.asarray(shifts_px, dtype=np.float64).reshape(-1, 2)
    f = phase_shift(f * c, s[:, 0], s[:, 1])
    return _fft.ift2(f).astype(np.float32)


def add_noise_at_snr(images: np.ndarray, snr: float, rng: np.random.Generator,
                     signal_variance: float | None = None) -> tuple[np.ndarray, float]:
    """Add white Gaussian noise so that ``var(signal) / var(noise) = snr``.

    The signal variance is that of all pixels of the noise-free stack (or
    ``signal_variance`` if given, e.g. to give several stacks the same noise).

    Returns
    -------
    noisy : ndarray, float32
    sigma : float
        Standard deviation of the added noise.
    """
    images = np.asarray(images, dtype=np.float32)
    var = float(images.var()) if signal_variance is None else float(signal_variance)
    if snr <= 0:
        raise ValueError("snr must be positive")
    sigma = float(np.sqrt(var / snr))
    return (images + rng.standard_normal(images.shape, dtype=np.float32) * np.float32(sigma)), sigma


# --------------------------------------------------------------------------
# micrographs
# --------------------------------------------------------------------------

def gaussian_random_field(shape: tuple[int, int], rng: np.random.Generator, corr_length_px: float = 30.0,
                          sigma: float = 1.0) -> np.ndarray:
    """Smooth Gaussian random field (Gaussian power spectrum), std ``sigma``.

    Used as the slowly varying ice-thickness/background term of micrographs.
    """
    ny, nx = shape
    white = rng.standard_normal(shape).astype(np.float32)
    fy = np.fft.fftfreq(ny)[:, None]
    fx = np.fft.rfftfreq(nx)[None, :]
    filt = np.exp(-2.0 * (np.pi * corr_length_px) ** 2 * (fx * fx + fy * fy) / 4.0).astype(np.float32)
    field = _fft.irfftn(_fft.rfftn(white) * filt, nx)
    sd = float(field.std())
    return (field * (sigma / sd if sd > 0 else 0.0)).astype(np.float32)


def random_positions(n: int, shape: tuple[int, int], box: int, rng: np.random.Generator,
                     min_distance: float | None = None, max_tries: int = 200) -> np.ndarray:
    """Up to ``n`` particle centres (x, y) in pixels, at least ``box/2`` from the edges
    and ``min_distance`` (default 0.8 box) from each other.  float64 (m, 2)."""
    ny, nx = shape
    dmin = 0.8 * box if min_distance is None else float(min_distance)
    lo = box / 2 + 1
    pts: list[tuple[float, float]] = []
    tries = 0
    while len(pts) < n and tries < n * max_tries:
        tries += 1
        p = (rng.uniform(lo, nx - lo), rng.uniform(lo, ny - lo))
        if all((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 >= dmin * dmin for q in pts):
            pts.append(p)
    return np.array(pts, dtype=np.float64).reshape(-1, 2)


def compose_micrograph(projections: np.ndarray, positions: np.ndarray, shape: tuple[int, int],
                       pixel_size: float, voltage: float, cs: float, amplitude_contrast: float,
                       df1: float, df2: float, angast: float, pshift: float = 0.0,
                       contrast: float = 1.0, phase_noise: np.ndarray | None = None,
                       background: np.ndarray | None = None, bfactor: float = 0.0) -> np.ndarray:
    """Noise-free micrograph intensity with particles at ``positions``.

    Each projection (N x N, centre N//2) is placed so its centre lands on
    ``positions[i] = (x, y)`` (sub-pixel by a Fourier shift).  The optional
    ``phase_noise`` (same shape as the micrograph, potential units; e.g.
    amorphous ice, which makes the Thon rings) is added to the potential,
    the sum is convolved with the micrograph's CTF, and the optional
    ``background`` (ice-thickness variations, which attenuate the beam:
    amplitude, not phase contrast) is added to the intensity:
    ``I = 1 + contrast * (CTF (x) potential) + background`` (float32).
    """
    ny, nx = shape
    pot = np.zeros((ny, nx), dtype=np.float32)
    nbox = projections.shape[-1]
    h = nbox // 2
    for img, (x, y) in zip(projections, positions):
        ix, iy = int(np.floor(x)), int(np.floor(y))
        fx, fy = x - ix, y - iy
        moved = _fft.ift2(_fft.ft2(img) * shift_phases(nbox, fx, fy), nx=nbox)
        y0, x0 = iy - h, ix - h
        ys0, xs0 = max(y0, 0), max(x0, 0)
        ys1, xs1 = min(y0 + nbox, ny), min(x0 + nbox, nx)
        if ys1 <= ys0 or xs1 <= xs0:
            continue
        pot[ys0:ys1, xs0:xs1] += moved[ys0 - y0:ys1 - y0, xs0 - x0:xs1 - x0]
    if phase_noise is not None:
        pot += phase_noise / np.float32(contrast)
    c = ctf_2d(ny, pixel_size, voltage, cs, amplitude_contrast, df1, df2, angast, pshift, bfactor,
               half=True, nx=nx)
    # ft2 requires nothing square; the CTF grid matches rfft2 of (ny, nx)
    f = _fft.rfftn(np.fft.ifftshift(pot))
    img = 1.0 + contrast * np.fft.fftshift(_fft.irfftn(f * c, nx))
    if background is not None:
        img += background
    return img.astype(np.float32)


# --------------------------------------------------------------------------
# movies
# --------------------------------------------------------------------------

def drift_trajectory(n_frames: int, rng: np.random.Generator, total_px: float = 6.0,
                     decay_frames: float = 4.0, jitter_px: float = 0.15) -> np.ndarray:
    """A beam-induced-motion-like drift: fast at first, then slowing, plus jitter.

    Returns (n_frames, 2) float64 (dx, dy) in pixels with frame 0 at (0, 0).
    """
    ang = rng.uniform(0, 2 * np.pi)
    f = np.arange(n_frames, dtype=np.float64)
    mag = total_px * (1.0 - np.exp(-f / decay_frames)) / max(1e-12, 1.0 - np.exp(-(n_frames - 1) / decay_frames))
    traj = np.stack([mag * np.cos(ang), mag * np.sin(ang)], axis=1)
    traj += rng.normal(0.0, jitter_px, traj.shape)
    traj -= traj[0]
    return traj


def exposure_filter(shape: tuple[int, int], pixel_size: float, dose_start: float, dose_end: float,
                    voltage: float = 300.0) -> np.ndarray:
    """Radiation-damage attenuation of a frame (Grant & Grigorieff 2015), rfft half layout.

    Amplitude ``exp(-N_mid / (2 N_e(k)))`` with critical exposure
    ``N_e = 0.245 k^-1.665 + 2.81`` e/Å² (k in 1/Å, 300 kV; scaled by 0.8
    at 200 kV as in cisTEM), ``N_mid`` the frame's mid exposure.
    """
    ny, nx = shape
    fy = np.fft.fftfreq(ny)[:, None] / pixel_size
    fx = np.fft.rfftfreq(nx)[None, :] / pixel_size
    k = np.sqrt(fx * fx + fy * fy)
    k[0, 0] = 1e-9
    ne = 0.245 * k ** -1.665 + 2.81
    if voltage < 250:
        ne *= 0.8
    n_mid = 0.5 * (dose_start + dose_end)
    return np.exp(-n_mid / (2.0 * ne)).astype(np.float32)


def gain_reference(shape: tuple[int, int], rng: np.random.Generator, spread: float = 0.1) -> np.ndarray:
    """Per-pixel gain reference (1 / sensitivity), mean ~1, with column structure and noise."""
    ny, nx = shape
    cols = 1.0 + 0.5 * spread * np.sin(np.linspace(0, 6 * np.pi, nx))[None, :]
    sens = cols * (1.0 + spread * rng.standard_normal((ny, nx)))
    sens = np.clip(sens, 0.3, 3.0)
    return (1.0 / sens).astype(np.float32)


def simulate_movie_frames(intensity: np.ndarray, drift_px: np.ndarray, exposure_per_frame: float,
                          pixel_size: float, rng: np.random.Generator,
                          gain: np.ndarray | None = None, damage: bool = True,
                          voltage: float = 300.0) -> np.ndarray:
    """Integer-count frames of a micrograph intensity ``I`` (mean ~1).

    Frame f: the specimen moved by ``drift_px[f]``, optionally attenuated by
    :func:`exposure_filter` for its accumulated exposure, expected counts
    ``exposure_per_frame * pixel_size^2 * I * (1/gain)``; counts drawn from
    Poisson.  Returns uint16 (or uint32 if needed) (n_frames, ny, nx).
    """
    ny, nx = intensity.shape
    base = intensity.astype(np.float32) - 1.0
    f0 = _fft.rfftn(np.fft.ifftshift(base))
    fy = np.fft.fftfreq(ny)[:, None]
    fx = np.fft.rfftfreq(nx)[None, :]
    counts_per_px = exposure_per_frame * pixel_size * pixel_size
    sens = 1.0 if gain is None else (1.0 / gain)
    frames = []
    for i, (dx, dy) in enumerate(np.asarray(drift_px, dtype=np.float64)):
        ph = np.exp(-2j * np.pi * (fx * dx + fy * dy)).astype(np.complex64)
        f = f0 * ph
        if damage:
            f = f * exposure_filter((ny, nx), pixel_size, i * exposure_per_frame,
                                    (i + 1) * exposure_per_frame, voltage)
        frame_int = 1.0 + np.fft.fftshift(_fft.irfftn(f, nx))
        lam = np.clip(frame_int, 0.0, None) * counts_per_px * sens
        frames.append(rng.poisson(lam))
    out = np.array(frames)
    return out.astype(np.uint16 if out.max() < 65535 else np.uint32)

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
from cistem_mpi.kernels.grids import fourier_grid_2d
from cistem_mpi.kernels.projection import VolumeFT, extract_slices
from cistem_mpi.kernels.shifts import phase_shift, shift_phases

__all__ = [
    "atoms_to_map", "simulate_particle_images", "add_noise_at_snr", "random_defocus",
    "gaussian_random_field", "compose_micrograph", "drift_trajectory", "exposure_filter",
    "simulate_movie_frames", "gain_reference", "local_deformation_params", "local_deformation", "random_positions", "paste_images",
    "random_positions_allowed", "atoms_to_map_separable",
    "interaction_constant", "inelastic_mfp", "solvent_excluded_potential", "amorphous_structure_factor",
    "amorphous_potential_noise", "detector_mtf", "apply_detector", "ctf_filter_by_height", "specimen_height",
    "height_at", "ice_thickness_map", "carbon_mask", "contamination_thickness", "physical_micrograph",
    "SCATTERING_TO_VOLTS", "ICE_MEAN_POTENTIAL", "CARBON_MEAN_POTENTIAL", "slab_layers", "slab_ctf_filter_ft",
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


@njit(cache=True)
def _splat_separable(coords_px, a, b_px2, n, out, cut):
    # same sum as _splat, with exp(-c d^2) = exp(-c dx^2) exp(-c dy^2) exp(-c dz^2)
    four_pi2 = 4.0 * np.pi * np.pi
    k = a.shape[1]
    for i in range(coords_px.shape[0]):
        cx, cy, cz = coords_px[i, 0], coords_px[i, 1], coords_px[i, 2]
        bmax = 0.0
        for t in range(k):
            if b_px2[i, t] > bmax:
                bmax = b_px2[i, t]
        r = int(np.ceil(cut * np.sqrt(bmax / (8.0 * np.pi * np.pi)))) + 1
        ix, iy, iz = int(np.floor(cx)), int(np.floor(cy)), int(np.floor(cz))
        x0, x1 = max(ix - r, 0), min(ix + r + 1, n)
        y0, y1 = max(iy - r, 0), min(iy + r + 1, n)
        z0, z1 = max(iz - r, 0), min(iz + r + 1, n)
        if x1 <= x0 or y1 <= y0 or z1 <= z0:
            continue
        ex = np.empty((k, x1 - x0))
        ey = np.empty((k, y1 - y0))
        ez = np.empty((k, z1 - z0))
        amp = np.empty(k)
        for t in range(k):
            bb = b_px2[i, t]
            c = four_pi2 / bb
            amp[t] = a[i, t] * (4.0 * np.pi / bb) ** 1.5
            for x in range(x0, x1):
                ex[t, x - x0] = np.exp(-c * (x - cx) ** 2)
            for y in range(y0, y1):
                ey[t, y - y0] = np.exp(-c * (y - cy) ** 2)
            for z in range(z0, z1):
                ez[t, z - z0] = amp[t] * np.exp(-c * (z - cz) ** 2)
        for z in range(z0, z1):
            for y in range(y0, y1):
                for x in range(x0, x1):
                    v = 0.0
                    for t in range(k):
                        v += ez[t, z - z0] * ey[t, y - y0] * ex[t, x - x0]
                    out[z, y, x] += v


def atoms_to_map_separable(coords: np.ndarray, coef_a: np.ndarray, coef_b: np.ndarray, box: int,
                           pixel_size: float, bfactor: float = 0.0, min_sigma_px: float = 0.6,
                           center: np.ndarray | None = None) -> np.ndarray:
    """:func:`atoms_to_map` with separable Gaussians (same sum, ~10x fewer exponentials).

    Same parameters and result as :func:`atoms_to_map` (to rounding); used
    for large assemblies.

    >>> import numpy as np
    >>> m = atoms_to_map_separable(np.zeros((1, 3)), np.ones((1, 1)), np.full((1, 1), 20.0), 8, 1.0)
    >>> bool(np.allclose(m, atoms_to_map(np.zeros((1, 3)), np.ones((1, 1)), np.full((1, 1), 20.0), 8, 1.0), atol=1e-6))
    True
    """
    coords = np.asarray(coords, dtype=np.float64)
    c = coords.mean(axis=0) if center is None else np.asarray(center, dtype=np.float64)
    px = (coords - c) / pixel_size + box // 2
    bmin = 8.0 * np.pi ** 2 * (min_sigma_px * pixel_size) ** 2
    b = np.maximum(np.asarray(coef_b, dtype=np.float64) + bfactor, bmin) / pixel_size ** 2
    a = np.asarray(coef_a, dtype=np.float64) / pixel_size ** 3
    out = np.zeros((box, box, box), dtype=np.float64)
    _splat_separable(np.ascontiguousarray(px), np.ascontiguousarray(a), np.ascontiguousarray(b), box, out, 4.5)
    return out.astype(np.float32)


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
    fy, fx = fourier_grid_2d(ny, nx, dtype=np.float64)
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


def random_positions_allowed(n: int, shape: tuple[int, int], radius_px: float, rng: np.random.Generator,
                             allowed: np.ndarray | None = None, min_distance: float | None = None,
                             max_tries: int = 200) -> np.ndarray:
    """Up to ``n`` centres (x, y) px at least ``radius_px`` from the edges, ``min_distance``
    (default ``2 radius_px``) apart, and on pixels where ``allowed`` (bool, ny x nx) is true.

    >>> import numpy as np
    >>> random_positions_allowed(5, (100, 100), 10, np.random.default_rng(0)).shape[1]
    2
    """
    ny, nx = shape
    dmin = 2.0 * radius_px if min_distance is None else float(min_distance)
    lo = radius_px + 1
    pts: list[tuple[float, float]] = []
    tries = 0
    while len(pts) < n and tries < n * max_tries:
        tries += 1
        q = (rng.uniform(lo, nx - lo), rng.uniform(lo, ny - lo))
        if allowed is not None and not allowed[int(q[1]), int(q[0])]:
            continue
        if all((q[0] - a[0]) ** 2 + (q[1] - a[1]) ** 2 >= dmin * dmin for a in pts):
            pts.append(q)
    return np.array(pts, dtype=np.float64).reshape(-1, 2)


def compose_micrograph(projections: np.ndarray, positions: np.ndarray, shape: tuple[int, int],
                       pixel_size: float, voltage: float, cs: float, amplitude_contrast: float,
                       df1: float, df2: float, angast: float, pshift: float = 0.0,
                       contrast: float = 1.0, phase_noise: np.ndarray | None = None,
                       background: np.ndarray | None = None, bfactor: float = 0.0,
                       thickness_angstrom: float | None = None,
                       rng: np.random.Generator | None = None) -> np.ndarray:
    """Noise-free micrograph intensity with particles at ``positions``.

    Each projection (N x N, centre N//2) is placed so its centre lands on
    ``positions[i] = (x, y)`` (sub-pixel by a Fourier shift).  The optional
    ``phase_noise`` (same shape as the micrograph, potential units; e.g.
    amorphous ice, which makes the Thon rings) is added to the potential,
    the sum is convolved with the micrograph's CTF, and the optional
    ``background`` (ice-thickness variations, which attenuate the beam:
    amplitude, not phase contrast) is added to the intensity:
    ``I = 1 + contrast * (CTF (x) potential) + background`` (float32).

    ``thickness_angstrom`` (default None: a thin specimen) spreads the
    ``phase_noise`` (the ice) over a slab of that thickness centred on the
    defocus plane: :func:`slab_layers` independent layers of equal power,
    each through the CTF of its own height, summed (``rng`` required).
    Their power spectrum is the CTF^2 averaged over defocus across the slab,
    ``0.5 (1 - sinc(pi lambda g^2 t) cos 2 chi)`` (McMullan et al. 2015, the
    model ctffind5 fits).  The particles stay at the defocus plane.
    """
    ny, nx = shape
    pot = paste_images(projections, positions, shape)
    thick = thickness_angstrom is not None and thickness_angstrom > 0 and phase_noise is not None
    if phase_noise is not None and not thick:
        pot += phase_noise / np.float32(contrast)
    c = ctf_2d(ny, pixel_size, voltage, cs, amplitude_contrast, df1, df2, angast, pshift, bfactor,
               half=True, nx=nx)
    # ft2 requires nothing square; the CTF grid matches rfft2 of (ny, nx)
    f = _fft.rfftn(np.fft.ifftshift(pot)) * c
    if thick:
        if rng is None:
            raise ValueError("rng is required with thickness_angstrom")
        f += slab_ctf_filter_ft(_fft.rfftn(np.fft.ifftshift(phase_noise / np.float32(contrast))), pixel_size,
                                voltage, cs, amplitude_contrast, df1, df2, angast, float(thickness_angstrom), rng,
                                pshift, bfactor)
    img = 1.0 + contrast * np.fft.fftshift(_fft.irfftn(f, nx))
    if background is not None:
        img += background
    return img.astype(np.float32)


def slab_layers(thickness: float, pixel_size: float, voltage: float) -> np.ndarray:
    """Heights (Å, from the slab's centre) of the layers that sample a slab of ``thickness`` Å.

    Midpoints of equal sub-slabs no thicker than ``0.5 pixel^2 / lambda``:
    between neighbouring layers ``lambda g^2 dz <= 1/4`` up to the corner of
    the spectrum, so that the sum over layers follows the integral over
    the slab (its first alias, at ``lambda g^2 dz = 1``, stays outside).

    >>> z = slab_layers(1000.0, 1.5, 300.0)
    >>> bool(abs(z.mean()) < 1e-9 and z.max() < 500.0), len(z)
    (True, 18)
    """
    from cistem_mpi.kernels.ctf import electron_wavelength

    t = float(thickness)
    if t <= 0:
        return np.zeros(1)
    dz = 0.5 * pixel_size * pixel_size / electron_wavelength(voltage)
    n = max(1, int(np.ceil(t / dz)))
    return -0.5 * t + (np.arange(n) + 0.5) * (t / n)


def slab_ctf_filter_ft(ft: np.ndarray, pixel_size: float, voltage: float, cs: float, amplitude_contrast: float,
                       df1: float, df2: float, angast: float, thickness: float, rng: np.random.Generator,
                       pshift: float = 0.0, bfactor: float = 0.0) -> np.ndarray:
    """A thin layer's transform (rfft layout, ny x nx//2+1) spread over a slab and imaged through the CTF.

    The slab is :func:`slab_layers` independent layers with the spectrum
    ``|ft|`` (an amorphous layer: the same power, independent random
    phases), each of ``1/L`` of the power and at its own height ``z``
    (defocus ``df + z``): ``sum_k CTF(df + z_k) |ft| exp(i theta_k) / sqrt(L)``.
    Its expected power is ``|ft|^2 mean_k CTF(df + z_k)^2``.

    Returns
    -------
    ndarray complex64, same shape as ``ft``.

    >>> f = np.ones((32, 17), np.complex64)
    >>> out = slab_ctf_filter_ft(f, 1.5, 300.0, 2.7, 0.07, 15000, 15000, 0, 1000.0, np.random.default_rng(0))
    >>> out.shape, out.dtype
    ((32, 17), dtype('complex64'))
    """
    ft = np.asarray(ft)
    ny, w = ft.shape
    nx = 2 * (w - 1)
    amp = np.abs(ft).astype(np.float32)
    z = slab_layers(thickness, pixel_size, voltage)
    out = np.zeros((ny, w), np.complex64)
    scale = np.float32(1.0 / np.sqrt(len(z)))
    for dz in z:
        c = ctf_2d(ny, pixel_size, voltage, cs, amplitude_contrast, df1 + dz, df2 + dz, angast, pshift, bfactor,
                   half=True, nx=nx)
        theta = rng.uniform(0.0, 2.0 * np.pi, size=(ny, w)).astype(np.float32)
        out += (amp * c.astype(np.float32) * scale) * (np.cos(theta) + 1j * np.sin(theta)).astype(np.complex64)
    out[0, 0] = 0.0
    return out


def paste_images(images: np.ndarray, positions: np.ndarray, shape: tuple[int, int],
                 out: np.ndarray | None = None, fourier: bool = False) -> np.ndarray:
    """Add centred boxes into an image so that box centre ``N//2`` lands on ``positions[i]``.

    Parameters
    ----------
    images : ndarray (n, N, N)
        Real boxes (or, with ``fourier``, their centred rfft-half FTs
        (n, N, N//2+1) as made by :func:`cistem_mpi.kernels.fft.ft2`).
    positions : ndarray (n, 2)
        (x, y) in pixels from the first pixel; the fractional part is applied
        as a Fourier shift.
    shape : (ny, nx)
        Output size.
    out : ndarray, optional
        float32 image to add to (default zeros).

    Returns
    -------
    ndarray float32 (ny, nx)

    >>> import numpy as np
    >>> b = np.zeros((1, 8, 8), np.float32); b[0, 4, 4] = 1
    >>> float(paste_images(b, np.array([[10.0, 3.0]]), (16, 16))[3, 10])
    1.0
    """
    ny, nx = shape
    res = np.zeros((ny, nx), dtype=np.float32) if out is None else out
    nbox = images.shape[-2]
    h = nbox // 2
    for img, (x, y) in zip(images, np.asarray(positions, dtype=np.float64).reshape(-1, 2)):
        ix, iy = int(np.floor(x)), int(np.floor(y))
        fx, fy = x - ix, y - iy
        f = img if fourier else _fft.ft2(img)
        moved = _fft.ift2(f * shift_phases(nbox, fx, fy), nx=nbox)
        y0, x0 = iy - h, ix - h
        ys0, xs0 = max(y0, 0), max(x0, 0)
        ys1, xs1 = min(y0 + nbox, ny), min(x0 + nbox, nx)
        if ys1 <= ys0 or xs1 <= xs0:
            continue
        res[ys0:ys1, xs0:xs1] += moved[ys0 - y0:ys1 - y0, xs0 - x0:xs1 - x0]
    return res


# --------------------------------------------------------------------------
# physical image formation: projected Coulomb potential, CTF, detector
# --------------------------------------------------------------------------
#
# Units.  atoms_to_map returns sum_t a_t (4 pi/B_t)^{3/2} exp(-4 pi^2 r^2/B_t),
# i.e. the 3D Fourier transform of the electron scattering factor f_e(q) (Å),
# in Å^-2.  The Coulomb potential is V(r) = h^2 / (2 pi m0 e) * that map, with
# h^2/(2 pi m0 e) = 47.878 V Å^2 (Kirkland, "Advanced computing in electron
# microscopy", eq. 5.9: 2 pi a0 e = 47.878 V Å^2).  A projection of the map
# summed over voxels times the pixel size is the projected potential in V Å,
# and the phase of the exit wave is sigma * projected potential with the
# interaction constant sigma (rad / (V Å)) at the voltage.

#: h^2 / (2 pi m0 e) in V Å^2: scattering-factor maps (Å^-2) -> volts.
SCATTERING_TO_VOLTS = 47.878
#: electron rest energy, eV
ELECTRON_REST_ENERGY_EV = 510998.95
#: f_e(0) (Å) of a water molecule from the neutral-atom factors (gemmi c4322: O 1.9834 + 2 H 0.5288)
F0_WATER = 3.0410
#: f_e(0) (Å) of carbon (gemmi c4322)
F0_CARBON = 2.5088
#: number density (1/Å^3) of vitreous ice at 0.94 g/cm^3 and of amorphous carbon at 2.0 g/cm^3
ICE_NUMBER_DENSITY = 0.94 / 18.015 * 0.602214
CARBON_NUMBER_DENSITY = 2.0 / 12.011 * 0.602214
#: mean inner potential (V) of vitreous ice and amorphous carbon from the numbers above
ICE_MEAN_POTENTIAL = SCATTERING_TO_VOLTS * F0_WATER * ICE_NUMBER_DENSITY   # ~4.58 V
CARBON_MEAN_POTENTIAL = SCATTERING_TO_VOLTS * F0_CARBON * CARBON_NUMBER_DENSITY  # ~12.0 V
#: inelastic mean free path (Å) in vitreous ice at 300 kV (literature: ~3000-4000 Å); the
#: zero-loss (energy-filtered) image is attenuated by exp(-t / mfp)
ICE_INELASTIC_MFP_300KV = 3500.0


def interaction_constant(voltage_kv: float) -> float:
    """Interaction constant sigma (rad per V Å) at an acceleration voltage.

    ``sigma = 2 pi / (lambda V) * (m0 c^2 + eV) / (2 m0 c^2 + eV)`` with the
    relativistic wavelength ``lambda`` (Å, :func:`cistem_mpi.kernels.ctf.electron_wavelength`).

    Parameters
    ----------
    voltage_kv : float
        Acceleration voltage in kV.

    Returns
    -------
    float
        sigma in rad/(V Å): 6.53e-4 at 300 kV, 7.29e-4 at 200 kV.

    >>> round(interaction_constant(300.0) * 1e4, 2)
    6.53
    """
    from cistem_mpi.kernels.ctf import electron_wavelength

    v = 1000.0 * float(voltage_kv)
    lam = electron_wavelength(voltage_kv)
    e0 = ELECTRON_REST_ENERGY_EV
    return float(2.0 * np.pi / (lam * v) * (e0 + v) / (2.0 * e0 + v))


def inelastic_mfp(voltage_kv: float) -> float:
    """Inelastic mean free path in ice (Å), scaled from 300 kV by (v/c)^2 (~0.8 at 200 kV)."""
    def beta2(kv: float) -> float:
        g = 1.0 + 1000.0 * kv / ELECTRON_REST_ENERGY_EV
        return 1.0 - 1.0 / (g * g)
    return ICE_INELASTIC_MFP_300KV * beta2(voltage_kv) / beta2(300.0)


def solvent_excluded_potential(volume_volts: np.ndarray, pixel_size: float,
                               solvent_potential: float = ICE_MEAN_POTENTIAL,
                               smooth_angstrom: float = 1.5) -> np.ndarray:
    """Particle potential against the solvent it displaces: ``V - V_ice * envelope``.

    The envelope is ``clip(gauss(V, smooth) / V_ice, 0, 1)``: 1 inside the
    protein (its mean potential, ~7-8 V, exceeds the ice's), falling to 0
    outside.  The projection of the result is the change of the projected
    potential when the particle replaces ice (so a particle is seen against
    ice, not against vacuum).

    Parameters
    ----------
    volume_volts : ndarray (n, n, n)
        Potential in volts (:data:`SCATTERING_TO_VOLTS` times :func:`atoms_to_map`).
    pixel_size : float
        Å per voxel.
    solvent_potential : float
        Mean potential of the solvent (V), default vitreous ice.
    smooth_angstrom : float
        Gaussian sigma (Å) of the smoothing that makes the envelope.

    Returns
    -------
    ndarray float32, volts

    >>> import numpy as np
    >>> v = np.zeros((8, 8, 8), np.float32); v[2:6, 2:6, 2:6] = 8.0
    >>> round(float(solvent_excluded_potential(v, 1.0, 4.0, 0.0)[4, 4, 4]), 3)
    4.0
    """
    from scipy.ndimage import gaussian_filter

    v = np.asarray(volume_volts, dtype=np.float32)
    s = gaussian_filter(v, smooth_angstrom / pixel_size) if smooth_angstrom > 0 else v
    env = np.clip(s / np.float32(solvent_potential), 0.0, 1.0)
    return (v - np.float32(solvent_potential) * env).astype(np.float32)


def amorphous_structure_factor(q: np.ndarray, s0: float = 0.06, q_c: float = 0.15) -> np.ndarray:
    """Approximate structure factor of an amorphous solid: ``s0`` at q = 0 rising to 1.

    ``S(q) = s0 + (1 - s0) (1 - exp(-(q/q_c)^4))`` (q in 1/Å, q = 1/d):
    flat near ``s0`` ~ 0.06, water's compressibility limit (few density
    fluctuations at long wavelengths), up to q ~ 0.07/Å (d ~ 15 Å), then
    rising to 1 by the first diffraction ring of ice (q ~ 0.27/Å, 3.7 Å).
    """
    q = np.asarray(q, dtype=np.float64)
    return s0 + (1.0 - s0) * (1.0 - np.exp(-(q / q_c) ** 4))


def amorphous_potential_noise(shape: tuple[int, int], pixel_size: float, thickness: np.ndarray | float,
                              rng: np.random.Generator, f0: float = F0_WATER,
                              number_density: float = ICE_NUMBER_DENSITY, bfactor: float = 8.0,
                              s0: float = 0.06, q_c: float = 0.15) -> np.ndarray:
    """Fluctuation (V Å, zero mean) of the projected potential of an amorphous layer.

    A column of area ``p^2`` through thickness ``t`` holds ``n t p^2``
    molecules on average; for independent molecules (``S = 1``) the
    pixel-averaged projected potential has standard deviation
    ``47.878 f0 sqrt(n t) / p``.  That white field is shaped by
    ``sqrt(S(q))`` (:func:`amorphous_structure_factor`) and by the
    molecule's form-factor fall-off ``exp(-B q^2 / 4)``.  These
    fluctuations make the Thon rings of real micrographs.

    Parameters
    ----------
    shape : (ny, nx)
    pixel_size : float
        Å per pixel.
    thickness : float or ndarray (ny, nx)
        Layer thickness (Å); an array varies the noise power locally.
    rng : numpy.random.Generator
    f0, number_density : float
        Scattering factor at 0 (Å) and number density (1/Å^3) of the molecules.
    bfactor : float
        Å^2 of the form-factor fall-off.

    Returns
    -------
    ndarray float32 (ny, nx), V Å

    >>> import numpy as np
    >>> a = amorphous_potential_noise((64, 64), 1.0, 300.0, np.random.default_rng(0))
    >>> a.shape
    (64, 64)
    """
    ny, nx = shape
    t = np.clip(np.asarray(thickness, dtype=np.float64), 0.0, None)
    amp = SCATTERING_TO_VOLTS * f0 * np.sqrt(number_density * t) / pixel_size
    white = rng.standard_normal((ny, nx)) * amp
    fy, fx = (f / pixel_size for f in fourier_grid_2d(ny, nx, dtype=np.float64))
    q2 = fx * fx + fy * fy
    filt = np.sqrt(amorphous_structure_factor(np.sqrt(q2), s0, q_c)) * np.exp(-bfactor * q2 / 4.0)
    filt[0, 0] = 0.0
    out = _fft.irfftn(_fft.rfftn(white.astype(np.float32)) * filt.astype(np.float32), nx)
    return out.astype(np.float32)


def detector_mtf(ny: int, nx: int | None = None, half: bool = True, kind: str = "counting") -> np.ndarray:
    """MTF of the detector on a Fourier grid (rfft half layout by default).

    ``kind="counting"``: an electron-counting camera localises each event in
    one pixel, so the MTF is the pixel aperture, ``sinc(fx) sinc(fy)``
    (f in cycles/pixel: 0.64 at Nyquist along an axis), and the counts are
    Poisson (white noise): DQE = MTF^2 (0.41 at Nyquist along an axis).
    ``kind="ideal"``: 1 everywhere.

    >>> round(float(detector_mtf(8)[0, 4]), 3)
    0.637
    """

    fy, fx = fourier_grid_2d(ny, nx, half=half)
    if kind == "ideal":
        return np.ones(np.broadcast_shapes(fy.shape, fx.shape), dtype=np.float32)
    if kind != "counting":
        raise ValueError("detector kind must be 'counting' or 'ideal'")
    return (np.sinc(fy.astype(np.float64)) * np.sinc(fx.astype(np.float64))).astype(np.float32)


def apply_detector(intensity: np.ndarray, exposure: float, pixel_size: float, rng: np.random.Generator,
                   kind: str = "counting") -> np.ndarray:
    """Counts of a counting detector: the intensity blurred by the MTF, then Poisson.

    Expected counts ``exposure * pixel_size^2 * (MTF (x) intensity)``
    (exposure in e/Å^2).  Returns float32 counts.
    """
    img = np.asarray(intensity, dtype=np.float32)
    if kind != "ideal":
        pad = 16
        big = np.pad(img, pad, mode="reflect")
        ny, nx = big.shape
        img = _fft.irfftn(_fft.rfftn(big) * detector_mtf(ny, nx, kind=kind), nx)[pad:-pad, pad:-pad]
    lam = np.clip(img, 0.0, None).astype(np.float64) * exposure * pixel_size * pixel_size
    return rng.poisson(lam).astype(np.float32)


def ctf_filter_by_height(image: np.ndarray, pixel_size: float, voltage: float, cs: float,
                         amplitude_contrast: float, df1: float, df2: float, angast: float,
                         pshift: float = 0.0, bfactor: float = 0.0, height: np.ndarray | None = None,
                         step: float = 200.0, pad: int = 0) -> np.ndarray:
    """Convolve an image with the CTF whose defocus varies across it by ``height``.

    The defocus at a pixel is ``df + height`` (Å); the image is filtered
    with the CTFs of defocus levels ``step`` Å apart spanning the heights,
    and each pixel takes the linear interpolation between its two levels
    (exact for a constant height).  ``pad`` pixels of mirrored image on
    every side keep the circular convolution from wrapping the opposite
    edge in (a non-periodic image, e.g. an ice-thickness gradient).

    Returns
    -------
    ndarray float32 (ny, nx)
    """
    if pad > 0:
        big = np.pad(np.asarray(image, dtype=np.float32), pad, mode="reflect")
        hb = None if height is None else np.pad(np.asarray(height, dtype=np.float32), pad, mode="edge")
        return ctf_filter_by_height(big, pixel_size, voltage, cs, amplitude_contrast, df1, df2, angast, pshift,
                                    bfactor, hb, step, 0)[pad:-pad, pad:-pad].copy()
    ny, nx = image.shape
    f = _fft.rfftn(np.asarray(image, dtype=np.float32))

    def at(dz: float) -> np.ndarray:
        c = ctf_2d(ny, pixel_size, voltage, cs, amplitude_contrast, df1 + dz, df2 + dz, angast, pshift,
                   bfactor, half=True, nx=nx)
        return _fft.irfftn(f * c, nx)

    if height is None:
        return at(0.0).astype(np.float32)
    h = np.asarray(height, dtype=np.float64)
    lo, hi = float(h.min()), float(h.max())
    if hi - lo < 1e-6:
        return at(lo).astype(np.float32)
    nlev = int(np.ceil((hi - lo) / step)) + 1
    levels = np.linspace(lo, hi, nlev)
    pos = (h - lo) / (levels[1] - levels[0])
    k = np.clip(np.floor(pos).astype(np.int64), 0, nlev - 2)
    w = (pos - k).astype(np.float32)
    out = np.zeros((ny, nx), dtype=np.float32)
    prev = at(levels[0])
    for i in range(nlev - 1):
        nxt = at(levels[i + 1])
        sel = k == i
        out[sel] = (1.0 - w[sel]) * prev[sel] + w[sel] * nxt[sel]
        prev = nxt
    return out


def specimen_height(shape: tuple[int, int], pixel_size: float, tilt_axis: float = 0.0,
                    tilt_angle: float = 0.0) -> np.ndarray:
    """Height (Å, towards the source) of a tilted specimen plane at each pixel.

    The plane passes through the image centre ``(nx/2, ny/2)`` and is tilted
    by ``tilt_angle`` degrees about an in-plane axis at ``tilt_axis``
    degrees from the x axis: ``h = tan(tilt) * (-(x - cx) sin(axis) + (y - cy) cos(axis)) * pixel``.
    The local defocus is the defocus at the centre plus ``h`` (higher =
    further from focus = more underfocus).

    >>> float(specimen_height((4, 4), 1.0, 0.0, 45.0)[3, 0])
    1.0
    """
    ny, nx = shape
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float64)
    a = np.deg2rad(tilt_axis)
    d = (-(x - nx / 2) * np.sin(a) + (y - ny / 2) * np.cos(a)) * pixel_size
    return (np.tan(np.deg2rad(tilt_angle)) * d).astype(np.float32)


def height_at(x: np.ndarray, y: np.ndarray, shape: tuple[int, int], pixel_size: float, tilt_axis: float,
              tilt_angle: float) -> np.ndarray:
    """:func:`specimen_height` at arbitrary (x, y) pixel positions (float64)."""
    ny, nx = shape
    a = np.deg2rad(tilt_axis)
    d = (-(np.asarray(x) - nx / 2) * np.sin(a) + (np.asarray(y) - ny / 2) * np.cos(a)) * pixel_size
    return np.tan(np.deg2rad(tilt_angle)) * d


def ice_thickness_map(shape: tuple[int, int], pixel_size: float, rng: np.random.Generator,
                      mean: float = 300.0, gradient: float = 0.0, gradient_angle: float = 0.0,
                      sigma: float = 0.0, corr_length: float = 1500.0, minimum: float = 50.0) -> np.ndarray:
    """Ice thickness (Å) over the image: mean + linear gradient + smooth fluctuation.

    ``gradient`` is the thickness change (Å) across the image width along
    ``gradient_angle`` (degrees from x); ``sigma`` the std (Å) of a smooth
    Gaussian random field of correlation length ``corr_length`` Å.
    """
    ny, nx = shape
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float64)
    a = np.deg2rad(gradient_angle)
    u = ((x - nx / 2) * np.cos(a) + (y - ny / 2) * np.sin(a)) / max(nx, ny)
    t = mean + gradient * u
    if sigma > 0:
        t = t + gaussian_random_field(shape, rng, corr_length_px=corr_length / pixel_size, sigma=sigma)
    return np.clip(t, minimum, None).astype(np.float32)


def carbon_mask(shape: tuple[int, int], pixel_size: float, rng: np.random.Generator,
                fraction: float = 0.2, hole_radius: float = 6000.0, soft: float = 20.0) -> np.ndarray:
    """Soft mask (0..1) of carbon film outside a circular hole whose edge crosses the image.

    The hole (radius ``hole_radius`` Å) is placed so that about ``fraction``
    of the image lies on carbon, on a random side; the edge is smoothed over
    ``soft`` Å.
    """
    ny, nx = shape
    ang = rng.uniform(0, 2 * np.pi)
    r_px = hole_radius / pixel_size
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float64)
    cx, cy = nx / 2, ny / 2
    ux, uy = np.cos(ang), np.sin(ang)
    # distance of the edge from the image centre along (ux, uy) so that the carbon
    # (beyond the edge) covers ~fraction of the extent along that direction
    ext = 0.5 * (abs(ux) * nx + abs(uy) * ny)
    edge = ext * (1.0 - 2.0 * fraction)
    hx, hy = cx + (edge - r_px) * ux, cy + (edge - r_px) * uy
    d = np.hypot(x - hx, y - hy) - r_px  # > 0 on carbon
    return (0.5 * (1.0 + np.tanh(d * pixel_size / max(soft, 1e-3)))).astype(np.float32)


def contamination_thickness(shape: tuple[int, int], pixel_size: float, rng: np.random.Generator,
                            n_blobs: int = 1, radius: tuple[float, float] = (300.0, 700.0),
                            thickness: float = 3000.0, centres: np.ndarray | None = None) -> np.ndarray:
    """Extra ice (Å) of contamination balls: ``T sqrt(1 - (r/R)^2)`` inside radius R.

    Centres uniform in the inner 80 % of the image unless ``centres`` (x, y
    px) are given.
    """
    ny, nx = shape
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float64)
    out = np.zeros((ny, nx), dtype=np.float64)
    for i in range(n_blobs):
        if centres is not None:
            cx, cy = centres[i]
        else:
            cx, cy = rng.uniform(0.1 * nx, 0.9 * nx), rng.uniform(0.1 * ny, 0.9 * ny)
        r = rng.uniform(*radius) / pixel_size
        q = 1.0 - ((x - cx) ** 2 + (y - cy) ** 2) / (r * r)
        out += thickness * np.sqrt(np.clip(q, 0.0, None))
    return out.astype(np.float32)


def physical_micrograph(particle_fts: np.ndarray, positions: np.ndarray, particle_df: np.ndarray,
                        shape: tuple[int, int], pixel_size: float, voltage: float, cs: float,
                        amplitude_contrast: float, df1: float, df2: float, angast: float,
                        pshift: float = 0.0, ctf_bfactor: float = 0.0,
                        ice_thickness: np.ndarray | float = 300.0, height: np.ndarray | None = None,
                        carbon: np.ndarray | None = None, carbon_thickness: float = 200.0,
                        contamination: np.ndarray | None = None,
                        rng: np.random.Generator | None = None,
                        thickness_angstrom: float | None = None) -> np.ndarray:
    """Intensity (zero-loss image, before the detector) of particles in ice.

    Model (weak-phase, energy-filtered):

    * the exit-wave phase is ``sigma * phi`` with ``phi`` the projected
      potential (V Å): particles (solvent-excluded, see
      :func:`solvent_excluded_potential`), the mean potential of the ice
      and carbon layers times their thickness, and their amorphous
      fluctuations (:func:`amorphous_potential_noise`);
    * the contrast is ``2 sigma (CTF (x) phi)`` with cisTEM's CTF (its
      amplitude-contrast term included) and the envelope ``ctf_bfactor``;
      each particle has its own defocus (``particle_df``, Å added to df1
      and df2: its height in the ice and on the tilted plane), the
      background uses the local ``height`` map;
    * the intensity is ``A (1 + contrast)`` with the zero-loss attenuation
      ``A = exp(-t_ice/mfp - t_carbon/mfp_c - t_contamination/mfp)``.

    Parameters
    ----------
    particle_fts : ndarray complex (n, P, P//2+1)
        Centred FTs (:func:`cistem_mpi.kernels.fft.ft2` layout) of each
        particle's projected solvent-excluded potential in V Å, box P.
    positions : ndarray (n, 2)
        (x, y) pixels.
    particle_df : ndarray (n,)
        Defocus offset of each particle (Å).
    ice_thickness : float or ndarray (ny, nx)
        Å.
    height : ndarray (ny, nx), optional
        Defocus offset map (Å) of the background (tilt).
    carbon : ndarray (ny, nx), optional
        Carbon coverage 0..1 (thickness ``carbon_thickness`` where 1).
    contamination : ndarray (ny, nx), optional
        Extra ice thickness (Å) of contamination (amplitude only: its phase
        is far outside the weak-phase range).
    rng : numpy.random.Generator
        For the amorphous fluctuations (required).
    thickness_angstrom : float, optional
        A thick specimen: the ice's amorphous fluctuations are made as
        :func:`slab_layers` layers across a slab of this thickness centred
        on the defocus plane (each ``1/L`` of ``ice_thickness``), each
        through the CTF of its own height (its power spectrum is then the
        CTF^2 averaged over the slab, the model ctffind5 fits).  Default
        None: one layer at the defocus plane.

    Returns
    -------
    ndarray float32 (ny, nx), relative intensity (1 = vacuum).
    """
    if rng is None:
        raise ValueError("rng is required")
    ny, nx = shape
    sigma = interaction_constant(voltage)
    n, p = len(particle_fts), (particle_fts.shape[1] if len(particle_fts) else 0)
    phi_p = np.zeros((ny, nx), dtype=np.float32)
    if n:
        dfo = np.asarray(particle_df, dtype=np.float64)
        c = ctf_2d_stack(p, pixel_size, voltage, cs, amplitude_contrast, df1 + dfo, df2 + dfo,
                         np.full(n, angast), pshift, ctf_bfactor)
        paste_images(particle_fts * c, positions, shape, out=phi_p, fourier=True)
    t = np.broadcast_to(np.asarray(ice_thickness, dtype=np.float32), (ny, nx))
    thick = thickness_angstrom is not None and thickness_angstrom > 0
    layers = slab_layers(float(thickness_angstrom), pixel_size, voltage) if thick else None
    bg = ICE_MEAN_POTENTIAL * t
    if not thick:
        bg = bg + amorphous_potential_noise(shape, pixel_size, t, rng)
    att = t / inelastic_mfp(voltage)
    if carbon is not None:
        tc = carbon_thickness * np.asarray(carbon, dtype=np.float32)
        bg = bg + CARBON_MEAN_POTENTIAL * tc + amorphous_potential_noise(
            shape, pixel_size, tc, rng, F0_CARBON, CARBON_NUMBER_DENSITY, bfactor=6.0)
        att = att + tc * (CARBON_NUMBER_DENSITY * F0_CARBON) / (ICE_NUMBER_DENSITY * F0_WATER) / inelastic_mfp(voltage)
    if contamination is not None:
        tx = np.asarray(contamination, dtype=np.float32)
        att = att + tx / inelastic_mfp(voltage)
        bg = bg + amorphous_potential_noise(shape, pixel_size, tx, rng)
    bg = bg - np.float32(bg.mean())  # a constant phase is invisible
    pad = int(min(256, ny // 2, nx // 2))
    contrast = ctf_filter_by_height(bg, pixel_size, voltage, cs, amplitude_contrast, df1, df2, angast, pshift,
                                    ctf_bfactor, height, pad=pad)
    if thick:
        # the ice's fluctuations layer by layer, each at its own height in the slab
        for dz in layers:
            layer = amorphous_potential_noise(shape, pixel_size, t / np.float32(len(layers)), rng)
            contrast += ctf_filter_by_height(layer - np.float32(layer.mean()), pixel_size, voltage, cs,
                                             amplitude_contrast, df1 + dz, df2 + dz, angast, pshift, ctf_bfactor,
                                             height, pad=pad)
    # particles: each with its own CTF already
    contrast = np.float32(2.0 * sigma) * (contrast + phi_p)
    return (np.exp(-att).astype(np.float32) * (1.0 + contrast)).astype(np.float32)


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
    fy, fx = (f / pixel_size for f in fourier_grid_2d(ny, nx, dtype=np.float64))
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


@njit(cache=True)
def _warp_by_field(img, dx, dy, out):
    ny, nx = img.shape
    for y in range(ny):
        for x in range(nx):
            xs = x - dx[y, x]
            ys = y - dy[y, x]
            ix = int(np.floor(xs))
            iy = int(np.floor(ys))
            fx = xs - ix
            fy = ys - iy
            acc = 0.0
            for j in range(-1, 3):
                t = abs(fy - j)
                wy = (1.5 * t - 2.5) * t * t + 1.0 if t <= 1.0 else (((-0.5 * t + 2.5) * t - 4.0) * t + 2.0 if t < 2.0 else 0.0)
                yy = min(max(iy + j, 0), ny - 1)
                row = 0.0
                for i in range(-1, 3):
                    u = abs(fx - i)
                    wx = (1.5 * u - 2.5) * u * u + 1.0 if u <= 1.0 else (((-0.5 * u + 2.5) * u - 4.0) * u + 2.0 if u < 2.0 else 0.0)
                    row += wx * img[yy, min(max(ix + i, 0), nx - 1)]
                acc += wy * row
            out[y, x] = acc


def local_deformation_params(shape: tuple[int, int], n_frames: int, rng: np.random.Generator,
                             amplitude_px: float = 1.5, n_bumps: int = 4, decay_frames: float = 4.0) -> dict:
    """A random smooth local deformation (beam-induced doming), on top of the global drift.

    The displacement of the specimen at pixel (x, y) in frame t is
    ``profile[t] * sum_b v_b exp(-|p - c_b|² / (2 s_b²))``: a few wide
    Gaussian bumps (``s_b`` half to one frame size: doming of the whole field) with random
    displacement vectors ``v_b`` (scaled so the largest displacement over the
    frame is ``amplitude_px``), growing fastest in the first frames
    (``profile`` rises from 0 as ``1 - exp(-t / decay_frames)`` to 1).
    Not of the polynomial form the aligner fits.

    Returns
    -------
    dict
        ``centres`` (b, 2) px, ``sigmas`` (b,) px, ``vectors`` (b, 2) px,
        ``profile`` (n_frames,), ``shape``.
    """
    ny, nx = int(shape[0]), int(shape[1])
    size = min(ny, nx)
    centres = np.stack([rng.uniform(0.1 * nx, 0.9 * nx, n_bumps), rng.uniform(0.1 * ny, 0.9 * ny, n_bumps)], axis=1)
    sigmas = rng.uniform(0.5 * size, 1.0 * size, n_bumps)
    vectors = rng.normal(0.0, 1.0, (n_bumps, 2))
    f = np.arange(n_frames, dtype=np.float64)
    profile = (1.0 - np.exp(-f / decay_frames)) / max(1e-12, 1.0 - np.exp(-(n_frames - 1) / decay_frames))
    params = {"centres": centres, "sigmas": sigmas, "vectors": vectors, "profile": profile,
              "shape": np.array([ny, nx])}
    yy, xx = np.mgrid[0:ny:16, 0:nx:16]
    d = local_deformation(params, xx.astype(np.float64), yy.astype(np.float64), n_frames - 1)
    peak = float(np.sqrt((d ** 2).sum(axis=-1)).max())
    params["vectors"] = vectors * (amplitude_px / max(peak, 1e-12))
    return params


def local_deformation(params: dict, x: np.ndarray, y: np.ndarray, t: int | float | np.ndarray) -> np.ndarray:
    """Displacement (..., 2) px of the specimen at (x, y) in frame(s) t (see :func:`local_deformation_params`)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    out = np.zeros(x.shape + (2,))
    for c, sg, v in zip(params["centres"], params["sigmas"], params["vectors"]):
        g = np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2) / (2.0 * sg * sg))
        out[..., 0] += v[0] * g
        out[..., 1] += v[1] * g
    prof = np.interp(np.asarray(t, dtype=np.float64), np.arange(len(params["profile"])), params["profile"])
    return out * np.asarray(prof)[..., None]


def simulate_movie_frames(intensity: np.ndarray, drift_px: np.ndarray, exposure_per_frame: float,
                          pixel_size: float, rng: np.random.Generator,
                          gain: np.ndarray | None = None, damage: bool = True,
                          voltage: float = 300.0, deformation: dict | None = None,
                          frame_times: np.ndarray | None = None) -> np.ndarray:
    """Integer-count frames of a micrograph intensity ``I`` (mean ~1).

    Frame f: the specimen moved by ``drift_px[f]`` plus, with ``deformation``
    (:func:`local_deformation_params`), the local displacement of each pixel
    (bicubic interpolation of the noise-free intensity), optionally attenuated
    by :func:`exposure_filter` for its accumulated exposure, expected counts
    ``exposure_per_frame * pixel_size^2 * I * (1/gain)``; counts drawn from
    Poisson (counting mode).  ``frame_times`` (default 0, 1, ...) is the frame
    time used for the deformation profile (EER sub-frames).  Returns uint16
    (or uint32 if needed) (n_frames, ny, nx).
    """
    ny, nx = intensity.shape
    base = intensity.astype(np.float32) - 1.0
    f0 = _fft.rfftn(np.fft.ifftshift(base))
    fy, fx = fourier_grid_2d(ny, nx, dtype=np.float64)
    counts_per_px = exposure_per_frame * pixel_size * pixel_size
    sens = 1.0 if gain is None else (1.0 / gain)
    frames = []
    grid = None
    for i, (dx, dy) in enumerate(np.asarray(drift_px, dtype=np.float64)):
        ph = np.exp(-2j * np.pi * (fx * dx + fy * dy)).astype(np.complex64)
        f = f0 * ph
        if damage:
            f = f * exposure_filter((ny, nx), pixel_size, i * exposure_per_frame,
                                    (i + 1) * exposure_per_frame, voltage)
        frame_int = 1.0 + np.fft.fftshift(_fft.irfftn(f, nx))
        if deformation is not None:
            if i == 0 or grid is None:
                grid = np.mgrid[0:ny, 0:nx].astype(np.float64)
            t = float(i if frame_times is None else frame_times[i])
            d = local_deformation(deformation, grid[1], grid[0], t)
            warped = np.empty_like(frame_int, dtype=np.float32)
            _warp_by_field(frame_int.astype(np.float32), d[..., 0].astype(np.float32),
                           d[..., 1].astype(np.float32), warped)
            frame_int = warped
        lam = np.clip(frame_int, 0.0, None) * counts_per_px * sens
        frames.append(rng.poisson(lam))
    out = np.array(frames)
    return out.astype(np.uint16 if out.max() < 65535 else np.uint32)

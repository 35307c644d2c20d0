"""The public Python API: cisTEM's steps as functions on numpy arrays, for notebooks and scripts.

Every function here is a thin wrapper over the kernels the MPI jobs use
(:mod:`cistem_mpi.kernels`), in one process, with no project, no database
and no MPI: importing this module loads neither ``sqlite3`` nor ``mpi4py``.
Conventions are cisTEM's (README "Conventions"): Euler angles ``(phi,
theta, psi)`` in degrees (ZYZ), shifts and defocus in Å, the particle sits
at ``+shift`` from the box centre, images are protein dark.

>>> import numpy as np, cistem_mpi.api as cm
>>> vol = cm.phantom(24)
>>> angles = cm.random_angles(400, seed=1)
>>> images = cm.project(vol, angles)
>>> maps = cm.reconstruct(images, angles, pixel_size=4.0, defocus=None)
>>> bool(np.corrcoef(maps.volume.ravel(), vol.ravel())[0, 1] > 0.9)
True
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cistem_mpi.errors import InputError

__all__ = ["phantom", "random_angles", "project", "reconstruct", "fsc", "ctf", "align_movie", "estimate_ctf",
           "pick_particles", "classify_2d", "validate"]


def _rotations(angles: np.ndarray) -> np.ndarray:
    from cistem_mpi.kernels.euler import rotation_matrix

    a = np.asarray(angles, dtype=np.float64).reshape(-1, 3)
    return rotation_matrix(a[:, 0], a[:, 1], a[:, 2]).reshape(-1, 3, 3)


def phantom(box: int, radius: float | None = None, seed: int = 0) -> np.ndarray:
    """A small asymmetric test map: a few Gaussian blobs inside a sphere (float32).

    Parameters
    ----------
    box : int
        Edge of the cube (pixels).
    radius : float, optional
        Radius of the region the blobs fill (pixels; default ``box / 4``).
    seed : int
        Random seed of the blob positions.

    Returns
    -------
    numpy.ndarray, shape (box, box, box)

    Examples
    --------
    >>> phantom(16).shape
    (16, 16, 16)
    """
    rng = np.random.default_rng(seed)
    r = box / 4 if radius is None else float(radius)
    z, y, x = np.mgrid[:box, :box, :box] - box // 2
    out = np.zeros((box, box, box), np.float32)
    for _ in range(6):
        c = rng.uniform(-r, r, 3) * 0.6
        s = rng.uniform(0.08, 0.18) * box
        out += np.exp(-((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) / (2 * s * s)).astype(np.float32)
    return out


def random_angles(n: int, seed: int = 0) -> np.ndarray:
    """``n`` uniformly random orientations as cisTEM Euler angles ``(phi, theta, psi)`` in degrees.

    Parameters
    ----------
    n : int
        Number of orientations.
    seed : int
        Random seed.

    Returns
    -------
    numpy.ndarray, shape (n, 3)

    Examples
    --------
    >>> random_angles(5).shape
    (5, 3)
    """
    from cistem_mpi.kernels.euler import matrix_to_euler, random_rotations

    phi, theta, psi = matrix_to_euler(random_rotations(n, np.random.default_rng(seed)))
    return np.stack([phi, theta, psi], axis=1)


def project(volume: np.ndarray, angles: np.ndarray, shifts: np.ndarray | None = None, pixel_size: float = 1.0,
            padding: float = 2.0) -> np.ndarray:
    """Projections of a map at the given orientations (Fourier slices, trilinear, as cisTEM).

    Parameters
    ----------
    volume : numpy.ndarray, shape (N, N, N)
    angles : numpy.ndarray, shape (n, 3)
        ``(phi, theta, psi)`` in degrees.
    shifts : numpy.ndarray, shape (n, 2), optional
        ``(shx, shy)`` in Å: each projection is moved by ``+shift`` (the ``.par`` convention).
    pixel_size : float
        Å per pixel (for the shifts).
    padding : float
        Oversampling of the map's transform.

    Returns
    -------
    numpy.ndarray, shape (n, N, N), float32

    Raises
    ------
    InputError
        The map is not a cube, or ``angles`` is not (n, 3).

    Examples
    --------
    >>> project(phantom(16), [[0, 0, 0], [0, 90, 0]]).shape
    (2, 16, 16)
    """
    from cistem_mpi.kernels import fft
    from cistem_mpi.kernels.projection import project as _project
    from cistem_mpi.kernels.shifts import phase_shift

    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise InputError("volume", f"must be a cube, got shape {volume.shape}")
    if np.asarray(angles).size % 3:
        raise InputError("angles", "must be (n, 3): phi, theta, psi per projection")
    images = _project(volume, _rotations(angles), pad=padding)
    if shifts is not None:
        s = np.asarray(shifts, dtype=np.float64).reshape(-1, 2) / float(pixel_size)
        images = fft.ift2(phase_shift(fft.ft2(images), s[:, 0], s[:, 1])).astype(np.float32)
    return images


def _params(n: int, angles: np.ndarray, shifts: np.ndarray | None, defocus: np.ndarray | None) -> np.ndarray:
    from cistem_mpi.io.params import empty_params

    p = empty_params(n)
    a = np.asarray(angles, dtype=np.float64).reshape(-1, 3)
    if len(a) != n:
        raise InputError("angles", f"{len(a)} orientations for {n} images")
    p["phi"], p["theta"], p["psi"] = a.T
    if shifts is not None:
        s = np.asarray(shifts, dtype=np.float64).reshape(-1, 2)
        if len(s) != n:
            raise InputError("shifts", f"{len(s)} shifts for {n} images")
        p["shx"], p["shy"] = s.T
    if defocus is not None:
        d = np.asarray(defocus, dtype=np.float64)
        if d.ndim == 0:
            d = np.full((n, 1), float(d))
        elif d.ndim == 1:
            d = d[:, None] if len(d) == n else np.broadcast_to(d, (n, len(d)))
        if d.ndim != 2 or d.shape[0] != n or not 1 <= d.shape[1] <= 3:
            raise InputError("defocus", f"expected (df1[, df2[, angast]]) per image, got shape {np.shape(defocus)}")
        if not np.isfinite(d).all():
            raise InputError("defocus", "contains NaN or infinite values")
        p["df1"] = d[:, 0]
        p["df2"] = d[:, 1] if d.shape[1] > 1 else d[:, 0]
        p["angast"] = d[:, 2] if d.shape[1] > 2 else 0.0
    return p


def reconstruct(images: np.ndarray, angles: np.ndarray, pixel_size: float, shifts: np.ndarray | None = None,
                defocus: np.ndarray | None = None, voltage: float = 300.0, cs: float = 2.7,
                amplitude_contrast: float = 0.07, symmetry: str = "C1", half_sets: np.ndarray | None = None,
                mask_radius: float = 0.0, bfactor: float | None = None, padding: float = 2.0):
    """3D reconstruction with half maps, FSC, resolution and a sharpened map (cisTEM's reconstruct3d).

    The same steps as ``cistem-mpi reconstruct`` (trilinear insertion of
    CTF-weighted image transforms into two half sets, FSC -> Wiener
    regulariser iterations, gridding correction, Guinier sharpening), in one
    process.

    Parameters
    ----------
    images : numpy.ndarray, shape (n, N, N)
        Particle images, protein dark.
    angles : numpy.ndarray, shape (n, 3)
        ``(phi, theta, psi)`` in degrees.
    pixel_size : float
        Å per pixel.
    shifts : numpy.ndarray, shape (n, 2), optional
        ``(shx, shy)`` in Å (the particle sits at ``+shift``).
    defocus : numpy.ndarray, optional
        ``(df1, df2, angast)`` per image (Å, Å, degrees), or one defocus per image; None: no CTF
        (the images are not CTF-weighted).
    voltage, cs, amplitude_contrast : float
        kV, mm, fraction (checked: :class:`~cistem_mpi.io.params.Optics`).
    symmetry : str
        Point group (C1, Cn, Dn, T, O, I).
    half_sets : numpy.ndarray, shape (n,), optional
        1 or 2 per image; default cisTEM-style fixed hash of the image index.
    mask_radius : float
        Soft spherical mask radius (Å) for the reported FSC; 0: unmasked.
    bfactor : float or None
        Sharpening B-factor (Å²); None: Guinier fit.
    padding : float
        Oversampling of the accumulators.

    Returns
    -------
    cistem_mpi.kernels.reconstruct3d.ReconstructedMaps
        ``volume``, ``half1``, ``half2``, ``sharpened``, ``frequency`` (1/Å), ``fsc``,
        ``fsc_unmasked``, ``resolution`` (Å at 0.143), ``bfactor``.

    Raises
    ------
    InputError
        Non-square images, mismatched lengths, bad optics or symmetry, non-finite values.

    Examples
    --------
    >>> vol = phantom(24)
    >>> ang = random_angles(300, seed=2)
    >>> maps = reconstruct(project(vol, ang), ang, pixel_size=3.0, defocus=None, bfactor=0.0)
    >>> maps.half1.shape, bool(maps.resolution < 12.0)
    ((24, 24, 24), True)
    """
    from cistem_mpi.io.params import Optics
    from cistem_mpi.kernels import backprojection as bp
    from cistem_mpi.kernels import reconstruct3d as r3
    from cistem_mpi.kernels.projection import padded_size
    from cistem_mpi.kernels.reconstruction import half_sets as default_halves
    from cistem_mpi.kernels.symmetry import symmetry_matrices

    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise InputError("images", f"must be (n, N, N) square images, got shape {images.shape}")
    if not np.isfinite(images).all():
        raise InputError("images", "contain NaN or infinite values")
    n_img, n = images.shape[0], images.shape[-1]
    o = Optics(pixel_size=pixel_size, voltage=voltage, cs=cs, amplitude_contrast=amplitude_contrast, name="given")
    if not o.pixel_size > 0:
        raise InputError("pixel_size", "must be positive")
    p = _params(n_img, angles, shifts, defocus)
    half = default_halves(np.arange(1, n_img + 1)) if half_sets is None else np.asarray(half_sets).astype(np.int8)
    if half.shape != (n_img,) or not np.isin(half, (1, 2)).all():
        raise InputError("half_sets", "must hold 1 or 2 for every image")
    try:
        sym = symmetry_matrices(symmetry)
    except ValueError as exc:
        raise InputError("symmetry", str(exc)) from None
    pp = padded_size(n, padding)
    acc = bp.new_accumulators(pp) + bp.new_accumulators(pp)
    if defocus is None:  # no CTF: amplitude contrast 1 would divide by zero; a CTF of 1 is the same
        for h, (d, w) in ((1, acc[:2]), (2, acc[2:])):
            m = half == h
            if m.any():
                from cistem_mpi.kernels.fft import ft2
                from cistem_mpi.kernels.shifts import phase_shift

                imgs = images[m] - images[m].mean(axis=(1, 2), keepdims=True)
                f = phase_shift(ft2(imgs), -p["shx"][m] / o.pixel_size, -p["shy"][m] / o.pixel_size)
                rot = _rotations(np.stack([p["phi"][m], p["theta"][m], p["psi"][m]], axis=1))
                for s in sym:
                    bp.insert_slices(d, w, f, s[None] @ rot)
    else:
        r3.insert_particles(acc, images, p, half, o.pixel_size, (o.voltage, o.cs, o.amplitude_contrast), sym)
    g1, g2, gf, _ = r3.wiener_normalise(*acc, n)
    return r3.finish_maps(g1, g2, gf, n, o.pixel_size, mask_radius=mask_radius, bfactor=bfactor)


def fsc(map1: np.ndarray, map2: np.ndarray, pixel_size: float, mask: np.ndarray | None = None,
        threshold: float = 0.143) -> tuple[np.ndarray, np.ndarray, float]:
    """Fourier shell correlation of two maps and the resolution where it falls below ``threshold``.

    Parameters
    ----------
    map1, map2 : numpy.ndarray, shape (N, N, N)
    pixel_size : float
        Å per voxel.
    mask : numpy.ndarray, optional
        Applied to both maps first.
    threshold : float
        FSC criterion (0.143 for half maps).

    Returns
    -------
    (frequency, curve, resolution)
        Shell frequencies (1/Å), the FSC per shell, the resolution (Å).

    Examples
    --------
    >>> v = phantom(16)
    >>> f, c, res = fsc(v, v, 2.0)
    >>> round(float(c[1]), 6), res
    (1.0, 4.0)
    """
    from cistem_mpi.kernels.fsc import fsc as _fsc
    from cistem_mpi.kernels.fsc import resolution_at

    freq, curve = _fsc(np.asarray(map1, np.float32), np.asarray(map2, np.float32), mask)
    return freq / pixel_size, curve, float(resolution_at(freq, curve, threshold, pixel_size))


def ctf(box: int, pixel_size: float, df1: float, df2: float | None = None, angast: float = 0.0,
        voltage: float = 300.0, cs: float = 2.7, amplitude_contrast: float = 0.07, pshift: float = 0.0,
        bfactor: float = 0.0, half: bool = False) -> np.ndarray:
    """The CTF on a ``box`` x ``box`` Fourier grid (cisTEM's formula and sign: negative at low frequency).

    Parameters
    ----------
    box : int
        Image edge (pixels).
    pixel_size : float
        Å per pixel.
    df1, df2 : float
        Defocus along the two axes (Å, underfocus positive); ``df2`` defaults to ``df1``.
    angast : float
        Astigmatism angle (degrees).
    voltage, cs, amplitude_contrast : float
        kV, mm, fraction in [0, 1).
    pshift : float
        Additional phase shift (radians).
    bfactor : float
        Envelope ``exp(-B g²/4)`` (Å²).
    half : bool
        Return the rfft half layout ``(box, box//2+1)`` instead of the full, origin-first grid.

    Returns
    -------
    numpy.ndarray, float32

    Raises
    ------
    InputError
        Voltage <= 0, Cs < 0, amplitude contrast outside [0, 1), non-finite values.

    Examples
    --------
    >>> c = ctf(64, 1.0, 15000.0)
    >>> c.shape, round(float(c[0, 0]), 3)
    ((64, 64), -0.07)
    """
    from cistem_mpi.kernels.ctf import CTFParams

    p = CTFParams(voltage=voltage, cs=cs, amplitude_contrast=amplitude_contrast, df1=df1,
                  df2=df1 if df2 is None else df2, angast=angast, pshift=pshift, bfactor=bfactor)
    return p.image(int(box), float(pixel_size), half=half)


def align_movie(frames: np.ndarray, pixel_size: float, exposure_per_frame: float = 1.0,
                dose_weighting: bool = False, voltage: float = 300.0, **settings: Any
                ) -> tuple[np.ndarray, np.ndarray]:
    """Align a movie's frames (cisTEM's unblur, full frame) and sum them.

    Parameters
    ----------
    frames : numpy.ndarray, shape (n_frames, ny, nx)
        Gain-corrected frames.
    pixel_size : float
        Å per pixel.
    exposure_per_frame : float
        e/Å² per frame (sets the trajectory smoothing, and the dose weights).
    dose_weighting : bool
        Sum with cisTEM's dose weights (else the plain aligned sum).
    voltage : float
        kV (dose weighting only).
    **settings
        Fields of :class:`~cistem_mpi.kernels.motion.AlignmentSettings` (``max_shift``, ``bfactor``, ...).

    Returns
    -------
    (image, shifts)
        The aligned sum (ny, nx) float32 and each frame's shift ``(sx, sy)`` in Å.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> base = rng.normal(size=(128, 128)).astype(np.float32)
    >>> movie = np.stack([np.roll(base, k, axis=1) + 0.5 * rng.normal(size=base.shape) for k in range(6)])
    >>> image, shifts = align_movie(movie.astype(np.float32), pixel_size=1.0, coarse_pixel=1.0)
    >>> np.round(shifts[:, 0] - shifts[0, 0]).tolist()
    [0.0, -1.0, -2.0, -3.0, -4.0, -5.0]
    """
    from cistem_mpi.kernels.motion import AlignmentSettings, MovieAligner, MovieSummer

    frames = np.asarray(frames, dtype=np.float32)
    if frames.ndim != 3 or len(frames) < 2:
        raise InputError("frames", f"need (n_frames >= 2, ny, nx), got shape {frames.shape}")
    n, ny, nx = frames.shape
    s = AlignmentSettings(**settings)
    aligner = MovieAligner((ny, nx), n, pixel_size, exposure_per_frame, s, keep_full=True)
    for i in range(n):
        aligner.add(i, frames[i])
    full = aligner.full
    shifts = aligner.align()
    weighter = None
    if dose_weighting:
        from cistem_mpi.kernels.dose import DoseWeighter

        weighter = DoseWeighter((ny, nx), pixel_size, exposure_per_frame, 0.0, voltage)
    summer = MovieSummer((ny, nx), (ny, nx), weighter)
    for i in range(n):
        summer.add_ft(i, full[i], shifts[i, 0], shifts[i, 1])
    weighted, unweighted = summer.finish()
    image = weighted if weighted is not None else unweighted
    return image.astype(np.float32), np.asarray(shifts, dtype=np.float64) * pixel_size


def estimate_ctf(image: np.ndarray, pixel_size: float, voltage: float = 300.0, cs: float = 2.7,
                 amplitude_contrast: float = 0.07, **options: Any):
    """Fit the CTF of a micrograph (cisTEM's ctffind: defocus, astigmatism, fit resolution).

    Parameters
    ----------
    image : numpy.ndarray, shape (ny, nx)
        The micrograph.
    pixel_size : float
        Å per pixel.
    voltage, cs, amplitude_contrast : float
        kV, mm, fraction.
    **options
        Fields of :class:`~cistem_mpi.kernels.ctffind.CtffindOptions` (``box``, ``min_defocus``,
        ``max_defocus``, ``max_resolution``, ``phase_plate``, ...).

    Returns
    -------
    cistem_mpi.kernels.ctffind.CtffindResult
        ``df1``, ``df2`` (Å), ``angast`` (degrees), ``pshift``, ``score``, ``fit_resolution`` (Å), spectra.

    Raises
    ------
    InputError
        Bad optics values.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> noise = np.fft.rfft2(rng.normal(size=(512, 512)))
    >>> c = ctf(512, 1.5, 20000.0, 18000.0, 30.0, half=True)
    >>> mic = np.fft.irfft2(noise * c, s=(512, 512)).astype(np.float32)
    >>> fit = estimate_ctf(mic, 1.5, box=256, max_resolution=5.0)
    >>> abs(fit.df1 - 20000.0) < 300 and abs(fit.df2 - 18000.0) < 300
    True
    """
    from cistem_mpi.kernels.ctf import CTFParams
    from cistem_mpi.kernels.ctffind import CtffindOptions
    from cistem_mpi.kernels.ctffind import estimate_ctf as _estimate

    CTFParams(voltage=voltage, cs=cs, amplitude_contrast=amplitude_contrast)  # checks the optics
    return _estimate(np.asarray(image, dtype=np.float32), float(pixel_size), voltage, cs, amplitude_contrast,
                     CtffindOptions(**options))


def pick_particles(image: np.ndarray, pixel_size: float, df1: float, df2: float | None = None,
                   angast: float = 0.0, voltage: float = 300.0, cs: float = 2.7, amplitude_contrast: float = 0.07,
                   **params: Any):
    """Pick particles in a micrograph (cisTEM's find_particles, template-free: a soft disc template).

    Parameters
    ----------
    image : numpy.ndarray, shape (ny, nx)
        The micrograph (protein dark).
    pixel_size : float
        Å per pixel.
    df1, df2, angast : float
        Its CTF (Å, Å, degrees); ``df2`` defaults to ``df1``.
    voltage, cs, amplitude_contrast : float
        kV, mm, fraction.
    **params
        Fields of :class:`~cistem_mpi.kernels.picking.PickingParams` (``characteristic_radius``,
        ``maximum_radius`` in Å, ``threshold`` in noise sigmas, ``edge``, ...).

    Returns
    -------
    cistem_mpi.kernels.picking.PickResult
        ``x``, ``y`` (Å from the first pixel), ``score``, the filtered image and score map.

    Examples
    --------
    >>> mic = np.random.default_rng(6).normal(size=(512, 512)).astype(np.float32)
    >>> yy, xx = np.mgrid[0:512, 0:512]
    >>> for x, y in ((100, 120), (300, 300), (400, 150)):
    ...     mic[np.hypot(xx - x, yy - y) < 20] -= 0.5  # dark discs; with this CTF (-1 everywhere) no rings
    >>> picks = pick_particles(mic, 4.0, 0.0, cs=0.0, amplitude_contrast=0.999, characteristic_radius=70.0,
    ...                        maximum_radius=100.0, edge=16, highest_resolution=16.0, avoid_abnormal_mean=False)
    >>> sorted(zip((picks.x / 4 / 10).round().astype(int).tolist(), (picks.y / 4 / 10).round().astype(int).tolist()))
    [(10, 12), (30, 30), (40, 15)]
    """
    from cistem_mpi.kernels.ctf import CTFParams
    from cistem_mpi.kernels.picking import PickingParams, find_particles

    d2 = df1 if df2 is None else df2
    CTFParams(voltage=voltage, cs=cs, amplitude_contrast=amplitude_contrast, df1=df1, df2=d2, angast=angast)
    return find_particles(np.asarray(image, dtype=np.float32), float(pixel_size), voltage, cs, amplitude_contrast,
                          float(df1), float(d2), float(angast), params=PickingParams(**params))


def classify_2d(images: np.ndarray, pixel_size: float, n_classes: int, mask_radius: float,
                defocus: np.ndarray | None = None, voltage: float = 300.0, cs: float = 2.7,
                amplitude_contrast: float = 0.07, iterations: int = 10, high_resolution: float | None = None,
                search_range: float | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """2D classification (cisTEM's refine2d maximum-likelihood step), in memory, from random classes.

    Each iteration classifies every particle against the class averages
    (in-plane rotations and shifts, CTF-weighted) and forms new averages.
    The job (``cistem-mpi classify-2d``) adds cisTEM's resolution schedule,
    subsets, re-seeding of empty classes and centring; this is the core loop.

    Parameters
    ----------
    images : numpy.ndarray, shape (n, N, N)
        Particle images, protein dark.
    pixel_size : float
        Å per pixel.
    n_classes : int
    mask_radius : float
        Circular mask radius (Å).
    defocus : numpy.ndarray, optional
        ``(df1, df2, angast)`` per image (Å, Å, degrees), or one defocus per image; None: 0 (no CTF).
    voltage, cs, amplitude_contrast : float
        kV, mm, fraction.
    iterations : int
        Rounds of classification.
    high_resolution : float, optional
        Resolution limit (Å; default 8 pixels).
    search_range : float, optional
        Largest shift searched (Å; default the mask radius / 4).
    seed : int
        Random seed of the starting classes.

    Returns
    -------
    (averages, classes)
        Class averages (K, N, N) float32 and each particle's class (0-based).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> from cistem_mpi.kernels.masks import circle_mask
    >>> a, b = circle_mask(32, 8.0, 2.0), np.zeros((32, 32)); b[8:24, 13:19] = 1.0
    >>> truth = rng.integers(0, 2, 60)
    >>> imgs = np.stack([(-a if t else -b) + 0.3 * rng.normal(size=(32, 32)) for t in truth]).astype(np.float32)
    >>> av, cls = classify_2d(imgs, 4.0, 2, mask_radius=56.0, iterations=4)
    >>> agree = float(np.mean(cls == truth)); bool(max(agree, 1 - agree) > 0.95)
    True
    """
    from cistem_mpi.kernels import classify2d as c2
    from cistem_mpi.kernels.ctf import CTFParams
    from cistem_mpi.kernels.masks import circle_mask

    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise InputError("images", f"must be (n, N, N) square images, got shape {images.shape}")
    n_img, n = images.shape[0], images.shape[-1]
    k = int(n_classes)
    if not 1 <= k <= n_img:
        raise InputError("n_classes", f"must be between 1 and the number of images ({n_img}), got {k}")
    CTFParams(voltage=voltage, cs=cs, amplitude_contrast=amplitude_contrast)
    p = _params(n_img, np.zeros((n_img, 3)), None, np.zeros(n_img) if defocus is None else defocus)
    ps = float(pixel_size)
    resolution = 8.0 * ps if high_resolution is None else float(high_resolution)
    m = c2.binned_size(n, ps, resolution)
    mask_px = float(mask_radius) / ps
    edge = min(max(2.0, 10.0 / ps), max(1.0, 0.5 * n - mask_px))
    search = (0.25 * mask_px if search_range is None else float(search_range) / ps)
    s = c2.ClassifySettings(n=n, m=m, pixel_size=ps, mask_radius=mask_px, mask_edge=edge,
                            low_resolution=max(300.0, 2.0 * n * ps), search_range=search, shift_sigma=search,
                            psi_step=0.0)
    optics = (voltage, cs, amplitude_contrast)
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, k, n_img)
    band = c2.band_mask(s.m, s.n, s.pixel_size, s.low_resolution)
    mask = circle_mask(n, s.mask_radius, s.mask_edge)
    half = np.arange(n_img) % 2
    num, den = c2.new_sums(k, s.m)
    for i in range(n_img):  # the start: averages of random subsets
        x, _ = c2.particle_ft(images[i], s)
        ctf_i = (float(p["df1"][i]), float(p["df2"][i]), float(p["angast"][i]), 0.0)
        cr = c2.rotated_ctfs(s.m, s.binned_pixel, optics, *ctf_i, np.zeros(1))[0]
        num[half[i], classes[i]] += cr * x * band
        den[half[i], classes[i]] += cr * cr
    pop = np.bincount(classes, minlength=k).astype(np.float64)
    angles = c2.rotation_angles(s.binned_pixel, float(mask_radius), s.psi_step)
    for _ in range(int(iterations)):
        full, _halves = c2.class_averages_ft(num, den, pop / n_img)
        averages = c2.ft_to_image(full, n)
        refs = [np.maximum(a, -0.3 * float(a.max())) * mask if a.max() > 0 else a * mask for a in averages]
        refs = (c2.image_to_ft(np.stack(refs), s.m) * band).astype(np.complex64)
        prior = np.log(np.maximum(pop, 1e-3) / max(pop.sum(), 1e-3))
        num, den = c2.new_sums(k, s.m)
        pop = np.zeros(k)
        for i in range(n_img):
            ctf_i = (float(p["df1"][i]), float(p["df2"][i]), float(p["angast"][i]), 0.0)
            o = c2.classify_particle(images[i], ctf_i, optics, refs, prior, s, angles, sums=(num, den),
                                     half=int(half[i]), class_weights=pop)
            classes[i] = o.class_index
    full, _halves = c2.class_averages_ft(num, den, pop / n_img)
    return c2.ft_to_image(full, n).astype(np.float32), classes.astype(np.int64)


def validate(path) -> list[str]:
    """Every problem of a ``.par``, ``.star`` or MRC file at once (:func:`cistem_mpi.io.validate.validate`).

    Parameters
    ----------
    path : path-like

    Returns
    -------
    list of str
        One sentence per problem (line, column); empty when none.

    Examples
    --------
    >>> validate("/nonexistent.star")
    ['file not found']
    """
    from cistem_mpi.io.validate import validate as _validate

    return _validate(path)

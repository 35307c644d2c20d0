"""The numerical steps of a 3D reconstruction with half maps, on arrays (no files, no MPI).

:func:`insert_particles` centres, CTF-weights and inserts a chunk of particle
images into two half-set accumulators (the chunk function of the parallel
job, :mod:`cistem_mpi.drivers.volumejob`); :func:`wiener_normalise` is the
single-process form of the job's FSC -> Wiener regulariser iterations (the
job runs the same kernels on z-slabs with all-reduced shell sums);
:func:`finish_maps` turns the normalised transforms into maps, FSC,
resolution and a sharpened map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cistem_mpi.kernels import backprojection as bp
from cistem_mpi.kernels import reconstruction as rec
from cistem_mpi.kernels.ctf import ctf_2d_stack
from cistem_mpi.kernels.euler import rotation_matrix
from cistem_mpi.kernels.fft import ft2
from cistem_mpi.kernels.fsc import fsc as fsc_maps
from cistem_mpi.kernels.fsc import resolution_at
from cistem_mpi.kernels.masks import sphere_mask
from cistem_mpi.kernels.shifts import phase_shift

__all__ = ["WIENER_ITERATIONS", "ReconstructedMaps", "insert_particles", "wiener_normalise", "finish_maps"]

#: Rounds of FSC -> regulariser -> FSC before the final normalisation.
WIENER_ITERATIONS = 3


@dataclass
class ReconstructedMaps:
    """Maps and curves of a reconstruction (what :func:`finish_maps` returns)."""

    volume: np.ndarray
    half1: np.ndarray
    half2: np.ndarray
    sharpened: np.ndarray
    frequency: np.ndarray  # 1/Å per shell
    fsc: np.ndarray  # half-map FSC (masked if a mask radius was given)
    fsc_unmasked: np.ndarray
    resolution: float  # Å at FSC = 0.143
    bfactor: float  # Å², the sharpening applied


def insert_particles(acc: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], images: np.ndarray,
                     params: np.ndarray, half: np.ndarray, pixel_size: float,
                     optics: tuple[float, float, float], symmetry: np.ndarray,
                     score_b: np.ndarray | None = None, method: str = "linear",
                     max_radius: float | None = None) -> None:
    """Normalise, centre, CTF-weight and insert particle images into two half-set accumulators, in place.

    Parameters
    ----------
    acc : (d1, w1, d2, w2)
        Accumulators of half sets 1 and 2 (:func:`~cistem_mpi.kernels.backprojection.new_accumulators`).
    images : numpy.ndarray, shape (n, N, N)
        Particle images, protein dark (cisTEM's contrast).
    params : numpy.ndarray
        Their :data:`~cistem_mpi.io.params.PARAM_DTYPE` rows (angles, shifts in Å, defocus, occupancy).
    half : numpy.ndarray, shape (n,)
        Half set (1 or 2) of each image.
    pixel_size : float
        Å per pixel.
    optics : (float, float, float)
        Voltage (kV), Cs (mm), amplitude contrast.
    symmetry : numpy.ndarray, shape (k, 3, 3)
        Symmetry operators (:func:`~cistem_mpi.kernels.symmetry.symmetry_matrices`); each image is
        inserted once per operator.
    score_b : numpy.ndarray, shape (n,), optional
        Per-particle B-factors (Å²) weighting each image by ``exp(-B s²/4)`` (score weighting).
    method : str
        Insertion kernel (``"linear"``: trilinear, cisTEM's).
    max_radius : float, optional
        Insert frequencies up to this radius (Fourier pixels of N); default N//2.

    Returns
    -------
    None

    Examples
    --------
    >>> from cistem_mpi.io.params import empty_params
    >>> acc = bp.new_accumulators(16) + bp.new_accumulators(16)
    >>> p = empty_params(2); p["df1"] = p["df2"] = 15000.0
    >>> insert_particles(acc, np.random.default_rng(0).normal(size=(2, 8, 8)), p, np.array([1, 2]), 2.0,
    ...                  (300.0, 2.7, 0.07), np.eye(3)[None])
    >>> bool(acc[1].sum() > 0 and acc[3].sum() > 0)
    True
    """
    n = images.shape[-1]
    ps = float(pixel_size)
    imgs = images - images.mean(axis=(1, 2), keepdims=True)
    sd = imgs.std(axis=(1, 2), keepdims=True)
    imgs = imgs / np.where(sd > 0, sd, 1.0)
    f = phase_shift(ft2(imgs.astype(np.float32)), -params["shx"] / ps, -params["shy"] / ps)
    voltage, cs, ac = optics
    ctf = ctf_2d_stack(n, ps, voltage, cs, ac, params["df1"], params["df2"], params["angast"], params["pshift"])
    if score_b is not None and np.any(score_b != 0):
        # per-particle B: weight sqrt(w) on both c and F gives w*c*F and w*c^2
        fy = np.fft.fftfreq(n)[:, None]
        fx = np.fft.rfftfreq(n)[None, :]
        s2 = ((fy ** 2 + fx ** 2) / ps ** 2).astype(np.float32)  # (1/Å)^2 on the half grid
        root_w = np.exp(-np.asarray(score_b)[:, None, None] * s2[None] / 8.0).astype(np.float32)
        ctf = ctf * root_w
        f = f * root_w
    rot = rotation_matrix(params["phi"], params["theta"], params["psi"]).reshape(-1, 3, 3)
    occ = (params["occ"] / 100.0).astype(np.float32)
    d1, w1, d2, w2 = acc
    for h, (d, w) in ((1, (d1, w1)), (2, (d2, w2))):
        m = half == h
        if not m.any():
            continue
        for s in symmetry:  # each symmetry copy: insert at S @ R
            bp.insert_slices(d, w, f[m], s[None] @ rot[m], ctf=ctf[m], image_weights=occ[m],
                             method=method, max_radius=max_radius)


def wiener_normalise(d1: np.ndarray, w1: np.ndarray, d2: np.ndarray, w2: np.ndarray, n: int,
                     nominator: float = 1.0, iterations: int = WIENER_ITERATIONS
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Half-map and full-map transforms ``D / (W + <W>_s / SSNR(s))`` from whole accumulators.

    Parameters
    ----------
    d1, w1, d2, w2 : numpy.ndarray
        Whole (not slab) accumulators of the two half sets, padded size P.
    n : int
        Box size N.
    nominator : float
        Multiplies the full map's Wiener term (1: the plain Wiener filter).
    iterations : int
        Rounds of FSC -> regulariser after a flat start.

    Returns
    -------
    (g1, g2, gf, fsc)
        Normalised transforms of half maps 1, 2 and the full map, and the Fourier FSC per shell.

    Examples
    --------
    >>> d, w = bp.new_accumulators(8)
    >>> g1, g2, gf, f = wiener_normalise(d, w, d.copy(), w.copy(), 4)
    >>> gf.shape, f.shape
    ((8, 8, 5), (3,))
    """
    p = d1.shape[0]
    shells = n // 2 + 1
    reg_half = np.zeros(shells)
    reg_full = np.zeros(shells)
    fsc = np.zeros(shells)
    for it in range(iterations + 1):
        sums = rec.slab_shell_sums(d1, w1, d2, w2, 0, p, n, reg_half, reg_half)
        if it == 0:  # flat start: SSNR 1 in every shell
            reg_half = 0.5 * (sums[3] + sums[4]) / np.maximum(sums[5], 1.0)
            continue
        fsc = rec.fsc_from_sums(sums)
        reg_half, reg_full = rec.wiener_regularisers(sums, fsc)
    reg_full = reg_full * float(nominator)
    g1 = rec.normalise_slab(d1, w1, 0, p, n, reg_half)
    g2 = rec.normalise_slab(d2, w2, 0, p, n, reg_half)
    gf = rec.normalise_slab(d1 + d2, w1 + w2, 0, p, n, reg_full)
    return g1, g2, gf, fsc


def finish_maps(g1: np.ndarray, g2: np.ndarray, gf: np.ndarray, n: int, pixel_size: float,
                method: str = "linear", mask_radius: float = 0.0, bfactor: float | None = None) -> ReconstructedMaps:
    """Inverse transforms, half-map FSC, resolution at 0.143 and the sharpened map.

    Parameters
    ----------
    g1, g2, gf : numpy.ndarray
        Normalised padded transforms of half maps 1, 2 and the full map.
    n : int
        Box size.
    pixel_size : float
        Å per pixel.
    method : str
        The insertion kernel (for the gridding correction).
    mask_radius : float
        Soft spherical mask radius (Å) for the reported FSC; 0: no mask.
    bfactor : float or None
        Sharpening B-factor (Å²); None: a Guinier fit on the FSC-weighted map (never negative).

    Returns
    -------
    ReconstructedMaps

    Examples
    --------
    >>> d, w = bp.new_accumulators(8)
    >>> maps = finish_maps(d, d, d, 4, 2.0, bfactor=0.0)
    >>> maps.volume.shape, maps.bfactor
    ((4, 4, 4), 0.0)
    """
    ps = float(pixel_size)
    half1 = bp.ft_to_volume(g1, n, method)
    half2 = bp.ft_to_volume(g2, n, method)
    volume = bp.ft_to_volume(gf, n, method)
    freq, fsc_unmasked = fsc_maps(half1, half2)
    if mask_radius > 0:
        mask = sphere_mask(n, mask_radius / ps, edge=max(2.0, 6.0 / ps))
        _, fsc_masked = fsc_maps(half1, half2, mask)
    else:
        fsc_masked = fsc_unmasked
    resolution = resolution_at(freq, fsc_masked, 0.143, ps)
    if bfactor is None:
        f = np.clip(fsc_unmasked, 0.0, 1.0)
        wiener_weight = 2 * f / (1 + f)  # ~ the full map's SNR/(1+SNR) per shell
        bfactor = rec.guinier_bfactor(volume, ps, low_resolution=10.0, high_resolution=max(resolution, 2 * ps),
                                      shell_weights=wiener_weight)
        bfactor = max(0.0, bfactor)  # never blur a map while "sharpening" it
    sharpened = rec.sharpen(volume, ps, bfactor, resolution)
    return ReconstructedMaps(volume=volume, half1=half1, half2=half2, sharpened=sharpened, frequency=freq / ps,
                             fsc=fsc_masked, fsc_unmasked=fsc_unmasked, resolution=resolution,
                             bfactor=float(bfactor))

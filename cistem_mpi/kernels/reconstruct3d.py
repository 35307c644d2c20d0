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

from dataclasses import dataclass, field

import numpy as np

from cistem_mpi.kernels import backprojection as bp
from cistem_mpi.kernels import reconstruction as rec
from cistem_mpi.kernels.ctf import ctf_2d_stack
from cistem_mpi.kernels.euler import rotation_matrix
from cistem_mpi.kernels.fft import rfftn
from cistem_mpi.kernels.fsc import fsc as fsc_maps
from cistem_mpi.kernels.fsc import resolution_at
from cistem_mpi.kernels.masks import sphere_mask
from cistem_mpi.kernels.shifts import centred_shifted
from cistem_mpi.kernels.whitening import MASK_FALLOFF, background_radius, whitened_transforms

__all__ = ["WIENER_ITERATIONS", "ReconstructedMaps", "PreparedSlices", "prepare_slices", "insert_prepared",
           "insert_particles", "wiener_normalise", "finish_maps", "outer_mask"]

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
    #: volume, half1, half2 before the outer mask (only when asked for: ``keep_unmasked``); keyword-only so
    #: subclasses may add fields without defaults
    unmasked: dict[str, np.ndarray] | None = field(default=None, kw_only=True)


@dataclass
class PreparedSlices:
    """Particle images made ready for insertion (what :func:`prepare_slices` returns).

    ``fts[i]`` is to be inserted with weight ``ctf[i]`` at ``sym @ rot[i]`` for
    every symmetry operator, scaled by ``weights[i]``; ``half[i]`` names its half set.
    """

    fts: np.ndarray  # (n, N, N//2+1) complex64, centred
    ctf: np.ndarray  # (n, N, N//2+1) float32 (score weighting folded in)
    rot: np.ndarray  # (n, 3, 3) float64
    weights: np.ndarray  # (n,) float32 (occupancy)
    half: np.ndarray  # (n,) half set 1 or 2


def prepare_slices(images: np.ndarray, params: np.ndarray, half: np.ndarray, pixel_size: float,
                   optics: tuple[float, float, float], score_b: np.ndarray | None = None,
                   whitening: np.ndarray | None = None) -> PreparedSlices:
    """Normalise, centre and CTF-weight particle images: everything before the 3D insertion.

    Parameters
    ----------
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
    score_b : numpy.ndarray, shape (n,), optional
        Per-particle B-factors (Å²) weighting each image by ``exp(-B s²/4)`` (score weighting).
    whitening : numpy.ndarray, shape (N, N//2+1), optional
        Whitening filter (:func:`~cistem_mpi.kernels.whitening.whitening_filter` of the data set's noise
        spectrum; or one per image, shape (n, N, N//2+1)): each image is multiplied by it and then scaled to
        unit noise variance in the ring next to the box edge (cisTEM's ``normalize_particles``), and its CTF
        weights by the same ``1 / sigma(k)`` (inverse-noise weighting; the map is not left whitened).
        None: each image is scaled to zero mean and unit variance over the whole box.

    Returns
    -------
    PreparedSlices

    Examples
    --------
    >>> from cistem_mpi.io.params import empty_params
    >>> p = empty_params(2); p["df1"] = p["df2"] = 15000.0
    >>> s = prepare_slices(np.random.default_rng(0).normal(size=(2, 8, 8)), p, np.array([1, 2]), 2.0,
    ...                    (300.0, 2.7, 0.07))
    >>> s.fts.shape, s.ctf.dtype.name, s.rot.shape
    ((2, 8, 5), 'float32', (2, 3, 3))
    """
    n = images.shape[-1]
    ps = float(pixel_size)
    # The images are transformed once without centring; the centring, the particle shift and the
    # normalisation factor are then one pass of phase factors (centred_shifted).  The value is
    # phase_shift(ft2(normalised images), -shx/ps, -shy/ps), to float32 rounding (test_kernels_reconstruct3d.py).
    if whitening is not None:
        # the filter equalises the noise over frequency; the ring next to the edge then holds (almost) only
        # noise, so scaling by it gives every particle the same noise level whatever its signal or ice
        f, noise_scale = whitened_transforms(images, whitening, background_radius(ps, n))
        scale = None
    else:
        imgs = np.asarray(images, dtype=np.float32)
        sd = imgs.std(axis=(1, 2), dtype=np.float64)
        scale = 1.0 / np.where(sd > 0, sd, 1.0)
        f = rfftn(imgs, axes=(-2, -1))
        f[:, 0, 0] = 0.0  # zero mean
    f = centred_shifted(f, -params["shx"] / ps, -params["shy"] / ps, scale=scale, nx=n)
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
    if whitening is not None:
        # The CTF weights carry the whitening too (cisTEM filters the image only): each frequency of each
        # particle is then inserted with weight CTF^2 / sigma^2(k), the inverse-noise weighting, and
        # D / W estimates the map itself, not a map left whitened by the filter.  With noise that differs
        # between groups of particles this raises the FSC against the truth (test_whitening.py).
        inv_sigma = np.asarray(whitening, dtype=np.float32) * noise_scale.reshape(-1, 1, 1)
        ctf = ctf * inv_sigma
    rot = rotation_matrix(params["phi"], params["theta"], params["psi"]).reshape(-1, 3, 3)
    occ = (params["occ"] / 100.0).astype(np.float32)
    return PreparedSlices(fts=np.ascontiguousarray(f, dtype=np.complex64),
                          ctf=np.ascontiguousarray(ctf, dtype=np.float32), rot=np.ascontiguousarray(rot),
                          weights=occ, half=np.asarray(half))


def insert_prepared(acc: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], s: PreparedSlices,
                    symmetry: np.ndarray, method: str = "linear", max_radius: float | None = None,
                    z_range: tuple[int, int] | None = None) -> None:
    """Insert prepared slices into two half-set accumulators, in place (once per symmetry operator).

    Parameters
    ----------
    acc : (d1, w1, d2, w2)
        Accumulators of half sets 1 and 2, whole or rows ``z_range`` of them.
    s : PreparedSlices
    symmetry : numpy.ndarray, shape (k, 3, 3)
        Symmetry operators; each image is inserted at ``S @ R`` for each.
    method : str
        Insertion kernel (``"linear"``: trilinear, cisTEM's).
    max_radius : float, optional
        Insert frequencies up to this radius (Fourier pixels of N); default N//2.
    z_range : (int, int), optional
        The accumulators hold kz-rows ``z0:z1`` only (a slab; see
        :func:`~cistem_mpi.kernels.backprojection.insert_slices`).

    Returns
    -------
    None

    Examples
    --------
    >>> from cistem_mpi.io.params import empty_params
    >>> p = empty_params(1); p["df1"] = p["df2"] = 15000.0
    >>> s = prepare_slices(np.ones((1, 8, 8)), p, np.array([2]), 2.0, (300.0, 2.7, 0.07))
    >>> acc = bp.new_accumulators(16) + bp.new_accumulators(16)
    >>> insert_prepared(acc, s, np.eye(3)[None])
    >>> float(acc[1].sum()), bool(acc[3].sum() > 0)
    (0.0, True)
    """
    d1, w1, d2, w2 = acc
    for h, (d, w) in ((1, (d1, w1)), (2, (d2, w2))):
        m = s.half == h
        if not m.any():
            continue
        for op in symmetry:  # each symmetry copy: insert at S @ R
            bp.insert_slices(d, w, s.fts[m], op[None] @ s.rot[m], ctf=s.ctf[m], image_weights=s.weights[m],
                             method=method, max_radius=max_radius, z_range=z_range)


def insert_particles(acc: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], images: np.ndarray,
                     params: np.ndarray, half: np.ndarray, pixel_size: float,
                     optics: tuple[float, float, float], symmetry: np.ndarray,
                     score_b: np.ndarray | None = None, method: str = "linear",
                     max_radius: float | None = None, whitening: np.ndarray | None = None) -> None:
    """Normalise, centre, CTF-weight and insert particle images into two half-set accumulators, in place.

    :func:`prepare_slices` followed by :func:`insert_prepared`.

    Parameters
    ----------
    acc : (d1, w1, d2, w2)
        Accumulators of half sets 1 and 2 (:func:`~cistem_mpi.kernels.backprojection.new_accumulators`).
    images, params, half, pixel_size, optics, score_b, whitening
        As for :func:`prepare_slices`.
    symmetry : numpy.ndarray, shape (k, 3, 3)
        Symmetry operators (:func:`~cistem_mpi.kernels.symmetry.symmetry_matrices`); each image is
        inserted once per operator.
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
    s = prepare_slices(images, params, half, pixel_size, optics, score_b=score_b, whitening=whitening)
    insert_prepared(acc, s, symmetry, method=method, max_radius=max_radius)


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


def outer_mask(n: int, mask_radius: float, pixel_size: float) -> np.ndarray:
    """The soft outer mask the written maps carry: a sphere of ``mask_radius`` Å, 10 Å cosine edge (cisTEM's).

    Parameters
    ----------
    n : int
        Box size.
    mask_radius : float
        Outer mask radius (Å), centre of the cosine edge (cisTEM's ``CosineMask`` convention).
    pixel_size : float
        Å per voxel.

    Returns
    -------
    numpy.ndarray, shape (n, n, n), float32

    Examples
    --------
    >>> m = outer_mask(64, 15.0, 1.0)
    >>> [round(float(m[32, 32, 32 + r]), 3) for r in (0, 10, 15, 20)]
    [1.0, 1.0, 0.5, 0.0]
    """
    return sphere_mask(n, mask_radius / pixel_size, edge=MASK_FALLOFF / pixel_size)


def finish_maps(g1: np.ndarray, g2: np.ndarray, gf: np.ndarray, n: int, pixel_size: float,
                method: str = "linear", mask_radius: float = 0.0, bfactor: float | None = None,
                keep_unmasked: bool = False, grid_correct: bool = False,
                overwrite_input: bool = False) -> ReconstructedMaps:
    """Inverse transforms, half-map FSC, resolution at 0.143, the sharpened map and the outer mask.

    The FSC is that of the half maps before the outer mask (with ``mask_radius``: also after the FSC's own
    soft sphere), so its meaning does not depend on the mask the maps are written with.  The maps
    returned (volume, half maps, sharpened map) carry :func:`outer_mask` when ``mask_radius > 0``, as
    cisTEM writes them.

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
        Outer mask radius (Å): the soft sphere of the masked FSC and of the maps returned; 0: no mask.
    bfactor : float or None
        Sharpening B-factor (Å²); None: a Guinier fit on the FSC-weighted map (never negative).
    keep_unmasked : bool
        Also return the maps before the outer mask (``unmasked``).
    grid_correct : bool
        Divide by the interpolation kernel's apodisation.  Off by default, as in cisTEM (``Correct3D`` is
        not applied): the correction restores the signal near the box edge but amplifies the noise there
        by the same factor, up to 1.7x at 0.4 N from the centre with trilinear insertion and no padding,
        and lowers the masked FSC against the truth by up to 0.08 near Nyquist (measured).
    overwrite_input : bool
        ``g1``, ``g2`` and ``gf`` may be destroyed: each is inverse-transformed in place, so no
        padded-size array is made (1 GB less on rank 0 at box 256; the jobs pass their own copies).

    Returns
    -------
    ReconstructedMaps

    Examples
    --------
    >>> d, w = bp.new_accumulators(8)
    >>> maps = finish_maps(d, d, d, 4, 2.0, bfactor=0.0)
    >>> maps.volume.shape, maps.bfactor, maps.unmasked
    ((4, 4, 4), 0.0, None)
    """
    ps = float(pixel_size)
    half1 = bp.ft_to_volume(g1, n, method, grid_correct=grid_correct, overwrite_input=overwrite_input)
    half2 = bp.ft_to_volume(g2, n, method, grid_correct=grid_correct, overwrite_input=overwrite_input)
    volume = bp.ft_to_volume(gf, n, method, grid_correct=grid_correct, overwrite_input=overwrite_input)
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
    unmasked = None
    if mask_radius > 0:
        if keep_unmasked:
            unmasked = {"volume": volume, "half1": half1, "half2": half2}
        outer = outer_mask(n, mask_radius, ps)
        # masked after sharpening, so the sharpening filter cannot ring off the mask's edge
        volume, half1, half2, sharpened = volume * outer, half1 * outer, half2 * outer, sharpened * outer
    return ReconstructedMaps(volume=volume, half1=half1, half2=half2, sharpened=sharpened, frequency=freq / ps,
                             fsc=fsc_masked, fsc_unmasked=fsc_unmasked, resolution=resolution,
                             bfactor=float(bfactor), unmasked=unmasked)

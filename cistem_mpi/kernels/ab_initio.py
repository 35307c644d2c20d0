"""Numerics of ab initio 3D reconstruction (cisTEM's ``AbInitio3DPanel`` schedule).

Schedule (0-based round ``r`` of ``R`` rounds per start, start ``s``), as
cisTEM's ab-initio manager sets it:

* alignment resolution limit ``start + (end - start) r / (R - 1)``, reset to
  ``start`` whenever ``r mod round(R/10) <= 1`` and ``r <= 0.65 R``
  (:func:`high_resolution_limit`); the reconstruction is limited to the next
  round's value without the resets (:func:`reconstruction_resolution_limit`);
* angular step of the global search ``degrees(2 res / 75 Å)``
  (cisTEM's ``CalculateAngularStep(res, 75)``, :func:`angular_step`);
* percentage of particles "used": from 2500 K to 10000 K asymmetric units
  (K classes), divided by the symmetry order once symmetry is imposed,
  linear in ``r`` (:func:`percent_used_range`, :func:`percent_used`);
  five times that percentage is globally searched, and the best-scoring 20 %
  of those go into the reconstruction (all of them once five times the
  percentage reaches 100 %) (:func:`search_fraction`, :func:`score_fraction`);
* Wiener nominator 500 in the very first round, then ``200 + (10 - 200) r / R``
  (at least 10) in the first start and 10 in later starts
  (:func:`wiener_nominator`), applied per shell to the plain Wiener map
  (:func:`wiener_refilter`); the per-voxel form (``ReconstructionSettings.
  wiener_nominator``, cisTEM's ``CTF^2 + nominator/SSNR``) exists but measured worse;
* optionally (the job's ``--pick-range``, default off: it measured worse here)
  each searched particle takes a random orientation among the projection
  directions scoring within 15 % of the score range below the best (cisTEM's
  ``best_parameters_to_keep < 0``: "take random best parameter"), not the best
  (:func:`search_grid` ``pick``, :func:`grid_directions`);
* symmetry axes found at round ``round(0.75 R)`` of the first start, then
  symmetry is imposed (:func:`symmetry_round`, :func:`align_symmetry_axes`).

Also here: uniform random orientations, best-fraction selection, the
Wiener re-filter, centring, symmetrising, and the alignment of a map to a
reference by rotation, shift and hand (for tests and reports).

Volumes are ``[z, y, x]`` arrays with the centre at ``n // 2``; rotations act
on ``(x, y, z)`` coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage, optimize
from scipy.spatial.transform import Rotation

from cistem_mpi.kernels import alignment as al
from cistem_mpi.kernels import fft as _fft
from cistem_mpi.kernels.euler import matrix_to_euler, random_rotations, rotation_matrix
from cistem_mpi.kernels.fsc import fsc as fsc_maps
from cistem_mpi.kernels.fsc import part_fsc_to_ssnr
from cistem_mpi.kernels.grids import fourier_grid_3d
from cistem_mpi.kernels.projection import VolumeFT, extract_slices
from cistem_mpi.kernels.radial import shell_index
from cistem_mpi.kernels.symmetry import group_order, symmetry_matrices

__all__ = [
    "myroundint", "high_resolution_limit", "reconstruction_resolution_limit", "angular_step",
    "percent_used_range", "percent_used", "search_fraction", "score_fraction", "wiener_nominator",
    "symmetry_round", "random_orientations", "best_fraction", "wiener_refilter", "centre_of_mass",
    "auto_mask", "shift_volume", "rotate_volume", "symmetrise", "symmetry_score", "align_symmetry_axes",
    "grid_projections", "search_grid", "grid_directions", "coarse_grid", "CoarseGrid", "mirror", "align_to_reference", "map_change",
]

#: cisTEM: particles refined per round = this x the percentage used.
SEARCH_MULTIPLIER = 5.0
#: cisTEM's score threshold: the best 20 % of the searched particles are reconstructed.
SCORE_THRESHOLD = 0.2
#: Asymmetric units wanted in the first and last round, per class.
START_ASYM_UNITS = 2500
END_ASYM_UNITS = 10000
#: cisTEM's ab initio picks a random orientation among those within this fraction of the score range of the best.
PICK_RANGE = 0.15
#: Radius (Å) in cisTEM's ``CalculateAngularStep(res, 75)`` for ab initio.
ANGULAR_STEP_RADIUS = 75.0


def myroundint(x: float) -> int:
    """cisTEM's ``myroundint``: round half away from zero.

    >>> myroundint(2.5), myroundint(-2.5), myroundint(29.6)
    (3, -3, 30)
    """
    return int(x + 0.5) if x > 0 else int(x - 0.5)


def high_resolution_limit(round_index: int, n_rounds: int, start_res: float = 20.0, end_res: float = 8.0) -> float:
    """Alignment resolution limit (Å) of a round, with cisTEM's periodic resets.

    Parameters
    ----------
    round_index : int
        Round in the start, from 0.
    n_rounds : int
        Rounds per start.
    start_res, end_res : float
        Initial and final limits (Å).

    Returns
    -------
    float

    >>> [round(high_resolution_limit(r, 40), 2) for r in (0, 1, 2, 3, 4, 26, 27, 39)]
    [20.0, 20.0, 19.38, 19.08, 20.0, 12.0, 11.69, 8.0]
    """
    if round_index == 0 or n_rounds < 2:
        return float(start_res)
    res = start_res + (end_res - start_res) * (round_index / (n_rounds - 1))
    period = max(1, myroundint(n_rounds / 10.0))
    if round_index % period <= 1 and round_index <= n_rounds * 0.65:
        res = start_res
    return float(res)


def reconstruction_resolution_limit(round_index: int, n_rounds: int, start_res: float = 20.0,
                                    end_res: float = 8.0) -> float:
    """Resolution limit (Å) of the round's reconstruction: the next round's ramp value (no resets).

    >>> round(reconstruction_resolution_limit(0, 40), 3), reconstruction_resolution_limit(38, 40)
    (19.692, 8.0)
    """
    if n_rounds < 2:
        return float(end_res)
    res = start_res + (end_res - start_res) * ((round_index + 1) / (n_rounds - 1))
    return float(max(res, 0.0) if res > 0 else 0.0)


def angular_step(resolution: float, radius: float = ANGULAR_STEP_RADIUS) -> float:
    """cisTEM's ``CalculateAngularStep``: ``degrees(2 resolution / radius)``.

    >>> round(angular_step(20.0), 3), round(angular_step(8.0), 3)
    (30.558, 12.223)
    """
    return float(np.degrees(2.0 * resolution / radius))


def percent_used_range(n_particles: int, n_classes: int = 1, symmetry: str = "C1") -> tuple[float, float]:
    """cisTEM's automatic start and end percentages (2500 K and 10000 K asymmetric units).

    ``symmetry`` is the symmetry imposed (``C1`` before the axes are found).

    >>> percent_used_range(100_000)
    (2.5, 10.0)
    >>> percent_used_range(100_000, 2, "D2")
    (1.25, 5.0)
    >>> percent_used_range(1000)
    (100.0, 100.0)
    """
    order = max(1, group_order(symmetry))
    p0 = START_ASYM_UNITS * n_classes / (n_particles * order) * 100.0
    p1 = END_ASYM_UNITS * n_classes / (n_particles * order) * 100.0
    return float(min(p0, 100.0)), float(min(p1, 100.0))


def percent_used(round_index: int, n_rounds: int, start_percent: float, end_percent: float) -> float:
    """Percentage used in a round: linear from ``start_percent`` to ``end_percent``.

    >>> percent_used(0, 40, 2.5, 10.0), round(percent_used(39, 40, 2.5, 10.0), 6)
    (2.5, 10.0)
    """
    if n_rounds < 2:
        return float(start_percent)
    return float(start_percent + (end_percent - start_percent) * (round_index / (n_rounds - 1)))


def search_fraction(percent: float) -> float:
    """Fraction of all particles globally searched in a round (5 x the percentage, at most all).

    >>> search_fraction(2.5), search_fraction(40.0)
    (0.125, 1.0)
    """
    return float(min(SEARCH_MULTIPLIER * percent, 100.0) / 100.0)


def score_fraction(percent: float) -> float:
    """Fraction of the searched particles that is reconstructed (cisTEM's score threshold).

    >>> score_fraction(2.5), score_fraction(20.0)
    (0.2, 1.0)
    """
    return SCORE_THRESHOLD if SEARCH_MULTIPLIER * percent < 100.0 else 1.0


def wiener_nominator(round_index: int, n_rounds: int, start_index: int) -> float:
    """cisTEM's Wiener-filter nominator of a round's reconstruction.

    >>> wiener_nominator(0, 40, 0), wiener_nominator(20, 40, 0), wiener_nominator(39, 40, 0), wiener_nominator(5, 40, 1)
    (500.0, 105.0, 14.75, 10.0)
    """
    if round_index == 0 and start_index == 0:
        return 500.0
    if start_index == 0:
        return float(max(200.0 + (10.0 - 200.0) * (round_index / n_rounds), 10.0))
    return 10.0


def symmetry_round(n_rounds: int) -> int:
    """Round (0-based index of the finished rounds) after which cisTEM aligns to the symmetry axes.

    >>> symmetry_round(40), symmetry_round(10)
    (30, 8)
    """
    return myroundint(n_rounds * 0.75)


# ---------------------------------------------------------------- particles
def random_orientations(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Uniformly random orientations (Haar measure on SO(3)) as cisTEM Euler angles (degrees).

    Returns
    -------
    phi, theta, psi : ndarray (n,)
        Projection directions uniform on the sphere, in-plane angles uniform.

    >>> phi, theta, psi = random_orientations(4, np.random.default_rng(0))
    >>> phi.shape, bool(((theta >= 0) & (theta <= 180)).all())
    ((4,), True)
    """
    phi, theta, psi = matrix_to_euler(random_rotations(n, rng))
    return np.mod(phi, 360.0), theta, np.mod(psi, 360.0)


def best_fraction(scores: np.ndarray, fraction: float, groups: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of the best-scoring ``fraction`` of ``scores`` (within each group if given).

    At least one particle per non-empty group is kept; ties are broken by index.

    >>> best_fraction(np.array([1.0, 5.0, 3.0, 4.0, 2.0]), 0.4).tolist()
    [False, True, False, True, False]
    """
    scores = np.asarray(scores, dtype=np.float64)
    keep = np.zeros(len(scores), dtype=bool)
    labels = np.zeros(len(scores), dtype=np.int64) if groups is None else np.asarray(groups)
    for g in np.unique(labels):
        idx = np.nonzero(labels == g)[0]
        k = max(1, int(round(fraction * len(idx))))
        order = idx[np.lexsort((idx, -scores[idx]))]
        keep[order[:k]] = True
    return keep


# ---------------------------------------------------------------- maps
def wiener_refilter(volume: np.ndarray, fsc: np.ndarray, nominator: float) -> np.ndarray:
    """Re-weight a Wiener-filtered map as if its regulariser were ``nominator`` times larger.

    The project's reconstruction divides by ``CTF^2 + 1/SSNR``, i.e. filters
    each shell by ``SSNR / (SSNR + 1)``; cisTEM's ab initio divides by
    ``CTF^2 + nominator/SSNR``.  Per shell (SSNR from the half-map FSC,
    ``2 FSC / (1 - FSC)``) this multiplies by ``(SSNR + 1) / (SSNR + nominator)``,
    rescaled so that the best shell keeps its amplitude.

    >>> v = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    >>> bool(np.allclose(wiener_refilter(v, np.ones(5) * 0.999, 10.0), v, atol=1e-2))
    True
    """
    n = volume.shape[0]
    ssnr = part_fsc_to_ssnr(np.asarray(fsc)) * 2.0  # full map: twice the half maps' SNR
    factor = (ssnr + 1.0) / (ssnr + float(nominator))
    factor = factor / max(float(factor.max()), 1e-12)
    shells = shell_index((n, n, n))
    idx = np.minimum(shells, len(factor) - 1)
    f = _fft.ftn(np.asarray(volume, dtype=np.float32))
    f = f * factor[idx].astype(np.float32)
    return _fft.iftn(f, n).astype(np.float32)


def auto_mask(volume: np.ndarray, radius: float, threshold: float = 0.1, smooth: float = 1.5,
              dilate: int = 3, edge: float = 1.5) -> np.ndarray:
    """Soft mask of the molecule (cisTEM's auto-masking, simplified): 0..1, float32.

    The map is smoothed (Gaussian, ``smooth`` px), cut to a sphere of
    ``radius`` px, thresholded at ``threshold`` x its maximum; the largest
    connected blob is kept, dilated by ``dilate`` px and given a Gaussian edge
    of ``edge`` px.  Weak densities away from the molecule, which ab initio
    would otherwise amplify round after round, are removed.

    >>> v = np.zeros((16, 16, 16), np.float32); v[6:10, 6:10, 6:10] = 1.0; v[0, 0, 0] = 0.5
    >>> m = auto_mask(v, 7.0); bool(m[8, 8, 8] > 0.99), bool(m[0, 0, 0] < 0.01)
    (True, True)
    """
    n = volume.shape[0]
    g = np.arange(n) - n // 2
    r = np.sqrt(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2)
    sm = ndimage.gaussian_filter(np.asarray(volume, dtype=np.float32), smooth) * (r <= radius)
    top = float(sm.max())
    if top <= 0:
        return (r <= radius).astype(np.float32)
    binary = sm > threshold * top
    labels, count = ndimage.label(binary)
    if count > 1:
        sizes = ndimage.sum(binary, labels, index=np.arange(1, count + 1))
        binary = labels == (1 + int(np.argmax(sizes)))
    if dilate > 0:
        binary = ndimage.binary_dilation(binary, iterations=int(dilate))
    mask = ndimage.gaussian_filter(binary.astype(np.float32), edge) if edge > 0 else binary.astype(np.float32)
    return np.clip(np.maximum(mask, binary.astype(np.float32)), 0.0, 1.0).astype(np.float32)


def centre_of_mass(volume: np.ndarray) -> np.ndarray:
    """Centre of mass of the positive density, ``(x, y, z)`` in voxels from the box centre."""
    v = np.clip(np.asarray(volume, dtype=np.float64), 0.0, None)
    total = v.sum()
    if total <= 0:
        return np.zeros(3)
    n = v.shape[0]
    c = np.arange(n) - n // 2
    z = (v.sum(axis=(1, 2)) * c).sum() / total
    y = (v.sum(axis=(0, 2)) * c).sum() / total
    x = (v.sum(axis=(0, 1)) * c).sum() / total
    return np.array([x, y, z])


def shift_volume(volume: np.ndarray, shift_xyz: np.ndarray) -> np.ndarray:
    """Move a map by ``shift_xyz`` voxels (Fourier phase shift, periodic)."""
    n = volume.shape[0]
    kz, ky, kx = fourier_grid_3d(n, dtype=np.float64)
    sx, sy, sz = (float(s) for s in shift_xyz)
    ph = np.exp(-2j * np.pi * (kz * sz + ky * sy + kx * sx))
    return _fft.iftn(_fft.ftn(np.asarray(volume, dtype=np.float32)) * ph.astype(np.complex64), n).astype(np.float32)


@lru_cache(maxsize=8)
def _voxel_coordinates(n: int) -> np.ndarray:
    g = np.arange(n, dtype=np.float64) - n // 2
    zz, yy, xx = np.meshgrid(g, g, g, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel(), zz.ravel()])  # (3, N) x, y, z


@lru_cache(maxsize=8)
def _inner_sphere(n: int) -> np.ndarray:
    return np.sqrt((_voxel_coordinates(n) ** 2).sum(axis=0)).reshape(n, n, n) < 0.45 * n


def rotate_volume(volume: np.ndarray, rot: np.ndarray, order: int = 1) -> np.ndarray:
    """``out(x) = volume(rot^T x)``: the map turned by ``rot`` about the box centre (x, y, z coordinates)."""
    n = volume.shape[0]
    c = n // 2
    src = np.asarray(rot, dtype=np.float64).T @ _voxel_coordinates(n)
    coords = np.stack([src[2], src[1], src[0]]) + c  # z, y, x indices
    out = ndimage.map_coordinates(np.asarray(volume, dtype=np.float32), coords, order=order, mode="constant")
    return out.reshape(n, n, n).astype(np.float32)


def symmetrise(volume: np.ndarray, symbol: str) -> np.ndarray:
    """Average of the map over the point group (cisTEM's standard orientation)."""
    ops = symmetry_matrices(symbol)
    if len(ops) == 1:
        return np.asarray(volume, dtype=np.float32).copy()
    acc = np.zeros(volume.shape, dtype=np.float64)
    for s in ops:
        acc += rotate_volume(volume, s)
    return (acc / len(ops)).astype(np.float32)


def _ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    if mask is not None:
        a, b = a[mask], b[mask]
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def symmetry_score(volume: np.ndarray, symbol: str, rot: np.ndarray) -> float:
    """Correlation of the map turned by ``rot`` with its own copies under the group (1 = symmetric).

    Mean over the non-identity operators ``S`` of ``CC(R v, S R v)``.
    """
    v = rotate_volume(volume, rot)
    ops = symmetry_matrices(symbol)[1:]
    if len(ops) == 0:
        return 1.0
    mask = _inner_sphere(volume.shape[0])
    return float(np.mean([_ncc(v, rotate_volume(v, s), mask) for s in ops]))


def _frame(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rotation taking the map frame to one where ``axis`` is z and the in-plane angle is ``angle`` (deg)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    helper = np.array([1.0, 0.0, 0.0]) if abs(a[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = np.cross(a, helper)
    u /= np.linalg.norm(u)
    w = np.cross(a, u)
    t = np.radians(angle)
    x = np.cos(t) * u + np.sin(t) * w
    y = np.cross(a, x)
    # rows: new axes expressed in old coordinates -> R maps old to new
    return np.stack([x, y, a])


def _downsample(volume: np.ndarray, size: int) -> np.ndarray:
    from cistem_mpi.kernels.resample import fourier_crop

    n = volume.shape[0]
    if n <= size:
        return np.asarray(volume, dtype=np.float32)
    return fourier_crop(np.asarray(volume, dtype=np.float32), size).astype(np.float32)


def align_symmetry_axes(volume: np.ndarray, symbol: str, step: float = 8.0, size: int = 24,
                        refine: bool = True) -> tuple[np.ndarray, float]:
    """The rotation that puts a map's symmetry axes in cisTEM's standard orientation.

    A coarse search over axis directions (hemisphere, ``step`` degrees) and,
    for D groups, the in-plane angle of the two-fold axes, on a copy of the
    map Fourier-cropped to ``size``; then a Nelder-Mead polish.

    Parameters
    ----------
    volume : ndarray (n, n, n)
    symbol : str
        Cn or Dn (T, O, I: only the polish from the identity and a coarse
        search over all rotations at ``2 step``).
    step : float
        Degrees.
    size : int
        Box of the search copy.
    refine : bool
        Polish the best rotation.

    Returns
    -------
    rot : ndarray (3, 3)
        Apply with ``rotate_volume(volume, rot)``.
    score : float
        :func:`symmetry_score` at ``rot`` (full-size map).
    """
    kind = symbol.strip().upper()[0]
    small = _downsample(volume, size)
    small = shift_volume(small, -centre_of_mass(small))
    order = group_order(symbol)
    if order == 1:
        return np.eye(3), 1.0
    cands: list[np.ndarray] = []
    if kind in "CD":
        nf = int(symbol.strip()[1:])
        n_dir = max(16, int(2 * np.pi / np.radians(step) ** 2 * 1.1))
        i = np.arange(n_dir) + 0.5
        z = 1 - i / n_dir  # upper hemisphere: an axis and its opposite are the same axis
        th = np.arccos(z)
        ph = np.mod(i * np.pi * (3 - np.sqrt(5)), 2 * np.pi)
        dirs = np.stack([np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph), z], axis=1)
        # n-fold axis first (its score does not depend on the in-plane angle)
        cn = f"C{nf}"
        scores = np.array([symmetry_score(small, cn, _frame(d, 0.0)) for d in dirs])
        top = dirs[np.argsort(scores)[::-1][:3]]
        if kind == "C":
            cands = [_frame(d, 0.0) for d in top]
        else:
            angles = np.arange(0.0, 180.0 / nf, step / 2)
            for d in top:
                cands.extend(_frame(d, a) for a in angles)
    else:
        grid = al.orientation_grid(3 * step)
        cands = [rotation_matrix(*g).reshape(3, 3) for g in grid]
    scores = np.array([symmetry_score(small, symbol, r) for r in cands])
    best = cands[int(np.argmax(scores))]
    if refine:
        def f(v):
            d = rotation_matrix(*v).reshape(3, 3)
            return -symmetry_score(small, symbol, d @ best)

        res = optimize.minimize(f, np.zeros(3), method="Nelder-Mead",
                                options={"initial_simplex": np.vstack([np.zeros(3), np.eye(3) * step / 2]),
                                         "xatol": 0.2, "fatol": 1e-5, "maxfev": 120})
        if res.fun < -scores.max():
            best = rotation_matrix(*res.x).reshape(3, 3) @ best
    return best, symmetry_score(shift_volume(volume, -centre_of_mass(volume)), symbol, best)


# ---------------------------------------------------------------- global search
def grid_projections(vft: VolumeFT, grid: np.ndarray, band: al.Band, batch: int = 2048) -> np.ndarray:
    """Central sections of a reference for every grid orientation, cropped to the band (complex64).

    Parameters
    ----------
    vft : VolumeFT
    grid : ndarray (k, 3)
        (phi, theta, psi) degrees (:func:`alignment.orientation_grid`).
    band : Band

    Returns
    -------
    ndarray (k, m, m//2+1)
        Shared by every particle of a round: the search only multiplies by each CTF.
    """
    out = np.empty((len(grid), band.m, band.m // 2 + 1), dtype=np.complex64)
    for s in range(0, len(grid), batch):
        g = grid[s:s + batch]
        rot = rotation_matrix(g[:, 0], g[:, 1], g[:, 2]).reshape(-1, 3, 3)
        out[s:s + len(g)] = al.crop_ft(extract_slices(vft, rot, max_radius=band.m // 2), band.m)
    return out


def search_grid(x_c: np.ndarray, ctf_c: np.ndarray, projections: np.ndarray, band: al.Band,
                max_shift: float, coarse: "CoarseGrid | None" = None, batch: int = 512,
                pick: float | None = None, pick_range: float = PICK_RANGE, directions: np.ndarray | None = None
                ) -> tuple[int, float, float, float]:
    """Best grid orientation and shift of one particle (the project's FFT shift search per orientation).

    Parameters
    ----------
    x_c, ctf_c : ndarray (m, m//2+1)
        Cropped particle transform and its CTF.
    projections : ndarray (k, m, m//2+1)
        From :func:`grid_projections`.
    max_shift : float
        Pixels of the full image.
    coarse : CoarseGrid, optional
        A grid at twice the step scored at half the resolution first
        (:func:`coarse_grid`); only the fine orientations near its best
        ``keep`` orientations are then scored at the full band.  None: every
        fine orientation at the full band.
    pick : float, optional
        A uniform random number in [0, 1): instead of the best orientation,
        take one at random among those scoring within ``pick_range`` of the
        score range (best - worst of the orientations scored) below the best
        (cisTEM's ab initio "take a random best parameter"): the noise that
        lets the search leave a wrong starting map.  None: the best.
    pick_range : float
        Fraction of the score range (cisTEM: 0.15).
    directions : ndarray (k,) of int, optional
        Projection direction of each grid orientation (:func:`grid_directions`): as
        cisTEM's list of best parameters, each direction counts once, with its best
        in-plane angle and shift, when ``pick`` is given.  None: every orientation alone.

    Returns
    -------
    index, dx, dy, cc : int, float, float, float
        Grid index, shift (pixels, particle = projection moved by +d) and the correlation.

    >>> band = al.make_band(16, 1.0, 4.0)
    >>> p = np.zeros((3, band.m, band.m // 2 + 1), np.complex64); p[1, 1, 1] = 1.0
    >>> x = p[1].copy(); search_grid(x, np.ones(x.shape, np.float32), p, band, 2.0)[0]
    1
    """
    candidates = np.arange(len(projections))
    if coarse is not None:
        xc, cc_ = al.crop_ft(x_c, coarse.band.m), al.crop_ft(ctf_c, coarse.band.m)
        scores = np.concatenate([al.shift_search(xc, coarse.projections[s:s + batch] * cc_[None], coarse.band,
                                                 max_shift)[0] for s in range(0, len(coarse.projections), batch)])
        top = np.argsort(-scores, kind="stable")[:coarse.keep]
        candidates = np.unique(np.concatenate([coarse.neighbours[j] for j in top]))
    if pick is not None:
        parts = [al.shift_search(x_c, projections[candidates[s:s + batch]] * ctf_c[None], band, max_shift)
                 for s in range(0, len(candidates), batch)]
        score, dx, dy = (np.concatenate([p[i] for p in parts]) for i in range(3))
        if directions is not None:  # the best in-plane orientation of each direction
            d = np.asarray(directions)[candidates]
            by = np.lexsort((np.arange(len(d)), -score, d))
            first = by[np.r_[True, d[by][1:] != d[by][:-1]]]
            candidates, score, dx, dy = candidates[first], score[first], dx[first], dy[first]
        order = np.argsort(-score, kind="stable")
        top, worst = float(score[order[0]]), float(score[order[-1]])
        count = int(np.sum(score >= top - pick_range * (top - worst)))
        j = int(order[min(int(float(pick) * count), count - 1)])
        return int(candidates[j]), float(dx[j]), float(dy[j]), float(score[j])
    best = (-np.inf, 0, 0.0, 0.0)
    for s in range(0, len(candidates), batch):
        sel = candidates[s:s + batch]
        score, dx, dy = al.shift_search(x_c, projections[sel] * ctf_c[None], band, max_shift)
        j = int(np.argmax(score))
        if score[j] > best[0]:
            best = (float(score[j]), int(sel[j]), float(dx[j]), float(dy[j]))
    return best[1], best[2], best[3], best[0]


def grid_directions(grid: np.ndarray) -> np.ndarray:
    """Index of the projection direction (phi, theta) of every orientation of a grid.

    >>> grid_directions(np.array([[0, 10, 0], [0, 10, 90], [5, 20, 0]], float)).tolist()
    [0, 0, 1]
    """
    g = np.round(np.asarray(grid, dtype=np.float64)[:, :2], 6)
    _, inverse = np.unique(g, axis=0, return_inverse=True)
    first = {}
    out = np.empty(len(g), dtype=np.int64)
    for i, v in enumerate(np.asarray(inverse).ravel()):
        out[i] = first.setdefault(int(v), len(first))
    return out


@dataclass
class CoarseGrid:
    """First pass of :func:`search_grid`: a coarser grid, its projections in a lower band, fine neighbours."""

    band: al.Band
    projections: np.ndarray  # (kc, mc, mc//2+1)
    neighbours: list  # per coarse orientation: indices of the fine grid within the coarse step
    keep: int


def coarse_grid(vft: VolumeFT, grid: np.ndarray, step: float, band: al.Band, pixel_size: float,
                resolution: float, low_resolution: float = 300.0, keep: int = 12,
                min_orientations: int = 2000) -> CoarseGrid | None:
    """A grid at ``2 step`` scored at ``2 resolution`` (cisTEM's step for that resolution) for the first pass.

    None when the fine grid is small (fewer than ``min_orientations``): searching it whole is as cheap.
    """
    if len(grid) < min_orientations:
        return None
    cgrid = al.orientation_grid(2.0 * step)
    cband = al.make_band(band.n, pixel_size, min(2.0 * resolution, band.n * pixel_size / 4), low_resolution)
    cproj = grid_projections(vft, cgrid, cband)
    rf = rotation_matrix(grid[:, 0], grid[:, 1], grid[:, 2]).reshape(-1, 3, 3)
    rc = rotation_matrix(cgrid[:, 0], cgrid[:, 1], cgrid[:, 2]).reshape(-1, 3, 3)
    # angle between rotations from the trace of Rc^T Rf, all pairs at once
    tr = np.einsum("cij,fij->cf", rc, rf)
    cos_lim = 2.0 * np.cos(np.radians(2.0 * step)) + 1.0
    neighbours = [np.nonzero(row >= cos_lim)[0] for row in tr]
    return CoarseGrid(band=cband, projections=cproj, neighbours=neighbours, keep=keep)


# ---------------------------------------------------------------- comparison with a truth
def mirror(volume: np.ndarray) -> np.ndarray:
    """The other hand: the map inverted through its centre (``v(-x)``), same as a z flip up to a rotation."""
    v = np.asarray(volume, dtype=np.float32)
    n = v.shape[0]
    out = v[::-1, ::-1, ::-1]
    if n % 2 == 0:  # keep the centre voxel n//2 in place
        out = np.roll(out, 1, axis=(0, 1, 2))
    return np.ascontiguousarray(out)


def _best_translation(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float]:
    """Shift (x, y, z voxels) moving ``a`` onto ``b`` and the normalised peak correlation."""
    n = a.shape[0]
    a0, b0 = a - a.mean(), b - b.mean()
    cc = _fft.iftn(np.conj(_fft.ftn(a0)) * _fft.ftn(b0), n)
    k = np.unravel_index(int(np.argmax(cc)), cc.shape)
    # iftn returns the correlation centred (fftshift): zero shift is at index n // 2
    s = np.array([k[2] - n // 2, k[1] - n // 2, k[0] - n // 2], float)
    den = np.sqrt(float((a0 * a0).sum()) * float((b0 * b0).sum()))
    return s, float(cc[k] / den) if den > 0 else 0.0


def align_to_reference(volume: np.ndarray, reference: np.ndarray, step: float = 20.0, size: int = 16,
                       hands: tuple[bool, ...] = (False, True)) -> dict:
    """Best rotation, shift and hand taking ``volume`` onto ``reference``.

    Coarse search over SO(3) at ``step`` degrees on copies Fourier-cropped to
    ``size`` (translation by FFT cross-correlation for each rotation), for
    each hand in ``hands`` (True = mirrored), then a Nelder-Mead polish of
    the rotation at full size.

    Returns
    -------
    dict
        ``rot`` (3, 3), ``shift`` (x, y, z voxels), ``mirrored`` (bool),
        ``cc`` (real-space correlation after alignment), ``aligned`` (the
        volume moved onto the reference), ``cc_by_hand`` {False: cc, True: cc}.
    """
    ref_s = _downsample(reference, size)
    grid = al.orientation_grid(step)
    results = {}
    for hand in hands:
        v = mirror(volume) if hand else np.asarray(volume, np.float32)
        v_s = _downsample(v, size)
        best = (-np.inf, None)
        for g in grid:
            r = rotation_matrix(*g).reshape(3, 3)
            _, c = _best_translation(rotate_volume(v_s, r), ref_s)
            if c > best[0]:
                best = (c, r)
        r0 = best[1]

        def f(x, v=v, r0=r0):
            r = rotation_matrix(*x).reshape(3, 3) @ r0
            return -_best_translation(rotate_volume(v, r), reference)[1]

        res = optimize.minimize(f, np.zeros(3), method="Nelder-Mead",
                                options={"initial_simplex": np.vstack([np.zeros(3), np.eye(3) * step / 3]),
                                         "xatol": 0.2, "fatol": 1e-5, "maxfev": 100})
        r = rotation_matrix(*res.x).reshape(3, 3) @ r0
        turned = rotate_volume(v, r, order=3)
        s, c = _best_translation(turned, reference)
        results[hand] = {"rot": r, "shift": s, "cc": c, "aligned": shift_volume(turned, s), "mirrored": hand}
    best_hand = max(results, key=lambda h: results[h]["cc"])
    out = dict(results[best_hand])
    out["cc_by_hand"] = {h: results[h]["cc"] for h in results}
    return out


def polish_alignment(volume: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Sub-voxel shift and small rotation taking an already aligned ``volume`` onto ``reference``.

    :func:`align_to_reference` ends on whole-voxel shifts.  Comparing a map
    from ab initio (arbitrary origin) with the true map at high resolution
    needs better: an offset of 0.4 voxel costs the FSC most of its value near
    Nyquist.  The six parameters (a rotation vector in degrees, which has no
    gimbal lock at zero as Euler angles have, and a shift in voxels) maximise
    the masked real-space correlation (Powell), with the map moved by
    cubic-spline interpolation.

    Parameters
    ----------
    volume, reference : (n, n, n) arrays
        ``volume`` already within about a voxel and a few degrees of ``reference``.
    mask : (n, n, n) array, optional
        Weights of the correlation (a soft sphere); default all ones.

    Returns
    -------
    moved : (n, n, n) float32
        ``volume`` turned and shifted onto ``reference``.
    params : (6,) float64
        The rotation vector (x, y, z; its length is the angle in °) and the shift x, y, z (voxels) applied:
        ``moved(p) = volume(R^T (p - c) + c + shift)`` about the box centre ``c``.

    Examples
    --------
    >>> z, y, x = np.mgrid[:24, :24, :24] - 12.0
    >>> blob = lambda a, b, c, w: np.exp(-((x - a) ** 2 + (y - b) ** 2 + (z - c) ** 2) / w)
    >>> ref = blob(3, 0, 0, 8) + blob(0, -4, 2, 5) + blob(-2, 3, -3, 3)  # no symmetry: a unique fit
    >>> off = ndimage.shift(ref, (0.3, -0.2, 0.4), order=3)
    >>> moved, params = polish_alignment(off, ref)
    >>> np.round(params[3:], 2).tolist()  # x, y, z: the shift back
    [0.4, -0.2, 0.3]
    """
    v = np.asarray(volume, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    w = np.ones_like(ref) if mask is None else np.asarray(mask, dtype=np.float64)
    coeffs = ndimage.spline_filter(v, order=3)  # once: every trial then interpolates without re-filtering
    c = (v.shape[0] // 2) * np.ones(3)

    def moved(x: np.ndarray) -> np.ndarray:
        # (x, y, z) rotation acting on [z, y, x] indices: reverse both axes of the matrix
        r = Rotation.from_rotvec(np.radians(x[:3])).as_matrix().T[::-1, ::-1]
        off = c - r @ c + np.asarray(x[3:])[::-1]
        return ndimage.affine_transform(coeffs, r, offset=off, order=3, mode="constant", prefilter=False)

    def cost(x: np.ndarray) -> float:
        a, b = moved(x) * w, ref * w
        a, b = a - a.mean(), b - b.mean()
        return -float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))

    res = optimize.minimize(cost, np.zeros(6), method="Powell", options={"xtol": 1e-3, "ftol": 1e-7})
    return moved(res.x).astype(np.float32), np.asarray(res.x, dtype=np.float64)


def fsc_resolution(a: np.ndarray, b: np.ndarray, pixel_size: float, threshold: float = 0.5,
                   mask_radius: float | None = None) -> float:
    """Resolution (Å) where the FSC of two maps drops below ``threshold`` (optional soft spherical mask, Å)."""
    from cistem_mpi.kernels.fsc import resolution_at
    from cistem_mpi.kernels.masks import sphere_mask

    mask = None
    if mask_radius:
        mask = sphere_mask(a.shape[0], mask_radius / pixel_size, edge=3.0)
    freq, curve = fsc_maps(a, b, mask)
    return resolution_at(freq, curve, threshold, pixel_size)


def map_change(old: np.ndarray, new: np.ndarray) -> float:
    """``1 - CC`` of two successive references (0: unchanged)."""
    return float(1.0 - _ncc(np.asarray(old, np.float64), np.asarray(new, np.float64)))

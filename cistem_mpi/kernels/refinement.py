"""One particle against K class references: angles, shifts, defocus, score, LogP, occupancy.

What cisTEM's refine3d computes per particle and writes as the Frealign X
columns.  Conventions:

* SCORE = 100 x the band-limited correlation coefficient of the particle
  with its best CTF-modulated reference projection;
* LogP = the log-likelihood of the particle under a Gaussian noise model
  with the optimally scaled reference, ``-N (1 - CC^2) / 2`` (``N`` real
  degrees of freedom in the band), so class differences in LogP are
  ``N (CC_k^2 - CC_j^2) / 2``;
* OCC = 100 x the posterior class probability ``pi_k exp(LogP_k) / sum``;
* SIGMA = the noise standard deviation of the normalised particle left
  after subtracting the model, ``sqrt(1 - CC^2)``;
* CHANGE = SCORE minus the particle's previous SCORE.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cistem_mpi.kernels import alignment as al
from cistem_mpi.kernels.ctf import ctf_2d, ctf_2d_stack
from cistem_mpi.kernels.euler import angular_distance, rotation_matrix
from cistem_mpi.kernels.fft import ft2, ift2
from cistem_mpi.kernels.projection import VolumeFT, extract_slices_cropped
from cistem_mpi.kernels.shifts import phase_shift

__all__ = ["AlignSettings", "ParticleResult", "align_particle", "occupancies", "defocus_offsets"]


@dataclass(frozen=True)
class AlignSettings:
    """What to search (all lengths in pixels of the particle image, angles in degrees)."""

    mask_radius: float
    global_search: bool = False
    global_step: float = 15.0
    global_keep: int = 3
    angle_step: float = 3.0
    max_shift: float = 5.0
    refine_angles: bool = True
    refine_shifts: bool = True
    refine_defocus: bool = False
    defocus_range: float = 500.0  # Å
    defocus_step: float = 50.0  # Å
    focus_centre: tuple[float, float, float] | None = None  # pixels from the volume centre (x, y, z)
    focus_radius: float = 0.0


@dataclass
class ParticleResult:
    """Best alignment of one particle to each class."""

    alignments: list[al.Alignment]
    logp: np.ndarray  # per class
    scores: np.ndarray  # per class: 100 CC (focused CC when a focus mask is used)
    defocus_offset: float  # Å added to DF1 and DF2 (0 unless refined)


def defocus_offsets(settings: AlignSettings) -> np.ndarray:
    """Defocus offsets (Å) tried by the defocus refinement."""
    k = int(round(settings.defocus_range / settings.defocus_step))
    return np.arange(-k, k + 1) * settings.defocus_step


def align_particle(
    image: np.ndarray,
    row: np.void,
    pixel_size: float,
    optics: tuple[float, float, float],
    references: list[VolumeFT],
    band: al.Band,
    settings: AlignSettings,
    grid: np.ndarray | None = None,
    search_band: al.Band | None = None,
    class_rows: list | None = None,
) -> ParticleResult:
    """Align one particle to every class reference.

    Parameters
    ----------
    image : ndarray (n, n)
        The particle as stored.
    row : structured scalar of PARAM_DTYPE
        Its current parameters (start of a local search; CTF).
    pixel_size : float
        Å per pixel.
    optics : (voltage kV, Cs mm, amplitude contrast)
    references : list of VolumeFT
        One prepared reference per class.
    band : Band
        Resolution band for the local refinement and the scores.
    settings : AlignSettings
    grid : ndarray (k, 3), optional
        Orientations for a global search (:func:`alignment.orientation_grid`).
    search_band : Band, optional
        Coarser band for the global search (default ``band``).
    class_rows : list of structured scalars, optional
        The particle's current parameters in each class: each class's local
        search starts from its own angles and shifts (default ``row`` for all).
    """
    n = image.shape[0]
    voltage, cs, ac = optics
    img = al.prepare_particle(image, settings.mask_radius)
    f = ft2(img)
    df1, df2 = float(row["df1"]), float(row["df2"])
    angast, pshift = float(row["angast"]), float(row["pshift"])
    x_c, c_c = al.crop_ft(f, band.m), _cropped_ctf(n, band.m, pixel_size, optics, df1, df2, angast, pshift)
    starts = [al.Alignment(float(r["phi"]), float(r["theta"]), float(r["psi"]),
                           float(r["shx"]) / pixel_size, float(r["shy"]) / pixel_size, 0.0)
              for r in (class_rows or [row] * len(references))]
    results: list[al.Alignment] = []
    for vft, start in zip(references, starts):
        if settings.global_search:
            sb = search_band or band
            assert grid is not None
            cands = al.global_search(al.crop_ft(f, sb.m), _cropped_ctf(n, sb.m, pixel_size, optics, df1, df2, angast,
                                                                       pshift), vft, sb, grid,
                                     settings.max_shift, keep=settings.global_keep)
            best = max((al.local_refine(x_c, c_c, vft, band, c, angle_step=settings.angle_step,
                                        max_shift=settings.max_shift) for c in cands), key=lambda a: a.cc)
        else:
            best = al.local_refine(x_c, c_c, vft, band, start, angle_step=settings.angle_step,
                                   max_shift=settings.max_shift, angles_fixed=not settings.refine_angles,
                                   shifts_fixed=not settings.refine_shifts)
        results.append(best)
    offset = 0.0
    k_best = int(np.argmax([a.cc for a in results]))
    if settings.refine_defocus:
        offset = _refine_defocus(x_c, references[k_best], results[k_best], band, n, pixel_size, optics, row,
                                 defocus_offsets(settings))
        if offset:
            df1, df2 = df1 + offset, df2 + offset
            c_c = _cropped_ctf(n, band.m, pixel_size, optics, df1, df2, angast, pshift)
            results = [_rescore(x_c, c_c, vft, band, a) for vft, a in zip(references, results)]
    dof = float(band.mult.sum())
    cc = np.array([a.cc for a in results])
    if settings.focus_centre is not None and settings.focus_radius > 0:
        fcc = []
        ctf = ctf_2d(n, pixel_size, voltage, cs, ac, df1, df2, angast, pshift)  # the focus score needs the full grid
        for vft, a in zip(references, results):
            centred = ift2(phase_shift(f, -a.shx, -a.shy), n)
            fcc.append(al.focused_cc(centred, vft, ctf, a, np.asarray(settings.focus_centre), settings.focus_radius,
                                     band))
        cc = np.array(fcc)
        # real-space samples in the circle that carry independent information in the band
        dof = np.pi * settings.focus_radius ** 2 * float(band.mult.sum()) / (n * n)
    cc = np.clip(cc, -0.999999, 0.999999)
    logp = -0.5 * dof * (1.0 - cc ** 2)
    return ParticleResult(alignments=results, logp=logp, scores=100.0 * cc, defocus_offset=offset)


def _cropped_ctf(n: int, m: int, pixel_size: float, optics: tuple[float, float, float], df1: float, df2: float,
                 angast: float, pshift: float) -> np.ndarray:
    """The particle's CTF on the cropped m-grid only: ``crop_ft(ctf of the n-image, m)``.

    The m-grid's frequency k means k / (n * pixel_size) 1/Å, which is an m-image
    at pixel size ``pixel_size * n / m``; so the CTF is evaluated at (m/n)^2 of
    the points instead of all of them and then mostly discarded.
    """
    voltage, cs, ac = optics
    return ctf_2d(m, pixel_size * n / m, voltage, cs, ac, df1, df2, angast, pshift)


def _rescore(x_c: np.ndarray, c_c: np.ndarray, vft: VolumeFT, band: al.Band, a: al.Alignment) -> al.Alignment:
    return al.local_refine(x_c, c_c, vft, band, a, angles_fixed=True, shifts_fixed=True)


def _refine_defocus(x_c, vft, a, band, n, pixel_size, optics, row, offsets) -> float:
    """Best common defocus offset (Å) for one particle at its alignment (parabolic peak)."""
    voltage, cs, ac = optics
    rot = rotation_matrix(a.phi, a.theta, a.psi).reshape(1, 3, 3)
    proj = extract_slices_cropped(vft, rot, band.m, max_radius=band.m // 2)[0]
    proj = phase_shift(proj, a.shx * band.m / n, a.shy * band.m / n)
    k = len(offsets)
    # on the cropped grid directly (see _cropped_ctf)
    ctfs = ctf_2d_stack(band.m, pixel_size * n / band.m, voltage, cs, ac, row["df1"] + offsets, row["df2"] + offsets,
                        np.full(k, row["angast"]), np.full(k, row["pshift"]))
    scores = al.cc(x_c, ctfs * proj[None], band)
    j = int(np.argmax(scores))
    if not 0 < j < k - 1:
        # no maximum inside the searched range: the score does not pin the defocus down
        # (too little signal in the band); keep the particle's defocus
        return 0.0
    c0, c1, c2 = scores[j - 1], scores[j], scores[j + 1]
    den = c0 - 2 * c1 + c2
    frac = 0.5 * (c0 - c2) / den if den < 0 else 0.0
    return float(offsets[j] + np.clip(frac, -0.5, 0.5) * (offsets[1] - offsets[0]))


def occupancies(logp: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """Posterior class probabilities in percent, ``(n, K)``, from LogP ``(n, K)`` and class priors ``(K,)``."""
    logp = np.asarray(logp, dtype=np.float64)
    lp = logp + np.log(np.clip(np.asarray(priors, dtype=np.float64), 1e-12, None))[None, :]
    lp -= lp.max(axis=1, keepdims=True)
    p = np.exp(lp)
    return 100.0 * p / p.sum(axis=1, keepdims=True)


def angular_change(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Angle (degrees) between old and new orientations of each particle (PARAM_DTYPE rows)."""
    r0 = rotation_matrix(old["phi"], old["theta"], old["psi"])
    r1 = rotation_matrix(new["phi"], new["theta"], new["psi"])
    return angular_distance(r0, r1)

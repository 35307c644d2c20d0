"""``cistem-mpi simulate``: ground-truth data from a real structure.

Sub-commands (each writes its data *and* the truth beside it):

* ``particles``      -- particle stack (.mrcs) with known angles, shifts,
  per-particle defocus/astigmatism/phase shift and noise at a given SNR;
  parameters as Frealign X ``.par``, cisTEM ``.star`` and RELION 3.1 ``.star``.
* ``micrographs``    -- micrographs with particles at known positions; by
  default the physical model (projected Coulomb potential against vitreous
  ice, interaction constant, per-particle defocus on a tilted specimen, CTF
  with envelope, carbon edge, contamination, ice gradient, counting-detector
  MTF/DQE, Poisson noise; see :func:`simulate_micrographs`) of a ~356 kDa
  ring of 8 copies of 8ZPM; coordinates + truth tables and masks.
* ``movies``         -- integer-count frames (Poisson) with a known drift and
  per-frame exposure (with radiation damage), seen through a known gain;
  LZW TIFF and/or MRC and/or EER, plus the gain reference (MRC).
* ``conformations``  -- two-conformation particles for classification: the
  structure and the structure with one region removed or moved, mixed in a
  known ratio; true class per particle.

The structure is an MRC map (``--map``), an atomic model (``--model``,
PDB/mmCIF via gemmi) or, by default, the built-in PDB 8ZPM
(:func:`builtin_map`).

Conventions (see :mod:`cistem_mpi.kernels.euler`, ``.shifts``, ``.ctf``):
a particle with .par PSI THETA PHI SHX SHY is the projection of the map with
``rotation_matrix(PHI, THETA, PSI)``, multiplied by cisTEM's CTF, moved by
``(+SHX, +SHY) / pixel size``; protein is dark (the data as recorded).

The Python functions (:func:`simulate_particles`, :func:`simulate_micrographs`,
:func:`simulate_movies`, :func:`simulate_conformations`, :func:`builtin_map`)
are what tests and the demo call.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cistem_mpi.errors import InputError
from cistem_mpi.io.params import Optics, ParticleSet, empty_params
from cistem_mpi.kernels import fft as _fft
from cistem_mpi.kernels.fft import nice_size
from cistem_mpi.kernels.euler import matrix_to_euler, random_rotations, rotation_matrix
from cistem_mpi.kernels.masks import sphere_mask
from cistem_mpi.kernels.projection import prepare_volume_ft
from cistem_mpi.kernels.simulate import (
    SCATTERING_TO_VOLTS, apply_detector, atoms_to_map, carbon_mask, compose_micrograph,
    contamination_thickness, drift_trajectory, gain_reference, gaussian_random_field, height_at,
    ice_thickness_map, physical_micrograph, random_defocus, random_positions, random_positions_allowed,
    simulate_movie_frames, simulate_particle_images, solvent_excluded_potential, specimen_height,
)

__all__ = [
    "builtin_map", "map_from_atoms", "load_structure", "simulate_particles", "simulate_micrographs",
    "builtin_assembly", "assembly_map",
    "simulate_movies", "simulate_conformations", "SimulatedParticles", "SimulatedMicrographs",
    "SimulatedMovies", "register", "run",
]


# --------------------------------------------------------------------------
# structures
# --------------------------------------------------------------------------

def map_from_atoms(atoms, box: int, pixel_size: float, bfactor: float = 30.0,
                   center: np.ndarray | None = None) -> np.ndarray:
    """Map (box^3, float32) of :class:`cistem_mpi.io.model.Atoms` (electron scattering Gaussians)."""
    from cistem_mpi.io.model import scattering_coefficients

    a, b = scattering_coefficients(atoms.elements)
    return atoms_to_map(atoms.coords, a, b, box, pixel_size, bfactor=bfactor, center=center)


def builtin_map(box: int = 64, pixel_size: float = 2.5, bfactor: float = 30.0) -> np.ndarray:
    """The built-in structure (PDB 8ZPM, protein atoms) as a map centred in the box.

    Parameters
    ----------
    box : int
        Box size in voxels.
    pixel_size : float
        Å per voxel.  The molecule is about 60 x 45 x 110 Å.
    bfactor : float
        Isotropic B (Å²) added to every atom.
    """
    from cistem_mpi.io.model import builtin_atoms

    return map_from_atoms(builtin_atoms(), box, pixel_size, bfactor)


#: implicit hydrogens per heavy atom of a protein (about 8 H per residue of ~8 heavy atoms)
_IMPLICIT_H = {"C": 1.3, "N": 1.0, "O": 0.25, "S": 0.5}


def builtin_assembly(copies: int = 8, ring_radius: float | None = None, layers: int = 1):
    """A larger complex built from the built-in structure: ``copies`` of PDB 8ZPM on a ring.

    8ZPM (CXCR4 + nanobody) is only ~45 kDa with hydrogens, too small to be
    seen in a micrograph; ``copies`` of it arranged with C_n symmetry about z
    (each copy's long axis along z, its centre at ``ring_radius`` Å) make a
    ring: 8 copies ~356 kDa, ~180 Å across and ~110 Å high; 4 copies
    ~178 kDa, ~125 Å across.

    ``layers=2`` stacks two rings of ``copies // 2`` back to back (D_n
    symmetry, the second ring turned over about x): 8 copies then make a
    compact ~125 x 125 x 215 Å particle.

    Parameters
    ----------
    copies : int
        Number of copies (>= 1; 1 = the structure itself).
    ring_radius : float, optional
        Å; default ``7.5 * (copies per ring)`` (copies just touching).
    layers : int
        1 (C_n ring) or 2 (D_n double ring).

    Returns
    -------
    cistem_mpi.io.model.Atoms
        With chains renamed ``<chain><copy>``.

    >>> len(builtin_assembly(2)) == 2 * len(builtin_assembly(1))
    True
    """
    from cistem_mpi.io.model import Atoms, builtin_atoms

    a = builtin_atoms()
    c = a.coords - a.coords.mean(axis=0)
    if layers not in (1, 2) or (layers == 2 and copies % 2):
        raise ValueError("layers must be 1, or 2 with an even number of copies")
    per = copies // layers
    r = 7.5 * per if ring_radius is None else float(ring_radius)
    if per == 1:
        r = 0.0
    dz = 0.5 * (c[:, 2].max() - c[:, 2].min()) + 2.0 if layers == 2 else 0.0
    flip = np.diag([1.0, -1.0, -1.0])
    coords, els, chs, res = [], [], [], []
    for k in range(copies):
        layer, j = divmod(k, per)
        t = 2.0 * np.pi * j / per
        rz = np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])
        x = (c + np.array([r, 0.0, dz])) @ rz.T
        coords.append(x @ flip.T if layer == 1 else x)
        els.append(a.elements)
        chs.append(np.char.add(a.chains.astype(str), str(k)))
        res.append(a.residues)
    return Atoms(np.concatenate(els), np.concatenate(coords), np.concatenate(chs), np.concatenate(res))


def assembly_map(copies: int = 8, pixel_size: float = 1.5, bfactor: float = 30.0, box: int | None = None,
                 hydrogens: bool = True, layers: int = 1) -> np.ndarray:
    """Map (scattering units of :func:`atoms_to_map`, Å^-2) of :func:`builtin_assembly`.

    ``hydrogens``: add the scattering of the riding hydrogens the model lacks
    (per heavy atom C 1.3, N 1.0, O 0.25, S 0.5 H, placed on the heavy atom),
    which raises the protein's mean potential from ~6.6 V to ~8 V.  ``box``
    default: the assembly's extent plus 12 pixels, even.

    >>> assembly_map(1, 6.0).shape[0] >= 20
    True
    """
    from cistem_mpi.io.model import scattering_coefficients

    atoms = builtin_assembly(copies, layers=layers)
    a, b = scattering_coefficients(atoms.elements)
    if hydrogens:
        ha, hb = scattering_coefficients(np.array(["H"]))
        nh = np.array([_IMPLICIT_H.get(str(e), 0.0) for e in atoms.elements])
        a = np.concatenate([a, nh[:, None] * ha], axis=1)
        b = np.concatenate([b, np.broadcast_to(hb, (len(nh), hb.shape[1]))], axis=1)
    c = atoms.coords - atoms.coords.mean(axis=0)
    if box is None:
        box = int(np.ceil(2.0 * np.abs(c).max() / pixel_size)) + 12
        box += box % 2
    key = (copies, float(pixel_size), float(bfactor), int(box), bool(hydrogens), int(layers))
    if key not in _ASSEMBLY_CACHE:
        from cistem_mpi.kernels.simulate import atoms_to_map_separable

        if len(_ASSEMBLY_CACHE) >= 2:  # keep two (they are large)
            _ASSEMBLY_CACHE.clear()
        _ASSEMBLY_CACHE[key] = atoms_to_map_separable(atoms.coords, a, b, box, pixel_size, bfactor=bfactor)
    return _ASSEMBLY_CACHE[key].copy()


_ASSEMBLY_CACHE: dict[tuple, np.ndarray] = {}


def load_structure(map_path: str | None, model_path: str | None, box: int, pixel_size: float,
                   bfactor: float = 30.0) -> np.ndarray:
    """The map to simulate from: an MRC map, an atomic model or the built-in one.

    An MRC map must be cubic with the requested box and pixel size (use
    ``--box``/``--pixel-size`` that match it).
    """
    if map_path and model_path:
        raise InputError("--map/--model", "give either a map or an atomic model, not both")
    if map_path:
        from cistem_mpi.io.mrc import read_mrc

        vol, ps = read_mrc(map_path)
        if vol.ndim != 3 or len(set(vol.shape)) != 1:
            raise InputError(map_path, f"map must be a cube, got {vol.shape}")
        if vol.shape[0] != box:
            raise InputError(map_path, f"map box {vol.shape[0]} differs from --box {box}")
        if abs(ps - pixel_size) > 1e-3 * pixel_size:
            raise InputError(map_path, f"map pixel size {ps:g} Å differs from --pixel-size {pixel_size:g}")
        if not np.isfinite(vol).all():
            raise InputError(map_path, "map contains NaN or infinite values")
        return np.asarray(vol, dtype=np.float32)
    if model_path:
        from cistem_mpi.io.model import read_atoms

        return map_from_atoms(read_atoms(model_path), box, pixel_size, bfactor)
    return builtin_map(box, pixel_size, bfactor)


# --------------------------------------------------------------------------
# particles
# --------------------------------------------------------------------------

@dataclass
class SimulatedParticles:
    """What :func:`simulate_particles` made.

    Attributes
    ----------
    stack, par, cistem_star, relion_star, map, truth : Path
        Files written (``map`` = the noise-free reference map; ``truth`` =
        npz with rotation matrices, shifts in pixels, noise sigma, classes).
    particles : ParticleSet
        The true parameters (same as the .par/.star).
    rotations : ndarray (n, 3, 3)
    noise_sigma : float
        Noise standard deviation in the written stack (1: unit variance).
    classes : ndarray (n,) int
        True class (0 unless two conformations).
    """

    stack: Path
    par: Path
    cistem_star: Path
    relion_star: Path
    map: Path
    truth: Path
    particles: ParticleSet
    rotations: np.ndarray
    noise_sigma: float
    classes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))


def _angles_from(angles, n: int, rng: np.random.Generator) -> np.ndarray:
    if angles is None or (isinstance(angles, str) and angles == "uniform"):
        return random_rotations(n, rng)
    a = np.asarray(angles, dtype=np.float64)
    if a.shape == (n, 3, 3):
        return a
    if a.shape == (n, 3):  # psi, theta, phi as in the .par
        return rotation_matrix(a[:, 2], a[:, 1], a[:, 0])
    raise ValueError("angles must be 'uniform', (n, 3) psi/theta/phi in degrees or (n, 3, 3) matrices")


def _write_parameter_files(out: Path, name: str, stack: Path, params: np.ndarray,
                           optics: Optics) -> tuple[Path, Path, Path]:
    from cistem_mpi.io.par import write_par
    from cistem_mpi.io.star import write_cistem_star, write_relion_star

    par = out / f"{name}.par"
    write_par(par, params)
    ps = ParticleSet(params=params, optics=[optics])
    cstar = out / f"{name}_cistem.star"
    write_cistem_star(cstar, ps, stack=stack.name)
    rstar = out / f"{name}_relion.star"
    write_relion_star(rstar, ps, style="3.1", stack=stack.name)
    return par, cstar, rstar


def _make_params(rot: np.ndarray, shifts_a: np.ndarray, df1, df2, ang, pshift) -> np.ndarray:
    n = len(rot)
    p = empty_params(n)
    phi, theta, psi = matrix_to_euler(rot)
    p["psi"], p["theta"], p["phi"] = psi, theta, phi
    p["shx"], p["shy"] = shifts_a[:, 0], shifts_a[:, 1]
    p["mag"] = 0.0
    p["film"] = 1
    p["df1"], p["df2"], p["angast"], p["pshift"] = df1, df2, ang, pshift
    p["occ"] = 100.0
    p["sigma"] = 1.0
    return p


def _simulate_set(vols: list[np.ndarray], out_dir: str | Path, n_particles: int, box: int,
                  pixel_size: float, snr: float, seed: int, class_fraction: list[float] | None,
                  voltage: float, cs: float, amplitude_contrast: float, defocus_mean: float,
                  defocus_spread: float, astigmatism: float, phase_shift: float,
                  max_shift: float, ctf_bfactor: float, angles, name: str,
                  batch: int = 256) -> SimulatedParticles:
    from cistem_mpi.io.mrc import write_mrc

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rot = _angles_from(angles, n_particles, rng)
    shifts_a = rng.uniform(-max_shift, max_shift, (n_particles, 2)) if max_shift > 0 else np.zeros((n_particles, 2))
    df1, df2, ang = random_defocus(n_particles, rng, defocus_mean, defocus_spread, astigmatism)
    pshift = np.full(n_particles, phase_shift, dtype=np.float32)
    if class_fraction is None:
        classes = np.zeros(n_particles, dtype=np.int32)
    else:
        classes = rng.choice(len(vols), size=n_particles, p=np.asarray(class_fraction) / np.sum(class_fraction)).astype(np.int32)
    vfts = [prepare_volume_ft(v, 2.0, "cubic") for v in vols]

    def clean_batch(s0: int, s1: int) -> np.ndarray:
        imgs = np.empty((s1 - s0, box, box), dtype=np.float32)
        for c, vft in enumerate(vfts):
            sel = np.nonzero(classes[s0:s1] == c)[0]
            if sel.size:
                g = sel + s0
                imgs[sel] = simulate_particle_images(
                    vft, rot[g], shifts_a[g] / pixel_size, pixel_size, voltage, cs, amplitude_contrast,
                    df1[g], df2[g], ang[g], pshift[g], ctf_bfactor)
        return imgs

    if snr <= 0:
        raise ValueError("snr must be positive")
    # The images are made and written batch by batch (any number of particles
    # fits in memory); the noise level comes from the signal variance of the
    # first batch (up to `batch` particles), which is representative.
    from cistem_mpi.io.mrc import MrcStackWriter

    first = clean_batch(0, min(batch, n_particles))
    sigma = float(np.sqrt(float(first.var()) / snr))
    stack = out / f"{name}.mrcs"
    with MrcStackWriter(stack, (box, box), n_particles, pixel_size) as w:
        for s0 in range(0, n_particles, batch):
            s1 = min(s0 + batch, n_particles)
            imgs = first if s0 == 0 else clean_batch(s0, s1)
            # cisTEM-like normalisation: unit noise variance (the SNR is unchanged)
            noisy = imgs / np.float32(sigma) + rng.standard_normal(imgs.shape, dtype=np.float32)
            for img in noisy:
                w.append(img)
    params = _make_params(rot, shifts_a, df1, df2, ang, pshift)
    optics = Optics(pixel_size=pixel_size, voltage=voltage, cs=cs, amplitude_contrast=amplitude_contrast)
    par, cstar, rstar = _write_parameter_files(out, name, stack, params, optics)
    map_path = out / f"{name}_map.mrc"
    write_mrc(map_path, vols[0], pixel_size)
    for c, v in enumerate(vols[1:], start=2):
        write_mrc(out / f"{name}_map_class{c}.mrc", v, pixel_size)
    truth = out / f"{name}_truth.npz"
    np.savez_compressed(truth, rotations=rot, shifts_px=shifts_a / pixel_size, shifts_angstrom=shifts_a,
                        df1=df1, df2=df2, angast=ang, pshift=pshift, classes=classes,
                        noise_sigma_before_normalisation=sigma, snr=snr, pixel_size=pixel_size,
                        voltage=voltage, cs=cs, amplitude_contrast=amplitude_contrast, seed=seed)
    (out / f"{name}_truth.json").write_text(json.dumps({
        "what": "simulated particles (cistem-mpi simulate)", "n_particles": int(n_particles), "box": int(box),
        "pixel_size": pixel_size, "snr": snr, "seed": int(seed), "voltage": voltage, "cs": cs,
        "amplitude_contrast": amplitude_contrast, "ctf_bfactor": ctf_bfactor,
        "conventions": "particle = projection(rotation_matrix(PHI,THETA,PSI)) * CTF, moved by +SHX/pixel, "
                       "+SHY/pixel; protein dark; stack normalised to unit noise variance",
        "class_fraction": class_fraction, "files": {"stack": stack.name, "par": par.name,
                                                    "cistem_star": cstar.name, "relion_star": rstar.name,
                                                    "map": map_path.name, "truth": truth.name},
    }, indent=2))
    return SimulatedParticles(stack, par, cstar, rstar, map_path, truth,
                              ParticleSet(params=params, optics=[optics]), rot, 1.0, classes)


def simulate_particles(out_dir: str | Path, n_particles: int = 500, box: int = 64, pixel_size: float = 2.5,
                       snr: float = 0.1, seed: int = 0, volume: np.ndarray | None = None,
                       voltage: float = 300.0, cs: float = 2.7, amplitude_contrast: float = 0.07,
                       defocus_mean: float = 15000.0, defocus_spread: float = 5000.0,
                       astigmatism: float = 300.0, phase_shift: float = 0.0, max_shift: float = 5.0,
                       ctf_bfactor: float = 0.0, angles=None, name: str = "particles") -> SimulatedParticles:
    """Simulate a particle stack with known parameters and write it with its truth.

    Parameters
    ----------
    out_dir : path
        Output directory (created).
    n_particles, box, pixel_size : int, int, float
        Number of particles, box in pixels, Å per pixel.
    snr : float
        ``var(noise-free particle images) / var(noise)`` over the whole boxes
        (signal variance measured on the first 256 particles).  The stack is
        scaled to unit noise variance.
    seed : int
        Everything random derives from it (same seed, same files).
    volume : ndarray, optional
        The map (box^3, at ``pixel_size``); default :func:`builtin_map`.
    voltage, cs, amplitude_contrast : float
        kV, mm, fraction.
    defocus_mean, defocus_spread, astigmatism : float
        Å: defocus uniform in mean +/- spread, df1 - df2 up to 2*astigmatism.
    phase_shift : float
        Phase-plate shift (radians) for all particles.
    max_shift : float
        SHX, SHY uniform in +/- max_shift Å.
    ctf_bfactor : float
        CTF envelope B (Å²).
    angles : "uniform", (n, 3) PSI/THETA/PHI degrees, or (n, 3, 3) matrices
    name : str
        Base name of the files.

    Returns
    -------
    SimulatedParticles
    """
    vol = builtin_map(box, pixel_size) if volume is None else np.asarray(volume, np.float32)
    if vol.shape != (box, box, box):
        raise ValueError(f"volume shape {vol.shape} does not match box {box}")
    return _simulate_set([vol], out_dir, n_particles, box, pixel_size, snr, seed, None, voltage, cs,
                         amplitude_contrast, defocus_mean, defocus_spread, astigmatism, phase_shift,
                         max_shift, ctf_bfactor, angles, name)


def conformation_maps(box: int, pixel_size: float, change: str = "remove", move_angstrom: float = 10.0,
                      atoms=None, region_chain: str | None = None, bfactor: float = 30.0
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Two maps in the same frame: the structure, and it with one region removed or moved.

    The region is a chain (default: the last chain; for 8ZPM the nanobody,
    chain N).  ``change="move"`` translates it by ``move_angstrom`` away from
    the rest of the molecule.
    """
    from cistem_mpi.io.model import builtin_atoms

    atoms = builtin_atoms() if atoms is None else atoms
    chains = list(dict.fromkeys(atoms.chains.tolist()))
    chain = chains[-1] if region_chain is None else region_chain
    sel = atoms.chains == chain
    if not sel.any() or sel.all():
        raise ValueError(f"region chain {chain!r} must be part, not all, of the model")
    center = atoms.coords.mean(axis=0)
    a = map_from_atoms(atoms, box, pixel_size, bfactor, center=center)
    if change == "remove":
        b = map_from_atoms(atoms.select(~sel), box, pixel_size, bfactor, center=center)
    elif change == "move":
        d = atoms.coords[sel].mean(0) - atoms.coords[~sel].mean(0)
        moved = atoms.select(np.ones(len(atoms), bool))
        moved.coords = atoms.coords.copy()
        moved.coords[sel] += move_angstrom * d / np.linalg.norm(d)
        b = map_from_atoms(moved, box, pixel_size, bfactor, center=center)
    else:
        raise ValueError("change must be 'remove' or 'move'")
    return a, b


def simulate_conformations(out_dir: str | Path, n_particles: int = 1000, box: int = 64,
                           pixel_size: float = 2.5, snr: float = 0.1, seed: int = 0,
                           fraction_first: float = 0.6, change: str = "remove",
                           maps: tuple[np.ndarray, np.ndarray] | None = None,
                           name: str = "conformations", **kw) -> SimulatedParticles:
    """Particles from two conformations mixed ``fraction_first : 1 - fraction_first``.

    ``classes`` (and ``<name>_truth.npz``) give each particle's true
    conformation (0 = the full structure, 1 = the changed one); the two maps
    are written as ``<name>_map.mrc`` and ``<name>_map_class2.mrc``.
    Other keywords as in :func:`simulate_particles`.
    """
    a, b = conformation_maps(box, pixel_size, change) if maps is None else maps
    defaults = dict(voltage=300.0, cs=2.7, amplitude_contrast=0.07, defocus_mean=15000.0,
                    defocus_spread=5000.0, astigmatism=300.0, phase_shift=0.0, max_shift=5.0,
                    ctf_bfactor=0.0, angles=None)
    defaults.update(kw)
    return _simulate_set([a, b], out_dir, n_particles, box, pixel_size, snr, seed,
                         [fraction_first, 1.0 - fraction_first], name=name, **defaults)


# --------------------------------------------------------------------------
# micrographs and movies
# --------------------------------------------------------------------------

@dataclass
class SimulatedMicrographs:
    """What :func:`simulate_micrographs` made: files and per-micrograph truth.

    ``truths`` (realistic model only) holds one dict per micrograph with
    the arrays also written to ``<name>_NNNN_truth.npz``: ``classes``,
    ``radius_angstrom`` (per class), ``particle_df`` (defocus offset of each
    particle, Å), ``height`` (tilt part), ``z_in_ice``, ``carbon_mask``,
    ``contamination_mask``, ``reject_mask`` (bool), ``ice_thickness`` (Å).
    """

    micrographs: list[Path]
    coordinates: list[Path]
    truth: Path
    positions: list[np.ndarray]
    ctf: np.ndarray  # (n, 4): df1, df2, angast, pshift
    intensities: list[np.ndarray] = field(default_factory=list)
    truths: list[dict] = field(default_factory=list)


def _micrograph_intensity(vft, rng: np.random.Generator, shape: tuple[int, int], box: int, pixel_size: float,
                          n_particles: int, voltage: float, cs: float, amplitude_contrast: float,
                          df: tuple[float, float, float], pshift: float, particle_contrast: float,
                          ice_sigma: float, ice_phase_sigma: float, physics: str = "simple",
                          thickness_angstrom: float | None = None, **realistic) -> tuple:
    """Noise-free intensity (mean ~1) of one micrograph, its particle positions and rotations.

    ``physics="simple"`` (the original model): projections scaled to peak
    ``particle_contrast``, white phase noise, smooth amplitude background.
    ``physics="realistic"``: :func:`_physical_intensity` (``vft`` is then a
    :class:`_Particles`; keywords as there) and a 4th return value, the
    truth dict.  Neither applies the detector (see
    :func:`cistem_mpi.kernels.simulate.apply_detector`).  ``thickness_angstrom``:
    the ice is a slab of that thickness (the CTF integrated over it; see
    :func:`cistem_mpi.kernels.simulate.compose_micrograph`).
    """
    if physics == "realistic":
        return _physical_intensity(vft, rng, shape, pixel_size, n_particles, voltage, cs, amplitude_contrast,
                                   df, pshift, thickness_angstrom=thickness_angstrom, **realistic)
    if physics != "simple":
        raise ValueError("physics must be 'simple' or 'realistic'")
    pos = random_positions(n_particles, shape, box, rng)
    rot = random_rotations(len(pos), rng)
    from cistem_mpi.kernels.projection import extract_slices

    proj = _fft.ift2(extract_slices(vft, rot)).astype(np.float32)
    proj *= np.float32(particle_contrast / max(float(np.abs(proj).max()), 1e-30))
    # ice: slowly varying thickness (amplitude) + amorphous phase noise (gives Thon rings)
    ice = gaussian_random_field(shape, rng, corr_length_px=max(8.0, box / 2), sigma=ice_sigma)
    phase = gaussian_random_field(shape, rng, corr_length_px=1.0, sigma=ice_phase_sigma)
    img = compose_micrograph(proj, pos, shape, pixel_size, voltage, cs, amplitude_contrast,
                             df[0], df[1], df[2], pshift, contrast=1.0, phase_noise=phase, background=ice,
                             **({} if thickness_angstrom is None else dict(thickness_angstrom=thickness_angstrom,
                                                                          rng=rng)))
    return img, pos, rot


@dataclass
class _Particles:
    """Prepared particle classes of the realistic model (solvent-excluded potential, V)."""

    vfts: list
    radius_angstrom: np.ndarray  # per class
    box: int  # map box
    fraction: np.ndarray  # per class

    @classmethod
    def from_maps(cls, maps: list[np.ndarray], pixel_size: float, units: str = "scattering",
                  fraction: list[float] | None = None) -> "_Particles":
        from cistem_mpi.kernels.simulate import ICE_MEAN_POTENTIAL

        if units not in ("scattering", "volts"):
            raise ValueError("volume units must be 'scattering' or 'volts'")
        vfts, radii = [], []
        box = max(m.shape[0] for m in maps)
        for m in maps:
            v = np.asarray(m, np.float32) * np.float32(SCATTERING_TO_VOLTS if units == "scattering" else 1.0)
            if v.shape[0] < box:  # common box: pad
                pad = (box - v.shape[0]) // 2
                v = np.pad(v, [(pad, box - v.shape[0] - pad)] * 3)
            eff = solvent_excluded_potential(v, pixel_size)
            # the envelope: where the smoothed potential exceeds half the ice's
            from scipy.ndimage import gaussian_filter

            env = gaussian_filter(v, 1.5 / pixel_size) > 0.5 * ICE_MEAN_POTENTIAL
            zz, yy, xx = np.nonzero(env)
            c = box // 2
            r = float(np.sqrt(((xx - c) ** 2 + (yy - c) ** 2 + (zz - c) ** 2).max())) * pixel_size if zz.size else 0.0
            radii.append(r)
            # projections are V Å: sum over voxels times the voxel length
            vfts.append(prepare_volume_ft(eff * np.float32(pixel_size), 2.0, "cubic"))
        f = np.ones(len(maps)) if fraction is None else np.asarray(fraction, dtype=np.float64)
        return cls(vfts, np.array(radii), box, f / f.sum())


def _physical_intensity(parts: "_Particles", rng: np.random.Generator, shape: tuple[int, int],
                        pixel_size: float, n_particles: int, voltage: float, cs: float,
                        amplitude_contrast: float, df: tuple[float, float, float], pshift: float,
                        ctf_bfactor: float = 50.0, ice_thickness: float = 300.0, ice_gradient: float = 0.0,
                        ice_thickness_sigma: float = 0.0, tilt_axis: float = 0.0, tilt_angle: float = 0.0,
                        carbon_fraction: float = 0.0, carbon_thickness: float = 200.0,
                        contamination: int = 0, contamination_radius: tuple[float, float] = (150.0, 400.0),
                        min_distance_factor: float = 2.1, thickness_angstrom: float | None = None) -> tuple:
    from cistem_mpi.kernels.ctf import electron_wavelength
    from cistem_mpi.kernels.projection import extract_slices
    from scipy.ndimage import distance_transform_edt

    ny, nx = shape
    t = ice_thickness_map(shape, pixel_size, rng, ice_thickness, ice_gradient, rng.uniform(0, 360),
                          ice_thickness_sigma)
    height = specimen_height(shape, pixel_size, tilt_axis, tilt_angle) if tilt_angle else None
    carbon = carbon_mask(shape, pixel_size, rng, carbon_fraction) if carbon_fraction > 0 else None
    contam = (contamination_thickness(shape, pixel_size, rng, contamination, contamination_radius)
              if contamination > 0 else None)
    cmask = carbon > 0.5 if carbon is not None else np.zeros(shape, bool)
    xmask = contam > 0 if contam is not None else np.zeros(shape, bool)
    reject = cmask | xmask
    rmax = float(parts.radius_angstrom.max()) / pixel_size
    allowed = distance_transform_edt(~reject) > rmax if reject.any() else None
    pos = random_positions_allowed(n_particles, shape, rmax, rng, allowed,
                                   min_distance=min_distance_factor * rmax)
    n = len(pos)
    rot = random_rotations(n, rng)
    classes = rng.choice(len(parts.vfts), size=n, p=parts.fraction).astype(np.int32)
    # height of each particle in the ice (centre within the layer) and on the tilted plane
    tloc = t[np.clip(pos[:, 1].astype(int), 0, ny - 1), np.clip(pos[:, 0].astype(int), 0, nx - 1)] if n else np.zeros(0)
    half = np.clip(0.5 * tloc - parts.radius_angstrom[classes], 0.0, None)
    z = rng.uniform(-1.0, 1.0, n) * half
    htilt = height_at(pos[:, 0], pos[:, 1], shape, pixel_size, tilt_axis, tilt_angle) if n else np.zeros(0)
    dfo = (htilt + z).astype(np.float64)
    # padded box holding the CTF's delocalisation
    lam = electron_wavelength(voltage)
    k = 0.5 / pixel_size
    if ctf_bfactor > 0:
        k = min(k, float(np.sqrt(4.0 * np.log(100.0) / ctf_bfactor)))
    dmax = max(df[0], df[1]) + (float(np.abs(dfo).max()) if n else 0.0)
    deloc = lam * dmax * k + lam ** 3 * cs * 1e7 * k ** 3
    pbox = nice_size(parts.box + 2 * int(np.ceil(deloc / pixel_size)) + 8)
    pbox = min(pbox, nice_size(max(parts.box, min(4 * parts.box, max(ny, nx)))))
    fts = np.empty((n, pbox, pbox // 2 + 1), np.complex64)
    for c, vft in enumerate(parts.vfts):
        sel = np.nonzero(classes == c)[0]
        if sel.size:
            fts[sel] = extract_slices(vft, rot[sel], image_size=pbox)
    img = physical_micrograph(fts, pos, dfo, shape, pixel_size, voltage, cs, amplitude_contrast,
                              df[0], df[1], df[2], pshift, ctf_bfactor, t, height, carbon, carbon_thickness,
                              contam, rng, **({} if thickness_angstrom is None
                                              else dict(thickness_angstrom=thickness_angstrom)))
    truth = {"classes": classes, "radius_angstrom": parts.radius_angstrom, "particle_df": dfo,
             "height": htilt, "z_in_ice": z, "carbon_mask": cmask, "contamination_mask": xmask,
             "reject_mask": reject, "ice_thickness": t, "tilt_axis": tilt_axis, "tilt_angle": tilt_angle,
             "ctf_bfactor": ctf_bfactor}
    return img, pos, rot, truth


def simulate_micrographs(out_dir: str | Path, n_micrographs: int = 2, shape: tuple[int, int] = (512, 512),
                         n_per_micrograph: int = 20, box: int = 64, pixel_size: float = 2.5,
                         exposure: float = 30.0, seed: int = 0, volume: np.ndarray | None = None,
                         voltage: float = 300.0, cs: float = 2.7, amplitude_contrast: float = 0.07,
                         defocus_mean: float = 15000.0, defocus_spread: float = 5000.0,
                         astigmatism: float = 500.0, phase_shift: float = 0.0,
                         particle_contrast: float = 0.15, ice_sigma: float = 0.01,
                         ice_phase_sigma: float = 0.05,
                         name: str = "micrograph", physics: str = "simple",
                         volumes: list[np.ndarray] | None = None, class_fraction: list[float] | None = None,
                         volume_units: str = "scattering", two_sizes: bool = False,
                         ctf_bfactor: float | None = None, detector: str | None = None,
                         ice_thickness: float = 300.0, ice_gradient: float = 0.0,
                         ice_thickness_sigma: float = 0.0, tilt_axis: float = 0.0, tilt_angle: float = 0.0,
                         carbon_fraction: float = 0.0, carbon_thickness: float = 200.0,
                         contamination: int = 0,
                         contamination_radius: tuple[float, float] = (150.0, 400.0),
                         assembly_copies: int = 8, thickness_angstrom: float | None = None) -> SimulatedMicrographs:
    """Micrographs (float32 MRC, electron counts) with particles at known positions.

    ``physics="simple"`` (default, the original model): intensity
    ``1 + CTF (x) (particles + amorphous ice) + ice thickness``, particles
    scaled so their projected peak is ``particle_contrast`` (weak-phase
    units), white phase noise of std ``ice_phase_sigma`` (Thon rings),
    smooth amplitude background of std ``ice_sigma``; shot noise Poisson
    with ``exposure`` e/Å².

    ``physics="realistic"`` (the default of ``cistem-mpi simulate
    micrographs``): contrast from the projected Coulomb potential
    (``47.878 V Å^2`` times the scattering-factor map of
    :func:`atoms_to_map`; the interaction constant at the voltage; protein
    against the vitreous-ice mean potential it displaces), ice of
    ``ice_thickness`` Å (plus a linear ``ice_gradient`` across the image and
    a smooth fluctuation ``ice_thickness_sigma``) with amorphous
    fluctuations, zero-loss attenuation, each particle's own defocus (its
    height in the ice and on a plane tilted by ``tilt_angle`` about
    ``tilt_axis``, degrees), the CTF with envelope ``ctf_bfactor`` (Å²,
    default 50), a carbon edge covering ``carbon_fraction`` of the image,
    ``contamination`` ice balls, a counting detector (``detector``:
    "counting" (default) MTF = pixel sinc, DQE = MTF², or "ideal") and
    Poisson noise at ``exposure`` e/Å².  Structure: ``volume`` /
    ``volumes`` (maps in ``volume_units``: "scattering" as
    :func:`atoms_to_map` makes them, or "volts"), or by default
    :func:`assembly_map` of ``assembly_copies`` copies of 8ZPM (8: ~356
    kDa; with ``two_sizes`` also a 4-copy ring, ~178 kDa); the particles'
    class mix ``class_fraction``.  ``box`` then only matters for the simple
    model; the particles keep ``2.1`` radii apart and away from carbon and
    contamination by a radius.

    ``thickness_angstrom`` (default None: off) makes thick samples: the
    ice is a slab of that thickness centred on the defocus plane, its
    amorphous fluctuations in layers each through the CTF of its own height
    (the CTF^2 averaged over the slab: Thon rings with nodes, the model
    ctffind5 fits; :func:`cistem_mpi.kernels.simulate.slab_ctf_filter_ft`);
    the realistic model's ice is then that thick (``ice_thickness`` is
    replaced) and its particles sit at heights within it.  The truth
    records it as ``thickness_angstrom``.

    Truth: ``<name>_NNNN_coords.txt`` (x y in pixels, origin at pixel 0,
    one particle per line, with its PSI THETA PHI), ``<name>_truth.json``
    with each micrograph's CTF and, realistic model, ``<name>_NNNN_truth.npz``
    (see :class:`SimulatedMicrographs`).
    """
    from cistem_mpi.io.mrc import write_mrc

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    realistic = physics == "realistic"
    if physics not in ("simple", "realistic"):
        raise ValueError("physics must be 'simple' or 'realistic'")
    if realistic:
        if volumes is not None:
            maps = list(volumes)
        elif volume is not None:
            maps = [np.asarray(volume, np.float32)]
        else:
            maps = [assembly_map(assembly_copies, pixel_size)]
            if two_sizes:
                maps.append(assembly_map(max(1, assembly_copies // 2), pixel_size))
        parts = _Particles.from_maps(maps, pixel_size, volume_units, class_fraction)
        bf = 50.0 if ctf_bfactor is None else float(ctf_bfactor)
        if thickness_angstrom is not None and thickness_angstrom > 0:
            ice_thickness = float(thickness_angstrom)
        kw = dict(ctf_bfactor=bf, ice_thickness=ice_thickness, ice_gradient=ice_gradient,
                  ice_thickness_sigma=ice_thickness_sigma, tilt_axis=tilt_axis, tilt_angle=tilt_angle,
                  carbon_fraction=carbon_fraction, carbon_thickness=carbon_thickness,
                  contamination=contamination, contamination_radius=tuple(contamination_radius))
        det = "counting" if detector is None else detector
    else:
        vol = builtin_map(box, pixel_size) if volume is None else np.asarray(volume, np.float32)
        vft = prepare_volume_ft(vol * sphere_mask(box, box / 2 - 2, 4))
        det = "none" if detector is None else detector
    df1, df2, ang = random_defocus(n_micrographs, rng, defocus_mean, defocus_spread, astigmatism)
    mics, coords, positions, intens, truths = [], [], [], [], []
    table = []
    for i in range(n_micrographs):
        stem = f"{name}_{i + 1:04d}"
        if realistic:
            img, pos, rot, tr = _micrograph_intensity(parts, rng, shape, box, pixel_size, n_per_micrograph,
                                                      voltage, cs, amplitude_contrast, (df1[i], df2[i], ang[i]),
                                                      phase_shift, particle_contrast, ice_sigma, ice_phase_sigma,
                                                      physics="realistic", thickness_angstrom=thickness_angstrom,
                                                      **kw)
        else:
            img, pos, rot = _micrograph_intensity(vft, rng, shape, box, pixel_size, n_per_micrograph, voltage,
                                                  cs, amplitude_contrast, (df1[i], df2[i], ang[i]), phase_shift,
                                                  particle_contrast, ice_sigma, ice_phase_sigma,
                                                  thickness_angstrom=thickness_angstrom)
            tr = None
        if det == "none":
            counts = rng.poisson(np.clip(img, 0, None) * exposure * pixel_size ** 2).astype(np.float32)
        else:
            counts = apply_detector(img, exposure, pixel_size, rng, det)
        mp = out / f"{stem}.mrc"
        write_mrc(mp, counts, pixel_size)
        cp = out / f"{stem}_coords.txt"
        phi, theta, psi = matrix_to_euler(rot)
        with open(cp, "w") as fh:
            fh.write("# x_px y_px psi theta phi (particle centres; pixel 0 = first pixel)\n")
            for (x, y), a, b, c in zip(pos, psi, theta, phi):
                fh.write(f"{x:.3f} {y:.3f} {a:.3f} {b:.3f} {c:.3f}\n")
        mics.append(mp)
        coords.append(cp)
        positions.append(pos)
        intens.append(img)
        row = {"micrograph": mp.name, "df1": float(df1[i]), "df2": float(df2[i]),
               "angast": float(ang[i]), "pshift": float(phase_shift), "n_particles": int(len(pos))}
        if tr is not None:
            np.savez_compressed(out / f"{stem}_truth.npz", positions_px=pos, rotations=rot,
                                df1=df1[i] + tr["particle_df"], df2=df2[i] + tr["particle_df"],
                                **{k: v for k, v in tr.items() if k != "ice_thickness"},
                                ice_thickness=tr["ice_thickness"].astype(np.float16))
            tr["positions_px"] = pos
            truths.append(tr)
            row.update({"tilt_axis": tilt_axis, "tilt_angle": tilt_angle, "ctf_bfactor": bf,
                        "mean_ice_thickness": float(tr["ice_thickness"].mean()),
                        "rejected_area_fraction": float(tr["reject_mask"].mean()),
                        "classes": np.bincount(tr["classes"], minlength=len(parts.vfts)).tolist(),
                        "truth_npz": f"{stem}_truth.npz"})
        table.append(row)
    truth = out / f"{name}_truth.json"
    info = {"what": "simulated micrographs (cistem-mpi simulate)", "physics": physics, "pixel_size": pixel_size,
            "voltage": voltage, "cs": cs, "amplitude_contrast": amplitude_contrast, "exposure_e_per_A2": exposure,
            "box": box, "seed": int(seed), "detector": det}
    if thickness_angstrom is not None and thickness_angstrom > 0:
        info["thickness_angstrom"] = float(thickness_angstrom)
    if realistic:
        info.update({"particle_radius_angstrom": parts.radius_angstrom.round(2).tolist(),
                     "class_fraction": parts.fraction.tolist(), "ice_thickness": ice_thickness,
                     "ice_gradient": ice_gradient, "carbon_fraction": carbon_fraction,
                     "contamination_blobs": contamination,
                     "conventions": "particle defocus = micrograph df + particle_df (Å; its height on the tilted "
                                    "plane + its height in the ice; higher = more underfocus)"})
    info["micrographs"] = table
    truth.write_text(json.dumps(info, indent=2))
    ctf = np.stack([df1, df2, ang, np.full(n_micrographs, phase_shift, np.float32)], axis=1)
    return SimulatedMicrographs(mics, coords, truth, positions, ctf, intens, truths)


@dataclass
class SimulatedMovies:
    """What :func:`simulate_movies` made."""

    movies: dict[str, list[Path]]  # format -> files
    gain: Path
    truth: Path
    drift_px: list[np.ndarray]
    ctf: np.ndarray
    positions: list[np.ndarray]


def simulate_movies(out_dir: str | Path, n_movies: int = 1, shape: tuple[int, int] = (512, 512),
                    n_frames: int = 20, exposure_per_frame: float = 1.5, pixel_size: float = 1.5,
                    box: int = 96, n_per_micrograph: int = 20, seed: int = 0,
                    formats: tuple[str, ...] = ("tiff", "mrc"), drift_total_px: float = 6.0,
                    gain_spread: float = 0.1, damage: bool = True, volume: np.ndarray | None = None,
                    voltage: float = 300.0, cs: float = 2.7, amplitude_contrast: float = 0.07,
                    defocus_mean: float = 15000.0, defocus_spread: float = 5000.0,
                    astigmatism: float = 500.0, particle_contrast: float = 0.15, ice_sigma: float = 0.01,
                    ice_phase_sigma: float = 0.05, eer_fractions_per_frame: int | None = None,
                    name: str = "movie", local_motion_px: float = 0.0,
                    drift_decay_frames: float = 4.0, jitter_px: float = 0.15) -> SimulatedMovies:
    """Movies: integer frames with known drift, per-frame exposure, and gain.

    Frame f shows the specimen moved by ``drift_px[f]`` (pixels, frame 0 at
    0); counts are Poisson with mean ``exposure_per_frame * pixel_size^2 *
    I / gain`` (so ``frame * gain`` is the gain-corrected frame) and, with
    ``damage``, the frame's accumulated exposure attenuates it (Grant &
    Grigorieff).  ``formats``: any of "tiff" (LZW), "mrc" (uint16, mode 6),
    "eer" (each frame split into ``eer_fractions_per_frame`` raw frames of
    0/1 counts -- EER cannot hold more -- and the sum of a frame's raw frames
    is the frame; by default enough raw frames that a pixel expects <= 0.02
    electrons in each, so that clipping at 1 loses < 1 % of the counts).  The gain
    reference is ``<name>_gain.mrc``; truth in ``<name>_truth.json`` and
    ``<name>_NNNN_truth.npz`` (drift, CTF, particle positions, noise-free
    intensity).

    Beam-induced motion: the drift rises as ``1 - exp(-f / drift_decay_frames)``
    (fastest in the first frames) plus ``jitter_px`` of random jitter; with
    ``local_motion_px > 0`` a smooth local deformation of at most that many
    pixels (:func:`cistem_mpi.kernels.simulate.local_deformation_params`)
    is added on top; its parameters are in the truth npz (``local_*``; evaluate
    with :func:`cistem_mpi.kernels.simulate.local_deformation`).
    """
    from cistem_mpi.io.movies import write_eer, write_mrc_movie, write_tiff_movie
    from cistem_mpi.kernels.simulate import local_deformation_params
    from cistem_mpi.io.mrc import write_mrc

    bad = set(formats) - {"tiff", "mrc", "eer"}
    if bad:
        raise ValueError(f"unknown movie formats {sorted(bad)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vol = builtin_map(box, pixel_size) if volume is None else np.asarray(volume, np.float32)
    vft = prepare_volume_ft(vol * sphere_mask(box, box / 2 - 2, 4))
    gain = gain_reference(shape, rng, gain_spread)
    gain_path = out / f"{name}_gain.mrc"
    write_mrc(gain_path, gain, pixel_size)
    df1, df2, ang = random_defocus(n_movies, rng, defocus_mean, defocus_spread, astigmatism)
    files: dict[str, list[Path]] = {f: [] for f in formats}
    drifts, positions, table = [], [], []
    for i in range(n_movies):
        img, pos, rot = _micrograph_intensity(vft, rng, shape, box, pixel_size, n_per_micrograph, voltage, cs,
                                              amplitude_contrast, (df1[i], df2[i], ang[i]), 0.0,
                                              particle_contrast, ice_sigma, ice_phase_sigma)
        drift = drift_trajectory(n_frames, rng, total_px=drift_total_px, decay_frames=drift_decay_frames,
                                 jitter_px=jitter_px)
        deform = (local_deformation_params(shape, n_frames, rng, amplitude_px=local_motion_px,
                                           decay_frames=drift_decay_frames) if local_motion_px > 0 else None)
        stem = f"{name}_{i + 1:04d}"
        if "tiff" in formats or "mrc" in formats:
            frames = simulate_movie_frames(img, drift, exposure_per_frame, pixel_size, rng, gain=gain,
                                           damage=damage, voltage=voltage, deformation=deform)
            if "tiff" in formats:
                p = out / f"{stem}.tif"
                write_tiff_movie(p, frames, compression="lzw")
                files["tiff"].append(p)
            if "mrc" in formats:
                p = out / f"{stem}.mrc"
                write_mrc_movie(p, frames, pixel_size, dtype=np.uint16)
                files["mrc"].append(p)
        if "eer" in formats:
            per_px = exposure_per_frame * pixel_size ** 2 * float(np.max(1.0 / gain)) * float(img.max())
            k = int(eer_fractions_per_frame or max(1, int(np.ceil(per_px / 0.02))))
            fine = simulate_movie_frames(img, np.repeat(drift, k, axis=0), exposure_per_frame / k, pixel_size,
                                         rng, gain=gain, damage=damage, voltage=voltage, deformation=deform,
                                         frame_times=np.repeat(np.arange(n_frames), k))
            # EER stores at most one electron per pixel per raw frame
            fine = np.minimum(fine, 1).astype(np.uint8)
            p = out / f"{stem}.eer"
            write_eer(p, fine, rng=rng, pixel_size=pixel_size)
            files["eer"].append(p)
        extra = {} if deform is None else {f"local_{key}": val for key, val in deform.items()}
        np.savez_compressed(out / f"{stem}_truth.npz", drift_px=drift, positions_px=pos, rotations=rot,
                            intensity=img, df1=df1[i], df2=df2[i], angast=ang[i], **extra)
        drifts.append(drift)
        positions.append(pos)
        table.append({"movie": stem, "df1": float(df1[i]), "df2": float(df2[i]), "angast": float(ang[i]),
                      "drift_px": drift.round(4).tolist()})
    truth = out / f"{name}_truth.json"
    truth.write_text(json.dumps({
        "what": "simulated movies (cistem-mpi simulate)", "pixel_size": pixel_size, "voltage": voltage,
        "cs": cs, "amplitude_contrast": amplitude_contrast, "n_frames": n_frames,
        "exposure_per_frame_e_per_A2": exposure_per_frame, "damage": damage,
        "eer_raw_frames_per_frame": k if "eer" in formats else None,
        "gain_reference": gain_path.name, "gain_convention": "corrected frame = raw frame * gain",
        "drift_convention": "frame f shows the specimen moved by +drift_px[f] (x, y) pixels; frame 0 at (0, 0)",
        "seed": int(seed), "movies": table}, indent=2))
    ctf = np.stack([df1, df2, ang], axis=1)
    return SimulatedMovies(files, gain_path, truth, drifts, ctf, positions)


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser, box: int, pixel: float) -> None:
    p.add_argument("--out", required=True, help="output directory (created)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--map", help="MRC map to simulate from (cube of --box at --pixel-size)")
    g.add_argument("--model", help="atomic model (PDB/mmCIF) to turn into a map (default: built-in PDB 8ZPM)")
    p.add_argument("--box", type=int, default=box, help=f"box size in pixels (default {box})")
    p.add_argument("--pixel-size", type=float, default=pixel, help=f"Å per pixel (default {pixel})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--voltage", type=float, default=300.0, help="kV (default 300)")
    p.add_argument("--cs", type=float, default=2.7, help="spherical aberration, mm (default 2.7)")
    p.add_argument("--amplitude-contrast", type=float, default=0.07, help="amplitude contrast (default 0.07)")
    p.add_argument("--defocus", type=float, default=15000.0, help="mean defocus, Å (default 15000)")
    p.add_argument("--defocus-spread", type=float, default=5000.0, help="defocus range +/-, Å (default 5000)")
    p.add_argument("--astigmatism", type=float, default=300.0, help="max (df1-df2)/2, Å (default 300)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``simulate particles|micrographs|movies|conformations``."""
    p = sub.add_parser("simulate", help="make ground-truth data (particles, micrographs, movies, two conformations)",
                       description=__doc__.split("\n\n")[0])
    ssub = p.add_subparsers(dest="what", metavar="<what>")
    ssub.required = True

    a = ssub.add_parser("particles", help="particle stack + .par/.star with known parameters")
    _common(a, 64, 2.5)
    a.add_argument("-n", "--n-particles", type=int, default=500)
    a.add_argument("--snr", type=float, default=0.1, help="signal/noise variance ratio (default 0.1)")
    a.add_argument("--phase-shift", type=float, default=0.0, help="phase-plate shift, radians")
    a.add_argument("--max-shift", type=float, default=5.0, help="shifts uniform in +/- this, Å (default 5)")
    a.add_argument("--ctf-bfactor", type=float, default=0.0, help="CTF envelope B, Å^2")
    a.set_defaults(func=run)

    c = ssub.add_parser("conformations", help="two conformations mixed in a known ratio (classification)")
    _common(c, 64, 2.5)
    c.add_argument("-n", "--n-particles", type=int, default=1000)
    c.add_argument("--snr", type=float, default=0.1)
    c.add_argument("--fraction", type=float, default=0.6, help="fraction of the first conformation (default 0.6)")
    c.add_argument("--change", choices=("remove", "move"), default="remove",
                   help="second conformation: a chain removed or moved (default remove)")
    c.add_argument("--max-shift", type=float, default=5.0)
    c.set_defaults(func=run)

    m = ssub.add_parser("micrographs", help="micrographs with particles at known positions")
    _common(m, 64, 2.5)
    m.add_argument("-n", "--n-micrographs", type=int, default=2)
    m.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("NY", "NX"))
    m.add_argument("--particles-per-micrograph", type=int, default=20)
    m.add_argument("--exposure", type=float, default=30.0, help="e/Å^2 (default 30)")
    m.add_argument("--physics", choices=("realistic", "simple"), default="realistic",
                   help="realistic: projected Coulomb potential in ice, CTF with envelope, counting detector, "
                        "Poisson noise (default); simple: the original weak-phase model with fixed contrast")
    m.add_argument("--ctf-bfactor", type=float, default=50.0, help="CTF envelope B, Å^2 (default 50)")
    m.add_argument("--tilt-axis", type=float, default=0.0, help="specimen tilt axis from x, degrees (default 0)")
    m.add_argument("--tilt-angle", type=float, default=0.0, help="specimen tilt, degrees (default 0)")
    m.add_argument("--ice-thickness", type=float, default=300.0, help="mean ice thickness, Å (default 300)")
    m.add_argument("--thickness", type=float, metavar="Å",
                   help="thick sample: the ice is a slab of this many Å, the CTF integrated over its height "
                        "(Thon-ring nodes, ctffind5's model; replaces --ice-thickness; default off)")
    m.add_argument("--ice-gradient", type=float, default=0.0,
                   help="ice-thickness change across the image, Å (default 0)")
    m.add_argument("--carbon-fraction", type=float, default=0.0,
                   help="fraction of the image on carbon (a hole edge; default 0 = none)")
    m.add_argument("--contamination", type=int, default=0, help="contamination balls per micrograph (default 0)")
    m.add_argument("--two-sizes", action="store_true",
                   help="built-in structure: mix 8-copy (~356 kDa) and 4-copy (~178 kDa) rings of 8ZPM")
    m.add_argument("--assembly-copies", type=int, default=8,
                   help="built-in structure, realistic model: copies of 8ZPM (~45 kDa) on a ring (default 8)")
    m.add_argument("--detector", choices=("counting", "ideal"), default="counting",
                   help="realistic model: counting camera (MTF = pixel sinc, DQE = MTF^2) or ideal")
    m.set_defaults(func=run)

    v = ssub.add_parser("movies", help="movies (TIFF LZW / MRC / EER) with known drift and gain")
    _common(v, 96, 1.5)
    v.add_argument("-n", "--n-movies", type=int, default=1)
    v.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("NY", "NX"))
    v.add_argument("--frames", type=int, default=20)
    v.add_argument("--exposure-per-frame", type=float, default=1.5, help="e/Å^2 per frame (default 1.5)")
    v.add_argument("--formats", nargs="+", choices=("tiff", "mrc", "eer"), default=["tiff", "mrc"])
    v.add_argument("--drift", type=float, default=6.0, help="total drift, pixels (default 6)")
    v.add_argument("--no-damage", action="store_true", help="no radiation damage between frames")
    v.add_argument("--local-motion", type=float, default=0.0, metavar="PX",
                   help="add a smooth local deformation of at most PX pixels on top of the drift (default 0)")
    v.add_argument("--particles-per-movie", type=int, default=20,
                   help="particles placed on each movie (default 20; fewer when they do not fit)")
    v.add_argument("--particle-contrast", type=float, default=0.15,
                   help="projected peak of a particle, weak-phase units (default 0.15; higher = higher SNR)")
    v.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``cistem-mpi simulate ...``; prints what was written."""
    if args.box < 8:
        raise InputError("--box", "box must be at least 8 pixels")
    if not args.pixel_size > 0:
        raise InputError("--pixel-size", "pixel size must be positive")
    for option in ("n_particles", "n_micrographs", "n_movies", "frames", "particles_per_micrograph",
                   "particles_per_movie"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            name = {"n_particles": "-n/--n-particles", "n_micrographs": "-n/--n-micrographs",
                    "n_movies": "-n/--n-movies"}.get(option, "--" + option.replace("_", "-"))
            raise InputError(name, f"must be at least 1, got {value}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a directory (--out names the output directory)")
    ctf = dict(voltage=args.voltage, cs=args.cs, amplitude_contrast=args.amplitude_contrast,
               defocus_mean=args.defocus, defocus_spread=args.defocus_spread, astigmatism=args.astigmatism)
    if args.what == "conformations":
        if args.map:
            raise InputError("--map", "conformations need an atomic model (a region is removed or moved)")
        atoms = None
        if args.model:
            from cistem_mpi.io.model import read_atoms

            atoms = read_atoms(args.model)
        if not 0.0 < args.fraction < 1.0:
            raise InputError("--fraction", "must be between 0 and 1")
        maps = (conformation_maps(args.box, args.pixel_size, args.change, atoms=atoms) if atoms is not None
                else None)
        r = simulate_conformations(args.out, args.n_particles, args.box, args.pixel_size, args.snr, args.seed,
                                   args.fraction, args.change, maps=maps, max_shift=args.max_shift, **ctf)
        print(f"wrote {r.stack} ({args.n_particles} particles, classes {np.bincount(r.classes).tolist()}), "
              f"{r.par}, {r.cistem_star}, {r.relion_star}, maps and truth in {Path(args.out)}")
        return 0
    vol = load_structure(args.map, args.model, args.box, args.pixel_size)
    if args.what == "particles":
        if args.snr <= 0:
            raise InputError("--snr", "must be positive")
        r = simulate_particles(args.out, args.n_particles, args.box, args.pixel_size, args.snr, args.seed, vol,
                               phase_shift=args.phase_shift, max_shift=args.max_shift,
                               ctf_bfactor=args.ctf_bfactor, **ctf)
        print(f"wrote {r.stack} ({args.n_particles} particles), {r.par}, {r.cistem_star}, {r.relion_star}, "
              f"{r.map}, {r.truth}")
    elif args.what == "micrographs":
        real = getattr(args, "physics", "simple") == "realistic"
        extra = {}
        if real:
            for opt, val, ok in (("--exposure", args.exposure, args.exposure > 0),
                                 ("--ice-thickness", args.ice_thickness, args.ice_thickness > 0),
                                 ("--carbon-fraction", args.carbon_fraction, 0 <= args.carbon_fraction < 0.9),
                                 ("--contamination", args.contamination, args.contamination >= 0),
                                 ("--ctf-bfactor", args.ctf_bfactor, args.ctf_bfactor >= 0),
                                 ("--tilt-angle", args.tilt_angle, abs(args.tilt_angle) < 80),
                                 ("--assembly-copies", args.assembly_copies, args.assembly_copies >= 1)):
                if not ok:
                    raise InputError(opt, f"value {val} out of range")
            extra = dict(physics="realistic", ctf_bfactor=args.ctf_bfactor, tilt_axis=args.tilt_axis,
                         tilt_angle=args.tilt_angle, ice_thickness=args.ice_thickness,
                         ice_gradient=args.ice_gradient, carbon_fraction=args.carbon_fraction,
                         contamination=args.contamination, two_sizes=args.two_sizes,
                         assembly_copies=args.assembly_copies, detector=args.detector)
            if not (args.map or args.model):
                vol = None  # the built-in assembly (8ZPM alone is ~45 kDa, too small to see)
        if args.thickness is not None:
            if not (args.thickness > 0 and np.isfinite(args.thickness)):
                raise InputError("--thickness", f"must be a positive number of Å, got {args.thickness}")
            extra["thickness_angstrom"] = float(args.thickness)
        r = simulate_micrographs(args.out, args.n_micrographs, tuple(args.size), args.particles_per_micrograph,
                                 args.box, args.pixel_size, args.exposure, args.seed, vol, **ctf, **extra)
        print(f"wrote {len(r.micrographs)} micrographs, coordinates and {r.truth}")
    else:
        r = simulate_movies(args.out, args.n_movies, tuple(args.size), args.frames, args.exposure_per_frame,
                            args.pixel_size, args.box, seed=args.seed, formats=tuple(args.formats),
                            drift_total_px=args.drift, damage=not args.no_damage, volume=vol,
                            local_motion_px=args.local_motion, n_per_micrograph=args.particles_per_movie,
                            particle_contrast=args.particle_contrast, **ctf)
        n = sum(len(v) for v in r.movies.values())
        print(f"wrote {n} movie files ({', '.join(r.movies)}), gain {r.gain}, truth {r.truth}")
    return 0

"""Reconstruct a parameter set into a volume, half maps, FSC and a sharpened map, and register it.

The job step that ``reconstruct``, ``refine`` and ``ab-initio`` share (driver
machinery, not a command): :func:`reconstruct_particles` runs on every rank,
:func:`write_volume_assets` writes and registers the maps on rank 0, and
:func:`load_refinement` reads a refinement's stack, classes and parameters
from the project.

Parallel layout (SPEC §1): rank 0 hands out chunks of particles; every rank
that inserts keeps its own padded accumulators (two half sets); the
accumulators are summed by reduce-scatter along z so each rank holds and
normalises one slab; small per-shell sums are all-reduced to estimate the
FSC and the Wiener regulariser; rank 0 gathers the normalised slabs, inverse
transforms, writes the maps and registers them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cistem_mpi.db import naming
from cistem_mpi.db import packages as packages_db
from cistem_mpi.drivers.jobrun import JobContext
from cistem_mpi.drivers import node_reconstruction
from cistem_mpi.drivers.runtime import World, gather_z, map_chunks, reduce_scatter_z
from cistem_mpi.drivers.runtime.shared import memory_mode, node_of
from cistem_mpi.errors import InputError
from cistem_mpi.io.params import Optics, ParticleSet
from cistem_mpi.kernels import backprojection as bp
from cistem_mpi.kernels import reconstruct3d as r3
from cistem_mpi.kernels import reconstruction as rec
from cistem_mpi.kernels import whitening as wh
from cistem_mpi.kernels.reconstruct3d import WIENER_ITERATIONS
from cistem_mpi.kernels.projection import padded_size
from cistem_mpi.kernels.symmetry import symmetry_matrices

__all__ = ["WIENER_ITERATIONS", "ReconstructionSettings", "Reconstruction", "reconstruct_particles",
           "half_sets_of", "volume_set_bytes", "write_volume_assets", "settings_from_args", "load_refinement"]



@dataclass
class ReconstructionSettings:
    """How to reconstruct (the job's options, shared by reconstruct and refine)."""

    symmetry: str = "C1"
    padding: float = 2.0
    interpolation: str = "linear"  # trilinear insertion (the kernel's reconstruct mode)
    resolution_limit: float = 0.0  # Å; 0 = Nyquist
    mask_radius: float = 0.0  # Å; outer mask of the written maps and the masked FSC; 0 = no mask
    score_weighting: float = 0.0  # Frealign score -> B-factor conversion; 0 = off
    bfactor: float | None = None  # None = automatic (Guinier)
    chunk_size: int | None = None
    #: Multiplies the full map's Wiener term: ``D / (W + nominator <W>_s / SSNR(s))`` per voxel (cisTEM's
    #: ``CTF^2 + nominator / SSNR``, ab initio's falling nominator); 1 = the plain Wiener filter. Half maps unaffected.
    wiener_nominator: float = 1.0
    #: Whiten the particles by the data set's noise spectrum (measured outside the mask) before insertion and
    #: scale each to unit background noise (cisTEM's "Normalize particles", on in reconstruct3d and refine).
    whiten: bool = True
    #: Also write the maps before the outer mask (``*_unmasked.mrc``).
    keep_unmasked: bool = False


@dataclass
class Reconstruction(r3.ReconstructedMaps):
    """Result on rank 0 (None on the other ranks): the maps and curves, and what the job adds."""

    n_particles: int
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- the kernel job
def reconstruct_particles(
    world: World,
    stack_path: str,
    particles: ParticleSet | None,
    settings: ReconstructionSettings,
    progress=None,
    invert: bool = False,
    log: logging.Logger | None = None,
) -> Reconstruction | None:
    """Reconstruct one class from a particle stack on every rank of ``world``.

    Parameters
    ----------
    world : World
        All ranks call this (SPMD).
    stack_path : str
        The particle stack (every rank reads the images it is given).
    particles : ParticleSet or None
        Parameters (rank 0; ignored elsewhere).  Particles with negative FILM
        or zero occupancy are left out.
    settings : ReconstructionSettings
    progress : callable, optional
        ``progress(done, total)`` on rank 0.
    invert : bool
        The stack is stored protein white (RELION's convention): images are
        negated when read (rank 0's value is used).
    log : logging.Logger, optional
        Rank 0 logs the accumulation mode there.

    Returns
    -------
    Reconstruction on rank 0, None elsewhere; ``extra["accumulation"]`` says
    whether the ranks of a node shared one set of accumulators
    (:mod:`~cistem_mpi.drivers.node_reconstruction`) or each had its own.
    """
    plan = None
    if world.is_controller:
        assert particles is not None
        plan = _plan(stack_path, particles, settings)
        plan["invert"] = bool(invert)
    plan = world.bcast(plan)
    n, p = plan["box"], plan["padded"]
    params = plan["params"]
    node = node_of(world)
    batch = node_reconstruction.batch_size(n, settings.chunk_size)
    mode, why = memory_mode(world, node, node_reconstruction.window_bytes(n, p, node.size, batch))
    if log is not None and world.is_controller:
        log.info("accumulation: %s (%s)", mode, why)
    if mode == "shared":
        def finish(g1: np.ndarray, g2: np.ndarray, gf: np.ndarray, fsc: np.ndarray) -> Reconstruction:
            return _finish(plan, settings, g1, g2, gf, fourier_fsc=fsc)

        result = node_reconstruction.accumulate_and_normalise(world, node, plan, settings, progress,
                                                              insertion_radius(plan, settings), finish)
        if result is not None:
            result.extra["accumulation"] = mode
        return result
    d1, w1 = bp.new_accumulators(p)
    d2, w2 = bp.new_accumulators(p)
    worker = _Inserter(plan, settings, (d1, w1, d2, w2))
    # static hand-out: each rank inserts the same particles in the same order in every run, so the
    # per-rank float32 sums, and their reduction over ranks, are bit-identical run to run
    map_chunks(world, len(params), worker, chunk_size=settings.chunk_size, min_chunk=8, max_chunk=64,
               progress=progress, keep=False, static=True)
    worker.close()
    # Sum over ranks; each rank keeps its z-slab of the sum (memory: accumulators + one slab).
    # Each accumulator is dropped as soon as its slab exists, so the peak stays near one set.
    acc = [d1, w1, d2, w2]
    del d1, w1, d2, w2
    slabs = []
    for i in range(4):
        slabs.append(reduce_scatter_z(world, acc[i]))
        acc[i] = None
    z0 = slabs[0].z0
    s_d1, s_w1, s_d2, s_w2 = (s.data for s in slabs)
    shells = n // 2 + 1
    reg_half = np.zeros(shells)
    reg_full = np.zeros(shells)
    fsc = np.zeros(shells)
    for it in range(WIENER_ITERATIONS + 1):
        sums = world.allreduce_sum(rec.slab_shell_sums(s_d1, s_w1, s_d2, s_w2, z0, p, n, reg_half, reg_half))
        if it == 0:  # flat start: SSNR 1 in every shell
            count = np.maximum(sums[5], 1.0)
            reg_half = 0.5 * (sums[3] + sums[4]) / count
            continue
        fsc = rec.fsc_from_sums(sums)
        reg_half, reg_full = rec.wiener_regularisers(sums, fsc)
    reg_full = reg_full * float(settings.wiener_nominator)
    full_shape = slabs[0].full_shape
    del slabs
    g1 = gather_z(world, rec.normalise_slab(s_d1, s_w1, z0, p, n, reg_half), full_shape)
    g2 = gather_z(world, rec.normalise_slab(s_d2, s_w2, z0, p, n, reg_half), full_shape)
    s_d1 += s_d2  # the full map's sums, in place: no more copies of the slab
    s_w1 += s_w2
    del s_d2, s_w2
    # in place: the summed slab is not needed after its normalisation (a padded-size array less on every rank)
    gf = gather_z(world, rec.normalise_slab(s_d1, s_w1, z0, p, n, reg_full, out=s_d1), full_shape)
    del s_d1, s_w1
    if not world.is_controller:
        return None
    result = _finish(plan, settings, g1, g2, gf, fourier_fsc=fsc)
    result.extra["accumulation"] = mode
    return result


def insertion_radius(plan: dict[str, Any], settings: ReconstructionSettings) -> float:
    """Frequencies inserted, in Fourier pixels of the box: Nyquist, or the resolution limit."""
    n, ps = plan["box"], plan["pixel_size"]
    return n // 2 if not settings.resolution_limit else min(n // 2, n * ps / settings.resolution_limit)


def _plan(stack_path: str, particles: ParticleSet, settings: ReconstructionSettings) -> dict[str, Any]:
    """Check inputs and decide what to insert (rank 0)."""
    from cistem_mpi.io.mrc import open_stack

    params = particles.params
    keep = (params["film"] >= 0) & (params["occ"] > 0)
    if not keep.any():
        raise InputError(stack_path, "no particles left to reconstruct (all excluded: negative FILM or zero occupancy)")
    pixel_sizes = particles.pixel_sizes()
    pixel_size = float(pixel_sizes[0])
    if np.abs(pixel_sizes - pixel_size).max() > 1e-3:
        raise InputError(stack_path, "particles have different pixel sizes; reconstruct each optics group alone")
    with open_stack(stack_path, pixel_size=pixel_size) as stack:
        count, ny, nx = stack.shape
    if nx != ny:
        raise InputError(stack_path, f"particle images must be square, got {nx}x{ny}")
    pos = params["position"][keep]
    if pos.min() < 1 or pos.max() > count:
        bad = int(pos[(pos < 1) | (pos > count)][0])
        raise InputError(stack_path, f"parameters refer to particle {bad}, but the stack has {count}")
    for name in ("psi", "theta", "phi", "shx", "shy", "df1", "df2", "angast", "occ"):
        if not np.isfinite(params[name][keep]).all():
            raise InputError(stack_path, f"parameter column {name.upper()} contains NaN or infinite values")
    optics = particles.optics[0]
    order = np.argsort(params["position"][keep], kind="stable")  # stack order: sequential reads
    sel = params[keep][order]
    half = half_sets_of(particles, keep, order, stack_path)
    symmetry_matrices(settings.symmetry)  # validates the symbol
    whitening = None
    if settings.whiten:
        spectrum = _noise_spectrum(stack_path, pixel_size, sel["position"], settings.mask_radius, int(nx))
        whitening = wh.whitening_filter(spectrum, int(nx))
    return {
        "stack": str(stack_path), "box": int(nx), "padded": padded_size(nx, settings.padding),
        "pixel_size": pixel_size, "optics": optics, "params": sel,
        "half": half,
        "score_b": rec.score_bfactors(sel["score"], settings.score_weighting),
        # (N, N//2+1) float32 or None: every rank multiplies its particles by it (prepare_slices(whitening=))
        "whitening": whitening,
    }


def _noise_spectrum(stack_path: str, pixel_size: float, positions: np.ndarray, mask_radius: float,
                    box: int) -> np.ndarray:
    """The data set's noise power spectrum outside the mask, from up to 2,000 particles (rank 0).

    One spectrum for all particles, as cisTEM's reconstruct3d: an evenly spread sample (the same in every
    run, so reruns give the same map), read in stack order, in chunks to bound the memory.
    """
    from cistem_mpi.io.mrc import open_stack

    pos = np.sort(np.asarray(positions)[wh.sample_positions(len(positions))])
    radius = wh.noise_mask_radius(mask_radius, pixel_size, box)
    total = None
    with open_stack(stack_path, pixel_size=pixel_size) as stack:
        for i in range(0, len(pos), 256):
            part = pos[i:i + 256]
            p = wh.noise_power_spectrum(stack[part - 1], radius, wh.MASK_FALLOFF / pixel_size) * len(part)
            total = p if total is None else total + p
    assert total is not None
    return total / len(pos)


def half_sets_of(particles: ParticleSet, keep: np.ndarray, order: np.ndarray, where: str) -> np.ndarray:
    """Half set (1 or 2) of each inserted particle.

    A split stored with the particles (``extra["half_set"]``, e.g. by
    micrograph for a package cut from positions, so that duplicate picks
    cannot correlate the half maps) is used as it is; otherwise the fixed
    hash of the stack position (:func:`~cistem_mpi.kernels.reconstruction.half_sets`).
    """
    stored = particles.extra.get("half_set") if particles.extra else None
    if stored is None:
        return rec.half_sets(particles.params["position"][keep][order])
    half = np.asarray(stored).astype(np.int8).ravel()
    if len(half) != len(particles.params):
        raise InputError(where, f"stored half sets have {len(half)} rows for {len(particles.params)} particles")
    half = half[keep][order]
    if not np.isin(half, (1, 2)).all() or np.unique(half).size < 2:
        raise InputError(where, "stored half sets must be 1 or 2 and both halves must hold particles")
    return half


class _Inserter:
    """Chunk function of the task queue: read, centre, CTF-weight and insert particles."""

    def __init__(self, plan: dict[str, Any], settings: ReconstructionSettings, acc: tuple[np.ndarray, ...]):
        self.plan = plan
        self.settings = settings
        self.acc = acc
        self.stack = None
        self.sym = symmetry_matrices(settings.symmetry)
        self.max_radius = insertion_radius(plan, settings)

    def __call__(self, start: int, stop: int, _data: Any) -> list[int]:
        if self.stack is None:
            self.stack = node_reconstruction.open_plan_stack(self.plan)
        s = node_reconstruction.prepared_batch(self.stack, self.plan, np.arange(start, stop))
        r3.insert_prepared(self.acc, s, self.sym, method=self.settings.interpolation, max_radius=self.max_radius)
        return [1] * (stop - start)

    def close(self) -> None:
        """Close the stack and let go of the accumulators (the caller owns them)."""
        if self.stack is not None:
            self.stack.close()
            self.stack = None
        self.acc = ()


def _finish(plan: dict[str, Any], settings: ReconstructionSettings, g1: np.ndarray, g2: np.ndarray,
            gf: np.ndarray, fourier_fsc: np.ndarray) -> Reconstruction:
    """Inverse transforms, FSC, resolution and sharpening (rank 0)."""
    m = r3.finish_maps(g1, g2, gf, plan["box"], plan["pixel_size"], settings.interpolation, settings.mask_radius,
                       settings.bfactor, keep_unmasked=settings.keep_unmasked,
                       overwrite_input=True)  # the gathered (or node-shared) transforms are used once
    return Reconstruction(
        volume=m.volume, half1=m.half1, half2=m.half2, sharpened=m.sharpened, frequency=m.frequency, fsc=m.fsc,
        fsc_unmasked=m.fsc_unmasked, resolution=m.resolution, bfactor=m.bfactor, n_particles=len(plan["params"]),
        extra={"fourier_fsc": fourier_fsc}, unmasked=m.unmasked,
    )


# -------------------------------------------------------------- writing assets
def volume_set_bytes(box: int) -> int:
    """Bytes one registered volume takes on disk: map, two half maps, sharpened map, orth views, pictures."""
    return 4 * (4 * box ** 3 + 6 * box * box) + 4 * 1024 + 2_000_000


def write_volume_assets(ctx: JobContext, result: Reconstruction, file_name: str, display_name: str,
                        pixel_size: float, new_name_if_taken: bool = False, **fields: Any) -> tuple[str, str]:
    """Write the maps, orth views and FSC picture; register the volume (rank 0).

    Parameters
    ----------
    ctx : JobContext
        The job (rank 0); the files are staged and registered with its rows.
    result : Reconstruction
    file_name, display_name : str
        The volume's names, e.g. ``volume_9_1.mrc`` and ``Local #9 (Rnd. 1) - Class #1``.
    pixel_size : float
        Å per voxel.
    new_name_if_taken : bool
        When the project already has a volume of this name: False (refine,
        ab-initio, whose runs are new) refuses with an :class:`InputError`;
        True (``reconstruct`` again on a refinement) registers a new volume
        under the next free name (:func:`~cistem_mpi.db.naming.next_free_volume_name`,
        ``volume_9_1_2.mrc`` / ``... #2``) and leaves the old one alone.
    **fields
        Further columns of the ``volumes`` row.

    Returns
    -------
    (file name, display name)
        The names registered.
    """
    from cistem_mpi.io.mrc import write_mrc
    from cistem_mpi.io.plots import save_fsc_png, save_image_png
    from cistem_mpi.kernels.orth_views import orth_views

    assert ctx.project is not None
    if new_name_if_taken:
        # chosen here, just before staging, so the name is read from the database as late as possible
        file_name, display_name = naming.next_free_volume_name(ctx.project.conn, file_name, display_name)
    root = ctx.project.root
    vol_dir = root / naming.ASSET_DIRS["volumes"]
    orth_dir = root / naming.ASSET_DIRS["orth_views"]
    stem = Path(file_name).stem
    paths = {
        "path": vol_dir / file_name,
        "half_map_1": vol_dir / f"{stem}_half1.mrc",
        "half_map_2": vol_dir / f"{stem}_half2.mrc",
        "orth_view": orth_dir / file_name,
    }
    if naming.asset_path_taken(ctx.project.conn, "volumes", ctx.project.store_path(paths["path"])):
        raise InputError(vol_dir / file_name, "a volume of this name already exists in the project")
    for name, data in (("volume", result.volume), ("half map 1", result.half1), ("half map 2", result.half2),
                       ("sharpened map", result.sharpened)):
        if not np.isfinite(data).all():  # never register a non-finite result (a NaN input slipped through)
            raise RuntimeError(f"{display_name}: the {name} contains NaN or infinite values; nothing registered")
    if not np.isfinite(result.resolution):
        raise RuntimeError(f"{display_name}: the resolution is not finite; nothing registered")
    vol_dir.mkdir(parents=True, exist_ok=True)
    orth_dir.mkdir(parents=True, exist_ok=True)
    # every file under a job-private staged name, renamed to its asset name after the commit
    write_mrc(ctx.stage(paths["path"]), result.volume, pixel_size)
    write_mrc(ctx.stage(paths["half_map_1"]), result.half1, pixel_size)
    write_mrc(ctx.stage(paths["half_map_2"]), result.half2, pixel_size)
    write_mrc(ctx.stage(vol_dir / f"{stem}_sharpened.mrc"), result.sharpened, pixel_size)
    for key, suffix in (("volume", ""), ("half1", "_half1"), ("half2", "_half2")):
        if result.unmasked is not None:  # only on request (--keep-unmasked): the maps before the outer mask
            write_mrc(ctx.stage(vol_dir / f"{stem}{suffix}_unmasked.mrc"), result.unmasked[key], pixel_size)
    ov = orth_views(result.volume)
    write_mrc(ctx.stage(paths["orth_view"]), ov, pixel_size)
    save_image_png(ctx.stage(orth_dir / f"{stem}.png"), ov,
                   f"{display_name}: sections (top), projections (bottom)")
    curves = {"half maps" + (" (masked)" if result.fsc is not result.fsc_unmasked else ""): result.fsc}
    if result.fsc is not result.fsc_unmasked:
        curves["half maps (unmasked)"] = result.fsc_unmasked
    save_fsc_png(ctx.stage(orth_dir / f"{stem}_fsc.png"), result.frequency, curves, pixel_size,
                 title=f"{display_name}: {result.resolution:.2f} Å at FSC 0.143")
    fsc_json = json.dumps({"frequency": [round(float(x), 6) for x in result.frequency],
                           "fsc": [round(float(x), 5) for x in result.fsc],
                           "fsc_unmasked": [round(float(x), 5) for x in result.fsc_unmasked]})
    ctx.register("volumes", display_name=display_name, box=int(result.volume.shape[0]), pixel_size=pixel_size,
                 resolution=float(result.resolution), fsc=fsc_json, **paths, **fields)
    ctx.log.info("%s: %d particles, %.2f Å at FSC 0.143, B %.0f Å² -> %s", display_name, result.n_particles,
                 result.resolution, result.bfactor, paths["path"])
    return file_name, display_name


def settings_from_args(a: dict[str, Any], symmetry: str) -> ReconstructionSettings:
    """Reconstruction settings from the command line."""
    bf = a.get("bfactor", "auto")
    try:
        bfactor = None if bf in (None, "auto") else float(bf)
    except ValueError as exc:
        raise InputError("--bfactor", f"expected a number or 'auto', got {bf!r}") from exc
    return ReconstructionSettings(
        symmetry=symmetry, padding=a.get("padding", 2.0),
        resolution_limit=a.get("resolution_limit", 0.0) or 0.0, mask_radius=a.get("mask_radius", 0.0) or 0.0,
        score_weighting=a.get("score_weighting", 0.0) or 0.0, bfactor=bfactor,
        # commands without the options (refine, ab-initio) reconstruct as cisTEM's refine does: whitened
        whiten=bool(a.get("whiten", True)), keep_unmasked=bool(a.get("keep_unmasked", False)),
    )


def load_refinement(ctx: JobContext, run: int | None) -> dict[str, Any]:
    """A refinement's stack, classes and parameters from the project (rank 0).

    ``half_sets`` holds, per class, the half-set column stored with the
    parameters (None where a file has none).
    """
    from cistem_mpi.io.param_store import read_params_column, read_params_h5

    assert ctx.project is not None
    conn = ctx.project.conn
    if run is None:
        run = packages_db.newest_refinement_id(conn)
        if run is None:
            raise InputError(ctx.project.root, "no refinement in the project yet (import particles first)")
    ref = packages_db.refinement_by_id(conn, run)
    if ref is None:
        raise InputError("--refinement", f"no refinement #{run} in the project")
    pkg = packages_db.package_by_id(conn, ref["package_id"])
    stack = packages_db.stack_by_id(conn, pkg["stack_id"])
    classes, halves = [], []
    for c in packages_db.refinement_class_rows(conn, run):
        path = ctx.project.resolve(c["params_path"])
        classes.append((int(c["class_number"]), read_params_h5(path)))
        halves.append(read_params_column(path, "half_set"))
    optics = Optics(pixel_size=float(stack["pixel_size"]), voltage=float(stack["voltage"]), cs=float(stack["cs"]),
                    amplitude_contrast=float(stack["amplitude_contrast"]))
    white = bool(stack["protein_is_white"]) if "protein_is_white" in stack.keys() else False
    return {"run": run, "refinement": ref, "package": pkg, "stack_path": str(ctx.project.resolve(stack["path"])),
            "optics": optics, "classes": classes, "half_sets": halves, "protein_is_white": white}

"""``cistem-mpi reconstruct``: particles + parameters -> volume, half maps, FSC (cisTEM's reconstruct3d).

Parallel layout (SPEC §1): rank 0 hands out chunks of particles; every rank
that inserts keeps its own padded accumulators (two half sets); the
accumulators are summed by reduce-scatter along z so each rank holds and
normalises one slab; small per-shell sums are all-reduced to estimate the
FSC and the Wiener regulariser; rank 0 gathers the normalised slabs, inverse
transforms, writes the maps and registers them.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cistem_mpi.db import naming
from cistem_mpi.drivers.jobrun import JobContext, add_job_arguments, check_options, run_job
from cistem_mpi.drivers.runtime import World, gather_z, map_chunks, reduce_scatter_z
from cistem_mpi.errors import InputError, check_free_space
from cistem_mpi.io.params import Optics, ParticleSet
from cistem_mpi.kernels import backprojection as bp
from cistem_mpi.kernels import reconstruction as rec
from cistem_mpi.kernels.ctf import ctf_2d_stack
from cistem_mpi.kernels.euler import rotation_matrix
from cistem_mpi.kernels.fft import ft2
from cistem_mpi.kernels.fsc import fsc as fsc_maps
from cistem_mpi.kernels.fsc import resolution_at
from cistem_mpi.kernels.masks import sphere_mask
from cistem_mpi.kernels.projection import padded_size
from cistem_mpi.kernels.shifts import phase_shift
from cistem_mpi.kernels.symmetry import symmetry_matrices

#: Rounds of FSC -> regulariser -> FSC before the final normalisation.
WIENER_ITERATIONS = 3


@dataclass
class ReconstructionSettings:
    """How to reconstruct (the job's options, shared by reconstruct and refine)."""

    symmetry: str = "C1"
    padding: float = 2.0
    interpolation: str = "linear"  # trilinear insertion (the kernel's reconstruct mode)
    resolution_limit: float = 0.0  # Å; 0 = Nyquist
    mask_radius: float = 0.0  # Å; 0 = no mask for the reported FSC
    score_weighting: float = 0.0  # Frealign score -> B-factor conversion; 0 = off
    bfactor: float | None = None  # None = automatic (Guinier)
    chunk_size: int | None = None
    #: Multiplies the full map's Wiener term: ``D / (W + nominator <W>_s / SSNR(s))`` per voxel (cisTEM's
    #: ``CTF^2 + nominator / SSNR``, ab initio's falling nominator); 1 = the plain Wiener filter. Half maps unaffected.
    wiener_nominator: float = 1.0


@dataclass
class Reconstruction:
    """Result on rank 0 (None on the other ranks)."""

    volume: np.ndarray
    half1: np.ndarray
    half2: np.ndarray
    sharpened: np.ndarray
    frequency: np.ndarray  # 1/Å per shell
    fsc: np.ndarray  # half-map FSC (masked if a mask radius was given)
    fsc_unmasked: np.ndarray
    resolution: float  # Å at FSC = 0.143
    bfactor: float
    n_particles: int
    extra: dict[str, Any] = field(default_factory=dict)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``reconstruct`` command."""
    p = sub.add_parser("reconstruct", help="3D reconstruction with half maps, FSC, resolution, sharpened map")
    add_job_arguments(p)
    p.add_argument("--refinement", type=int, help="refinement run number in the project (default: the newest)")
    p.add_argument("--stack", help="particle stack (instead of a refinement in the project)")
    p.add_argument("--params", help=".par or .star parameters for --stack")
    p.add_argument("--pixel-size", type=float, help="Å per pixel (for --stack with a .par)")
    p.add_argument("--voltage", type=float, default=300.0)
    p.add_argument("--cs", type=float, default=2.7)
    p.add_argument("--amplitude-contrast", type=float, default=0.07)
    p.add_argument("--symmetry", help="point group, e.g. C1, C4, D2, T, O, I (default: the package's)")
    p.add_argument("--mask-radius", type=float, default=0.0, help="soft spherical mask radius for the FSC (Å)")
    p.add_argument("--resolution-limit", type=float, default=0.0, help="insert data up to this resolution (Å)")
    p.add_argument("--bfactor", default="auto", help="sharpening B-factor in Å² ('auto': Guinier fit)")
    p.add_argument("--score-weighting", type=float, default=0.0,
                   help="Frealign score-to-B-factor conversion (0: all particles weigh the same)")
    p.add_argument("--padding", type=float, default=2.0)
    from cistem_mpi.drivers.import_assets import add_contrast_arguments

    add_contrast_arguments(p)
    p.set_defaults(func=lambda a: run_job(_checked(a), "reconstruct", _job))


def _checked(a: argparse.Namespace) -> argparse.Namespace:
    """Every option checked before the job record exists (exit 2, nothing recorded)."""
    check_options(a, symmetry=("symmetry",), non_negative=("mask_radius", "resolution_limit", "score_weighting"),
                  positive=("pixel_size", "voltage"), at_least_one=("padding",))
    settings_from_args(vars(a), "C1")  # --bfactor
    return a


# ---------------------------------------------------------------- the kernel job
def reconstruct_particles(
    world: World,
    stack_path: str,
    particles: ParticleSet | None,
    settings: ReconstructionSettings,
    progress=None,
    invert: bool = False,
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

    Returns
    -------
    Reconstruction on rank 0, None elsewhere.
    """
    plan = None
    if world.is_controller:
        assert particles is not None
        plan = _plan(stack_path, particles, settings)
        plan["invert"] = bool(invert)
    plan = world.bcast(plan)
    n, p = plan["box"], plan["padded"]
    params = plan["params"]
    d1, w1 = bp.new_accumulators(p)
    d2, w2 = bp.new_accumulators(p)
    worker = _Inserter(plan, settings, (d1, w1, d2, w2))
    # static hand-out: each rank inserts the same particles in the same order in every run, so the
    # per-rank float32 sums, and their reduction over ranks, are bit-identical run to run
    map_chunks(world, len(params), worker, chunk_size=settings.chunk_size, min_chunk=8, max_chunk=256,
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
    gf = gather_z(world, rec.normalise_slab(s_d1, s_w1, z0, p, n, reg_full), full_shape)
    del s_d1, s_w1
    if not world.is_controller:
        return None
    return _finish(plan, settings, g1, g2, gf, fourier_fsc=fsc)


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
    half = _half_sets_of(particles, keep, order, stack_path)
    symmetry_matrices(settings.symmetry)  # validates the symbol
    return {
        "stack": str(stack_path), "box": int(nx), "padded": padded_size(nx, settings.padding),
        "pixel_size": pixel_size, "optics": optics, "params": sel,
        "half": half,
        "score_b": rec.score_bfactors(sel["score"], settings.score_weighting),
    }


def _half_sets_of(particles: ParticleSet, keep: np.ndarray, order: np.ndarray, where: str) -> np.ndarray:
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
        n = plan["box"]
        ps = plan["pixel_size"]
        self.max_radius = n // 2 if not settings.resolution_limit else min(n // 2, n * ps / settings.resolution_limit)
        fy = np.fft.fftfreq(n)[:, None]
        fx = np.fft.rfftfreq(n)[None, :]
        self.s2 = ((fy ** 2 + fx ** 2) / ps ** 2).astype(np.float32)  # (1/Å)^2 on the half grid

    def __call__(self, start: int, stop: int, _data: Any) -> list[int]:
        from cistem_mpi.io.mrc import check_finite, open_stack

        plan = self.plan
        if self.stack is None:
            self.stack = open_stack(plan["stack"], pixel_size=plan["pixel_size"], invert=plan.get("invert", False))
        rows = plan["params"][start:stop]
        o: Optics = plan["optics"]
        ps = plan["pixel_size"]
        imgs = self.stack[rows["position"] - 1]
        check_finite(imgs, plan["stack"], rows["position"])  # one NaN pixel would make the whole map NaN
        imgs = imgs - imgs.mean(axis=(1, 2), keepdims=True)
        sd = imgs.std(axis=(1, 2), keepdims=True)
        imgs = imgs / np.where(sd > 0, sd, 1.0)
        f = phase_shift(ft2(imgs.astype(np.float32)), -rows["shx"] / ps, -rows["shy"] / ps)
        ctf = ctf_2d_stack(plan["box"], ps, o.voltage, o.cs, o.amplitude_contrast,
                           rows["df1"], rows["df2"], rows["angast"], rows["pshift"])
        score_b = plan["score_b"][start:stop]
        if np.any(score_b != 0):  # per-particle B: weight sqrt(w) on both c and F gives w*c*F and w*c^2
            root_w = np.exp(-score_b[:, None, None] * self.s2[None] / 8.0).astype(np.float32)
            ctf = ctf * root_w
            f = f * root_w
        rot = rotation_matrix(rows["phi"], rows["theta"], rows["psi"]).reshape(-1, 3, 3)
        occ = (rows["occ"] / 100.0).astype(np.float32)
        half = plan["half"][start:stop]
        d1, w1, d2, w2 = self.acc
        for h, (d, w) in ((1, (d1, w1)), (2, (d2, w2))):
            m = half == h
            if not m.any():
                continue
            for s in self.sym:  # each symmetry copy: insert at S @ R
                bp.insert_slices(d, w, f[m], s[None] @ rot[m], ctf=ctf[m], image_weights=occ[m],
                                 method=self.settings.interpolation, max_radius=self.max_radius)
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
    n, ps = plan["box"], plan["pixel_size"]
    half1 = bp.ft_to_volume(g1, n, settings.interpolation)
    half2 = bp.ft_to_volume(g2, n, settings.interpolation)
    volume = bp.ft_to_volume(gf, n, settings.interpolation)
    freq, fsc_unmasked = fsc_maps(half1, half2)
    if settings.mask_radius > 0:
        mask = sphere_mask(n, settings.mask_radius / ps, edge=max(2.0, 6.0 / ps))
        _, fsc_masked = fsc_maps(half1, half2, mask)
    else:
        fsc_masked = fsc_unmasked
    resolution = resolution_at(freq, fsc_masked, 0.143, ps)
    bfactor = settings.bfactor
    if bfactor is None:
        f = np.clip(fsc_unmasked, 0.0, 1.0)
        wiener_weight = 2 * f / (1 + f)  # ~ the full map's SNR/(1+SNR) per shell
        bfactor = rec.guinier_bfactor(volume, ps, low_resolution=10.0, high_resolution=max(resolution, 2 * ps),
                                      shell_weights=wiener_weight)
        bfactor = max(0.0, bfactor)  # never blur a map while "sharpening" it
    sharpened = rec.sharpen(volume, ps, bfactor, resolution)
    return Reconstruction(
        volume=volume, half1=half1, half2=half2, sharpened=sharpened, frequency=freq / ps, fsc=fsc_masked,
        fsc_unmasked=fsc_unmasked, resolution=resolution, bfactor=float(bfactor), n_particles=len(plan["params"]),
        extra={"fourier_fsc": fourier_fsc},
    )


# -------------------------------------------------------------- writing assets
def volume_set_bytes(box: int) -> int:
    """Bytes one registered volume takes on disk: map, two half maps, sharpened map, orth views, pictures."""
    return 4 * (4 * box ** 3 + 6 * box * box) + 4 * 1024 + 2_000_000


def write_volume_assets(ctx: JobContext, result: Reconstruction, file_name: str, display_name: str,
                        pixel_size: float, **fields: Any) -> None:
    """Write the maps, orth views and FSC picture; register the volume (rank 0)."""
    from cistem_mpi.io.mrc import write_mrc
    from cistem_mpi.io.plots import save_fsc_png, save_image_png
    from cistem_mpi.kernels.orth_views import orth_views

    assert ctx.project is not None
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
        row = conn.execute("SELECT max(id) FROM refinements").fetchone()
        if row[0] is None:
            raise InputError(ctx.project.root, "no refinement in the project yet (import particles first)")
        run = int(row[0])
    ref = conn.execute("SELECT * FROM refinements WHERE id = ?", (run,)).fetchone()
    if ref is None:
        raise InputError("--refinement", f"no refinement #{run} in the project")
    pkg = conn.execute("SELECT * FROM refinement_packages WHERE id = ?", (ref["package_id"],)).fetchone()
    stack = conn.execute("SELECT * FROM particle_stacks WHERE id = ?", (pkg["stack_id"],)).fetchone()
    classes, halves = [], []
    for c in conn.execute("SELECT * FROM refinement_classes WHERE refinement_id = ? ORDER BY class_number", (run,)):
        path = ctx.project.resolve(c["params_path"])
        classes.append((int(c["class_number"]), read_params_h5(path)))
        halves.append(read_params_column(path, "half_set"))
    optics = Optics(pixel_size=float(stack["pixel_size"]), voltage=float(stack["voltage"]), cs=float(stack["cs"]),
                    amplitude_contrast=float(stack["amplitude_contrast"]))
    white = bool(stack["protein_is_white"]) if "protein_is_white" in stack.keys() else False
    return {"run": run, "refinement": ref, "package": pkg, "stack_path": str(ctx.project.resolve(stack["path"])),
            "optics": optics, "classes": classes, "half_sets": halves, "protein_is_white": white}


def _job(ctx: JobContext) -> dict:
    a = ctx.args
    todo: list[tuple[str, ParticleSet | None, str, str, dict[str, Any]]] = []
    stack_path = ""
    symmetry = (a.get("symmetry") or "C1").upper()
    invert = False
    if ctx.is_controller:
        if a.get("stack"):
            from cistem_mpi.drivers.import_assets import (
                check_header_pixel_size, protein_is_white_for, read_particle_params,
            )
            from cistem_mpi.io.mrc import open_stack

            if not a.get("params"):
                raise InputError("--params", "a parameter file is needed with --stack")
            stack_path = str(Path(a["stack"]).absolute())
            with open_stack(stack_path, pixel_size=a.get("pixel_size")) as st:
                n_stack, header_ps = len(st), st.header.pixel_size
            ps = read_particle_params(Path(a["params"]).absolute(), a.get("pixel_size"), n_stack,
                                      (a["voltage"], a["cs"], a["amplitude_contrast"]))
            if a.get("pixel_size") is None:
                check_header_pixel_size(Path(stack_path), header_ps, float(ps.optics[0].pixel_size))
            invert = protein_is_white_for(a, [Path(a["params"])])
            name = f"reconstruction_{ctx.job_id}_1.mrc"
            todo.append((stack_path, ps, name, f"Reconstruction #{ctx.job_id} - Class #1",
                         {"kind": "reconstruction", "run_number": ctx.job_id, "class_number": 1}))
        else:
            ref = load_refinement(ctx, a.get("refinement"))
            stack_path = ref["stack_path"]
            invert = ref["protein_is_white"]
            symmetry = (a.get("symmetry") or ref["package"]["symmetry"] or "C1").upper()
            r = ref["refinement"]
            for (c, params), half in zip(ref["classes"], ref["half_sets"]):
                # several classes: a particle counts in each class by its occupancy (OCC weighting)
                ps = ParticleSet(params=params.copy(), optics=[ref["optics"]],
                                 extra={"half_set": half} if half is not None else {})
                name = naming.volume_file_name(r["kind"], ref["run"], c)
                display = naming.volume_display_name(r["kind"], ref["run"], c, r["round"])
                todo.append((stack_path, ps, name, display,
                             {"kind": "refinement", "run_number": ref["run"], "class_number": c,
                              "refinement_id": ref["run"]}))
        for _, _, name, _, _ in todo:
            target = ctx.project.root / naming.ASSET_DIRS["volumes"] / name  # type: ignore[union-attr]
            # the database claims names: an unregistered file left by a killed job does not block one
            if naming.asset_path_taken(ctx.project.conn, "volumes", ctx.project.store_path(target)):  # type: ignore[union-attr]
                raise InputError(target, "a volume of this name already exists in the project")
        from cistem_mpi.io.mrc import read_mrc_header

        box = int(read_mrc_header(stack_path).shape[2])
        check_free_space(ctx.project.root / naming.ASSET_DIRS["volumes"],  # type: ignore[union-attr]
                         len(todo) * volume_set_bytes(box), "the volumes")
    todo_meta = ctx.world.bcast([(t[0], t[2], t[3], t[4]) for t in todo] if ctx.is_controller else None)
    symmetry = ctx.world.bcast(symmetry)
    settings = settings_from_args(a, symmetry)
    results = {}
    for i, (stack, name, display, fields) in enumerate(todo_meta):
        particles = todo[i][1] if ctx.is_controller else None
        result = reconstruct_particles(ctx.world, stack, particles, settings, progress=ctx.progress, invert=invert)
        if ctx.is_controller:
            assert result is not None and particles is not None
            write_volume_assets(ctx, result, name, display, float(particles.optics[0].pixel_size), **fields)
            results[display] = {"resolution": round(result.resolution, 3), "particles": result.n_particles,
                                "bfactor": round(result.bfactor, 1)}
    return {"volumes": results, "symmetry": symmetry}

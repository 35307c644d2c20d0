"""``cistem-mpi reconstruct``: particles + parameters -> volume, half maps, FSC (cisTEM's reconstruct3d).

The reconstruction itself, shared with ``refine`` and ``ab-initio``, is
:mod:`cistem_mpi.drivers.volumejob` (its parallel layout is described there);
this module parses the command, picks the parameter sets (a refinement of the
project or ``--stack`` + ``--params``) and registers one volume per class.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cistem_mpi.db import naming
from cistem_mpi.drivers.jobrun import JobContext, add_job_arguments, check_options, run_job
from cistem_mpi.drivers.options import add_contrast_arguments
from cistem_mpi.drivers.volumejob import (
    ReconstructionSettings, load_refinement, reconstruct_particles, settings_from_args, volume_set_bytes,
    write_volume_assets,
)
from cistem_mpi.errors import InputError, check_free_space
from cistem_mpi.io.params import ParticleSet

#: ``ReconstructionSettings`` and ``reconstruct_particles`` (from :mod:`~cistem_mpi.drivers.volumejob`) are
#: re-exported: callers that reconstruct as this command does find them here.
__all__ = ["register", "ReconstructionSettings", "reconstruct_particles"]


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
    p.add_argument("--mask-radius", type=float, default=0.0,
                   help="outer mask radius (Å), cisTEM's: the soft sphere (10 Å cosine edge) the written maps carry, "
                        "the masked FSC's sphere, and where the noise is measured (default 0: no mask)")
    p.add_argument("--whiten", action=argparse.BooleanOptionalAction, default=True,
                   help="whiten the particles by the noise spectrum measured outside the mask and scale each to unit "
                        "background noise before insertion (cisTEM's 'Normalize particles'; default on)")
    p.add_argument("--keep-unmasked", action="store_true",
                   help="also write the maps before the outer mask (*_unmasked.mrc)")
    p.add_argument("--resolution-limit", type=float, default=0.0, help="insert data up to this resolution (Å)")
    p.add_argument("--bfactor", default="auto", help="sharpening B-factor in Å² ('auto': Guinier fit)")
    p.add_argument("--score-weighting", type=float, default=0.0,
                   help="Frealign score-to-B-factor conversion (0: all particles weigh the same)")
    p.add_argument("--padding", type=float, default=2.0)
    add_contrast_arguments(p)
    p.set_defaults(func=lambda a: run_job(_checked(a), "reconstruct", _job))


def _checked(a: argparse.Namespace) -> argparse.Namespace:
    """Every option checked before the job record exists (exit 2, nothing recorded)."""
    check_options(a, symmetry=("symmetry",), non_negative=("mask_radius", "resolution_limit", "score_weighting"),
                  positive=("pixel_size", "voltage"), at_least_one=("padding",))
    settings_from_args(vars(a), "C1")  # --bfactor
    return a


def _job(ctx: JobContext) -> dict:
    a = ctx.args
    todo: list[tuple[str, ParticleSet | None, str, str, dict[str, Any]]] = []
    stack_path = ""
    symmetry = (a.get("symmetry") or "C1").upper()
    invert = False
    if ctx.is_controller:
        if a.get("stack"):
            from cistem_mpi.io.mrc import open_stack
            from cistem_mpi.io.parameter_files import (
                check_header_pixel_size, read_particle_params, stack_protein_is_white,
            )

            if not a.get("params"):
                raise InputError("--params", "a parameter file is needed with --stack")
            stack_path = str(Path(a["stack"]).absolute())
            with open_stack(stack_path, pixel_size=a.get("pixel_size")) as st:
                n_stack, header_ps = len(st), st.header.pixel_size
            ps = read_particle_params(Path(a["params"]).absolute(), a.get("pixel_size"), n_stack,
                                      (a["voltage"], a["cs"], a["amplitude_contrast"]))
            if a.get("pixel_size") is None:
                check_header_pixel_size(Path(stack_path), header_ps, float(ps.optics[0].pixel_size))
            invert = stack_protein_is_white(a.get("protein_is_white"), [Path(a["params"])])
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
        # a refinement reconstructed again (other settings, or after manual-refine registered its map) gets
        # a new volume under the next free name when it is written (write_volume_assets); the old one stays
        from cistem_mpi.io.mrc import read_mrc_header

        box = int(read_mrc_header(stack_path).shape[2])
        unmasked_bytes = 3 * 4 * box ** 3 if a.get("keep_unmasked") else 0  # map and half maps again
        check_free_space(ctx.project.root / naming.ASSET_DIRS["volumes"],  # type: ignore[union-attr]
                         len(todo) * (volume_set_bytes(box) + unmasked_bytes), "the volumes")
    todo_meta = ctx.world.bcast([(t[0], t[2], t[3], t[4]) for t in todo] if ctx.is_controller else None)
    symmetry = ctx.world.bcast(symmetry)
    settings = settings_from_args(a, symmetry)
    results = {}
    for i, (stack, name, display, fields) in enumerate(todo_meta):
        particles = todo[i][1] if ctx.is_controller else None
        result = reconstruct_particles(ctx.world, stack, particles, settings, progress=ctx.progress, invert=invert,
                                       log=ctx.log)
        if ctx.is_controller:
            assert result is not None and particles is not None
            name, display = write_volume_assets(ctx, result, name, display, float(particles.optics[0].pixel_size),
                                                new_name_if_taken=True, **fields)
            results[display] = {"file": name, "resolution": round(result.resolution, 3),
                                "particles": result.n_particles, "bfactor": round(result.bfactor, 1)}
    return {"volumes": results, "symmetry": symmetry}

"""``cistem-mpi manual-refine`` and ``auto-refine``: per-particle alignment, 3D classification.

The rounds themselves (alignment, classification, reconstruction, auto
refine's schedule) are :mod:`cistem_mpi.drivers.refine_rounds`; this module
parses, sets up the starting parameters and references, and registers.
Auto refine repeats rounds with a resolution limit that follows the measured
resolution until it stops improving.  Every finished round is checkpointed, so
``--resume JOB`` continues a killed job from its last round; the job's
refinements, parameter files and volumes are registered together at the end.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from cistem_mpi.db import naming
from cistem_mpi.drivers.jobrun import JobContext, add_job_arguments, check_options, run_job
from cistem_mpi.drivers.refine_rounds import REC_ARRAYS, run_rounds, stored_halves
from cistem_mpi.drivers.runtime import CheckpointStore
from cistem_mpi.drivers.volumejob import Reconstruction, load_refinement, volume_set_bytes, write_volume_assets
from cistem_mpi.errors import DiskFull, InputError, free_bytes
from cistem_mpi.io.params import ParticleSet
from cistem_mpi.kernels.reconstruction import half_lookup, half_sets


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``manual-refine`` and ``auto-refine``."""
    for name, helptext in (("manual-refine", "one round of refinement/classification with your settings"),
                           ("auto-refine", "rounds with a rising resolution limit until the resolution stops improving")):
        p = sub.add_parser(name, help=helptext)
        add_job_arguments(p)
        p.add_argument("--refinement", type=int, help="start from this refinement run (default: the newest)")
        p.add_argument("--reference", action="append", help="reference map per class (MRC); default: reconstruct")
        p.add_argument("--classes", type=int, help="number of classes (default: the refinement's)")
        p.add_argument("--symmetry", help="point group (default: the refinement package's)")
        p.add_argument("--low-resolution", type=float, default=300.0, help="low resolution limit (Å)")
        p.add_argument("--high-resolution", type=float, help="high resolution limit for alignment (Å)")
        p.add_argument("--mask-radius", type=float, help="particle mask radius (Å; default 45%% of the box)")
        p.add_argument("--max-shift", type=float, help="largest shift change searched (Å; default 10%% of box)")
        p.add_argument("--angle-step", type=float, default=3.0, help="initial angular step of the local search (°)")
        p.add_argument("--global", dest="global_search", action="store_true", help="global search over all orientations")
        p.add_argument("--global-step", type=float, help="angular sampling of the global search (°)")
        p.add_argument("--no-angles", action="store_true", help="keep angles fixed")
        p.add_argument("--no-shifts", action="store_true", help="keep shifts fixed")
        p.add_argument("--refine-defocus", action="store_true", help="refine each particle's defocus")
        p.add_argument("--focus-radius", type=float, default=0.0, help="focused mask: sphere radius (Å)")
        p.add_argument("--focus-centre", type=float, nargs=3, metavar=("X", "Y", "Z"),
                       help="focused mask: sphere centre in Å from the first voxel")
        p.add_argument("--focus-mask", metavar="MRC",
                       help="focused mask: derive the sphere from this mask map on the reference's grid (centre "
                            "of mass; radius enclosing every voxel >= half the maximum); printed for reuse as "
                            "--focus-centre/--focus-radius (a --focus-radius given too wins)")
        p.add_argument("--randomise-occupancies", action="store_true",
                       help="start references from randomised occupancies (default for auto-refine with classes)")
        p.add_argument("--seed", type=int, default=1, help="random seed (occupancy randomisation)")
        if name == "auto-refine":
            p.add_argument("--max-rounds", type=int, default=8)
            p.add_argument("--global-rounds", type=int, default=0,
                           help="the first N rounds search every orientation (then local refinement of the best), "
                                "as RELION's auto-refine starts; for starts such as ab-initio's, where some "
                                "particles sit far from their orientation and local rounds cannot bring them back "
                                "(default 0: local only, as cisTEM)")
        p.set_defaults(func=lambda a, n=name: run_job(_checked(a), n.replace("-", "_"), _job))


def _checked(a: argparse.Namespace) -> argparse.Namespace:
    """Every option checked before the job record exists (exit 2, nothing recorded)."""
    check_options(a, symmetry=("symmetry",), at_least_one=("classes", "max_rounds"),
                  positive=("low_resolution", "high_resolution", "mask_radius", "max_shift", "angle_step",
                            "global_step"),
                  non_negative=("focus_radius", "global_rounds"))
    if a.high_resolution is not None and a.low_resolution is not None and a.high_resolution >= a.low_resolution:
        raise InputError("--high-resolution", f"{a.high_resolution} Å must be finer (smaller) than --low-resolution "
                                              f"{a.low_resolution} Å")
    return a


# ------------------------------------------------------------------ the job
def _job(ctx: JobContext) -> dict:
    a = ctx.args
    auto = ctx.job_type == "auto_refine"
    # every round is kept until the job registers them all at its end
    store = CheckpointStore(ctx.checkpoint_dir, keep=10_000)
    state: dict[str, Any] | None = None
    rounds: list[dict[str, Any]] = []
    if ctx.is_controller:
        state = _initial_state(ctx, auto)
        if ctx.resumed_from is not None and store.iterations():
            state, rounds = _restore(state, store)
            ctx.log.info("resuming after round %d (resolution %.2f Å)", state["round"], state["history"][-1])
    max_rounds = a.get("max_rounds", 8) if auto else 1
    state, rounds = run_rounds(ctx, state, a, auto, max_rounds, store, rounds)
    if not ctx.is_controller:
        return {}
    return _register(ctx, state, rounds)


def _focus_from_mask(ctx: JobContext, a: dict[str, Any], box: int, ps: float) -> tuple[list[float], float]:
    """``--focus-mask``: the focus sphere's centre (Å from the first voxel) and radius (Å) (rank 0).

    The radius is the mask's unless ``--focus-radius`` is given too.
    The mask must be on the reference's grid: a box other than the particles' or a (set) header pixel
    size other than the refinement's is an :class:`InputError` naming the file.
    """
    from cistem_mpi.io.mrc import read_mrc, read_mrc_header
    from cistem_mpi.kernels.masks import enclosing_sphere

    path = a["focus_mask"]
    if a.get("focus_centre"):
        raise InputError("--focus-mask", "give --focus-mask or --focus-centre, not both")
    header = read_mrc_header(path)
    if tuple(header.shape) != (box, box, box):
        raise InputError(path, f"mask box {'x'.join(map(str, header.shape[::-1]))} does not match the "
                               f"reference's {box}x{box}x{box} (the mask must be on the reference's grid)")
    hps = float(header.pixel_size)
    if hps and abs(hps - 1.0) > 1e-6 and abs(hps - ps) > 1e-3 * ps:  # 0 and 1 mean "not set"
        raise InputError(path, f"mask header pixel size {hps:.4f} Å does not match the reference's {ps:.4f} Å "
                               f"(the mask must be on the reference's grid)")
    mask, _ = read_mrc(path, pixel_size=ps)
    try:
        centre, radius = enclosing_sphere(mask, ps)
    except ValueError as exc:
        raise InputError(path, str(exc)) from None
    centre_A = [round(v, 2) for v in centre]
    used = float(a.get("focus_radius") or round(radius, 2))
    xyz = " ".join(f"{v:.2f}" for v in centre_A)
    text = (f"focus sphere from {path}: centre {xyz} Å from the first voxel, radius {radius:.2f} Å "
            f"(reuse as --focus-centre {xyz} --focus-radius {radius:.2f})")
    if a.get("focus_radius"):
        text += f"; using the given --focus-radius {used:g} Å"
    ctx.log.info("%s", text)
    print(text, flush=True)
    ctx.result["focus_from_mask"] = {"centre_A": centre_A, "radius_A": round(radius, 2), "focus_radius_A": used}
    return centre_A, used


def _initial_state(ctx: JobContext, auto: bool) -> dict[str, Any]:
    """Starting parameters, references and settings (rank 0)."""
    from cistem_mpi.io.mrc import read_mrc

    a = ctx.args
    ref = load_refinement(ctx, a.get("refinement"))
    classes = ref["classes"]
    n_classes = a.get("classes") or len(classes)
    base = classes[0][1]
    rng = np.random.default_rng(a.get("seed", 1))
    class_params = [p.copy() for _, p in classes]
    randomise = a.get("randomise_occupancies") or (auto and n_classes > 1)
    if n_classes != len(classes):
        if len(classes) != 1:
            raise InputError("--classes", f"refinement #{ref['run']} has {len(classes)} classes; make a new "
                                          "refinement package to change their number")
        class_params = [base.copy() for _ in range(n_classes)]
        randomise = True
    if randomise and n_classes > 1:
        # cisTEM: starting references from the parameters after randomising occupancies
        pick = rng.integers(0, n_classes, len(base))
        for c in range(n_classes):
            class_params[c]["occ"] = np.where(pick == c, 100.0, 0.0)
    box = None
    references = None
    if a.get("reference"):
        if len(a["reference"]) != n_classes:
            raise InputError("--reference", f"give one reference per class ({n_classes})")
        from cistem_mpi.io.parameter_files import check_header_pixel_size
        from cistem_mpi.io.mrc import read_mrc_header

        references = []
        for path in a["reference"]:
            check_header_pixel_size(Path(path), read_mrc_header(path).pixel_size, ref["optics"].pixel_size)
            vol, _ = read_mrc(path, pixel_size=ref["optics"].pixel_size)
            references.append(vol)
    from cistem_mpi.io.mrc import open_stack

    with open_stack(ref["stack_path"], pixel_size=ref["optics"].pixel_size) as st:
        box = st.shape[-1]
    for path, vol in zip(a.get("reference") or [], references or []):
        if not np.isfinite(vol).all():
            raise InputError(path, "map contains NaN or infinite values")
    if references is not None:
        for path, vol in zip(a["reference"], references):
            if vol.shape != (box, box, box):
                raise InputError(path, f"reference box {vol.shape[0]} does not match the particles' box {box}")
    ps = ref["optics"].pixel_size
    mask_radius_A = a.get("mask_radius") or 0.45 * box * ps
    focus = None
    focus_centre, focus_radius = a.get("focus_centre"), a.get("focus_radius") or 0.0
    if a.get("focus_mask"):
        focus_centre, focus_radius = _focus_from_mask(ctx, a, box, ps)
    if focus_radius:
        if not focus_centre:
            raise InputError("--focus-centre", "a focused mask needs a centre (X Y Z in Å)")
        # Å from the first voxel -> pixels from the volume centre
        focus = tuple(float(v) / ps - box // 2 for v in focus_centre)
    return {
        "half_by_position": half_lookup(classes[0][1]["position"], ref["half_sets"][0]),
        "run": ref["run"], "package_id": int(ref["package"]["id"]), "stack": ref["stack_path"],
        "optics": ref["optics"], "box": int(box), "pixel_size": float(ps),
        "symmetry": (a.get("symmetry") or ref["package"]["symmetry"] or "C1").upper(),
        "class_params": class_params, "references": references, "round": 0, "history": [], "res05": None,
        "mask_radius_A": float(mask_radius_A), "focus": focus, "focus_radius_A": float(focus_radius), "rounds": [],
        "invert": bool(ref["protein_is_white"]), "user_references": references is not None,
    }


def _restore(state: dict[str, Any], store: CheckpointStore) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """State after the last checkpointed round and every round's outputs so far (rank 0)."""
    k = len(state["class_params"])
    rounds = []
    for it in store.iterations():
        cp = store.load(it)
        recs = [Reconstruction(**{n: cp.arrays[f"rec_{c}_{n}"] for n in REC_ARRAYS}, **cp.state["recs"][c])
                for c in range(k)]
        params = [cp.arrays[f"params_{c}"] for c in range(k)]
        rounds.append({"round": it, "kind": cp.state["kind"], "params": params, "recs": recs})
        state["class_params"] = [p.copy() for p in params]
        state["references"] = [r.volume for r in recs]
        state["round"] = int(cp.state["round"])
        state["history"] = list(cp.state["history"])
        state["res05"] = cp.state["res05"]
        state["stopped"] = bool(cp.state.get("stopped", False))
    return state, rounds


def _register(ctx: JobContext, state: dict[str, Any], rounds: list[dict[str, Any]]) -> dict:
    """Write parameter files and volumes of every round and register them (rank 0)."""
    from cistem_mpi.io.par import write_par
    from cistem_mpi.io.param_store import write_params_h5
    from cistem_mpi.io.star import write_cistem_star

    assert ctx.project is not None
    conn = ctx.project.conn
    parent = state["run"]
    next_run = naming.next_refinement_run(conn)
    param_dir = ctx.project.root / naming.ASSET_DIRS["parameters"]
    for rd in rounds:  # never register a non-finite number
        for c, params in enumerate(rd["params"], 1):
            for name in ("psi", "theta", "phi", "shx", "shy", "df1", "df2", "occ", "score"):
                if not np.isfinite(params[name]).all():
                    raise RuntimeError(f"round {rd['round']} class {c}: {name.upper()} has NaN or infinite values; "
                                       "nothing registered")
    n_sets = sum(len(rd["params"]) for rd in rounds)
    n_part = len(state["class_params"][0])
    needed = n_sets * (volume_set_bytes(state["box"]) + 400 * n_part)
    free = free_bytes(param_dir)
    if needed * 1.01 > free:  # before writing anything; the rounds stay checkpointed for --resume
        raise DiskFull(ctx.project.root / naming.ASSET_DIRS["volumes"], needed, free)
    summary = []
    for i, rd in enumerate(rounds):
        run = next_run + i
        refinement = ctx.register("refinements", package_id=state["package_id"], kind=rd["kind"], round=rd["round"],
                                  n_classes=len(rd["params"]), parent_id=parent)
        parent_row = refinement
        for c, (params, rec) in enumerate(zip(rd["params"], rd["recs"]), 1):
            base = param_dir / f"params_{run}_{c}"
            half = stored_halves(state, params["position"]).get("half_set")
            if half is None:
                half = half_sets(params["position"])
            param_dir.mkdir(parents=True, exist_ok=True)
            write_params_h5(ctx.stage(base.with_suffix(".h5")), params,
                            {"pixel_size": state["pixel_size"], "symmetry": state["symmetry"]}, {"half_set": half})
            write_par(ctx.stage(base.with_suffix(".par")), params)
            write_cistem_star(ctx.stage(base.with_suffix(".star")),
                              ParticleSet(params=params, optics=[state["optics"]]))
            ctx.register("refinement_classes", refinement_id=refinement, class_number=c,
                         params_path=base.with_suffix(".h5"), resolution=float(rec.resolution),
                         occupancy=float(params["occ"].mean()))
            write_volume_assets(ctx, rec, naming.volume_file_name(rd["kind"], run, c),
                                naming.volume_display_name(rd["kind"], run, c, rd["round"]), state["pixel_size"],
                                kind="refinement", run_number=run, class_number=c, refinement_id=refinement)
            summary.append({"run": run, "round": rd["round"], "class": c, "resolution": round(rec.resolution, 3),
                            "occupancy": round(float(params["occ"].mean()), 2)})
        parent = parent_row
    return {"rounds": summary, "resolution_history": [round(x, 3) for x in state["history"]]}

"""``cistem-mpi manual-refine`` and ``auto-refine``: per-particle alignment, 3D classification.

One round: rank 0 hands out chunks of particles; each worker aligns its
particles to every class reference (local search around the current
parameters, or a global search followed by local refinement) and returns
the new Frealign X rows and per-class LogP; rank 0 turns LogP into
occupancies, then every rank takes part in the reconstruction of each class
(:func:`cistem_mpi.drivers.volumejob.reconstruct_particles`).  Auto refine
repeats rounds with a resolution limit that follows the measured resolution
until it stops improving.  Every finished round is checkpointed, so
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
from cistem_mpi.drivers.node_references import NodeReferences
from cistem_mpi.drivers.runtime import CheckpointStore, World, map_chunks
from cistem_mpi.drivers.runtime.shared import node_of
from cistem_mpi.drivers.volumejob import (
    Reconstruction, ReconstructionSettings, load_refinement, reconstruct_particles, volume_set_bytes,
    write_volume_assets,
)
from cistem_mpi.errors import DiskFull, InputError, free_bytes
from cistem_mpi.io.params import ParticleSet
from cistem_mpi.kernels import alignment as al
from cistem_mpi.kernels import refinement as rf
from cistem_mpi.kernels.projection import prepare_volume_ft
from cistem_mpi.kernels.reconstruction import half_lookup, half_sets

#: Auto refine stops when the resolution improves by less than this fraction.
AUTO_MIN_IMPROVEMENT = 0.01
#: Classification from random occupancies: rounds at a low resolution limit (Å) first.
CLASSIFY_LOW_RES_ROUNDS = 3
CLASSIFY_START_RESOLUTION = 20.0
#: ... and the particles' median orientation change is below this (degrees).
AUTO_MAX_TURN = 0.25
#: With several classes it stops when fewer particles than this fraction change class.
AUTO_MIN_CLASS_CHANGE = 0.01


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
        p.set_defaults(func=lambda a, n=name: run_job(_checked(a), n.replace("-", "_"), _job))


def _checked(a: argparse.Namespace) -> argparse.Namespace:
    """Every option checked before the job record exists (exit 2, nothing recorded)."""
    check_options(a, symmetry=("symmetry",), at_least_one=("classes", "max_rounds"),
                  positive=("low_resolution", "high_resolution", "mask_radius", "max_shift", "angle_step",
                            "global_step"),
                  non_negative=("focus_radius",))
    if a.high_resolution is not None and a.low_resolution is not None and a.high_resolution >= a.low_resolution:
        raise InputError("--high-resolution", f"{a.high_resolution} Å must be finer (smaller) than --low-resolution "
                                              f"{a.low_resolution} Å")
    return a


# ------------------------------------------------------------------ one round
def align_round(world: World, plan: dict[str, Any] | None, references: list[np.ndarray] | None,
                progress=None) -> tuple[list[np.ndarray], np.ndarray] | None:
    """Align every particle to every class; return (per-class params, LogP (n, K)) on rank 0."""
    plan = world.bcast(plan)
    references = world.bcast(references)
    # the references' transforms, once per node when several ranks share it
    refs = NodeReferences(world, node_of(world), references, 2.0)
    vfts = refs.vfts
    s: rf.AlignSettings = plan["align"]
    band = al.make_band(plan["box"], plan["pixel_size"], plan["high_resolution"], plan["low_resolution"])
    grid = search_band = None
    if s.global_search:
        grid = al.orientation_grid(s.global_step)
        search_band = al.make_band(plan["box"], plan["pixel_size"],
                                   max(plan["high_resolution"], plan["global_resolution"]), plan["low_resolution"])
    state: dict[str, Any] = {}

    def chunk(start: int, stop: int, _data: Any) -> list[Any]:
        from cistem_mpi.io.mrc import open_stack

        if "stack" not in state:
            state["stack"] = open_stack(plan["stack"], pixel_size=plan["pixel_size"], invert=plan.get("invert", False))
        rows = plan["params"][start:stop]
        per_class = [cp[start:stop] for cp in plan["class_params"]]
        out = []
        for i, row in enumerate(rows):
            img = state["stack"][int(row["position"]) - 1]
            if not np.isfinite(img).all():  # a NaN pixel would give SCORE 0 for garbage
                raise InputError(plan["stack"], f"image {int(row['position'])} contains NaN or infinite values")
            out.append(rf.align_particle(img, row, plan["pixel_size"], plan["optics"], vfts, band, s,
                                         grid=grid, search_band=search_band,
                                         class_rows=[cr[i] for cr in per_class]))
        return out

    results = map_chunks(world, len(plan["params"]), chunk, min_chunk=1, max_chunk=16, progress=progress)
    if "stack" in state:
        state["stack"].close()
    vfts = []  # the views die with the window
    refs.close()
    if not world.is_controller:
        return None
    return _collect(plan, results)


def _collect(plan: dict[str, Any], results: list[rf.ParticleResult]) -> tuple[list[np.ndarray], np.ndarray]:
    """New per-class parameter tables from the particles' results (rank 0)."""
    old = plan["class_params"]
    k = len(old)
    ps = plan["pixel_size"]
    logp = np.array([r.logp for r in results])
    priors = np.array([max(p["occ"].mean(), 1e-3) for p in old]) if k > 1 else np.ones(1)
    occ = rf.occupancies(logp, priors / priors.sum())
    out = []
    for c in range(k):
        new = old[c].copy()
        a = [r.alignments[c] for r in results]
        new["phi"] = np.mod([x.phi for x in a], 360.0)
        new["theta"] = [x.theta for x in a]
        new["psi"] = np.mod([x.psi for x in a], 360.0)
        new["shx"] = np.array([x.shx for x in a]) * ps
        new["shy"] = np.array([x.shy for x in a]) * ps
        offsets = np.array([r.defocus_offset for r in results])
        new["df1"] = old[c]["df1"] + offsets
        new["df2"] = old[c]["df2"] + offsets
        new["occ"] = occ[:, c]
        new["logp"] = np.round(logp[:, c])
        new["score"] = [r.scores[c] for r in results]
        new["sigma"] = np.sqrt(np.clip(1.0 - (np.array(new["score"]) / 100.0) ** 2, 0.0, 1.0))
        new["change"] = new["score"] - old[c]["score"]
        out.append(new)
    return out, logp


# ------------------------------------------------------------------ the job
def _job(ctx: JobContext) -> dict:
    a = ctx.args
    auto = ctx.job_type == "auto_refine"
    world = ctx.world
    # every round is kept until the job registers them all at its end
    store = CheckpointStore(ctx.checkpoint_dir, keep=10_000)
    state: dict[str, Any] | None = None
    rounds: list[dict[str, Any]] = []
    if ctx.is_controller:
        state = _initial_state(ctx, auto)
        if ctx.resumed_from is not None and store.iterations():
            state, rounds = _restore(state, store)
            ctx.log.info("resuming after round %d (resolution %.2f Å)", state["round"], state["history"][-1])
    state = world.bcast(state)
    settings = ReconstructionSettings(symmetry=state["symmetry"], mask_radius=state["mask_radius_A"])
    if state["references"] is None:  # first reconstruction from the starting parameters
        refs = _reconstruct_classes(ctx, state, settings)
        if ctx.is_controller:
            state["references"] = [r.volume for r in refs]
            state["history"] = [min(r.resolution for r in refs)]
            state["res05"] = max(_res_at(r, 0.5) for r in refs)
    state = world.bcast(state)
    max_rounds = a.get("max_rounds", 8) if auto else 1
    # rank 0 decides whether another round runs; every rank follows the same decision
    go_on = world.bcast(state["round"] < max_rounds and not state.get("stopped"))
    while go_on:
        r = state["round"] + 1
        plan = None
        if ctx.is_controller:
            plan = _round_plan(state, a, auto)
            if r == 1 and state.get("user_references"):
                _contrast_check(ctx, plan, state["references"])
            ctx.log.info("round %d: aligning %d particles to %d class(es), %s search, %.1f-%.1f Å",
                         r, len(plan["params"]), len(state["class_params"]),
                         "global" if plan["align"].global_search else "local", plan["low_resolution"],
                         plan["high_resolution"])
        out = align_round(world, plan, state["references"] if ctx.is_controller else None, progress=ctx.progress)
        if ctx.is_controller:
            assert out is not None
            before = _best_class(state["class_params"])
            old_params = state["class_params"]
            state["class_params"], _ = out
            moved = float(np.mean(_best_class(state["class_params"]) != before))
            turned = float(np.median(rf.angular_change(old_params[0], state["class_params"][0])))
        state = world.bcast(state)
        recs = _reconstruct_classes(ctx, state, settings)
        stop = False
        if ctx.is_controller:
            res = min(x.resolution for x in recs)
            state["references"] = [x.volume for x in recs]
            state["res05"] = max(_res_at(x, 0.5) for x in recs)
            prev = state["history"][-1] if state["history"] else res
            state["history"].append(res)
            state["round"] = r
            ctx.log.info("round %d: resolution %.2f Å (was %.2f Å); populations %s", r, res, prev,
                         [round(float(p["occ"].mean()), 1) for p in state["class_params"]])
            if len(state["class_params"]) > 1:
                # classification: go on while particles still change class
                ctx.log.info("round %d: %.1f%% of particles changed class", r, 100 * moved)
                stop = auto and r >= 2 and moved < AUTO_MIN_CLASS_CHANGE
            else:
                # done when the map stops improving and the particles stop turning (near Nyquist the
                # resolution saturates while the orientations still get better)
                ctx.log.info("round %d: median orientation change %.2f°", r, turned)
                stop = auto and (prev - res) / prev < AUTO_MIN_IMPROVEMENT and turned < AUTO_MAX_TURN
            state["stopped"] = bool(stop)
            rounds.append({"round": r, "kind": plan["kind"], "params": [p.copy() for p in state["class_params"]],
                           "recs": recs})
            _save_round(store, state, plan["kind"], recs)
        go_on = world.bcast(not stop and state["round"] < max_rounds)
    if not ctx.is_controller:
        return {}
    return _register(ctx, state, rounds)


#: Particles scored at their starting parameters by the contrast check.
CONTRAST_CHECK_PARTICLES = 32


def contrast_score(plan: dict[str, Any], references: list[np.ndarray], n: int = CONTRAST_CHECK_PARTICLES) -> float:
    """Mean correlation (SCORE, 100 CC) of up to ``n`` particles with the first reference at their
    starting parameters (no search).  Negative on average: the particles' contrast is the
    reference's inverted (a protein-white RELION stack read as dark, or the other way round).
    """
    from cistem_mpi.io.mrc import open_stack

    rows = plan["params"]
    pick = np.unique(np.linspace(0, len(rows) - 1, min(n, len(rows))).astype(np.int64))
    s = rf.AlignSettings(mask_radius=plan["align"].mask_radius, refine_angles=False, refine_shifts=False)
    band = al.make_band(plan["box"], plan["pixel_size"], plan["high_resolution"], plan["low_resolution"])
    vft = [prepare_volume_ft(references[0].astype(np.float32), 2.0)]
    scores = []
    with open_stack(plan["stack"], pixel_size=plan["pixel_size"], invert=plan.get("invert", False)) as st:
        for i in pick:
            row = rows[int(i)]
            res = rf.align_particle(st[int(row["position"]) - 1], row, plan["pixel_size"], plan["optics"], vft,
                                    band, s)
            scores.append(float(res.scores[0]))
    return float(np.mean(scores)) if scores else 0.0


def _contrast_check(ctx: JobContext, plan: dict[str, Any], references: list[np.ndarray]) -> None:
    """Warn when the given reference correlates negatively with the particles on average (rank 0)."""
    score = contrast_score(plan, references)
    ctx.result["reference_contrast_score"] = round(score, 2)
    if score < 0:
        ctx.log.warning("the reference correlates negatively with the particles at their starting parameters "
                        "(mean SCORE %.1f): the contrast is probably inverted; a stack from RELION is protein "
                        "white (import with --protein-is-white), a cisTEM one dark (--protein-is-dark)", score)


def _best_class(class_params: list[np.ndarray]) -> np.ndarray:
    """Each particle's class: where its occupancy is highest."""
    return np.argmax(np.stack([p["occ"] for p in class_params], axis=1), axis=1)


def _res_at(rec: Reconstruction, threshold: float) -> float:
    from cistem_mpi.kernels.fsc import resolution_at

    return resolution_at(rec.frequency * 1.0, rec.fsc, threshold, 1.0)


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


def _round_plan(state: dict[str, Any], a: dict[str, Any], auto: bool) -> dict[str, Any]:
    """Settings of the next round (rank 0)."""
    ps, box = state["pixel_size"], state["box"]
    if auto:
        # follow the measured resolution: align to where the half maps still agree well
        high = max(2.0 * ps, state["res05"] or 20.0)
        if len(state["class_params"]) > 1 and state["round"] < CLASSIFY_LOW_RES_ROUNDS:
            # classes start from random subsets: let them separate on low-resolution features first
            high = max(high, CLASSIFY_START_RESOLUTION)
    else:
        high = a.get("high_resolution") or max(2.0 * ps, 8.0)
    global_search = bool(a.get("global_search"))
    step = a.get("global_step") or float(np.clip(np.degrees(high / (0.45 * box * ps)) * 2.0, 5.0, 20.0))
    align = rf.AlignSettings(
        mask_radius=state["mask_radius_A"] / ps, global_search=global_search, global_step=step,
        angle_step=a.get("angle_step") or 3.0,
        max_shift=(a.get("max_shift") or 0.1 * box * ps) / ps,
        refine_angles=not a.get("no_angles"), refine_shifts=not a.get("no_shifts"),
        refine_defocus=bool(a.get("refine_defocus")),
        focus_centre=state["focus"], focus_radius=state.get("focus_radius_A", a.get("focus_radius") or 0.0) / ps,
    )
    o = state["optics"]
    # particles in the stack order, all classes share the rows' positions
    return {
        "stack": state["stack"], "box": box, "pixel_size": ps, "optics": (o.voltage, o.cs, o.amplitude_contrast),
        "params": state["class_params"][int(np.argmax([p["occ"].mean() for p in state["class_params"]]))],
        "class_params": state["class_params"], "align": align, "high_resolution": high,
        "invert": bool(state.get("invert", False)),
        "low_resolution": a.get("low_resolution") or 300.0, "global_resolution": max(high, 8.0),
        "kind": "global" if global_search else "local",
    }


def _stored_halves(state: dict[str, Any], positions: np.ndarray) -> dict[str, np.ndarray]:
    """``{"half_set": ...}`` for these stack positions when the package stores its split, else ``{}``."""
    lookup = state.get("half_by_position")
    return {"half_set": lookup[np.asarray(positions, dtype=np.int64)]} if lookup is not None else {}


def _reconstruct_classes(ctx: JobContext, state: dict[str, Any], settings: ReconstructionSettings) -> list[Reconstruction]:
    """Reconstruct every class from the current parameters (all ranks; results on rank 0)."""
    out = []
    k = len(state["class_params"])
    best = _best_class(state["class_params"]) if ctx.is_controller and k > 1 else None
    for c in range(k):
        particles = None
        if ctx.is_controller:
            params = state["class_params"][c]
            if best is not None:
                # Each class volume from the particles assigned to it (highest occupancy):
                # soft weights keep the classes alike and slow their divergence from a random start.
                params = params.copy()
                params["occ"] = np.where(best == c, 100.0, 0.0)
            particles = ParticleSet(params=params, optics=[state["optics"]],
                                    extra=_stored_halves(state, params["position"]))
        rec = reconstruct_particles(ctx.world, state["stack"], particles, settings, progress=None,
                                    invert=bool(state.get("invert", False)), log=ctx.log)
        if ctx.is_controller:
            out.append(rec)
    return out


_REC_ARRAYS = ("volume", "half1", "half2", "sharpened", "frequency", "fsc", "fsc_unmasked")
_REC_SCALARS = ("resolution", "bfactor", "n_particles")


def _save_round(store: CheckpointStore, state: dict[str, Any], kind: str, recs: list[Reconstruction]) -> None:
    """Checkpoint a finished round: parameters, references and the round's outputs (rank 0)."""
    arrays: dict[str, np.ndarray] = {}
    for c, (p, rec) in enumerate(zip(state["class_params"], recs)):
        arrays[f"params_{c}"] = p
        for name in _REC_ARRAYS:
            arrays[f"rec_{c}_{name}"] = getattr(rec, name)
    meta = {"round": state["round"], "history": state["history"], "res05": state["res05"], "kind": kind,
            "stopped": state.get("stopped", False),
            "recs": [{k: getattr(rec, k) for k in _REC_SCALARS} for rec in recs]}
    store.save(state["round"], meta, arrays=arrays)


def _restore(state: dict[str, Any], store: CheckpointStore) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """State after the last checkpointed round and every round's outputs so far (rank 0)."""
    k = len(state["class_params"])
    rounds = []
    for it in store.iterations():
        cp = store.load(it)
        recs = [Reconstruction(**{n: cp.arrays[f"rec_{c}_{n}"] for n in _REC_ARRAYS}, **cp.state["recs"][c])
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
            half = _stored_halves(state, params["position"]).get("half_set")
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

"""Rounds of refinement and 3D classification, shared by ``manual-refine``, ``auto-refine`` and
``ab-initio --classes K`` (which classifies its consensus this way).

One round: rank 0 hands out chunks of particles; each worker aligns its
particles to every class reference (local search around the current
parameters, or a global search followed by local refinement) and returns
the new Frealign X rows and per-class LogP; rank 0 turns LogP into
occupancies, then every rank takes part in the reconstruction of each class
(:func:`cistem_mpi.drivers.volumejob.reconstruct_particles`).  Auto refine's
schedule repeats rounds with a resolution limit that follows the measured
resolution until it stops improving (one class) or particles stop changing
class (several).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cistem_mpi.drivers.jobrun import JobContext
from cistem_mpi.drivers.node_references import NodeReferences
from cistem_mpi.drivers.runtime import CheckpointStore, World, map_chunks
from cistem_mpi.drivers.runtime.shared import node_of
from cistem_mpi.drivers.volumejob import Reconstruction, ReconstructionSettings, reconstruct_particles
from cistem_mpi.errors import InputError
from cistem_mpi.io.params import ParticleSet
from cistem_mpi.kernels import alignment as al
from cistem_mpi.kernels import refinement as rf
from cistem_mpi.kernels.projection import prepare_volume_ft

#: Auto refine stops when the resolution improves by less than this fraction.
AUTO_MIN_IMPROVEMENT = 0.01


#: Classification from random occupancies: rounds at a low resolution limit (Å) first.
CLASSIFY_LOW_RES_ROUNDS = 3


CLASSIFY_START_RESOLUTION = 20.0


#: ... and the particles' median orientation change is below this (degrees).
AUTO_MAX_TURN = 0.25


#: With several classes it stops when fewer particles than this fraction change class.
AUTO_MIN_CLASS_CHANGE = 0.01


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


def run_rounds(ctx: JobContext, state: dict[str, Any] | None, a: dict[str, Any], auto: bool, max_rounds: int,
               store: CheckpointStore | None = None, rounds: list[dict[str, Any]] | None = None,
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Rounds of alignment (with several classes: classification) and reconstruction (all ranks).

    Parameters
    ----------
    ctx : JobContext
        The running job (world, log, progress).
    state : dict or None
        Rank 0: the refinement state (:func:`_initial_state`'s fields: ``class_params``, ``references``
        (None: reconstruct them first), ``round``, ``history``, ...); None on the other ranks.
    a : dict
        The round options (``--high-resolution``, ``--max-shift``, ...; missing ones take their defaults).
    auto : bool
        auto-refine's schedule: the resolution limit follows the half maps; stop when converged.
    max_rounds : int
        Upper bound on the rounds (counting those ``state`` has done).
    store : CheckpointStore, optional
        Each finished round is checkpointed there (``--resume``).
    rounds : list, optional
        Rounds already done (a resumed job's).

    Returns
    -------
    state, rounds
        The state after the last round (every rank), and on rank 0 each round's parameters and
        reconstructions (``{"round", "kind", "params", "recs"}``).

    Examples
    --------
    >>> state, rounds = run_rounds(ctx, state, {}, auto=True, max_rounds=8)  # doctest: +SKIP
    """
    world = ctx.world
    rounds = [] if rounds is None else rounds
    state = world.bcast(state)
    settings = ReconstructionSettings(symmetry=state["symmetry"], mask_radius=state["mask_radius_A"])
    if state["references"] is None:  # first reconstruction from the starting parameters
        refs = _reconstruct_classes(ctx, state, settings)
        if ctx.is_controller:
            state["references"] = [r.volume for r in refs]
            state["history"] = [min(r.resolution for r in refs)]
            state["res05"] = max(_res_at(r, 0.5) for r in refs)
    state = world.bcast(state)
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
            if len(state["class_params"]) > 1:
                # one seeded generator per round: a resumed job re-seeds as the uninterrupted one did
                seed = a.get("seed")
                rng = np.random.default_rng([1 if seed is None else int(seed), r])
                for c, donor, count in reseed_empty_classes(state["class_params"], rng):
                    state.setdefault("reseeded", []).append([r, c + 1])
                    ctx.log.warning("round %d: class %d held %d particle(s): re-seeded with half of class %d's",
                                    r, c + 1, count, donor + 1)
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
            if store is not None:
                _save_round(store, state, plan["kind"], recs)
        go_on = world.bcast(not stop and state["round"] < max_rounds)
    return state, rounds


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


#: A class holding fewer particles than this (both half maps need some), or than this fraction of an equal
#: share, is re-seeded (classification here, ab-initio's K maps from random assignments alike).
RESEED_MIN = 10
RESEED_FRACTION = 0.1


def reseed_empty_classes(class_params: list[np.ndarray], rng: np.random.Generator,
                         ) -> list[tuple[int, int, int]]:
    """Give every class that (almost) emptied half of the largest class's particles, in place.

    A class that loses its particles would otherwise stay dead (its map
    cannot be reconstructed, and nothing ever moves back to it: a known
    failure of classification from random starts).  The moved particles
    take the donor's orientations and shifts and occupancy 100 in the
    re-seeded class, 0 in the donor.

    Parameters
    ----------
    class_params : list of numpy.ndarray
        Per-class parameter tables (same rows, ``occ`` in percent).
    rng : numpy.random.Generator
        Chooses the moved particles.

    Returns
    -------
    list of (class, donor, count before)
        The classes re-seeded (0-based).

    Examples
    --------
    >>> from cistem_mpi.io.params import empty_params
    >>> a, b = empty_params(40), empty_params(40)
    >>> a["occ"], b["occ"] = 100.0, 0.0
    >>> reseed_empty_classes([a, b], np.random.default_rng(0))
    [(1, 0, 0)]
    >>> int((b["occ"] == 100).sum()), int((a["occ"] == 100).sum())
    (20, 20)
    """
    k = len(class_params)
    out = []
    need = max(RESEED_MIN, int(RESEED_FRACTION * len(class_params[0]) / k))
    for c in range(k):
        best = _best_class(class_params)
        count = int(np.sum(best == c))
        if count >= need:
            continue
        donor = int(np.argmax(np.bincount(best, minlength=k)))
        pool = np.nonzero(best == donor)[0]
        move = rng.choice(pool, size=len(pool) // 2, replace=False)
        for col in ("phi", "theta", "psi", "shx", "shy", "score"):
            class_params[c][col][move] = class_params[donor][col][move]
        for j in range(k):
            class_params[j]["occ"][move] = 100.0 if j == c else 0.0
        out.append((c, donor, count))
    return out


def _res_at(rec: Reconstruction, threshold: float) -> float:
    from cistem_mpi.kernels.fsc import resolution_at

    return resolution_at(rec.frequency * 1.0, rec.fsc, threshold, 1.0)


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
    # auto-refine's first --global-rounds rounds search globally: local rounds keep particles that start far
    # from their orientation where they are (the demo's ab-initio start: 34 % beyond 15°, 9 % still after
    # six local rounds)
    global_search = bool(a.get("global_search")) or (auto and state["round"] < int(a.get("global_rounds") or 0))
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


def stored_halves(state: dict[str, Any], positions: np.ndarray) -> dict[str, np.ndarray]:
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
                                    extra=stored_halves(state, params["position"]))
        rec = reconstruct_particles(ctx.world, state["stack"], particles, settings, progress=None,
                                    invert=bool(state.get("invert", False)), log=ctx.log)
        if ctx.is_controller:
            out.append(rec)
    return out


REC_ARRAYS = ("volume", "half1", "half2", "sharpened", "frequency", "fsc", "fsc_unmasked")


REC_SCALARS = ("resolution", "bfactor", "n_particles")


def _save_round(store: CheckpointStore, state: dict[str, Any], kind: str, recs: list[Reconstruction]) -> None:
    """Checkpoint a finished round: parameters, references and the round's outputs (rank 0)."""
    arrays: dict[str, np.ndarray] = {}
    for c, (p, rec) in enumerate(zip(state["class_params"], recs)):
        arrays[f"params_{c}"] = p
        for name in REC_ARRAYS:
            arrays[f"rec_{c}_{name}"] = getattr(rec, name)
    meta = {"round": state["round"], "history": state["history"], "res05": state["res05"], "kind": kind,
            "stopped": state.get("stopped", False),
            "recs": [{k: getattr(rec, k) for k in REC_SCALARS} for rec in recs]}
    store.save(state["round"], meta, arrays=arrays)

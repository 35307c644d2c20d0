"""``cistem-mpi ab-initio``: a first 3D map without a reference (cisTEM's ab initio 3D).

From uniformly random orientations each round globally searches a growing random subset of the
particles against the current reference(s) at an angular step tied to the
round's resolution limit, puts the best-scoring fraction into a new
reconstruction of each class and Wiener-filters it with a falling nominator
(schedule: :mod:`cistem_mpi.kernels.ab_initio`).  Several starts each
continue from the last start's maps.  With a point group given, the map is
turned onto its symmetry axes at 75 % of the first start's rounds and the
symmetry is imposed from then on.  With K classes the schedule makes one
consensus map, and its particles are then classified into K classes by
auto-refine's rounds from random occupancies (``--classes-from random``:
K maps from random class assignments through the schedule, as cisTEM).

Parallel layout: the global search goes through the dynamic task queue
(one particle at a time; every rank computes the same grid projections, so
results do not depend on the rank count); the reconstruction uses the slab
reconstruction of ``reconstruct``.  Rank 0 makes every random choice (one
seeded generator, checkpointed every round for ``--resume``).

Outputs: ``Assets/Volumes/startup_volume_<run>_<class>.mrc`` (one run number
per start, the last start's the highest), half maps, orth views and FSC
plots; the last round's per-particle parameters as a refinement of kind
``startup`` that ``auto-refine``/``manual-refine`` start from.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from cistem_mpi.db import naming
from cistem_mpi.drivers.jobrun import JobContext, add_job_arguments, run_job
from cistem_mpi.drivers.refine_rounds import REC_ARRAYS, REC_SCALARS, RESEED_FRACTION, RESEED_MIN, run_rounds
from cistem_mpi.drivers.runtime import CheckpointStore, World, map_chunks
from cistem_mpi.drivers.runtime.checkpoint import rng_from_state, rng_state
from cistem_mpi.drivers.volumejob import (
    Reconstruction, ReconstructionSettings, load_refinement, reconstruct_particles, write_volume_assets,
)
from cistem_mpi.errors import InputError
from cistem_mpi.io.params import ParticleSet
from cistem_mpi.kernels import ab_initio as ai
from cistem_mpi.kernels import alignment as al
from cistem_mpi.kernels import refinement as rf
from cistem_mpi.kernels.masks import sphere_mask
from cistem_mpi.kernels.projection import prepare_volume_ft
from cistem_mpi.kernels.reconstruction import half_lookup, half_sets
from cistem_mpi.kernels.symmetry import symmetry_matrices

#: Soft edge (pixels) of the particle and reference masks.
MASK_EDGE = 3.0
#: Classification of the consensus: its first rounds search globally.
CLASSIFY_GLOBAL_ROUNDS = 3



def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``ab-initio`` command."""
    p = sub.add_parser("ab-initio", help="ab initio 3D reconstruction from random orientations (startup volumes)")
    add_job_arguments(p)
    p.add_argument("--refinement", type=int, help="particles and CTF of this refinement (default: the newest)")
    p.add_argument("--classes", type=int, default=1, help="number of classes (maps) K (default 1)")
    p.add_argument("--classes-from", choices=("consensus", "random"), default="consensus",
                   help="with K > 1: 'consensus' (default) runs the schedule with one map, then classifies its "
                        "particles into K classes from random occupancies by auto-refine's rounds; 'random' "
                        "runs the schedule with K maps from random class assignments, as cisTEM (measured: "
                        "the classes converge to the same map)")
    p.add_argument("--class-rounds", type=int, default=8,
                   help="most classification rounds after the consensus (stops earlier when fewer than 1%% of "
                        "the particles change class; 8)")
    p.add_argument("--starts", type=int, default=2, help="number of starts, each from the last (cisTEM: 2)")
    p.add_argument("--rounds", type=int, default=40, help="rounds per start (cisTEM: 40)")
    p.add_argument("--start-resolution", type=float, default=20.0, help="initial resolution limit (Å; 20)")
    p.add_argument("--end-resolution", type=float, default=8.0, help="final resolution limit (Å; 8)")
    p.add_argument("--start-percent", type=float,
                   help="percent used in the first round (default: 2500 K asymmetric units)")
    p.add_argument("--end-percent", type=float, help="percent used in the last round (default: 10000 K units)")
    p.add_argument("--search-multiplier", type=float, default=ai.SEARCH_MULTIPLIER,
                   help="particles searched = this x the percent used (cisTEM: 5)")
    p.add_argument("--score-fraction", type=float, default=ai.SCORE_THRESHOLD,
                   help="best-scoring fraction of the searched particles reconstructed (cisTEM: 0.2)")
    p.add_argument("--wiener-first", type=float, default=500.0, help="Wiener nominator of the first round")
    p.add_argument("--wiener-start", type=float, default=200.0, help="Wiener nominator ramp start (first start)")
    p.add_argument("--wiener-end", type=float, default=10.0, help="Wiener nominator ramp end / later starts")
    p.add_argument("--pick-range", type=float, default=0.0,
                   help="each searched particle takes a random direction among those scoring within this "
                        "fraction of the score range below the best, except in the last round (cisTEM: 0.15; "
                        "default 0 = always the best, which measured better here)")
    p.add_argument("--symmetry", help="point group (default: the refinement package's)")
    p.add_argument("--always-apply-symmetry", action="store_true",
                   help="impose the symmetry from the first round (no axis search)")
    p.add_argument("--mask-radius", type=float,
                   help="mask radius (Å; default min(0.75 x largest dimension, 0.45 x box))")
    p.add_argument("--no-auto-mask", action="store_true",
                   help="only the spherical mask on the references (default: also mask weak density away "
                        "from the molecule, as cisTEM's auto-masking)")
    p.add_argument("--max-shift", type=float, help="largest shift searched (Å; default 10%% of the box)")
    p.add_argument("--angular-step", type=float, help="fixed angular step (°; default from the resolution)")
    p.add_argument("--step-radius", type=float, default=ai.ANGULAR_STEP_RADIUS,
                   help="radius (Å) in cisTEM's CalculateAngularStep (75)")
    p.add_argument("--low-resolution", type=float, help="low resolution limit of the search (Å; default: the "
                   "package's largest dimension, else 300)")
    p.add_argument("--min-particles-per-class", type=int, default=50,
                   help="fewest particles a class may be reconstructed from in the first round (50)")
    p.add_argument("--seed", type=int, default=1, help="random seed (orientations, subsets, classes)")
    p.set_defaults(func=lambda a: run_job(a, "ab_initio", _job))


# ------------------------------------------------------------------ planning (rank 0)
def _settings(ctx: JobContext) -> dict[str, Any]:
    """Validate the options against the refinement; every InputError comes before any work."""
    a = ctx.args
    for name in ("classes", "starts", "rounds", "class_rounds"):
        if a.get(name) is not None and a[name] < 1:
            raise InputError(f"--{name}", f"must be at least 1, got {a[name]}")
    if not 0 < a["end_resolution"] <= a["start_resolution"]:
        raise InputError("--end-resolution", f"need 0 < end ({a['end_resolution']} Å) <= start "
                                             f"({a['start_resolution']} Å)")
    if not 0 < a.get("score_fraction", 0.2) <= 1:
        raise InputError("--score-fraction", "must be in (0, 1]")
    if not 0 <= (a.get("pick_range") or 0.0) < 1:
        raise InputError("--pick-range", "must be in [0, 1)")
    for name in ("start_percent", "end_percent"):
        v = a.get(name)
        if v is not None and not 0 < v <= 100:
            raise InputError(f"--{name.replace('_', '-')}", f"must be in (0, 100], got {v}")
    ref = load_refinement(ctx, a.get("refinement"))
    pkg = ref["package"]
    symmetry = (a.get("symmetry") or pkg["symmetry"] or "C1").strip().upper()
    try:
        symmetry_matrices(symmetry)
    except ValueError as exc:
        raise InputError("--symmetry", str(exc)) from exc
    from cistem_mpi.io.mrc import open_stack

    ps = float(ref["optics"].pixel_size)
    with open_stack(ref["stack_path"], pixel_size=ps) as st:
        box = int(st.shape[-1])
    base = ref["classes"][0][1]
    n = len(base)
    classes = int(a.get("classes") or 1)
    # the schedule's number of maps: one consensus, classified afterwards, unless the classes start at random
    k = classes if a.get("classes_from", "consensus") == "random" else 1
    if n // classes < a["min_particles_per_class"]:
        raise InputError(ref["stack_path"], f"too few particles: {n} particles into {classes} classes is "
                                            f"{n // classes} per class; at least {a['min_particles_per_class']} "
                                            f"per class are needed")
    largest = pkg["largest_dimension"]
    if largest and largest > box * ps:
        raise InputError(ref["stack_path"], f"box too small for the particle: {box} px x {ps:g} Å = "
                                            f"{box * ps:.0f} Å, largest dimension {largest:g} Å")
    mask_radius = a.get("mask_radius")
    if mask_radius is None:
        mask_radius = min(0.45 * box, box / 2 - MASK_EDGE) * ps
        if largest:
            mask_radius = min(0.75 * largest, mask_radius)
    if mask_radius <= 0 or mask_radius / ps + MASK_EDGE > box / 2:
        need = int(np.ceil(2 * (mask_radius / ps + MASK_EDGE)))
        raise InputError("--mask-radius", f"box too small for the mask: a {mask_radius:g} Å mask "
                                          f"({mask_radius / ps:.1f} px + {MASK_EDGE:g} px edge) needs a box of "
                                          f"{need} px, the particles' box is {box} px")
    if 2 * ps > a["end_resolution"]:
        raise InputError("--end-resolution", f"{a['end_resolution']} Å is beyond Nyquist ({2 * ps:g} Å)")
    p0_auto, p1_auto = ai.percent_used_range(n, k, "C1")
    p0 = a.get("start_percent") or p0_auto
    p1 = a.get("end_percent") or p1_auto
    first = int(round(n * p0 / 100.0))
    per_class = first // k
    if per_class < a["min_particles_per_class"]:
        raise InputError(ref["stack_path"],
                         f"too few particles: the first round reconstructs {p0:.1f} % of {n} particles = {first} "
                         f"into {k} class(es), {per_class} per class; at least {a['min_particles_per_class']} per "
                         f"class are needed (use more particles, fewer classes or a larger --start-percent)")
    halves = ref["half_sets"][0]
    return {
        "ref_run": int(ref["run"]), "package_id": int(pkg["id"]), "stack": ref["stack_path"],
        "invert": bool(ref.get("protein_is_white", False)),
        "optics": ref["optics"], "box": box, "pixel_size": ps, "n": n, "k": k, "classes": classes,
        "symmetry": symmetry,
        "mask_radius": float(mask_radius), "p0": float(p0), "p1": float(p1),
        "auto_mask": not a.get("no_auto_mask"),
        "auto_percent": a.get("start_percent") is None and a.get("end_percent") is None,
        "max_shift": float(a.get("max_shift") or 0.1 * box * ps),
        "low_resolution": float(a.get("low_resolution") or (largest or 300.0)),
        "half_set": None if halves is None else np.asarray(halves),
        "base": base, "half_by_position": half_lookup(base["position"], halves),
    }


def _initial_state(cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """Random orientations and classes, and the first reconstruction's particles (rank 0)."""
    rng = np.random.default_rng(seed)
    n, k = cfg["n"], cfg["k"]
    base = cfg["base"]
    class_params = []
    for _ in range(k):
        p = base.copy()
        p["phi"], p["theta"], p["psi"] = ai.random_orientations(n, rng)
        p["shx"] = 0.0
        p["shy"] = 0.0
        p["score"] = 0.0
        p["occ"] = 100.0 / k if k > 1 else 100.0
        p["logp"] = 0.0
        p["sigma"] = 1.0
        class_params.append(p)
    assign = rng.integers(0, k, n) if k > 1 else np.zeros(n, dtype=np.int64)
    used = np.zeros(n, dtype=bool)
    used[rng.choice(n, size=max(1, int(round(n * cfg["p0"] / 100.0))), replace=False)] = True
    return {"start": 0, "round": 0, "applied_symmetry": cfg["symmetry"] if cfg.get("always") else "C1",
            "class_params": class_params, "assign": assign, "selected": used, "references": None,
            "history": [], "finished_starts": [], "rng": rng_state(rng), "searched": np.zeros(n, dtype=bool)}


# ------------------------------------------------------------------ the global search (all ranks)
def search_round(world: World, plan: dict[str, Any] | None, references: list[np.ndarray] | None,
                 progress=None) -> np.ndarray | None:
    """Global search of the plan's particles against every class; ``(n, K, 4)`` [grid index, dx, dy, cc] on rank 0."""
    plan = world.bcast(plan)
    references = world.bcast(references)
    band = al.make_band(plan["box"], plan["pixel_size"], plan["high_resolution"], plan["low_resolution"])
    grid = plan["grid"]
    vfts = [prepare_volume_ft(r.astype(np.float32), 2.0) for r in references]
    projections = [ai.grid_projections(v, grid, band) for v in vfts]
    directions = ai.grid_directions(grid)
    # first pass: a grid at twice the step at half the resolution; then the fine grid near its best orientations
    coarse = [ai.coarse_grid(v, grid, plan["step"], band, plan["pixel_size"], plan["high_resolution"],
                             plan["low_resolution"]) for v in vfts]
    state: dict[str, Any] = {}
    o = plan["optics"]

    def chunk(start: int, stop: int, _data: Any) -> list[np.ndarray]:
        from cistem_mpi.io.mrc import open_stack
        from cistem_mpi.kernels.ctf import ctf_2d_stack
        from cistem_mpi.kernels.fft import ft2

        if "stack" not in state:
            state["stack"] = open_stack(plan["stack"], pixel_size=plan["pixel_size"], invert=plan.get("invert", False))
        out = []
        picks = plan.get("pick")
        for i in range(start, stop):
            row = plan["rows"][i]
            pick = None if picks is None else float(picks[i])
            img = al.prepare_particle(state["stack"][int(row["position"]) - 1], plan["mask_radius_px"], MASK_EDGE)
            x_c = al.crop_ft(ft2(img), band.m)
            ctf = ctf_2d_stack(plan["box"], plan["pixel_size"], o.voltage, o.cs, o.amplitude_contrast,
                               np.array([row["df1"]]), np.array([row["df2"]]), np.array([row["angast"]]),
                               np.array([row["pshift"]]))[0]
            c_c = al.crop_ft(ctf, band.m)
            res = np.array([ai.search_grid(x_c, c_c, pr, band, plan["max_shift_px"], coarse=co, pick=pick,
                                           pick_range=plan.get("pick_range", ai.PICK_RANGE), directions=directions)
                            for pr, co in zip(projections, coarse)])
            out.append(res)
        return out

    results = map_chunks(world, len(plan["rows"]), chunk, min_chunk=1, max_chunk=8, progress=progress)
    if "stack" in state:
        state["stack"].close()
    if not world.is_controller:
        return None
    return np.array(results, dtype=np.float64).reshape(len(plan["rows"]), len(references), 4)


# ------------------------------------------------------------------ the job
def _job(ctx: JobContext) -> dict:
    a = ctx.args
    world = ctx.world
    store = CheckpointStore(ctx.checkpoint_dir, keep=2)
    cfg = state = None
    if ctx.is_controller:
        cfg = _settings(ctx)
        cfg["always"] = bool(a.get("always_apply_symmetry"))
        state = _initial_state(cfg, a.get("seed", 1))
        if ctx.resumed_from is not None and store.iterations():
            state = _restore(state, store)
            ctx.log.info("resuming after start %d round %d", state["start"] + 1, state["round"])
        ctx.log.info("ab initio: %d particles, box %d, %d class(es), symmetry %s, %d start(s) x %d rounds, "
                     "%.1f -> %.1f Å, %.2f -> %.2f %% used", cfg["n"], cfg["box"], cfg["classes"], cfg["symmetry"],
                     a["starts"], a["rounds"], a["start_resolution"], a["end_resolution"], cfg["p0"], cfg["p1"])
    cfg = world.bcast(None if cfg is None else {k: v for k, v in cfg.items() if k not in ("base",)})
    n_rounds, n_starts = int(a["rounds"]), int(a["starts"])
    timings: list[dict[str, Any]] = []
    if world.bcast(state["references"] is None if ctx.is_controller else None):
        # the first references: random orientations, random classes, heavy Wiener filter
        recs = _reconstruct(ctx, cfg, state, rec_limit=a["start_resolution"])
        if ctx.is_controller:
            state["references"] = [_reference(cfg, r, a["wiener_first"]) for r in recs]
    while True:
        go = None
        if ctx.is_controller:
            go = state["start"] < n_starts
        if not world.bcast(go):
            break
        t0 = time.monotonic()
        plan = None
        if ctx.is_controller:
            plan = _round_plan(cfg, state, a, n_rounds)
            ctx.log.info("start %d round %d/%d: %.2f Å, step %.1f°, searching %d particles (%.2f %% used), %s",
                         state["start"] + 1, state["round"] + 1, n_rounds, plan["high_resolution"], plan["step"],
                         len(plan["rows"]), plan["percent"], state["applied_symmetry"])
        res = search_round(world, plan, state["references"] if ctx.is_controller else None)
        t1 = time.monotonic()
        last = None
        if ctx.is_controller:
            last = state["round"] + 1 == n_rounds
            _update(cfg, state, plan, res, ctx)
        last = world.bcast(last)
        limit = 0.0 if last else (plan["rec_limit"] if ctx.is_controller else None)
        # measured (box 48, 1000 particles, seed 1): the per-voxel nominator in the reconstruction (wiener=...)
        # ended at 54 Å, the per-shell re-filter of the plain Wiener map at 25 Å: the re-filter stays
        recs = _reconstruct(ctx, cfg, state, rec_limit=world.bcast(limit))
        t2 = time.monotonic()
        if ctx.is_controller:
            _finish_round(cfg, state, plan, recs, a, n_rounds, ctx, last)
            _save(store, cfg, state)
            t3 = time.monotonic()
            timings.append({"search": t1 - t0, "reconstruction": t2 - t1, "bookkeeping": t3 - t2,
                            "searched": len(plan["rows"])})
            state["history"][-1]["seconds"] = {k: round(v, 3) for k, v in timings[-1].items() if k != "searched"}
            done = state["start"] * n_rounds + state["round"]
            ctx.progress(done, n_starts * n_rounds, f"start {min(state['start'] + 1, n_starts)}")
    _final_search(ctx, cfg, state if ctx.is_controller else None, a)
    if cfg["classes"] > cfg["k"]:
        _classify(ctx, cfg, state if ctx.is_controller else None, a)
    peaks = world.gather(_peak_rss_mb())
    if not ctx.is_controller:
        return {}
    out = _register(ctx, cfg, state, timings)
    out["peak_rss_mb_per_rank"] = [round(float(x), 1) for x in peaks]
    return out


def _peak_rss_mb() -> float:
    """This process's peak resident memory (MB)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def _round_plan(cfg: dict[str, Any], state: dict[str, Any], a: dict[str, Any], n_rounds: int) -> dict[str, Any]:
    """What the round searches and reconstructs (rank 0)."""
    r, s = state["round"], state["start"]
    hi = ai.high_resolution_limit(r, n_rounds, a["start_resolution"], a["end_resolution"])
    step = a.get("angular_step") or ai.angular_step(hi, a.get("step_radius") or ai.ANGULAR_STEP_RADIUS)
    pct = _percent(cfg, state, r, n_rounds)
    rng = rng_from_state(state["rng"])
    n = cfg["n"]
    frac = min(a.get("search_multiplier", 5.0) * pct, 100.0) / 100.0
    n_search = max(1, int(round(frac * n)))
    idx = np.sort(rng.choice(n, size=n_search, replace=False)) if n_search < n else np.arange(n)
    pick_range = float(a.get("pick_range") or 0.0)
    # one uniform number per searched particle (rank 0's generator: the same for any rank count)
    # ... except in the very last round, whose parameters and map are the job's output: the best orientation
    final = s + 1 == int(a["starts"]) and r + 1 == n_rounds
    pick = rng.random(len(idx)) if pick_range > 0 else None
    if final:
        pick = None
    state["rng"] = rng_state(rng)
    rows = state["class_params"][0][idx]
    return {
        "stack": cfg["stack"], "invert": cfg.get("invert", False), "box": cfg["box"], "pixel_size": cfg["pixel_size"], "optics": cfg["optics"],
        "rows": rows, "index": idx, "grid": al.orientation_grid(step), "step": step, "high_resolution": hi,
        "low_resolution": cfg["low_resolution"], "mask_radius_px": cfg["mask_radius"] / cfg["pixel_size"],
        "max_shift_px": cfg["max_shift"] / cfg["pixel_size"], "percent": pct, "pick": pick,
        "pick_range": pick_range,
        "score_fraction": 1.0 if a.get("search_multiplier", 5.0) * pct >= 100.0 else a.get("score_fraction", 0.2),
        "rec_limit": ai.reconstruction_resolution_limit(r, n_rounds, a["start_resolution"], a["end_resolution"]),
        "wiener": _wiener(r, n_rounds, s, a),
    }


def _percent(cfg: dict[str, Any], state: dict[str, Any], r: int, n_rounds: int) -> float:
    p0, p1 = cfg["p0"], cfg["p1"]
    if cfg["auto_percent"] and state["applied_symmetry"] != "C1":
        p0, p1 = ai.percent_used_range(cfg["n"], cfg["k"], state["applied_symmetry"])
    return ai.percent_used(r, n_rounds, p0, p1)


def _wiener(r: int, n_rounds: int, s: int, a: dict[str, Any]) -> float:
    first, w0, w1 = a.get("wiener_first", 500.0), a.get("wiener_start", 200.0), a.get("wiener_end", 10.0)
    if r == 0 and s == 0:
        return float(first)
    if s == 0:
        return float(max(w0 + (w1 - w0) * (r / n_rounds), w1))
    return float(w1)


def _update(cfg: dict[str, Any], state: dict[str, Any], plan: dict[str, Any], res: np.ndarray,
            ctx: JobContext, reseed: bool = True) -> None:
    """New parameters, class assignments and the reconstruction subset from the search (rank 0)."""
    k = cfg["k"]
    idx = plan["index"]
    ps = cfg["pixel_size"]
    band = al.make_band(cfg["box"], ps, plan["high_resolution"], plan["low_resolution"])
    dof = float(band.mult.sum())
    cc = np.clip(res[:, :, 3], -0.999999, 0.999999)
    logp = -0.5 * dof * (1.0 - cc ** 2)
    counts = np.bincount(state["assign"], minlength=k).astype(np.float64)
    priors = np.maximum(counts / counts.sum(), 1e-3) if k > 1 else np.ones(1)
    occ = rf.occupancies(logp, priors / priors.sum())
    best = np.argmax(occ, axis=1)
    grid = plan["grid"]
    for c in range(k):
        p = state["class_params"][c]
        g = grid[res[:, c, 0].astype(np.int64)]
        p["phi"][idx] = np.mod(g[:, 0], 360.0)
        p["theta"][idx] = g[:, 1]
        p["psi"][idx] = np.mod(g[:, 2], 360.0)
        p["shx"][idx] = res[:, c, 1] * ps
        p["shy"][idx] = res[:, c, 2] * ps
        old_score = p["score"][idx].copy()
        p["score"][idx] = 100.0 * cc[:, c]
        p["change"][idx] = p["score"][idx] - old_score
        p["occ"][idx] = occ[:, c]
        p["logp"][idx] = np.round(logp[:, c])
        p["sigma"][idx] = np.sqrt(np.clip(1.0 - cc[:, c] ** 2, 0.0, 1.0))
    state["assign"][idx] = best
    keep = ai.best_fraction(100.0 * cc[np.arange(len(idx)), best], plan["score_fraction"], best)
    selected = np.zeros(cfg["n"], dtype=bool)
    selected[idx[keep]] = True
    state["selected"] = selected
    state["searched"] = np.zeros(cfg["n"], dtype=bool)
    state["searched"][idx] = True
    if k > 1 and reseed:
        _reseed(cfg, state, ctx)


def _reseed(cfg: dict[str, Any], state: dict[str, Any], ctx: JobContext) -> None:
    """Give a class that has (almost) emptied half of the largest class's particles, chosen at random."""
    k = cfg["k"]
    sel = np.nonzero(state["selected"])[0]
    rng = rng_from_state(state["rng"])
    for c in range(k):
        members = sel[state["assign"][sel] == c]
        need = max(RESEED_MIN, int(RESEED_FRACTION * len(sel) / k))
        if len(members) >= need:
            continue
        counts = [np.sum(state["assign"][sel] == j) for j in range(k)]
        donor = int(np.argmax(counts))
        pool = sel[state["assign"][sel] == donor]
        move = rng.choice(pool, size=len(pool) // 2, replace=False)
        state["assign"][move] = c
        # the new class starts from the donor's orientations of those particles
        for col in ("phi", "theta", "psi", "shx", "shy", "score"):
            state["class_params"][c][col][move] = state["class_params"][donor][col][move]
        state.setdefault("reseeded", []).append([int(state["start"]), int(state["round"]) + 1, c + 1])
        ctx.log.warning("class %d had %d particle(s) (< %d): re-seeded with %d random particles of class %d",
                        c + 1, len(members), need, len(move), donor + 1)
    state["rng"] = rng_state(rng)


def _reconstruct(ctx: JobContext, cfg: dict[str, Any], state: dict[str, Any] | None,
                 rec_limit: float, wiener: float = 1.0) -> list[Reconstruction]:
    """Reconstruct every class from its selected particles (all ranks; results on rank 0).

    ``wiener``: the round's Wiener nominator, applied per voxel in the full map's filter
    (``D / (W + wiener <W>/SSNR)``, cisTEM's ``CTF^2 + nominator/SSNR``).
    """
    k = cfg["k"]
    symmetry = ctx.world.bcast(state["applied_symmetry"] if ctx.is_controller else None)
    settings = ReconstructionSettings(symmetry=symmetry, mask_radius=cfg["mask_radius"],
                                      resolution_limit=rec_limit, bfactor=0.0, wiener_nominator=float(wiener))
    out = []
    for c in range(k):
        particles = None
        if ctx.is_controller:
            p = state["class_params"][c].copy()
            use = state["selected"] & (state["assign"] == c)
            p["occ"] = np.where(use, 100.0, 0.0)
            extra = {}
            if cfg["half_by_position"] is not None:
                extra["half_set"] = cfg["half_by_position"][p["position"].astype(np.int64)]
            particles = ParticleSet(params=p, optics=[cfg["optics"]], extra=extra)
        rec = reconstruct_particles(ctx.world, cfg["stack"], particles, settings, invert=cfg.get("invert", False),
                                    log=ctx.log)
        if ctx.is_controller:
            out.append(rec)
    return out


def _reference(cfg: dict[str, Any], rec: Reconstruction, nominator: float) -> np.ndarray:
    """Next round's reference: Wiener re-filtered (per shell), centred, masked (rank 0)."""
    v = ai.wiener_refilter(rec.volume, rec.fsc_unmasked, nominator)
    v = ai.shift_volume(v, -ai.centre_of_mass(v))
    mask = sphere_mask(cfg["box"], cfg["mask_radius"] / cfg["pixel_size"], edge=MASK_EDGE)
    if cfg.get("auto_mask", True):
        mask = mask * ai.auto_mask(v, cfg["mask_radius"] / cfg["pixel_size"])
    return (v * mask).astype(np.float32)


def _finish_round(cfg: dict[str, Any], state: dict[str, Any], plan: dict[str, Any], recs: list[Reconstruction],
                  a: dict[str, Any], n_rounds: int, ctx: JobContext, last: bool) -> None:
    """New references, progress line, symmetry alignment, next round/start (rank 0)."""
    new_refs = [_reference(cfg, r, plan["wiener"]) for r in recs]
    change = [ai.map_change(o, nr) for o, nr in zip(state["references"], new_refs)]
    used = [int(np.sum(state["selected"] & (state["assign"] == c))) for c in range(cfg["k"])]
    entry = {"start": state["start"] + 1, "round": state["round"] + 1, "resolution_limit": round(plan["high_resolution"], 3),
             "angular_step": round(plan["step"], 3), "searched": int(len(plan["rows"])), "used": used,
             "map_change": [round(x, 5) for x in change], "wiener": plan["wiener"],
             "symmetry": state["applied_symmetry"],
             "mean_score": round(float(np.mean([state["class_params"][0]["score"][plan["index"]]])), 3)}
    state["history"].append(entry)
    ctx.log.info("start %d round %d: limit %.2f Å, %d searched, used per class %s, map change %s",
                 entry["start"], entry["round"], entry["resolution_limit"], entry["searched"], used,
                 ", ".join(f"{x:.4f}" for x in change))
    state["references"] = new_refs
    state["round"] += 1
    if (not last and state["start"] == 0 and state["round"] == ai.symmetry_round(n_rounds)
            and cfg["symmetry"] != "C1" and state["applied_symmetry"] == "C1"):
        aligned = []
        for c, ref in enumerate(state["references"]):
            rot, score = ai.align_symmetry_axes(ref, cfg["symmetry"])
            turned = ai.rotate_volume(ai.shift_volume(ref, -ai.centre_of_mass(ref)), rot, order=3)
            aligned.append(ai.symmetrise(turned, cfg["symmetry"]))
            ctx.log.info("class %d aligned to the %s axes (symmetry score %.3f); symmetry imposed from now on",
                         c + 1, cfg["symmetry"], score)
            state.setdefault("symmetry_alignment", []).append({"class": c + 1, "rotation": rot.tolist(),
                                                               "score": round(score, 4)})
        state["references"] = aligned
        state["applied_symmetry"] = cfg["symmetry"]
    if last:
        state["finished_starts"].append([{**{n: getattr(r, n) for n in REC_ARRAYS},
                                          **{n: getattr(r, n) for n in REC_SCALARS}} for r in recs])
        state["final_params"] = [p.copy() for p in state["class_params"]]
        state["start"] += 1
        state["round"] = 0


def _final_search(ctx: JobContext, cfg: dict[str, Any], state: dict[str, Any] | None, a: dict[str, Any]) -> None:
    """Particles the last round did not search get a global search against the final maps (all ranks)."""
    plan = None
    todo = None
    if ctx.is_controller:
        todo = np.nonzero(~state["searched"])[0]
    if not ctx.world.bcast(None if todo is None else len(todo) > 0):
        return
    if ctx.is_controller:
        hi = a["end_resolution"]
        step = a.get("angular_step") or ai.angular_step(hi, a.get("step_radius") or ai.ANGULAR_STEP_RADIUS)
        plan = {"stack": cfg["stack"], "invert": cfg.get("invert", False), "box": cfg["box"], "pixel_size": cfg["pixel_size"], "optics": cfg["optics"],
                "rows": state["class_params"][0][todo], "index": todo, "grid": al.orientation_grid(step), "step": step,
                "high_resolution": hi, "low_resolution": cfg["low_resolution"],
                "mask_radius_px": cfg["mask_radius"] / cfg["pixel_size"],
                "max_shift_px": cfg["max_shift"] / cfg["pixel_size"], "score_fraction": 1.0}
        ctx.log.info("final assignment: global search of the %d particle(s) the last round did not search", len(todo))
    res = search_round(ctx.world, plan, state["references"] if ctx.is_controller else None)
    if ctx.is_controller:
        keep_sel, keep_searched = state["selected"].copy(), state["searched"].copy()
        _update(cfg, state, plan, res, ctx, reseed=False)
        state["selected"], state["searched"] = keep_sel, keep_searched
        state["final_params"] = [p.copy() for p in state["class_params"]]


# ------------------------------------------------------------------ K classes from the consensus
def _classify(ctx: JobContext, cfg: dict[str, Any], state: dict[str, Any] | None, a: dict[str, Any]) -> None:
    """Classify the consensus's particles into K classes (all ranks; ``state`` on rank 0).

    Measured on two conformations (box 32, 600 particles, half without the
    nanobody): K maps from random class assignments converge to the same map,
    because particles are classified while their orientations are still
    random; from the consensus orientations, auto-refine's classification
    (random occupancies, the first rounds global at 20 Å, each class
    reconstructed from the particles it holds) separates them.  The last start's maps become the
    K class maps; their parameters are the refinement that is registered.
    """
    k = cfg["classes"]
    rstate = None
    if ctx.is_controller:
        rng = rng_from_state(state["rng"])
        base = state["final_params"][0]
        pick = rng.integers(0, k, len(base))  # cisTEM: class references from randomised occupancies
        state["rng"] = rng_state(rng)
        class_params = []
        for c in range(k):
            p = base.copy()
            p["occ"] = np.where(pick == c, 100.0, 0.0)
            class_params.append(p)
        rstate = {
            "half_by_position": cfg["half_by_position"], "stack": cfg["stack"], "optics": cfg["optics"],
            "box": cfg["box"], "pixel_size": cfg["pixel_size"], "symmetry": state["applied_symmetry"],
            "class_params": class_params, "references": None, "round": 0, "history": [], "res05": None,
            "mask_radius_A": cfg["mask_radius"], "focus": None, "focus_radius_A": 0.0,
            "invert": cfg.get("invert", False), "user_references": False,
        }
        ctx.log.info("classification: the consensus's %d particles into %d classes from random occupancies, "
                     "at most %d rounds", len(base), k, a["class_rounds"])
    options = {"low_resolution": cfg["low_resolution"], "max_shift": cfg["max_shift"]}
    # global first: a conformation's particles may sit in a pseudo-symmetric orientation of the consensus,
    # which a local search keeps (measured, seed 7: 61 % right with local rounds only, 84 % with global ones first)
    first = min(CLASSIFY_GLOBAL_ROUNDS, int(a["class_rounds"]))
    rstate, rounds = run_rounds(ctx, rstate, {**options, "global_search": True}, True, first)
    rstate, rounds = run_rounds(ctx, rstate, options, True, int(a["class_rounds"]), rounds=rounds)
    if not ctx.is_controller:
        return
    params = rstate["class_params"]
    recs = rounds[-1]["recs"]
    state["final_params"] = [p.copy() for p in params]
    state["assign"] = np.argmax(np.stack([p["occ"] for p in params], axis=1), axis=1)
    state["finished_starts"][-1] = [{**{n: getattr(r, n) for n in REC_ARRAYS},
                                     **{n: getattr(r, n) for n in REC_SCALARS}} for r in recs]
    state["classification"] = [{"round": r["round"], "resolution": round(float(res), 3),
                                "populations": [round(float(p["occ"].mean()), 2) for p in r["params"]]}
                               for r, res in zip(rounds, rstate["history"][1:])]


# ------------------------------------------------------------------ checkpoints
def _save(store: CheckpointStore, cfg: dict[str, Any], state: dict[str, Any]) -> None:
    arrays: dict[str, np.ndarray] = {"assign": state["assign"], "selected": state["selected"],
                                     "searched": state["searched"]}
    for c, (p, r) in enumerate(zip(state["class_params"], state["references"])):
        arrays[f"params_{c}"] = p
        arrays[f"ref_{c}"] = r
    for s, recs in enumerate(state["finished_starts"]):
        for c, rec in enumerate(recs):
            for name in REC_ARRAYS:
                arrays[f"start_{s}_{c}_{name}"] = rec[name]
    for c, p in enumerate(state.get("final_params") or []):
        arrays[f"final_{c}"] = p
    meta = {"start": state["start"], "round": state["round"], "applied_symmetry": state["applied_symmetry"],
            "history": state["history"], "rng": state["rng"], "k": cfg["k"],
            "finished": [[{n: float(rec[n]) for n in REC_SCALARS} for rec in recs] for recs in state["finished_starts"]],
            "has_final": bool(state.get("final_params")), "reseeded": state.get("reseeded", []),
            "symmetry_alignment": state.get("symmetry_alignment", [])}
    store.save(state["start"] * 100_000 + state["round"], meta, arrays=arrays)


def _restore(state: dict[str, Any], store: CheckpointStore) -> dict[str, Any]:
    cp = store.load(store.iterations()[-1])
    m = cp.state
    k = int(m["k"])
    state.update(start=int(m["start"]), round=int(m["round"]), applied_symmetry=m["applied_symmetry"],
                 history=list(m["history"]), rng=m["rng"], reseeded=list(m.get("reseeded", [])),
                 symmetry_alignment=list(m.get("symmetry_alignment", [])))
    state["assign"] = cp.arrays["assign"].copy()
    state["selected"] = cp.arrays["selected"].copy()
    state["searched"] = cp.arrays["searched"].copy()
    state["class_params"] = [cp.arrays[f"params_{c}"].copy() for c in range(k)]
    state["references"] = [cp.arrays[f"ref_{c}"].copy() for c in range(k)]
    state["finished_starts"] = [
        [{**{n: cp.arrays[f"start_{s}_{c}_{n}"] for n in REC_ARRAYS}, **m["finished"][s][c]} for c in range(k)]
        for s in range(len(m["finished"]))]
    if m.get("has_final"):
        state["final_params"] = [cp.arrays[f"final_{c}"].copy() for c in range(k)]
    return state


# ------------------------------------------------------------------ registration
def _register(ctx: JobContext, cfg: dict[str, Any], state: dict[str, Any], timings: list[dict[str, Any]]) -> dict:
    """Startup volumes of every start, the final parameters as a refinement (rank 0)."""
    from cistem_mpi.io.par import write_par
    from cistem_mpi.io.param_store import write_params_h5
    from cistem_mpi.io.star import write_cistem_star

    assert ctx.project is not None
    conn = ctx.project.conn
    ps = cfg["pixel_size"]
    run0 = naming.next_startup_run(conn)
    ref_id = naming.next_refinement_run(conn)
    params = state["final_params"]
    k = len(params)
    refinement = ctx.register("refinements", package_id=cfg["package_id"], kind="startup",
                              round=len(state["history"]), n_classes=k, parent_id=cfg["ref_run"])
    param_dir = ctx.project.root / naming.ASSET_DIRS["parameters"]
    param_dir.mkdir(parents=True, exist_ok=True)
    last = state["finished_starts"][-1]
    occ_mean = [float(np.mean(state["assign"] == c)) * 100.0 for c in range(k)]
    for c in range(k):
        p = params[c].copy()
        if k > 1:  # the registered OCC: posterior where searched, the final hard class elsewhere
            p["occ"] = np.where(np.isfinite(p["occ"]), p["occ"], 0.0)
        else:
            p["occ"] = 100.0
        base = param_dir / f"params_{ref_id}_{c + 1}"
        half = cfg["half_by_position"][p["position"].astype(np.int64)] if cfg["half_by_position"] is not None \
            else half_sets(p["position"])
        write_params_h5(ctx.stage(base.with_suffix(".h5")), p,
                        {"pixel_size": ps, "symmetry": cfg["symmetry"]}, {"half_set": half})
        write_par(ctx.stage(base.with_suffix(".par")), p)
        write_cistem_star(ctx.stage(base.with_suffix(".star")), ParticleSet(params=p, optics=[cfg["optics"]]))
        ctx.register("refinement_classes", refinement_id=refinement, class_number=c + 1,
                     params_path=base.with_suffix(".h5"), resolution=float(last[c]["resolution"]),
                     occupancy=occ_mean[c])
    volumes = []
    for s, recs in enumerate(state["finished_starts"]):
        run = run0 + s
        final = s == len(state["finished_starts"]) - 1
        for c, rec in enumerate(recs):
            r = Reconstruction(**{n: rec[n] for n in REC_ARRAYS}, resolution=float(rec["resolution"]),
                               bfactor=float(rec["bfactor"]), n_particles=int(rec["n_particles"]))
            fields: dict[str, Any] = {"kind": "startup", "run_number": run, "class_number": c + 1}
            if final:
                fields["refinement_id"] = refinement
            write_volume_assets(ctx, r, naming.volume_file_name("startup", run, c + 1),
                                naming.volume_display_name("startup", run, c + 1), ps, **fields)
            volumes.append({"start": s + 1, "run": run, "class": c + 1, "resolution": round(r.resolution, 3),
                            "particles": r.n_particles,
                            "file": f"{naming.ASSET_DIRS['volumes']}/{naming.volume_file_name('startup', run, c + 1)}"})
    tot = {key: round(float(sum(t[key] for t in timings)), 3) for key in ("search", "reconstruction", "bookkeeping")}
    return {"volumes": volumes, "refinement_run": ref_id, "startup_runs": [run0 + s for s in range(len(state["finished_starts"]))],
            "rounds": state["history"], "reseeded": state.get("reseeded", []),
            "symmetry_alignment": state.get("symmetry_alignment", []), "seconds": tot,
            "classification": state.get("classification", []),
            "handedness": "undetermined: projections cannot tell a map from its mirror image; check the hand "
                          "against known features (e.g. alpha-helices) before interpreting the map"}

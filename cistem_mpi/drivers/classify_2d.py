"""``cistem-mpi classify-2d``: 2D classification by maximum likelihood (cisTEM's refine2d).

Plan (rank 0): the refinement package's particles (stack, CTF per particle),
the classes (default: cisTEM's rule, :func:`~cistem_mpi.kernels.classify2d.default_class_count`)
and the schedule of cisTEM's GUI: 20 rounds, the high-resolution limit
rising linearly from 40 to 8 Å (reached 5 rounds before the end and kept),
300 particles per class in the early rounds and every particle in the last
5.  Starting classes are averages of random subsets (each particle joins
each class with probability 2/K, as refine2d's start); they are written to
``Scratch/Refine2DScratch/Startup``.

Each round: rank 0 chooses the round's particles; they go through the
runtime's dynamic queue (:func:`map_chunks`) with only their own parameter
rows as payload; workers classify them
(:func:`~cistem_mpi.kernels.classify2d.classify_particle`) and keep partial
class sums (2 half sets x K x m x (m/2+1) complex + CTF² weights, float64)
that are summed onto rank 0 once per round (:func:`reduce_sum`).  Rank 0
makes the class averages, re-seeds empty classes (from the two half-set
averages of the largest class), auto-centres them, estimates each class's
resolution (half-set FRC = 0.143), ranks the classes
(:func:`~cistem_mpi.kernels.classify2d.rank_classes`) and checkpoints the
round (``--resume``).  At the end every round is registered as a
Classification # with its class averages, gallery, parameters and RELION
export.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from cistem_mpi.db import classification as cdb
from cistem_mpi.db import naming
from cistem_mpi.drivers.jobrun import JobContext, add_job_arguments, check_options, run_job
from cistem_mpi.drivers.runtime import CheckpointStore, map_chunks, reduce_sum, rng_from_state, rng_state
from cistem_mpi.errors import InputError
from cistem_mpi.kernels import classify2d as c2

#: Columns sent with each chunk (a particle's own row only).
_ROW = np.dtype([("index", np.int64), ("position", np.int32), ("df1", np.float32), ("df2", np.float32),
                 ("angast", np.float32), ("pshift", np.float32), ("half", np.int8)])


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``classify-2d``."""
    p = sub.add_parser("classify-2d", help="2D classification (maximum likelihood, cisTEM's refine2d)",
                       description="Classify a refinement package's particles into 2D classes; every round is "
                                   "registered as a Classification # with class averages, parameters, a gallery, "
                                   "a RELION export and an automatic ranking of the classes.")
    add_job_arguments(p)
    p.add_argument("--package", type=int, help="refinement package id (default: the newest)")
    p.add_argument("--classes", type=int, help="number of classes (default: cisTEM's rule, particles/300 "
                                                "rounded down to 50, 40, 30, 20, 10 or 5)")
    p.add_argument("--rounds", type=int, default=20, help="iterations (default 20)")
    p.add_argument("--start-resolution", type=float, default=40.0, help="high-resolution limit of round 1 (Å)")
    p.add_argument("--finish-resolution", type=float, default=8.0, help="high-resolution limit at the end (Å)")
    p.add_argument("--low-resolution", type=float, default=300.0, help="low resolution limit (Å)")
    p.add_argument("--mask-radius", type=float,
                   help="mask radius (Å; default 0.6 x the package's largest dimension, else 40%% of the box)")
    p.add_argument("--search-range", type=float,
                   help="largest shift searched (Å; default 0.33 x largest dimension, else 15%% of the box)")
    p.add_argument("--shift-sigma", type=float, help="SD of the Gaussian shift prior (Å; default search range / 2)")
    p.add_argument("--angular-step", type=float, default=0.0,
                   help="in-plane step (degrees; 0 = binned pixel / mask radius, refine2d's rule)")
    p.add_argument("--smoothing", type=float, default=1.0, help="likelihood smoothing factor (< 1 blurs)")
    p.add_argument("--log-range", type=float, default=c2.LOG_RANGE, help="weights kept within this log range")
    p.add_argument("--particles-per-class", type=int, default=300,
                   help="particles per class used in the early rounds (default 300)")
    p.add_argument("--all-particles-rounds", type=int, default=5, help="last rounds that use every particle")
    p.add_argument("--no-auto-centre", action="store_true", help="do not centre the class averages")
    p.add_argument("--reseed-fraction", type=float, default=0.2,
                   help="re-seed a class holding less than this fraction of the mean class population (by "
                        "splitting the largest class), except in the last 3 rounds; empty classes always (default 0.2)")
    p.add_argument("--seed", type=int, default=1, help="random seed (starting classes, particle subsets)")
    p.set_defaults(func=_run)


def _run(a: argparse.Namespace) -> int:
    """Check the plain numeric options before the job exists, then run the job."""
    check_options(a, positive=("smoothing", "log_range", "start_resolution", "finish_resolution", "low_resolution",
                               "particles_per_class", "mask_radius", "shift_sigma"),
                  non_negative=("search_range", "angular_step", "all_particles_rounds", "reseed_fraction"),
                  at_least_one=("classes", "rounds"))
    return run_job(a, "classify_2d", _job)


# ------------------------------------------------------------------ plan (rank 0)
def schedule(rounds: int, start: float, finish: float, all_rounds: int, n_particles: int, n_classes: int,
             per_class: int) -> list[dict[str, float]]:
    """Per-round high-resolution limit (Å) and fraction of particles used (cisTEM's GUI schedule).

    >>> s = schedule(20, 40.0, 8.0, 5, 100000, 50, 300)
    >>> s[0]["resolution"], s[15]["resolution"], s[0]["fraction"], s[19]["fraction"]
    (40.0, 8.0, 0.15, 1.0)
    """
    ramp = max(1, rounds - max(0, all_rounds))
    out = []
    for r in range(rounds):
        t = min(1.0, r / max(1, ramp)) if rounds > 1 else 1.0
        res = start + (finish - start) * t
        frac = 1.0 if r >= rounds - all_rounds else min(1.0, n_classes * per_class / max(1, n_particles))
        out.append({"resolution": float(res), "fraction": float(frac)})
    return out


def _plan(ctx: JobContext) -> dict[str, Any]:
    """Check every option and gather the particles (rank 0); InputError before any work."""
    from cistem_mpi.io.mrc import open_stack
    from cistem_mpi.io.param_store import read_params_column, read_params_h5
    from cistem_mpi.kernels.reconstruction import half_sets

    a = ctx.args
    assert ctx.project is not None
    conn = ctx.project.conn
    src = cdb.package_source(conn, a.get("package"))
    if src is None:
        raise InputError("--package", "no refinement package in the project (make one with package create)"
                         if a.get("package") is None else f"no refinement package {a['package']}")
    if not src["params_path"]:
        raise InputError("--package", f"package {src['package']['id']} has no parameters (no refinement)")
    stack = src["stack"]
    stack_path = ctx.project.resolve(stack["path"])
    ps = float(stack["pixel_size"])
    params_path = ctx.project.resolve(src["params_path"])
    params = read_params_h5(params_path)
    with open_stack(stack_path, pixel_size=ps) as st:
        n_stack, box = len(st), int(st.shape[-1])
    if len(params) == 0:
        raise InputError(params_path, "the package has no particles")
    if params["position"].min() < 1 or params["position"].max() > n_stack:
        raise InputError(params_path, f"particle positions outside the stack (1..{n_stack})")
    n = len(params)
    k = a.get("classes") or c2.default_class_count(n)
    if k < 1:
        raise InputError("--classes", "must be at least 1")
    if k > n:
        raise InputError("--classes", f"{k} classes but only {n} particles in package {src['package']['id']}")
    rounds = int(a.get("rounds") or 20)
    if rounds < 1:
        raise InputError("--rounds", "must be at least 1")
    largest = src["package"]["largest_dimension"]
    mask_a = a.get("mask_radius") or (0.6 * largest if largest else 0.4 * box * ps)
    mask_a = min(mask_a, 0.5 * box * ps - ps) if not a.get("mask_radius") else mask_a
    if mask_a <= 0:
        raise InputError("--mask-radius", "must be positive")
    if mask_a > 0.5 * box * ps:
        raise InputError("--mask-radius", f"{mask_a:g} Å is larger than the box (radius {0.5 * box * ps:g} Å)")
    search_a = a.get("search_range")
    if search_a is None:
        search_a = 0.33 * largest if largest else 0.15 * box * ps
    if search_a < 0:
        raise InputError("--search-range", "must not be negative")
    sigma_a = a.get("shift_sigma") or max(search_a / 2.0, ps)
    start, finish = float(a.get("start_resolution", 40.0)), float(a.get("finish_resolution", 8.0))
    nyquist = 2.0 * ps
    for opt, val in (("--start-resolution", start), ("--finish-resolution", finish)):
        if val < nyquist - 1e-6:
            raise InputError(opt, f"{val:g} Å is past Nyquist ({nyquist:g} Å at {ps:g} Å/pixel)")
    if finish > start:
        raise InputError("--finish-resolution", f"{finish:g} Å is coarser than --start-resolution {start:g} Å")
    low = float(a.get("low_resolution", 300.0))
    if low <= start:
        raise InputError("--low-resolution", f"{low:g} Å must be coarser than the high-resolution limit")
    if not 0.0 <= float(a.get("reseed_fraction", 0.2)) < 1.0:
        raise InputError("--reseed-fraction", "must be in [0, 1)")
    for opt, key in (("--smoothing", "smoothing"), ("--log-range", "log_range"),
                     ("--particles-per-class", "particles_per_class")):
        if a.get(key) is not None and a[key] <= 0:
            raise InputError(opt, "must be positive")
    if a.get("angular_step", 0.0) < 0:
        raise InputError("--angular-step", "must not be negative")
    all_rounds = int(a.get("all_particles_rounds", 5))
    if all_rounds < 0:
        raise InputError("--all-particles-rounds", "must not be negative")
    stored = read_params_column(params_path, "half_set")
    halves = (np.asarray(stored).astype(np.int8) if stored is not None and len(stored) == n
              else half_sets(params["position"])) - 1
    rows = np.zeros(n, dtype=_ROW)
    rows["index"] = np.arange(n)
    for col in ("position", "df1", "df2", "angast", "pshift"):
        rows[col] = params[col]
    rows["half"] = halves
    return {
        "package_id": int(src["package"]["id"]), "stack": str(stack_path), "pixel_size": ps, "box": box,
        "optics": (float(stack["voltage"]), float(stack["cs"]), float(stack["amplitude_contrast"])),
        "white": bool(stack["protein_is_white"]) if "protein_is_white" in stack.keys() else False,
        "n_classes": int(k), "mask_radius": float(mask_a), "search_range": float(search_a),
        "shift_sigma": float(sigma_a), "low_resolution": low, "angular_step": float(a.get("angular_step", 0.0)),
        "smoothing": float(a.get("smoothing", 1.0)), "log_range": float(a.get("log_range", c2.LOG_RANGE)),
        "auto_centre": not a.get("no_auto_centre", False), "seed": int(a.get("seed", 1)),
        "reseed_fraction": float(a.get("reseed_fraction", 0.2)),
        "schedule": schedule(rounds, start, finish, all_rounds, n, k, int(a.get("particles_per_class", 300))),
        "params": params, "rows": rows, "params_path": str(params_path),
    }


def _settings(plan: dict[str, Any], resolution: float, psi_start: float) -> c2.ClassifySettings:
    n, ps = plan["box"], plan["pixel_size"]
    m = c2.binned_size(n, ps, resolution)
    mask_px = plan["mask_radius"] / ps
    edge = min(max(2.0, 10.0 / ps), max(1.0, 0.5 * n - mask_px))
    return c2.ClassifySettings(n=n, m=m, pixel_size=ps, mask_radius=mask_px, mask_edge=edge,
                               low_resolution=plan["low_resolution"], search_range=plan["search_range"] / ps,
                               shift_sigma=plan["shift_sigma"] / ps, psi_step=plan["angular_step"],
                               psi_start=psi_start, smoothing=plan["smoothing"], log_range=plan["log_range"],
                               white_protein=plan["white"])


# ------------------------------------------------------------------ one pass over particles
def _pass(ctx: JobContext, job: dict[str, Any] | None, rows: np.ndarray | None) -> dict[str, Any] | None:
    """Classify (or, for the start, just average) the given particles on every rank; sums on rank 0.

    ``job`` (broadcast): settings, references (K, m, m//2+1), log priors, angles, and for the
    start a membership matrix is sent with each chunk instead.
    """
    world = ctx.world
    job = world.bcast(job)
    s: c2.ClassifySettings = job["settings"]
    k = job["k"]
    num, den = c2.new_sums(k, s.m)
    pop = np.zeros(k, dtype=np.float64)
    state: dict[str, Any] = {}
    band = c2.band_mask(s.m, s.n, s.pixel_size, s.low_resolution)

    def payload(start: int, stop: int) -> Any:
        assert rows is not None
        chunk = rows[start:stop]
        if job["startup"]:
            return chunk, job_members[chunk["index"]]
        return chunk, None

    def chunk(start: int, stop: int, data: Any) -> list[Any]:
        from cistem_mpi.io.mrc import open_stack

        if "stack" not in state:
            state["stack"] = open_stack(job["stack"], pixel_size=s.pixel_size)
        part, members = data
        out = []
        for i, row in enumerate(part):
            img = state["stack"][int(row["position"]) - 1]
            ctf = (float(row["df1"]), float(row["df2"]), float(row["angast"]), float(row["pshift"]))
            if job["startup"]:
                x, _ = c2.particle_ft(img, s)
                x = x * band
                cr = c2.rotated_ctfs(s.m, s.binned_pixel, job["optics"], *ctf, np.zeros(1))[0]
                for c in np.nonzero(members[i])[0]:
                    num[int(row["half"]), c] += cr * x
                    den[int(row["half"]), c] += cr * cr
                    pop[c] += 1.0
                out.append(None)
                continue
            o = c2.classify_particle(img, ctf, job["optics"], job["refs"], job["log_prior"], s, job["angles"],
                                     sums=(num, den), half=int(row["half"]), class_weights=pop)
            out.append((o.class_index, o.psi, o.shx, o.shy, o.logp, o.sigma, o.score, o.occupancy))
        return out

    job_members = job.get("members") if world.is_controller else None
    n_tasks = len(rows) if rows is not None else 0
    results = map_chunks(world, n_tasks, chunk, payload=payload, min_chunk=1, max_chunk=32,
                         progress=ctx.progress if world.is_controller else None)
    if "stack" in state:
        state["stack"].close()
    num_t = reduce_sum(world, num)
    den_t = reduce_sum(world, den)
    pop_t = reduce_sum(world, pop)
    if not world.is_controller:
        return None
    return {"num": num_t, "den": den_t, "pop": pop_t, "results": results}


# ------------------------------------------------------------------ class averages (rank 0)
def class_averages(plan: dict[str, Any], s: c2.ClassifySettings, sums: dict[str, Any], n_used: int,
              log, min_fraction: float = 0.0) -> dict[str, Any]:
    """Class averages, re-seeding, centring, resolution per class (rank 0).

    A class holding less than one particle, or less than ``min_fraction`` of the
    mean class population, is re-seeded by splitting the largest class.
    """
    k = plan["n_classes"]
    pop = sums["pop"].astype(np.float64)
    occ = pop / max(1.0, float(n_used))
    full, halves = c2.class_averages_ft(sums["num"], sums["den"], occ)
    reseeded = []
    if k > 1:
        floor = max(1.0, min_fraction * float(pop.sum()) / k)
        for c in np.argsort(pop, kind="stable"):
            if pop[c] >= floor:
                break
            big = int(np.argmax(pop))
            if pop[big] < 2.0 * floor or big == c:
                continue
            # the largest class splits: one half set each, so the two differ and can separate
            full[c] = halves[0, big]
            full[big] = halves[1, big]
            pop[c] = pop[big] = 0.5 * pop[big]
            reseeded.append(int(c) + 1)
        if reseeded:
            log.info("re-seeded empty or small class(es) %s by splitting the largest class", reseeded)
    images = c2.ft_to_image(full, s.n)
    shifts = []
    if plan["auto_centre"]:
        for c in range(k):
            images[c], d = c2.centre_image(images[c], s.mask_radius)
            shifts.append(d)
    res = np.array([c2.resolution_from_frc(c2.frc(halves[0, c], halves[1, c]), s.m, s.binned_pixel)
                    if pop[c] >= 2 else float(s.n * s.pixel_size) for c in range(k)])
    return {"images": images.astype(np.float32), "pop_soft": pop, "resolution": res, "reseeded": reseeded}


def _references(images: np.ndarray, s: c2.ClassifySettings) -> np.ndarray:
    """Class averages as references: refine2d's clamp (>= -0.3 max), soft mask, binned transform."""
    from cistem_mpi.kernels.masks import circle_mask

    mask = circle_mask(s.n, s.mask_radius, s.mask_edge)
    out = []
    for img in images:
        im = np.maximum(img, -0.3 * float(img.max())) if img.max() > 0 else img
        out.append(im * mask)
    return (c2.image_to_ft(np.stack(out), s.m) * c2.band_mask(s.m, s.n, s.pixel_size, s.low_resolution)
            ).astype(np.complex64)


# ------------------------------------------------------------------ the job
def _job(ctx: JobContext) -> dict:
    world = ctx.world
    store = CheckpointStore(ctx.checkpoint_dir, keep=1_000_000)
    plan: dict[str, Any] | None = None
    st: dict[str, Any] = {}
    if ctx.is_controller:
        plan = _plan(ctx)
        rng = np.random.default_rng(plan["seed"])
        st = {"round": -1, "rng": rng}
        if ctx.resumed_from is not None and store.iterations():
            ck = store.load(store.iterations()[-1])
            if ck.arrays["images"].shape[0] != plan["n_classes"] or len(ck.arrays["params"]) != len(plan["rows"]):
                raise InputError("--resume", f"job {ctx.resumed_from} classified {len(ck.arrays['params'])} "
                                             f"particles into {ck.arrays['images'].shape[0]} classes; resume it "
                                             "with the same package and --classes")
            st = {"round": int(ck.state["round"]), "rng": rng_from_state(ck.state["rng"]),
                  "images": ck.arrays["images"], "pop": ck.arrays["pop_soft"], "params": ck.arrays["params"],
                  "class_2d": ck.arrays["class_2d"]}
            ctx.log.info("resuming after round %d", st["round"])
    go = world.bcast(st["round"] < 0 if ctx.is_controller else None)
    if go:  # starting classes from random subsets
        job = rows = None
        if ctx.is_controller:
            assert plan is not None
            k, n = plan["n_classes"], len(plan["rows"])
            s0 = _settings(plan, plan["schedule"][0]["resolution"], 0.0)
            members = st["rng"].random((n, k)) < (1.0 if k == 1 else 2.0 / k)
            members[np.arange(n), st["rng"].integers(0, k, n)] |= ~members.any(axis=1)
            job = {"settings": s0, "k": k, "startup": True, "members": members, "stack": plan["stack"],
                   "optics": plan["optics"]}
            rows = plan["rows"]
            ctx.log.info("starting %d classes from random subsets of %d particles", k, n)
        sums = _pass(ctx, job, rows)
        if ctx.is_controller:
            assert plan is not None and sums is not None
            plan_s = job["settings"]
            av = class_averages(dict(plan, auto_centre=False), plan_s, sums, len(rows) * 2 // max(1, plan["n_classes"]),
                           ctx.log)
            st.update(images=av["images"], pop=np.full(plan["n_classes"], len(rows) / plan["n_classes"]),
                      params=_initial_params(plan["params"]), class_2d=np.zeros(len(rows), dtype=np.int32), round=0)
            _write_startup(ctx, plan, st["images"])
            _save(store, st, {"resolution_limit": plan["schedule"][0]["resolution"]}, None)
    total = world.bcast(len(plan["schedule"]) if ctx.is_controller else None)
    r = world.bcast(st.get("round") if ctx.is_controller else None)
    while r < total:
        r += 1
        job = rows = None
        if ctx.is_controller:
            assert plan is not None
            step = plan["schedule"][r - 1]
            rng = st["rng"]
            s = _settings(plan, step["resolution"], 0.0)
            angles = c2.rotation_angles(s.binned_pixel, plan["mask_radius"], s.psi_step)
            # refine2d: the grid starts at a random fraction of half a step each round
            angles = angles + float(rng.uniform(0.0, 1.0)) * 0.5 * (360.0 / len(angles))
            n = len(plan["rows"])
            use = np.sort(rng.permutation(n)[: max(1, int(round(step["fraction"] * n)))])
            pop = np.asarray(st["pop"], dtype=np.float64)
            prior = np.log(np.maximum(pop, 1e-3) / max(pop.sum(), 1e-3))
            job = {"settings": s, "k": plan["n_classes"], "startup": False, "refs": _references(st["images"], s),
                   "log_prior": prior, "angles": angles, "stack": plan["stack"], "optics": plan["optics"]}
            rows = plan["rows"][use]
            ctx.log.info("round %d/%d: %d particles, %d classes, limit %.1f Å (binned box %d, %.2f Å/px), "
                         "%d rotations, shifts to %.1f Å", r, total, len(use), plan["n_classes"], step["resolution"],
                         s.m, s.binned_pixel, len(angles), plan["search_range"])
        sums = _pass(ctx, job, rows)
        if ctx.is_controller:
            assert plan is not None and sums is not None
            s = job["settings"]
            _round_done(ctx, plan, st, s, sums, use, r)
            _save(store, st, {"resolution_limit": plan["schedule"][r - 1]["resolution"]}, st["stats"])
        r = world.bcast(r)
    import resource

    peaks = world.gather(round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1))
    if not ctx.is_controller:
        return {}
    assert plan is not None and peaks is not None
    ctx.log.info("peak memory per rank (MB): %s", peaks)
    out = _register(ctx, plan, store)
    out["peak_rss_mb_per_rank"] = peaks
    return out


def _initial_params(params: np.ndarray) -> np.ndarray:
    p = params.copy()
    for col in ("psi", "theta", "phi", "shx", "shy", "logp", "score", "change"):
        p[col] = 0.0
    p["occ"] = 100.0
    p["sigma"] = 1.0
    return p


def _round_done(ctx: JobContext, plan: dict[str, Any], st: dict[str, Any], s: c2.ClassifySettings,
                sums: dict[str, Any], use: np.ndarray, r: int) -> None:
    """Fold the round's results into the per-particle table and make the class averages (rank 0)."""
    k = plan["n_classes"]
    res_arr = np.array(sums["results"], dtype=np.float64).reshape(len(use), 8)
    params = st["params"].copy()
    old_score = params["score"][use].copy()
    params["psi"][use] = res_arr[:, 1]
    params["shx"][use] = res_arr[:, 2] * plan["pixel_size"]
    params["shy"][use] = res_arr[:, 3] * plan["pixel_size"]
    params["logp"][use] = np.round(res_arr[:, 4])
    params["sigma"][use] = res_arr[:, 5]
    params["score"][use] = res_arr[:, 6]
    params["occ"][use] = res_arr[:, 7]
    params["change"][use] = res_arr[:, 6] - old_score
    class_2d = st["class_2d"].copy()
    class_2d[use] = res_arr[:, 0].astype(np.int32) + 1
    # small classes are re-seeded while the schedule still has rounds to settle them
    settle = max(2, int(plan.get("settle_rounds", 3)))
    small = plan["reseed_fraction"] if r <= len(plan["schedule"]) - settle else 0.0
    av = class_averages(plan, s, sums, len(use), ctx.log, small)
    hard = np.bincount(class_2d[class_2d > 0] - 1, minlength=k).astype(np.float64)
    assigned = res_arr[:, 0].astype(int)
    score = np.array([res_arr[assigned == c, 6].mean() if np.any(assigned == c) else 0.0 for c in range(k)])
    rank, selected = c2.rank_classes(hard, av["resolution"], score)
    moved = float(np.mean(st["class_2d"][use] != class_2d[use])) if r > 1 else 1.0
    st.update(images=av["images"], pop=av["pop_soft"], params=params, class_2d=class_2d, round=r,
              stats={"population": hard, "resolution": av["resolution"], "score": score, "rank": rank,
                     "selected": selected.astype(np.int8), "pop_soft": av["pop_soft"]})
    order = np.argsort(rank)
    ctx.log.info("round %d: %.1f%% changed class; ranking (class: particles, resolution, score): %s", r,
                 100 * moved, "; ".join(f"{c + 1}: {int(hard[c])}, {av['resolution'][c]:.1f} Å, {score[c]:.1f}"
                                        f"{' *' if selected[c] else ''}" for c in order))


def _save(store: CheckpointStore, st: dict[str, Any], extra: dict[str, Any], stats: dict[str, Any] | None) -> None:
    arrays = {"images": st["images"], "pop_soft": np.asarray(st["pop"], dtype=np.float64), "params": st["params"],
              "class_2d": st["class_2d"]}
    for key, v in (stats or {}).items():
        arrays[f"stat_{key}"] = np.asarray(v)
    store.save(int(st["round"]), {"round": int(st["round"]), "rng": rng_state(st["rng"]), **extra}, arrays=arrays)


def _write_startup(ctx: JobContext, plan: dict[str, Any], images: np.ndarray) -> None:
    from cistem_mpi.io.mrc import write_mrc

    folder = ctx.scratch.parent / "Startup"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"startup_classes_job_{ctx.job_id:04d}.mrc"
    write_mrc(path, images.astype(np.float32), plan["pixel_size"], stack=True)
    ctx.log.info("starting classes: %s", path)


# ------------------------------------------------------------------ registration (rank 0)
def _register(ctx: JobContext, plan: dict[str, Any], store: CheckpointStore) -> dict:
    from cistem_mpi.io.mrc import write_mrc
    from cistem_mpi.io.param_store import write_params_h5
    from cistem_mpi.io.params import Optics
    from cistem_mpi.io.plots import save_gallery_png
    from cistem_mpi.io.relion_2d import write_data_star, write_model_star

    assert ctx.project is not None
    conn = ctx.project.conn
    number = naming.next_classification_number(conn)
    ca_dir = ctx.project.root / naming.ASSET_DIRS["class_averages"]
    par_dir = ctx.project.root / naming.ASSET_DIRS["parameters"]
    ca_dir.mkdir(parents=True, exist_ok=True)
    par_dir.mkdir(parents=True, exist_ok=True)
    parent = None
    summary = []
    k = plan["n_classes"]
    ps = plan["pixel_size"]
    optics = Optics(pixel_size=ps, voltage=plan["optics"][0], cs=plan["optics"][1],
                    amplitude_contrast=plan["optics"][2])
    for it in store.iterations():
        if it == 0:
            continue
        ck = store.load(it)
        images, params, class_2d = ck.arrays["images"], ck.arrays["params"], ck.arrays["class_2d"]
        stats = {key[5:]: v for key, v in ck.arrays.items() if key.startswith("stat_")}
        if not (np.all(np.isfinite(images)) and np.all(np.isfinite(stats["resolution"]))):
            raise RuntimeError(f"round {it}: non-finite class averages")
        mrc = ca_dir / naming.class_averages_name(number)
        write_mrc(ctx.stage(mrc), images, ps, stack=True)
        order = np.lexsort((np.arange(k), -stats["population"]))
        png = mrc.with_suffix(".png")
        save_gallery_png(ctx.stage(png), images[order],
                         [f"#{c + 1} n={int(stats['population'][c])} {stats['resolution'][c]:.0f}Å" for c in order])
        h5 = par_dir / f"classification_{number:04d}.h5"
        write_params_h5(ctx.stage(h5), params, {"pixel_size": ps, "classification": number, "iteration": it},
                        {"class_2d": class_2d, "half_set": (plan["rows"]["half"] + 1).astype(np.int8)})
        data_star = par_dir / f"classification_{number:04d}_data.star"
        write_data_star(ctx.stage(data_star), params, class_2d, optics, Path(plan["stack"]), plan["box"],
                        plan["white"])
        model_star = par_dir / f"classification_{number:04d}_model.star"
        write_model_star(ctx.stage(model_star), mrc, stats, ps, float(ck.state["resolution_limit"]))
        row = ctx.register("classifications_2d", number=number, package_id=plan["package_id"], n_classes=k, path=mrc,
                           params_path=h5, iteration=it, parent_id=parent,
                           resolution_limit=float(ck.state["resolution_limit"]))
        for c in range(k):
            ctx.register("classification_2d_classes", classification_id=row, class_number=c + 1,
                         population=float(stats["population"][c]), resolution=float(stats["resolution"][c]),
                         score=float(stats["score"][c]), rank=int(stats["rank"][c]),
                         selected=int(stats["selected"][c]))
        parent = row
        summary.append({"classification": number, "round": it,
                        "resolution_limit": float(ck.state["resolution_limit"]),
                        "populations": [int(x) for x in stats["population"]]})
        last = (number, stats)
        number += 1
    number, stats = last
    order = np.argsort(stats["rank"])
    ranking = [{"class": int(c + 1), "rank": int(stats["rank"][c]), "population": int(stats["population"][c]),
                "resolution": round(float(stats["resolution"][c]), 2), "score": round(float(stats["score"][c]), 2),
                "selected": bool(stats["selected"][c])} for c in order]
    chosen = [x["class"] for x in ranking if x["selected"]]
    ctx.log.info("Classification #%d: automatic ranking (best first): %s", number,
                 ", ".join(f"{x['class']}{'*' if x['selected'] else ''}" for x in ranking))
    ctx.log.info("selected automatically: %s  (accept with: package create --from-classification %d --select auto)",
                 ",".join(map(str, sorted(chosen))), number)
    return {"classifications": summary, "final_classification": number, "ranking": ranking,
            "auto_selected": sorted(chosen)}

"""``find-particles``: cisTEM's template-free particle picker (and reference-based picking) as an MPI job.

One task per image through the dynamic queue (:mod:`cistem_mpi.drivers.itemjob`):
:func:`cistem_mpi.kernels.picking.find_particles` with the image's newest CTF
estimate (images whose newest estimate is flagged ``poor_fit`` are skipped
unless ``--include-poor-fits``).  Template-free by default (a soft disc of
``--characteristic-radius``); with ``--classification N`` (its class
averages: the automatically selected ones, or ``--classes``),
``--references STACK`` (2D class averages or projections, protein white;
``--invert-references`` if dark) or ``--map MAP`` (projected at
``--map-views`` directions) each reference is tried at ``--rotations``
in-plane angles.

Outputs: ``particle_positions`` rows (x, y in Å from the first pixel,
``peak`` = score in noise sigma; the table ``import positions`` writes, so
``package create --from-positions --positions-job J`` cuts them), and in
``Assets/ParticlePosition/find_particles_<n>/``: per image a RELION coordinate
STAR (``<image>_autopick.star``), an EMAN ``.box`` and a PNG (the resampled
micrograph, picks circled, rejected areas shaded), plus ``autopick.star``
listing the coordinate files.  The job result has picks per image, the
per-image threshold report (picks at each of ``--report-thresholds``) and
the histogram of peak heights.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np

from cistem_mpi.db import picking as picking_db
from cistem_mpi.db.project import Project
from cistem_mpi.drivers.itemjob import (
    ItemContext, ItemOutcome, ItemPlan, add_item_arguments, check_selection, run_item_job,
)
from cistem_mpi.drivers.jobrun import JobContext, add_job_arguments, check_options
from cistem_mpi.errors import InputError

JOB_TYPE = "find_particles"
PICK_DIR = "Assets/ParticlePosition"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``find-particles`` command."""
    p = sub.add_parser("find-particles", help="pick particles on every image (cisTEM's matched filter; "
                                              "or reference-based from 2D classes / a 3D map)")
    add_job_arguments(p)
    add_item_arguments(p)
    p.add_argument("--images", nargs="+", metavar="IMAGE", help="image ids or names (default: every image)")
    p.add_argument("--characteristic-radius", type=float, default=80.0,
                   help="radius of the disc template, Å, at the middle of its 5-pixel cosine edge as "
                        "cisTEM's (80)")
    p.add_argument("--maximum-radius", type=float, default=120.0,
                   help="maximum particle radius, Å: picks are at least twice this apart (120)")
    p.add_argument("--threshold", type=float, default=6.0, help="minimum peak height, noise sigma (6.0)")
    p.add_argument("--edge", type=int, default=128, help="minimum distance from the edges, pixels (128)")
    p.add_argument("--highest-resolution", type=float, default=30.0,
                   help="highest resolution used, Å; the image is resampled to half this per pixel (30)")
    p.add_argument("--background-boxes", type=int, default=50,
                   help="lowest-variance boxes that give the noise spectrum (50)")
    p.add_argument("--avoid-high-variance", action="store_true",
                   help="also reject areas of high local variance (off, as in cisTEM's GUI)")
    p.add_argument("--keep-abnormal-mean", action="store_true",
                   help="do not reject areas of abnormal local mean (carbon, contamination)")
    p.add_argument("--fwhm-factor", type=float, default=2.0,
                   help="area bounds are mode +/- this x FWHM of the local statistics (2)")
    p.add_argument("--references", metavar="MRCS", help="reference images (2D class averages, projections; "
                                                        "protein white, no CTF) for reference-based picking")
    p.add_argument("--reference-pixel-size", type=float, help="Å/pixel of --references (default: their header)")
    p.add_argument("--classification", type=int, metavar="N",
                   help="references: the class averages of 2D Classification #N (see --classes)")
    p.add_argument("--classes", default="auto", help="classes of --classification: 'auto' (the automatic "
                                                     "selection; all if none), or comma-separated numbers")
    p.add_argument("--invert-references", action="store_true",
                   help="the references show protein dark: invert them")
    p.add_argument("--map", metavar="MRC", help="3D map whose projections are the references")
    p.add_argument("--map-views", type=int, default=10, help="projection directions of --map (10)")
    p.add_argument("--rotations", type=int, default=36, help="in-plane rotations per reference (36)")
    p.add_argument("--include-poor-fits", action="store_true",
                   help="also pick images whose newest CTF estimate is flagged as a poor fit")
    p.add_argument("--box", type=int, help="box size written to the .box files, pixels "
                                           "(default: twice the maximum radius)")
    p.add_argument("--report-thresholds", default="3,4,5,6,7,8,10",
                   help="thresholds of the per-image report, comma-separated (3,4,5,6,7,8,10)")
    p.set_defaults(func=lambda a: run_item_job(_checked(a), JOB_TYPE, plan, compute, register_results))


def _thresholds(text: str) -> list[float]:
    try:
        v = sorted(float(t) for t in str(text).split(",") if t.strip())
    except ValueError:
        raise InputError("--report-thresholds", f"not a comma-separated list of numbers: {text!r}") from None
    if not v or any(not math.isfinite(t) or t <= 0 for t in v):
        raise InputError("--report-thresholds", "thresholds must be positive numbers")
    return v


def _checked(a: argparse.Namespace) -> argparse.Namespace:
    """Every option checked before the job record exists (exit 2, nothing recorded)."""
    if not (a.threshold > 0 and math.isfinite(a.threshold)):
        raise InputError("--threshold", f"must be above 0 sigma, got {a.threshold:g}")
    check_options(a, positive=("characteristic_radius", "maximum_radius", "highest_resolution", "fwhm_factor",
                               "reference_pixel_size"),
                  non_negative=("edge",), at_least_one=("background_boxes", "map_views", "rotations", "box"))
    if a.characteristic_radius > a.maximum_radius:
        raise InputError("--characteristic-radius", f"{a.characteristic_radius:g} Å is larger than "
                                                     f"--maximum-radius {a.maximum_radius:g} Å")
    if sum(bool(v) for v in (a.references, a.map, a.classification is not None)) > 1:
        raise InputError("--references/--map/--classification", "give one source of references")
    _thresholds(a.report_thresholds)
    return a


def _references(project: Project, args: argparse.Namespace) -> tuple[np.ndarray | None, float | None]:
    """The reference images (n, T, T) and their pixel size, or (None, None) for template-free picking."""
    refs, ps = _read_references(project, args)
    if refs is not None and args.invert_references:
        refs = -refs
    return refs, ps


def _read_references(project: Project, args: argparse.Namespace) -> tuple[np.ndarray | None, float | None]:
    from cistem_mpi.io.mrc import read_mrc

    if args.classification is not None:
        from cistem_mpi.db import classification as class_db

        row = class_db.classification_by_number(project.conn, args.classification)
        if row is None:
            raise InputError("--classification", f"no Classification #{args.classification} in this project")
        path = project.resolve(row["path"])
        if not Path(path).is_file():
            raise InputError(path, "class averages file not found")
        data, ps = read_mrc(path)
        data = np.asarray(data, dtype=np.float32).reshape(-1, data.shape[-2], data.shape[-1])
        if str(args.classes).strip().lower() == "auto":
            chosen = class_db.auto_selected_classes(project.conn, args.classification) or \
                list(range(1, len(data) + 1))
        else:
            try:
                chosen = [int(c) for c in str(args.classes).split(",") if c.strip()]
            except ValueError:
                raise InputError("--classes", f"not 'auto' or a list of class numbers: {args.classes!r}") from None
        bad = [c for c in chosen if not 1 <= c <= len(data)]
        if bad or not chosen:
            raise InputError("--classes", f"class {bad[0] if bad else '?'} is not one of 1..{len(data)}")
        refs = data[np.array(chosen) - 1]
        if not np.isfinite(refs).all():
            raise InputError(path, "class averages contain NaN/Inf")
        rps = args.reference_pixel_size or ps
        if not rps or rps <= 0:
            raise InputError(path, "no pixel size in the header: give --reference-pixel-size")
        return refs, float(rps)
    if args.references:
        path = Path(args.references)
        if not path.is_file():
            raise InputError(path, "reference file not found")
        data, ps = read_mrc(path)
        data = np.asarray(data, dtype=np.float32)
        if data.ndim == 2:
            data = data[None]
        if data.ndim != 3 or data.shape[1] != data.shape[2]:
            raise InputError(path, f"references must be square images, got shape {data.shape}")
        if not np.isfinite(data).all():
            raise InputError(path, "references contain NaN/Inf")
        rps = args.reference_pixel_size or ps
        if not rps or rps <= 0:
            raise InputError(path, "no pixel size in the header: give --reference-pixel-size")
        return data, float(rps)
    if args.map:
        from cistem_mpi.kernels.projection import project

        path = Path(args.map)
        if not path.is_file():
            raise InputError(path, "map file not found")
        vol, ps = read_mrc(path)
        vol = np.asarray(vol, dtype=np.float32)
        if vol.ndim != 3 or len(set(vol.shape)) != 1:
            raise InputError(path, f"map must be a cube, got {vol.shape}")
        if not np.isfinite(vol).all():
            raise InputError(path, "map contains NaN/Inf")
        rps = args.reference_pixel_size or ps
        if not rps or rps <= 0:
            raise InputError(path, "no pixel size in the header: give --reference-pixel-size")
        return project(vol, view_directions(int(args.map_views)), method="cubic"), float(rps)
    return None, None


def view_directions(n: int) -> np.ndarray:
    """``n`` rotation matrices whose viewing directions cover a hemisphere evenly (Fibonacci), psi = 0.

    >>> view_directions(5).shape
    (5, 3, 3)
    """
    from cistem_mpi.kernels.euler import rotation_matrix

    k = np.arange(n) + 0.5
    theta = np.degrees(np.arccos(1.0 - k / n))  # z from 1 to 0: the upper hemisphere
    phi = np.degrees(np.pi * (1.0 + 5.0 ** 0.5) * k) % 360.0
    return rotation_matrix(phi, theta, np.zeros(n))


# ---------------------------------------------------------------------- plan (rank 0)
def plan(project: Project, args: argparse.Namespace) -> ItemPlan:
    """One item per image with a usable CTF estimate; everything checked before any work."""
    rows = picking_db.images_to_pick(project.conn, args.images)
    check_selection(rows, args.images, "image", "--images",
                    "the project has no images (import images or run align-movies first)")
    refs, rps = _references(project, args)
    items, names, skipped = [], [], []
    run = 1
    while (project.root / PICK_DIR / f"find_particles_{run}").exists():
        run += 1
    out_dir = project.root / PICK_DIR / f"find_particles_{run}"
    for r in rows:
        path = project.resolve(r["path"])
        if r["ctf_id"] is None:
            raise InputError(path, f"image {r['name']} has no CTF estimate (run find-ctf, or import ctf)")
        if int(r["poor_fit"] or 0) and not args.include_poor_fits:
            skipped.append(str(r["name"]))
            continue
        if not Path(path).is_file():
            raise InputError(path, f"image file of {r['name']} not found")
        px, nx, ny = float(r["pixel_size"]), int(r["nx"]), int(r["ny"])
        if not (px > 0 and math.isfinite(px)):
            raise InputError(path, f"pixel size is {px:g} Å")
        if 2.0 * args.maximum_radius > min(nx, ny) * px:
            raise InputError("--maximum-radius", f"{args.maximum_radius:g} Å: a particle {2 * args.maximum_radius:g} Å "
                                                 f"across does not fit in image {r['name']} "
                                                 f"({nx}x{ny} px = {nx * px:.0f}x{ny * px:.0f} Å)")
        if args.highest_resolution < 2.0 * px:
            raise InputError("--highest-resolution", f"{args.highest_resolution:g} Å is past Nyquist of image "
                                                     f"{r['name']} ({2 * px:g} Å)")
        box = int(args.box) if args.box else int(2 * round(args.maximum_radius / px))
        stem = out_dir / str(r["name"])
        items.append(dict(image_id=int(r["id"]), name=str(r["name"]), path=str(path), pixel_size=px,
                          voltage=float(r["voltage"]), cs=float(r["cs"]),
                          amplitude_contrast=float(r["amplitude_contrast"]), df1=float(r["df1"]),
                          df2=float(r["df2"]), angast=float(r["angast"]), pshift=float(r["pshift"] or 0.0),
                          star=str(stem) + "_autopick.star", box_file=str(stem) + ".box",
                          png=str(stem) + "_picks.png", box=box))
        names.append(str(r["name"]))
    if not items:
        raise InputError("--include-poor-fits", f"every selected image's newest CTF estimate is a poor fit "
                                                f"({len(skipped)} image(s)); give --include-poor-fits")
    out_dir.mkdir(parents=True, exist_ok=True)
    params = dict(characteristic_radius=float(args.characteristic_radius),
                  maximum_radius=float(args.maximum_radius), threshold=float(args.threshold),
                  edge=int(args.edge), highest_resolution=float(args.highest_resolution),
                  n_background_boxes=int(args.background_boxes), avoid_high_variance=bool(args.avoid_high_variance),
                  avoid_abnormal_mean=not args.keep_abnormal_mean, k_fwhm=float(args.fwhm_factor),
                  n_rotations=int(args.rotations))
    options = dict(params=params, references=refs, reference_pixel_size=rps,
                   thresholds=_thresholds(args.report_thresholds), out_dir=str(out_dir), skipped=skipped,
                   mode="reference" if refs is not None else "template-free")
    return ItemPlan(items=items, names=names, options=options)


# ---------------------------------------------------------------------- compute (any rank)
def compute(item: dict[str, Any], options: dict[str, Any], ictx: ItemContext) -> dict[str, Any]:
    """Pick one image; write its coordinate STAR, .box and PNG (staged); return the picks."""
    from cistem_mpi.io.mrc import read_mrc
    from cistem_mpi.io.picks import save_picks_png, write_box, write_coordinate_star
    from cistem_mpi.kernels.picking import PickingParams, find_particles, threshold_report

    data, _ = read_mrc(item["path"], pixel_size=item["pixel_size"])
    if data.ndim == 3:
        if data.shape[0] != 1:
            raise InputError(item["path"], f"is a stack of {data.shape[0]} images, not one image")
        data = data[0]
    if not np.isfinite(data).all():
        raise InputError(item["path"], f"contains {int((~np.isfinite(data)).sum())} NaN/Inf pixel value(s)")
    if float(data.std()) == 0.0:
        raise InputError(item["path"], "is constant (nothing to pick)")
    p = PickingParams(**options["params"])
    thr = options["thresholds"]
    r = find_particles(np.asarray(data, dtype=np.float32), item["pixel_size"], item["voltage"], item["cs"],
                       item["amplitude_contrast"], item["df1"], item["df2"], item["angast"], item["pshift"],
                       params=p, references=options["references"],
                       reference_pixel_size=options["reference_pixel_size"],
                       report_floor=min(min(thr), p.threshold))
    ps = item["pixel_size"]
    x_px, y_px = r.x / ps, r.y / ps
    write_coordinate_star(ictx.stage(item["star"]), x_px, y_px, r.score)
    write_box(ictx.stage(item["box_file"]), x_px, y_px, item["box"])
    title = (f"{item['name']}: {len(r.x)} picks >= {p.threshold:g} sigma "
             f"({'references' if options['references'] is not None else 'template-free'}), "
             f"{100 * r.stats['rejected_fraction']:.0f} % rejected")
    save_picks_png(ictx.stage(item["png"]), r.image, r.x / r.pixel_size, r.y / r.pixel_size,
                   p.maximum_radius / r.pixel_size, r.rejected, title)
    return dict(x=r.x.astype(np.float64), y=r.y.astype(np.float64), score=r.score.astype(np.float64),
                template=np.asarray(r.template, dtype=np.int32), rotation=np.asarray(r.rotation, dtype=np.float32),
                peak_scores=r.peak_scores.astype(np.float32),
                report=threshold_report(r.peak_scores, np.asarray(thr)), stats=r.stats)


# ---------------------------------------------------------------------- register (rank 0)
def register_results(ctx: JobContext, the_plan: ItemPlan, outcomes: list[ItemOutcome]) -> dict[str, Any]:
    """``particle_positions`` rows, ``autopick.star`` and the job summary."""
    from cistem_mpi.io.picks import write_autopick_star

    assert ctx.project is not None
    per_image: dict[str, int] = {}
    reports: dict[str, list] = {}
    all_peaks = []
    mics, coords = [], []
    total = 0
    for o in outcomes:
        if o.result is None:
            continue
        item, r = the_plan.items[o.index], o.result
        if not (np.isfinite(r["x"]).all() and np.isfinite(r["y"]).all() and np.isfinite(r["score"]).all()):
            raise RuntimeError(f"{o.name}: non-finite pick")  # never register NaN
        rows = [(float(x), float(y), float(s)) for x, y, s in zip(r["x"], r["y"], r["score"])]
        if rows:
            ctx.register_many("particle_positions", ("x", "y", "peak"), rows, image_id=item["image_id"])
        per_image[o.name] = len(rows)
        reports[o.name] = [[t, n] for t, n in r["report"]]
        all_peaks.append(np.asarray(r["peak_scores"], dtype=np.float64))
        mics.append(item["path"])
        coords.append(Path(item["star"]).name)
        total += len(rows)
        ctx.log.info("%s: %d picks (%.0f %% of the image rejected; picks at %s)", o.name, len(rows),
                     100 * r["stats"]["rejected_fraction"],
                     ", ".join(f"{t:g}σ: {n}" for t, n in r["report"]))
    out_dir = Path(the_plan.options["out_dir"])
    star = out_dir / "autopick.star"
    write_autopick_star(ctx.stage(star), mics, coords)
    peaks = np.concatenate(all_peaks) if all_peaks else np.zeros(0)
    hist: dict[str, list] = {"edges": [], "counts": []}
    if peaks.size:
        hi = max(float(peaks.max()), float(the_plan.options["params"]["threshold"])) + 1.0
        counts, edges = np.histogram(peaks, bins=20, range=(float(min(the_plan.options["thresholds"])), hi))
        hist = {"edges": [round(float(e), 3) for e in edges], "counts": [int(c) for c in counts]}
    skipped = the_plan.options["skipped"]
    if skipped:
        ctx.log.warning("%d image(s) skipped: newest CTF estimate is a poor fit (first: %s; --include-poor-fits "
                        "picks them)", len(skipped), skipped[0])
    return {"positions": total, "images": len(per_image), "picks_per_image": per_image,
            "threshold_report": reports, "score_histogram": hist, "mode": the_plan.options["mode"],
            "skipped_poor_fits": skipped, "autopick_star": str(star), "directory": str(out_dir)}

"""``find-ctf``: ctffind 4/5's CTF estimation of every image of the project, as an MPI job.

One task per image through the dynamic queue (:mod:`cistem_mpi.drivers.itemjob`):
the kernel (:func:`cistem_mpi.kernels.ctffind.estimate_ctf`) fits DF1, DF2,
ANGAST (and PSHIFT with ``--phase-plate``) to the image's tile-averaged
amplitude spectrum.  The image is the align-movies sum without dose weighting
when there is one (``images.unweighted_path``: stronger Thon rings), else the
image itself.

Outputs per image, in ``Assets/CTF`` (``<image>_ctf_<n>``, n counting that
image's estimates): ctffind's ``.txt`` and ``_avrot.txt``, a diagnostic PNG
(spectrum with the fit in its right half; 1D profile with the fit and the
fit resolution), and a new ``ctf_estimates`` row (the image's newest
estimate, the table ``import ctf`` writes; ``poor_fit`` = 1 when the fit
resolution is worse than ``--poor-fit-resolution``).  Project-wide:
``Assets/CTF/micrographs_ctf.star`` (RELION, every image's newest estimate)
and ``Assets/CTF/find_ctf_<job>_summary.png`` (histograms of defocus and fit
resolution, also in the job's result).

``--tilt`` (off by default) adds the specimen tilt (ctffind5's idea: the
defocus of sub-regions fitted by a plane) to the row (``tilt_axis``,
``tilt_angle``, degrees) and to columns 8 and 9 of the ``.txt``.  A
particle at pixel (x, y) of an nx x ny image then has the defocus change
``tan(tilt_angle) * (-(x - nx/2) sin(tilt_axis) + (y - ny/2) cos(tilt_axis)) * pixel``
(Å, added to DF1 and DF2; the simulator's convention).

``--thickness`` (off by default) adds the sample thickness (ctffind5's node
model, :func:`cistem_mpi.kernels.ctffind.estimate_thickness`, fitted 30–3 Å
after the defocus) to the row (``thickness``, Å), to column 10 of the
``.txt``, and to the job result; DF1, DF2 and ANGAST are then those refined
with it, and the ``_avrot.txt`` fit row is the slab model
``0.5 (1 - E sinc cos 2 chi)``.

``--from-frames [N]`` (N = 3 by default, as cisTEM) fits the spectrum
averaged over sums of N consecutive frames of the image's movie, each frame
gain-corrected (the movie record's gain reference) and moved by its
align-movies shift (``images.shifts_path``), instead of the image's own
spectrum.  An image without a movie (imported micrographs), without its
shifts file, or binned by align-movies is fitted from the image itself, with
a warning, and listed in the job result (``fitted_from_image``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np

from cistem_mpi.db import ctf as ctf_db
from cistem_mpi.db.project import Project
from cistem_mpi.drivers.itemjob import (
    ItemContext, ItemOutcome, ItemPlan, add_item_arguments, check_selection, run_item_job,
)
from cistem_mpi.drivers.jobrun import JobContext, add_job_arguments, check_options
from cistem_mpi.errors import InputError

JOB_TYPE = "find_ctf"
CTF_DIR = "Assets/CTF"
STAR_NAME = "micrographs_ctf.star"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``find-ctf`` command."""
    p = sub.add_parser("find-ctf", help="estimate every image's CTF (ctffind 4/5): defocus, astigmatism, "
                                        "phase shift, fit resolution")
    add_job_arguments(p)
    add_item_arguments(p)
    p.add_argument("--images", nargs="+", metavar="IMAGE", help="image ids or names (default: every image)")
    p.add_argument("--box", type=int, default=512, help="tile (spectrum) size in pixels (512)")
    p.add_argument("--min-resolution", type=float, default=30.0, help="low-resolution end of the fit, Å (30)")
    p.add_argument("--max-resolution", type=float, default=5.0, help="high-resolution end of the fit, Å (5)")
    p.add_argument("--min-defocus", type=float, default=5000.0, help="defocus search start, Å (5000)")
    p.add_argument("--max-defocus", type=float, default=50000.0, help="defocus search end, Å (50000)")
    p.add_argument("--defocus-step", type=float, default=100.0, help="defocus search step, Å (100)")
    p.add_argument("--phase-plate", action="store_true", help="also fit an additional phase shift (Volta plate)")
    p.add_argument("--min-phase-shift", type=float, default=0.0, help="radians (0)")
    p.add_argument("--max-phase-shift", type=float, default=math.pi, help="radians (pi)")
    p.add_argument("--phase-shift-step", type=float, default=0.1, help="radians (0.1)")
    p.add_argument("--astigmatism-tolerance", type=float, default=0.0,
                   help="restrain the astigmatism to about this many Å (0: no restraint)")
    p.add_argument("--tile-overlap", type=float,
                   help="overlap of neighbouring tiles, 0..0.9 (default: 0.5 when fewer than 9 tiles fit, else 0)")
    p.add_argument("--tilt", action="store_true",
                   help="also estimate the specimen tilt axis and angle from the defocus of sub-regions (ctffind5)")
    p.add_argument("--thickness", action="store_true",
                   help="also estimate the sample thickness from the Thon-ring nodes (ctffind5's model)")
    p.add_argument("--thickness-resolution", type=float, nargs=2, default=(30.0, 3.0), metavar=("LOW", "HIGH"),
                   help="fitting range of the thickness fit, Å (30 3, ctffind5's)")
    p.add_argument("--thickness-range", type=float, nargs=2, default=(500.0, 4000.0), metavar=("MIN", "MAX"),
                   help="thickness search range, Å (500 4000, ctffind5's)")
    p.add_argument("--from-frames", type=int, nargs="?", const=3, default=None, metavar="N",
                   help="fit the spectrum averaged over sums of N aligned frames of the image's movie "
                        "(N = 3 when given without a number, as cisTEM)")
    p.add_argument("--no-resample", action="store_true",
                   help="fit at the image's pixel size even when it is below 1.4 Å (ctffind resamples)")
    p.add_argument("--poor-fit-resolution", type=float, default=0.0,
                   help="flag fits whose fit resolution is worse than this many Å (0: flag none)")
    p.add_argument("--voltage", type=float, help="kV (default: the image's)")
    p.add_argument("--cs", type=float, help="spherical aberration, mm (default: the image's)")
    p.add_argument("--amplitude-contrast", type=float, help="fraction (default: the image's)")
    p.add_argument("--use-weighted", action="store_true",
                   help="fit the dose-weighted image even when an unweighted sum exists")
    p.set_defaults(func=lambda a: run_item_job(_checked(a), JOB_TYPE, plan, compute, register_results))


def _checked(a: argparse.Namespace) -> argparse.Namespace:
    """Every option checked before the job record exists (exit 2, nothing recorded)."""
    check_options(a, positive=("box", "min_resolution", "max_resolution", "defocus_step", "phase_shift_step",
                               "voltage"),
                  non_negative=("min_defocus", "astigmatism_tolerance", "poor_fit_resolution", "cs",
                                "min_phase_shift", "max_phase_shift"))
    if a.box is not None and (a.box < 64 or a.box % 2):
        raise InputError("--box", f"must be an even number of pixels >= 64, got {a.box}")
    if a.min_defocus >= a.max_defocus:
        raise InputError("--min-defocus", f"{a.min_defocus:g} Å is not below --max-defocus {a.max_defocus:g} Å")
    if a.min_resolution <= a.max_resolution:
        raise InputError("--min-resolution", f"{a.min_resolution:g} Å is not a lower resolution than "
                                             f"--max-resolution {a.max_resolution:g} Å")
    if a.phase_plate and a.min_phase_shift >= a.max_phase_shift:
        raise InputError("--min-phase-shift", f"{a.min_phase_shift:g} is not below --max-phase-shift "
                                              f"{a.max_phase_shift:g}")
    if a.tile_overlap is not None and not (0.0 <= a.tile_overlap <= 0.9):
        raise InputError("--tile-overlap", f"must be in [0, 0.9], got {a.tile_overlap}")
    if a.amplitude_contrast is not None and not (0.0 <= a.amplitude_contrast < 1.0):
        raise InputError("--amplitude-contrast", f"must be in [0, 1), got {a.amplitude_contrast}")
    lo, hi = (float(v) for v in a.thickness_resolution)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo > hi > 0):
        raise InputError("--thickness-resolution", f"needs LOW > HIGH > 0 Å, got {lo:g} {hi:g}")
    t0, t1 = (float(v) for v in a.thickness_range)
    if not (math.isfinite(t0) and math.isfinite(t1) and 0 < t0 < t1):
        raise InputError("--thickness-range", f"needs 0 < MIN < MAX Å, got {t0:g} {t1:g}")
    if a.from_frames is not None and a.from_frames < 1:
        raise InputError("--from-frames", f"must be at least 1 frame, got {a.from_frames}")
    return a


def _settings(a: argparse.Namespace) -> dict[str, Any]:
    return dict(box=int(a.box), min_resolution=float(a.min_resolution), max_resolution=float(a.max_resolution),
                min_defocus=float(a.min_defocus), max_defocus=float(a.max_defocus),
                defocus_step=float(a.defocus_step), phase_plate=bool(a.phase_plate),
                min_phase_shift=float(a.min_phase_shift), max_phase_shift=float(a.max_phase_shift),
                phase_shift_step=float(a.phase_shift_step), astigmatism_tolerance=float(a.astigmatism_tolerance),
                resample=not a.no_resample, tilt=bool(a.tilt), tile_overlap=a.tile_overlap,
                thickness=bool(a.thickness), thickness_min_resolution=float(a.thickness_resolution[0]),
                thickness_max_resolution=float(a.thickness_resolution[1]),
                min_thickness=float(a.thickness_range[0]), max_thickness=float(a.thickness_range[1]))


# ---------------------------------------------------------------------- plan (rank 0)
def plan(project: Project, args: argparse.Namespace) -> ItemPlan:
    """One item per image; every image checked (size, optics, Nyquist) before any work."""
    rows = ctf_db.images_to_fit(project.conn, args.images)
    check_selection(rows, args.images, "image", "--images",
                    "the project has no images (import images or run align-movies first)")
    counts = ctf_db.estimate_count(project.conn)
    settings = _settings(args)
    items, names = [], []
    ctf_dir = project.root / CTF_DIR
    ctf_dir.mkdir(parents=True, exist_ok=True)
    for r in rows:
        use = r["unweighted_path"] if (r["unweighted_path"] and not args.use_weighted) else r["path"]
        path = project.resolve(use)
        if not Path(path).is_file():
            raise InputError(path, f"image file of {r['name']} not found")
        voltage = float(args.voltage if args.voltage is not None else r["voltage"])
        cs = float(args.cs if args.cs is not None else r["cs"])
        ac = float(args.amplitude_contrast if args.amplitude_contrast is not None else r["amplitude_contrast"])
        px = float(r["pixel_size"])
        if not (voltage > 0 and math.isfinite(voltage)):
            raise InputError(path, f"acceleration voltage is {voltage:g} kV (give --voltage)")
        if not (px > 0 and math.isfinite(px)):
            raise InputError(path, f"pixel size is {px:g} Å")
        if min(int(r["nx"]), int(r["ny"])) < settings["box"]:
            raise InputError(path, f"image is {r['nx']}x{r['ny']} pixels, smaller than the tile box "
                                   f"{settings['box']} (give a smaller --box)")
        if settings["max_resolution"] < 2.0 * px:
            raise InputError(path, f"--max-resolution {settings['max_resolution']:g} Å is past Nyquist "
                                   f"({2 * px:g} Å at {px:g} Å/pixel)")
        if settings["min_resolution"] > settings["box"] * px:
            raise InputError(path, f"--min-resolution {settings['min_resolution']:g} Å is beyond the tile's "
                                   f"{settings['box'] * px:g} Å")
        frames = _frames_source(project, r, args.from_frames, settings["box"]) if args.from_frames else None
        number = counts.get(int(r["id"]), 0) + 1
        while True:
            stem = f"{r['name']}_ctf_{number}"  # names may hold dots (epu2.9_...): no with_suffix
            outs = [ctf_dir / f"{stem}.txt", ctf_dir / f"{stem}_avrot.txt", ctf_dir / f"{stem}.png"]
            if not any(o.exists() or ctf_db.output_path_taken(project.conn, project.store_path(o)) for o in outs):
                break
            number += 1
        items.append(dict(image_id=int(r["id"]), name=str(r["name"]), path=str(path),
                          image_path=str(project.resolve(r["path"])), pixel_size=px,
                          voltage=voltage, cs=cs, amplitude_contrast=ac, txt=str(outs[0]), avrot=str(outs[1]),
                          png=str(outs[2]), frames=frames))
        names.append(str(r["name"]))
    options = dict(settings=settings, poor_fit_resolution=float(args.poor_fit_resolution),
                   project_root=str(project.root), from_frames=args.from_frames)
    return ItemPlan(items=items, names=names, options=options)


def _frames_source(project: Project, row, group: int, box: int) -> dict[str, Any]:
    """Where the image's aligned frames are (movie, gain, shifts), or ``{"fallback": why}`` to fit the image."""
    from cistem_mpi.db import movies as movies_db
    from cistem_mpi.io.motion_files import read_shifts

    if row["movie_id"] is None:
        return {"fallback": "no movie (not made by align-movies)"}
    if not row["shifts_path"]:
        return {"fallback": "no align-movies shifts recorded"}
    movie = movies_db.list_movies(project.conn, [int(row["movie_id"])])[0]
    path = project.resolve(movie["path"])
    if not Path(path).is_file():
        raise InputError(path, f"movie of image {row['name']} not found (--from-frames)")
    shifts_path = project.resolve(row["shifts_path"])
    if not Path(shifts_path).is_file():
        raise InputError(shifts_path, f"align-movies shifts of image {row['name']} not found (--from-frames)")
    shifts = read_shifts(shifts_path)
    if shifts.shape[0] != int(movie["n_frames"]) or not np.isfinite(shifts).all():
        raise InputError(shifts_path, f"has {shifts.shape[0]} finite shifts for a movie of {movie['n_frames']} frames")
    if (int(movie["nx"]), int(movie["ny"])) != (int(row["nx"]), int(row["ny"])):
        return {"fallback": f"the image is binned ({row['nx']}x{row['ny']} from {movie['nx']}x{movie['ny']} frames)"}
    if min(int(movie["nx"]), int(movie["ny"])) < box:
        raise InputError(path, f"frames are {movie['nx']}x{movie['ny']} pixels, smaller than the tile box {box}")
    gain = project.resolve(movie["gain_path"]) if movie["gain_path"] else None
    if gain is not None and not Path(gain).is_file():
        raise InputError(gain, f"gain reference of movie {movie['name']} not found (--from-frames)")
    return {"movie": str(path), "gain": None if gain is None else str(gain), "n_frames": int(movie["n_frames"]),
            "shifts": shifts.tolist(), "group": int(group), "pixel_size": float(movie["pixel_size"])}


def _frame_spectrum(item: dict[str, Any], opts, shape: tuple[int, int]) -> np.ndarray:
    """The average spectrum of sums of ``group`` aligned, gain-corrected frames, at the fitting geometry."""
    from cistem_mpi.io.gain import match_gain_to_frames, read_gain
    from cistem_mpi.io.movies import open_movie
    from cistem_mpi.kernels.ctffind import fitting_geometry, frame_group_spectrum
    from cistem_mpi.kernels.motion import prepare_frame

    fr = item["frames"]
    path = fr["movie"]
    try:
        movie = (open_movie(path, eer_fractions=fr["n_frames"], pixel_size=fr["pixel_size"])
                 if path.lower().endswith(".eer") else open_movie(path))
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable movie: bad input
        raise InputError(path, f"cannot read movie: {type(exc).__name__}: {exc}") from None
    try:
        n = len(movie)
        if n != fr["n_frames"]:
            raise InputError(path, f"movie has {n} frames, its record and shifts {fr['n_frames']}")
        frame_shape = tuple(int(v) for v in movie.shape[-2:])
        if frame_shape != tuple(shape):
            raise InputError(path, f"frames are {frame_shape[1]}x{frame_shape[0]}, the image {shape[1]}x{shape[0]}")
        gain = match_gain_to_frames(read_gain(fr["gain"]), frame_shape, fr["gain"], path) if fr["gain"] else None
        tile, _ = fitting_geometry(frame_shape, item["pixel_size"], opts.box, opts.resample, opts.target_pixel_size,
                                   opts.max_resolution)
        overlap = opts.tile_overlap
        if overlap is None:
            overlap = 0.5 if (frame_shape[0] // tile) * (frame_shape[1] // tile) < 9 else 0.0
        frames = (prepare_frame(movie[i], gain) for i in range(n))
        return frame_group_spectrum(frames, np.asarray(fr["shifts"], np.float64), fr["group"], tile, opts.box,
                                    overlap)
    finally:
        movie.close()


# ---------------------------------------------------------------------- compute (any rank)
def compute(item: dict[str, Any], options: dict[str, Any], ictx: ItemContext) -> dict[str, Any]:
    """Fit one image; write its .txt, _avrot.txt and PNG (staged); return the numbers."""
    from cistem_mpi.io.ctffind_output import save_ctf_diagnostic_png, write_ctffind_avrot, write_ctffind_txt
    from cistem_mpi.io.mrc import read_mrc
    from cistem_mpi.kernels.ctffind import CtffindOptions, diagnostic_spectrum, estimate_ctf

    s = options["settings"]
    data, _ = read_mrc(item["path"], pixel_size=item["pixel_size"])
    if data.ndim == 3:
        if data.shape[0] != 1:
            raise InputError(item["path"], f"is a stack of {data.shape[0]} images, not one image")
        data = data[0]
    if not np.isfinite(data).all():
        raise InputError(item["path"], f"contains {int((~np.isfinite(data)).sum())} NaN/Inf pixel value(s)")
    if float(data.std()) == 0.0:
        raise InputError(item["path"], "is constant (no spectrum to fit)")
    opts = CtffindOptions(**s)
    from_frames = bool(item.get("frames")) and "fallback" not in item["frames"]
    raw = _frame_spectrum(item, opts, data.shape) if from_frames else None
    if raw is not None and not np.isfinite(raw).all():
        raise InputError(item["frames"]["movie"], "the frames' spectrum is not finite")
    try:
        r = estimate_ctf(data, item["pixel_size"], item["voltage"], item["cs"], item["amplitude_contrast"], opts,
                         raw_spectrum=raw)
    except ValueError as exc:
        msg = str(exc)
        if not msg.startswith("no CTF fit"):
            msg = f"no CTF fit inside the range ({msg})"
        raise InputError(item["path"], msg) from None
    d_lo, d_hi = s["min_defocus"], s["max_defocus"]
    mean = 0.5 * (r.df1 + r.df2)
    values = [r.df1, r.df2, r.angast, r.pshift, r.score, r.fit_resolution]
    if not all(math.isfinite(v) for v in values):
        raise InputError(item["path"], "no CTF fit inside the search range (non-finite fit)")
    if not (d_lo - 2 * s["defocus_step"] <= mean <= d_hi + 2 * s["defocus_step"]) or r.df2 <= 0:
        raise InputError(item["path"], f"no CTF fit inside the defocus range: best fit at {mean:.0f} Å")
    head = dict(pixel_size=item["pixel_size"], voltage=item["voltage"], cs=item["cs"],
                amplitude_contrast=item["amplitude_contrast"], box=s["box"], min_res=s["min_resolution"],
                max_res=s["max_resolution"], min_def=s["min_defocus"], max_def=s["max_defocus"])
    tilt = [r.tilt_axis, r.tilt_angle] if s["tilt"] else [0.0, 0.0]
    if not all(math.isfinite(v) for v in tilt):
        raise InputError(item["path"], "no tilt estimate (non-finite)")
    thickness = float(r.thickness) if s["thickness"] else 0.0
    if not math.isfinite(thickness):
        raise InputError(item["path"], "no thickness estimate (non-finite)")
    group = int(item["frames"]["group"]) if from_frames else 1
    # "Input file" names the image's own file (what `import ctf` matches), even when its unweighted sum was fitted
    write_ctffind_txt(ictx.stage(item["txt"]), item["image_path"], values + tilt + [thickness], **head)
    profiles = [r.frequency, r.avrot_no_astig, r.avrot, r.fit, r.frc, r.frc_sigma]
    if not all(np.isfinite(v).all() for v in profiles):  # never register a file holding NaN/Inf
        raise InputError(item["path"], "the 1D profiles of the fit are not finite")
    write_ctffind_avrot(ictx.stage(item["avrot"]), item["image_path"], profiles, frames_averaged=group, **head)
    picture = diagnostic_spectrum(r, item["voltage"], item["cs"], item["amplitude_contrast"], s["min_resolution"],
                                  s["max_resolution"], zoom_resolution=min(s["max_resolution"], r.fit_resolution))
    title = (f"{item['name']}: DF1 {r.df1:.0f} Å, DF2 {r.df2:.0f} Å, ANGAST {r.angast:.1f}°"
             + (f", PSHIFT {r.pshift:.2f} rad" if s["phase_plate"] else "")
             + f", score {r.score:.3f}, fit resolution {r.fit_resolution:.2f} Å"
             + (f", tilt {r.tilt_angle:.1f}° about {r.tilt_axis:.1f}°" if s["tilt"] else "")
             + (f", thickness {thickness:.0f} Å" if s["thickness"] else "")
             + (f" (from {group}-frame sums)" if from_frames else ""))
    save_ctf_diagnostic_png(ictx.stage(item["png"]), picture, r.frequency,
                            {"equiphase average": r.avrot,
                             ("slab model fit" if s["thickness"] else "|CTF| fit"): r.fit, "FRC": r.frc},
                            r.fit_resolution, 1.0 / s["min_resolution"], 1.0 / s["max_resolution"], title)
    return dict(df1=r.df1, df2=r.df2, angast=r.angast, pshift=r.pshift, score=r.score,
                fit_resolution=r.fit_resolution, aliasing_resolution=r.aliasing_resolution,
                pixel_size_for_fitting=r.pixel_size_for_fitting,
                tilt_axis=r.tilt_axis if s["tilt"] else None, tilt_angle=r.tilt_angle if s["tilt"] else None,
                thickness=thickness if s["thickness"] else None, from_frames=group if from_frames else 0)


# ---------------------------------------------------------------------- register (rank 0)
def register_results(ctx: JobContext, the_plan: ItemPlan, outcomes: list[ItemOutcome]) -> dict[str, Any]:
    """New ``ctf_estimates`` rows, the project-wide STAR export and the job summary."""
    from cistem_mpi.io.ctffind_output import save_ctf_summary_png, write_micrographs_ctf_star

    assert ctx.project is not None
    poor = float(the_plan.options["poor_fit_resolution"])
    s = the_plan.options["settings"]
    done: dict[int, dict[str, Any]] = {}
    flagged = []
    for o in outcomes:
        if o.result is None:
            continue
        item, r = the_plan.items[o.index], o.result
        is_poor = bool(poor > 0 and r["fit_resolution"] > poor)
        if is_poor:
            flagged.append(o.name)
        if r["aliasing_resolution"] > 0 and r["aliasing_resolution"] > s["max_resolution"]:
            ctx.log.warning("%s: CTF aliasing from %.1f Å, inside the fitting range (try a larger --box)",
                            o.name, r["aliasing_resolution"])
        ctx.register("ctf_estimates", image_id=item["image_id"], df1=float(r["df1"]), df2=float(r["df2"]),
                     angast=float(r["angast"]), pshift=float(r["pshift"]),
                     fit_resolution=float(r["fit_resolution"]), score=float(r["score"]),
                     diagnostic_path=Path(item["png"]), output_path=Path(item["txt"]),
                     avrot_path=Path(item["avrot"]), poor_fit=int(is_poor),
                     tilt_axis=r["tilt_axis"], tilt_angle=r["tilt_angle"], thickness=r.get("thickness"))
        ctx.log.info("%s: DF1 %.1f DF2 %.1f ANGAST %.2f PSHIFT %.3f score %.4f fit resolution %.2f Å%s%s%s", o.name,
                     r["df1"], r["df2"], r["angast"], r["pshift"], r["score"], r["fit_resolution"],
                     f" thickness {r['thickness']:.0f} Å" if r.get("thickness") is not None else "",
                     f" (from {r['from_frames']}-frame sums)" if r.get("from_frames") else "",
                     " (poor fit)" if is_poor else "")
        done[item["image_id"]] = dict(item=item, result=r)
    # project-wide RELION export: every image's newest estimate (this job's where it made one)
    star_rows = []
    for row in ctf_db.newest_estimates(ctx.project.conn):
        if int(row["image_id"]) in done:
            continue
        star_rows.append(dict(image_id=int(row["image_id"]), micrograph=str(ctx.project.resolve(row["path"])),
                              pixel_size=row["pixel_size"], voltage=row["voltage"], cs=row["cs"],
                              amplitude_contrast=row["amplitude_contrast"], df1=row["df1"], df2=row["df2"],
                              angast=row["angast"], pshift=row["pshift"],
                              fit_resolution=row["fit_resolution"] if row["fit_resolution"] is not None else 0.0,
                              score=row["score"] if row["score"] is not None else 0.0))
    for image_id, d in done.items():
        item, r = d["item"], d["result"]
        star_rows.append(dict(image_id=image_id, micrograph=item["image_path"], pixel_size=item["pixel_size"],
                              voltage=item["voltage"], cs=item["cs"], amplitude_contrast=item["amplitude_contrast"],
                              df1=r["df1"], df2=r["df2"], angast=r["angast"], pshift=r["pshift"],
                              fit_resolution=r["fit_resolution"], score=r["score"]))
    star_rows.sort(key=lambda x: x["image_id"])
    root = ctx.project.root
    star = root / CTF_DIR / STAR_NAME
    write_micrographs_ctf_star(ctx.stage(star), star_rows)
    defocus = np.array([0.5 * (d["result"]["df1"] + d["result"]["df2"]) for d in done.values()])
    res = np.array([d["result"]["fit_resolution"] for d in done.values()])
    summary_png = root / CTF_DIR / f"find_ctf_{ctx.job_id}_summary.png"
    thick_all = (np.array([d["result"]["thickness"] for d in done.values()], np.float64) if s.get("thickness")
                 else None)
    save_ctf_summary_png(ctx.stage(summary_png), defocus, res, f"find-ctf job {ctx.job_id}: {len(done)} image(s)",
                         thickness=thick_all)

    def hist(v: np.ndarray, bins: int = 10) -> dict[str, list]:
        if v.size == 0:
            return {"edges": [], "counts": []}
        counts, edges = np.histogram(v, bins=bins)
        return {"edges": [round(float(e), 3) for e in edges], "counts": [int(c) for c in counts]}

    if flagged:
        ctx.log.warning("%d image(s) with a fit resolution worse than %.2f Å flagged as poor fits (first: %s)",
                        len(flagged), poor, flagged[0])
    out = {"ctf_estimates": len(done), "poor_fits": len(flagged), "star": str(star),
           "summary_png": str(summary_png),
           "defocus_histogram": hist(defocus), "fit_resolution_histogram": hist(res),
           "mean_defocus": float(defocus.mean()) if defocus.size else None,
           "median_fit_resolution": float(np.median(res)) if res.size else None}
    if thick_all is not None:
        out["thickness_histogram"] = hist(thick_all)
        out["median_thickness"] = float(np.median(thick_all)) if thick_all.size else None
    if the_plan.options.get("from_frames"):
        fallback = [(the_plan.names[k], it["frames"]["fallback"]) for k, it in enumerate(the_plan.items)
                    if it.get("frames") and "fallback" in it["frames"]]
        for name, why in fallback:
            ctx.log.warning("%s: fitted from the image, not its frames: %s", name, why)
        out["from_frames"] = int(the_plan.options["from_frames"])
        out["fitted_from_frames"] = sum(1 for d in done.values() if d["result"].get("from_frames"))
        out["fitted_from_image"] = [name for name, _ in fallback]
    return out

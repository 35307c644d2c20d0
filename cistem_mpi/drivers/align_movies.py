"""``cistem-mpi align-movies``: cisTEM's unblur as an MPI job, plus local (patch) motion.

Each movie of the project (by default those not aligned yet, so running the
command again continues with the movies still to do) is one task of the
dynamic queue (:mod:`cistem_mpi.drivers.itemjob`).  Per movie:

1. frames are read one at a time, gain-corrected on the fly (the movie's
   gain reference or ``--gain``, oriented by ``--gain-rotate/--gain-flip``),
   dark-subtracted (``--dark``), defects filled (``--defects``) and outliers
   beyond 12 sigma replaced (cisTEM), and kept only Fourier-cropped to the
   alignment resolutions (:class:`cistem_mpi.kernels.motion.MovieAligner`);
2. full-frame alignment as unblur (defaults: minimum shift 2 Å, maximum
   80 Å, B-factor 1500 Å², 1 Å termination, 20 iterations);
3. local motion on a patch grid (default 5 x 5 for movies of 2k or larger;
   ``--full-frame-only`` off, ``--patches C R`` to choose);
4. the frames' full-resolution transforms (kept from the one read; movies larger
   than ``KEEP_FULL_MAX_BYTES`` are read again instead) are summed with their
   shifts, in Fourier space in one pass: the dose-weighted sum (Grant &
   Grigorieff 2015, restore noise power) and the unweighted sum.

Outputs (cisTEM's layout): ``Assets/Images/<name>.mrc`` (dose-weighted sum,
float32, pixel size in the header; optionally ``--output-binning``),
``<name>_unweighted.mrc``, ``Scaled/<name>.mrc``, ``Spectra/<name>.mrc``,
``<name>_shifts.txt`` and ``<name>_shifts.png`` beside the image, and
RELION's ``Motion/<name>.star`` per movie plus
``Motion/corrected_micrographs_job<id>.star``.  Each sum is registered as an
image row with its ``movie_id``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from cistem_mpi.drivers.itemjob import ItemContext, ItemOutcome, ItemPlan, add_item_arguments, run_item_job
from cistem_mpi.drivers.jobrun import JobContext, add_job_arguments
from cistem_mpi.errors import InputError

__all__ = ["register", "plan", "compute", "register_outputs", "align_one"]

JOB_TYPE = "align_movies"
#: Movies at least this large (pixels, smaller side) get local motion by default.
LOCAL_DEFAULT_MIN_SIZE = 2048
#: Largest side of the Scaled image.
SCALED_SIZE = 1024
#: Box of the power spectrum.
SPECTRUM_BOX = 512
#: Keep the full-resolution frame transforms for the sums (one read of the movie) up to this size;
#: larger movies are read a second time instead.
KEEP_FULL_MAX_BYTES = 6e9


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``align-movies``."""
    p = sub.add_parser("align-movies", help="align movies (unblur + patch motion), dose-weighted sums -> images",
                       description=__doc__.split("\n\n")[0])
    add_job_arguments(p)
    add_item_arguments(p)
    p.add_argument("--movies", type=int, nargs="+", metavar="ID", help="movie ids (default: every movie not aligned yet)")
    p.add_argument("--realign", action="store_true", help="also movies that already have an aligned image")
    g = p.add_argument_group("alignment (cisTEM's unblur defaults)")
    g.add_argument("--min-shift", type=float, default=2.0, help="minimum shift of the first round, Å (default 2)")
    g.add_argument("--max-shift", type=float, default=80.0, help="maximum shift per round, Å (default 80)")
    g.add_argument("--bfactor", type=float, default=1500.0, help="B-factor on the reference, Å^2 (default 1500)")
    g.add_argument("--termination", type=float, default=1.0, help="stop below this shift, Å (default 1)")
    g.add_argument("--max-iterations", type=int, default=20, help="iteration limit (default 20)")
    g.add_argument("--no-mask-cross", action="store_true", help="do not mask the Fourier central cross")
    g.add_argument("--cross-half-width", type=int, nargs=2, default=(1, 1), metavar=("V", "H"),
                   help="half-widths of the vertical and horizontal cross mask (default 1 1)")
    g.add_argument("--smoothing", choices=("whittaker", "savitzky-golay"), default="whittaker",
                   help="trajectory smoother: penalised with GCV (default) or unblur's Savitzky-Golay")
    g.add_argument("--smoothing-window", type=int, help="Savitzky-Golay window, frames (default round(5/dose), >= 5)")
    g.add_argument("--final-filter", choices=("auto", "ssnr", "none"), default="auto",
                   help="last stage after unblur's rounds, the correlation weighted by the measured SSNR of the "
                        "frames: ssnr, none (unblur's rounds only), or auto (default: ssnr below 2 e/Å^2 per frame)")
    g.add_argument("--patches", type=int, nargs=2, metavar=("COLS", "ROWS"),
                   help="patch grid for local motion (default 5 5 for movies of 2k or more)")
    g.add_argument("--full-frame-only", action="store_true", help="no local (patch) motion")
    d = p.add_argument_group("dose weighting and output")
    d.add_argument("--pre-exposure", type=float, default=0.0, help="exposure before the first frame, e/Å^2")
    d.add_argument("--no-dose-weighting", action="store_true", help="the image is the unweighted sum")
    d.add_argument("--no-restore-power", action="store_true", help="do not restore the noise power after weighting")
    d.add_argument("--output-binning", type=float, default=1.0, help="bin the sums by this factor (default 1)")
    d.add_argument("--total-exposure", type=float,
                   help="check that frames x dose per frame gives this exposure (e/Å^2, 2 %% tolerance)")
    c = p.add_argument_group("detector corrections")
    c.add_argument("--gain", help="gain reference for every movie (MRC, TIFF or DM4); default: the movie's own")
    c.add_argument("--gain-rotate", type=int, default=0, choices=(0, 90, 180, 270),
                   help="rotate the gain clockwise (degrees, as RELION --gain_rot x 90)")
    c.add_argument("--gain-flip", choices=("none", "x", "y"), default="none",
                   help="flip the gain after rotating: x = left-right, y = upside down")
    c.add_argument("--no-gain", action="store_true", help="the movies are already gain-corrected")
    c.add_argument("--dark", help="dark reference subtracted before the gain (MRC, TIFF or DM4)")
    c.add_argument("--defects", help="defect list (x y / row Y / col X per line) or mask image")
    c.add_argument("--outlier-sigma", type=float, default=12.0, help="replace pixels beyond this many sigma (0: off)")
    c.add_argument("--eer-grouping", type=int, help="EER raw frames per fraction (default: as imported)")
    p.set_defaults(func=lambda a: run_item_job(a, JOB_TYPE, plan, compute, register_outputs))


# --------------------------------------------------------------------------------------- plan (rank 0)
def _check_options(a: argparse.Namespace) -> None:
    def positive(name: str, value: float, allow_zero: bool = False) -> None:
        if value is None:
            return
        if not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise InputError(f"--{name}", f"must be {'non-negative' if allow_zero else 'positive'}, got {value}")

    positive("min-shift", a.min_shift, True)
    positive("max-shift", a.max_shift)
    positive("bfactor", a.bfactor, True)
    positive("termination", a.termination, True)
    positive("pre-exposure", a.pre_exposure, True)
    positive("outlier-sigma", a.outlier_sigma, True)
    positive("total-exposure", a.total_exposure)
    if a.max_shift <= a.min_shift:
        raise InputError("--max-shift", f"must exceed --min-shift ({a.min_shift:g} Å)")
    if a.max_iterations < 1:
        raise InputError("--max-iterations", "must be at least 1")
    if not np.isfinite(a.output_binning) or a.output_binning < 1:
        raise InputError("--output-binning", "must be >= 1")
    if a.smoothing_window is not None and a.smoothing_window < 3:
        raise InputError("--smoothing-window", "must be at least 3 frames")
    if a.patches is not None and (min(a.patches) < 2 or max(a.patches) > 20):
        raise InputError("--patches", "need 2..20 patches along each axis")
    if a.patches is not None and a.full_frame_only:
        raise InputError("--patches", "cannot be combined with --full-frame-only")
    if min(a.cross_half_width) < 1:
        raise InputError("--cross-half-width", "half-widths must be at least 1")
    if a.eer_grouping is not None and a.eer_grouping < 1:
        raise InputError("--eer-grouping", "must be at least 1")
    if a.no_gain and a.gain:
        raise InputError("--gain", "cannot be combined with --no-gain")


def _unique_stem(name: str, taken: set[str]) -> str:
    stem, k = name, 2
    while stem in taken:
        stem = f"{name}_{k}"
        k += 1
    taken.add(stem)
    return stem


def plan(project, args: argparse.Namespace) -> ItemPlan:
    """Rank 0: check the options and the shared references, list the movies to align."""
    from cistem_mpi.db import movies as movies_db
    from cistem_mpi.io.gain import read_gain
    from cistem_mpi.kernels.dose import voltage_scaling_factor

    _check_options(args)
    try:
        movies = movies_db.list_movies(project.conn, args.movies)
    except KeyError as exc:
        raise InputError("--movies", f"no movie with id {exc.args[0]} in this project") from None
    if not movies:
        raise InputError(project.root, "no movies in the project (import movies first)")
    if not args.realign and args.movies is None:
        done = movies_db.aligned_movie_ids(project.conn)
        movies = [m for m in movies if m["id"] not in done]
        if not movies:
            raise InputError(project.root, "every movie is aligned already (use --realign to align them again)")
    shapes = {(m["ny"], m["nx"]) for m in movies}
    shared_gain = None
    if args.gain:
        gp = Path(args.gain).absolute()
        g = read_gain(gp, rotate=args.gain_rotate // 90, flip_x=args.gain_flip == "x", flip_y=args.gain_flip == "y")
        for ny, nx in shapes:
            if g.shape != (ny, nx) and not (ny % g.shape[0] == 0 and nx % g.shape[1] == 0
                                            and ny // g.shape[0] == nx // g.shape[1] in (2, 4)):
                hint = " (a 90° rotation would match: --gain-rotate 90 or 270)" if g.shape == (nx, ny) else ""
                raise InputError(gp, f"gain reference is {g.shape[1]} x {g.shape[0]} (after rotation/flip) but "
                                     f"the movies are {nx} x {ny}{hint}")
        shared_gain = str(gp)
    dark = None
    if args.dark:
        dp = Path(args.dark).absolute()
        dk = read_gain(dp, rotate=args.gain_rotate // 90, flip_x=args.gain_flip == "x", flip_y=args.gain_flip == "y")
        for ny, nx in shapes:
            if dk.shape != (ny, nx):
                raise InputError(dp, f"dark reference is {dk.shape[1]} x {dk.shape[0]} but the movies are {nx} x {ny}")
        dark = str(dp)
    defects = None
    if args.defects:
        from cistem_mpi.io.motion_files import read_defects

        for shape in shapes:
            read_defects(args.defects, shape)  # raises a clear error for a bad list
        defects = str(Path(args.defects).absolute())
    dose_weight = not args.no_dose_weighting
    taken = movies_db.used_image_names(project.conn)
    images_dir = project.root / movies_db.IMAGES_DIR
    for sub in ("", "Scaled", "Spectra", "Motion"):
        (images_dir / sub).mkdir(parents=True, exist_ok=True)
    items, names = [], []
    for m in movies:
        path = project.resolve(m["path"])
        if dose_weight:
            try:
                voltage_scaling_factor(m["voltage"])
            except ValueError as exc:
                raise InputError(path, f"{exc} (use --no-dose-weighting to align it without)") from None
        if args.total_exposure is not None:
            total = m["n_frames"] * m["dose_per_frame"]
            if abs(total - args.total_exposure) > 0.02 * args.total_exposure:
                raise InputError(path, f"{m['n_frames']} frames x {m['dose_per_frame']:g} e/Å² = {total:g} e/Å², "
                                       f"not the --total-exposure {args.total_exposure:g} e/Å²")
        stem = _unique_stem(m["name"], taken)
        gain = None if args.no_gain else (shared_gain or (str(project.resolve(m["gain_path"])) if m["gain_path"] else None))
        items.append({
            "movie_id": m["id"], "path": str(path), "name": stem, "n_frames": m["n_frames"], "nx": m["nx"],
            "ny": m["ny"], "pixel_size": m["pixel_size"], "voltage": m["voltage"], "cs": m["cs"],
            "amplitude_contrast": m["amplitude_contrast"], "dose_per_frame": m["dose_per_frame"], "gain": gain,
            "gain_is_shared": shared_gain is not None,
            "out": {
                "image": str(images_dir / f"{stem}.mrc"),
                "unweighted": str(images_dir / f"{stem}_unweighted.mrc"),
                "scaled": str(images_dir / "Scaled" / f"{stem}.mrc"),
                "spectrum": str(images_dir / "Spectra" / f"{stem}.mrc"),
                "shifts": str(images_dir / f"{stem}_shifts.txt"),
                "trajectory": str(images_dir / f"{stem}_shifts.png"),
                "star": str(images_dir / "Motion" / f"{stem}.star"),
            },
        })
        names.append(str(path))
    options = {
        "min_shift": args.min_shift, "max_shift": args.max_shift, "bfactor": args.bfactor,
        "termination": args.termination, "max_iterations": args.max_iterations,
        "mask_cross": not args.no_mask_cross, "cross_half_width": tuple(args.cross_half_width),
        "smoothing_window": args.smoothing_window, "smoothing": args.smoothing, "final_filter": args.final_filter, "patches": tuple(args.patches) if args.patches else None,
        "full_frame_only": bool(args.full_frame_only), "pre_exposure": args.pre_exposure,
        "dose_weighting": dose_weight, "restore_power": not args.no_restore_power,
        "output_binning": float(args.output_binning), "gain_rotate": args.gain_rotate, "gain_flip": args.gain_flip,
        "dark": dark, "defects": defects, "outlier_sigma": args.outlier_sigma, "eer_grouping": args.eer_grouping,
        "project_root": str(project.root),
    }
    return ItemPlan(items=items, names=names, options=options)


# --------------------------------------------------------------------------------------- compute (any rank)
_REF_CACHE: dict[tuple, np.ndarray] = {}


def _reference(path: str, rotate: int, flip: str) -> np.ndarray:
    from cistem_mpi.io.gain import read_gain

    key = (path, rotate, flip)
    if key not in _REF_CACHE:
        if len(_REF_CACHE) > 4:
            _REF_CACHE.clear()
        _REF_CACHE[key] = read_gain(path, rotate=rotate // 90, flip_x=flip == "x", flip_y=flip == "y")
    return _REF_CACHE[key]


def _open(item: dict, options: dict):
    from cistem_mpi.io.movies import open_movie

    path = Path(item["path"])
    if not path.is_file():
        raise InputError(path, "movie not found")
    if path.suffix.lower() == ".eer" or options.get("eer_grouping"):
        try:
            if options.get("eer_grouping"):
                movie = open_movie(path, eer_grouping=options["eer_grouping"], pixel_size=item["pixel_size"])
            else:
                movie = open_movie(path, eer_fractions=item["n_frames"], pixel_size=item["pixel_size"])
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - corrupt EER
            raise InputError(path, f"cannot read EER: {exc}") from None
    else:
        try:
            movie = open_movie(path)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - unreadable file
            raise InputError(path, f"cannot read movie: {type(exc).__name__}: {exc}") from None
    return movie


def align_one(item: dict, options: dict, stage=lambda p: Path(p)) -> dict[str, Any]:
    """Align one movie and write its outputs through ``stage(final) -> path to write``.

    Returns the small result that :func:`register_outputs` registers.
    """
    from cistem_mpi.io.gain import match_gain_to_frames
    from cistem_mpi.io.motion_files import read_defects, save_trajectory_png, write_motion_star, write_shifts
    from cistem_mpi.io.mrc import write_mrc
    from cistem_mpi.kernels.dose import DoseWeighter
    from cistem_mpi.kernels import fft as _fft
    from cistem_mpi.kernels.motion import (LOCAL_MODEL_MAX_RATIO, AlignmentSettings, MovieAligner, MovieSummer,
                                           fourier_crop_half, prepare_frame)
    from cistem_mpi.kernels.spectra import tiled_power_spectrum

    path = Path(item["path"])
    movie = _open(item, options)
    try:
        n = len(movie)
        ny, nx = movie.shape[-2:]
        dose = float(item["dose_per_frame"])
        if options.get("eer_grouping"):
            n_raw = getattr(movie, "n_raw_frames", n)
            dose = dose * item["n_frames"] * options["eer_grouping"] / max(1, n_raw)
        elif n != item["n_frames"]:
            raise InputError(path, f"movie has {n} frames but its dose settings are for {item['n_frames']} frames "
                                   f"of {item['dose_per_frame']:g} e/Å²")
        if (ny, nx) != (item["ny"], item["nx"]):
            raise InputError(path, f"frames are {nx} x {ny} but the movie record says {item['nx']} x {item['ny']}")
        if n < 2:
            raise InputError(path, "a movie needs at least 2 frames to align")
        gain = None
        if item["gain"]:
            g = _reference(item["gain"], options["gain_rotate"], options["gain_flip"])
            gain = match_gain_to_frames(g, (ny, nx), item["gain"], path)
        dark = _reference(options["dark"], options["gain_rotate"], options["gain_flip"]) if options["dark"] else None
        defects = read_defects(options["defects"], (ny, nx)) if options["defects"] else None
        ps = float(item["pixel_size"])
        patches = options["patches"]
        if patches is None and not options["full_frame_only"] and min(ny, nx) >= LOCAL_DEFAULT_MIN_SIZE:
            patches = (5, 5)
        settings = AlignmentSettings(
            min_shift=options["min_shift"], max_shift=options["max_shift"], bfactor=options["bfactor"],
            termination=options["termination"], max_iterations=options["max_iterations"],
            mask_cross=options["mask_cross"], vertical_half_width=options["cross_half_width"][0],
            horizontal_half_width=options["cross_half_width"][1], smoothing_window=options["smoothing_window"],
            smoothing=options["smoothing"], patches=patches,
            final_filter=options.get("final_filter", "none"))  # jobs recorded before the option: as they ran

        def frames():
            for i in range(n):
                try:
                    raw = movie[i]
                except InputError:
                    raise
                except Exception as exc:  # noqa: BLE001 - decoder failure: bad input
                    raise InputError(path, f"frame {i + 1} cannot be read: {exc}") from None
                yield i, prepare_frame(raw, gain, dark, defects, options["outlier_sigma"])

        # one read: the full-resolution transforms are kept (unblur keeps its frames too) unless too big
        keep_full = n * ny * (nx // 2 + 1) * 8 <= KEEP_FULL_MAX_BYTES
        aligner = MovieAligner((ny, nx), n, ps, dose, settings, keep_full=keep_full)
        for i, f in frames():
            aligner.add(i, f)
        full = aligner.full
        shifts = aligner.align()
        fitted = aligner.align_local(patches) if patches else None
        # the patch model is summed with only when it predicts patches it was not fitted to: at realistic
        # exposures on small frames the patch shifts are noise, and a model of them would blur the sums
        model = fitted if fitted is not None and aligner.local_accepted else None
        aligner.release()

        b = options["output_binning"]
        my, mx = (ny, nx) if b <= 1.0001 else (max(2, int(round(ny / b))), max(2, int(round(nx / b))))
        out_ps = ps * 0.5 * (nx / mx + ny / my)
        weighter = (DoseWeighter((my, mx), out_ps, dose, options["pre_exposure"], item["voltage"])
                    if options["dose_weighting"] else None)
        summer = MovieSummer((ny, nx), (my, mx), weighter, model, options["restore_power"])
        if full is not None:
            for i in range(n):
                summer.add_ft(i, full[i], shifts[i, 0], shifts[i, 1])
            del full
        else:  # second read
            for i, f in frames():
                summer.add(i, f, shifts[i, 0], shifts[i, 1])
        weighted, unweighted = summer.finish()
    finally:
        movie.close()
    image = weighted if weighted is not None else unweighted
    for what, arr in (("aligned sum", image), ("unweighted sum", unweighted)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{path}: the {what} has non-finite values")
    out = item["out"]
    write_mrc(stage(out["image"]), image.astype(np.float32), out_ps)
    write_mrc(stage(out["unweighted"]), unweighted.astype(np.float32), out_ps)
    scale = max(1.0, max(my, mx) / SCALED_SIZE)
    sy_, sx_ = max(2, int(round(my / scale))), max(2, int(round(mx / scale)))
    # binned by Fourier cropping of one real transform (mean kept, as kernels.resample.fourier_crop)
    scaled = _fft.irfftn(fourier_crop_half(_fft.rfftn(image), my, mx, sy_, sx_), sx_) if scale > 1 else image
    write_mrc(stage(out["scaled"]), scaled.astype(np.float32), out_ps * mx / sx_)
    box = min(SPECTRUM_BOX, (min(my, mx) // 2) * 2)
    spectrum = tiled_power_spectrum(unweighted, box)
    write_mrc(stage(out["spectrum"]), spectrum.astype(np.float32), out_ps)
    header = {"movie": path.name, "frames": n, "exposure_per_frame": dose, "pre_exposure": options["pre_exposure"],
              "iterations": ",".join(str(k) for k in aligner.iterations),
              "final_filter": aligner.final_filter_used}
    pc = ps_ = coeffs = None
    if fitted is not None:
        pc, ps_ = aligner.patch_centres, aligner.patch_shifts
        coeffs = model.coeffs if model is not None else None
        header["patches"] = f"{patches[0]}x{patches[1]}"
        header["model_rms_px"] = f"{fitted.rms_fit:.4f}"
        if model is not None:
            header["local_model"] = f"used (held-out ratio {aligner.local_ratio:.3f})"
        elif not np.isfinite(aligner.local_ratio):
            header["local_model"] = ("not used: with fewer than 7 patches it cannot be checked on held-out "
                                     "patches; the global trajectory is summed")
        else:
            header["local_model"] = (f"not used: it does not predict held-out patches (ratio "
                                     f"{aligner.local_ratio:.3f} >= {LOCAL_MODEL_MAX_RATIO}); the global "
                                     f"trajectory is summed")
    write_shifts(stage(out["shifts"]), shifts, ps, header, pc, ps_, coeffs)
    save_trajectory_png(stage(out["trajectory"]), shifts * ps, title=f"{item['name']}: shifts (Å)",
                        patch_centres=pc, patch_shifts_a=None if ps_ is None else ps_ * ps,
                        frame_size=(ny, nx), pixel_size=ps)
    write_motion_star(stage(out["star"]), str(path), (n, ny, nx), shifts, ps, dose, options["pre_exposure"],
                      item["voltage"], binning=b, gain=item["gain"])
    step = np.sqrt((np.diff(shifts, axis=0) ** 2).sum(axis=1)) * ps
    return {
        "movie_id": item["movie_id"], "name": item["name"], "nx": mx, "ny": my, "pixel_size": out_ps,
        "voltage": item["voltage"], "cs": item["cs"], "amplitude_contrast": item["amplitude_contrast"],
        "shifts_px": shifts.astype(np.float64), "total_motion": float(step.sum()),
        "early_motion": float(step[:3].sum()), "late_motion": float(step[3:].sum()),
        "local": model is not None, "model_rms_px": None if fitted is None else float(fitted.rms_fit),
        "local_ratio": None if fitted is None or not np.isfinite(aligner.local_ratio) else float(aligner.local_ratio),
        "local_rejected": fitted is not None and model is None,
        "out": out, "original_pixel_size": ps,
    }


def compute(payload: dict, options: dict, ictx: ItemContext) -> dict[str, Any]:
    """One movie (any rank); files are written under their staged names."""
    return align_one(payload, options, ictx.stage)


# --------------------------------------------------------------------------------------- register (rank 0)
def register_outputs(ctx: JobContext, the_plan: ItemPlan, outcomes: list[ItemOutcome]) -> dict[str, Any]:
    """Register one image per aligned movie and write RELION's corrected_micrographs star."""
    from cistem_mpi.io.motion_files import write_corrected_micrographs_star

    ok = [o for o in outcomes if o.result is not None]
    root = Path(the_plan.options["project_root"])
    entries = []
    for o in ok:
        r = o.result
        out = r["out"]
        ctx.register("images", movie_id=r["movie_id"], path=Path(out["image"]), name=r["name"], nx=r["nx"],
                     ny=r["ny"], pixel_size=r["pixel_size"], voltage=r["voltage"], cs=r["cs"],
                     amplitude_contrast=r["amplitude_contrast"], scaled_path=Path(out["scaled"]),
                     spectrum_path=Path(out["spectrum"]), shifts_path=Path(out["shifts"]),
                     unweighted_path=Path(out["unweighted"]), trajectory_path=Path(out["trajectory"]))
        entries.append({"micrograph": _rel(out["image"], root), "metadata": _rel(out["star"], root),
                        "total": r["total_motion"], "early": r["early_motion"], "late": r["late_motion"]})
    summary: dict[str, Any] = {"images": len(ok)}
    if ok:
        first = ok[0].result
        star = root / "Assets" / "Images" / "Motion" / f"corrected_micrographs_job{ctx.job_id}.star"
        write_corrected_micrographs_star(ctx.stage(star), entries, first["pixel_size"], first["voltage"],
                                         first["cs"], first["amplitude_contrast"], first["original_pixel_size"])
        summary["corrected_micrographs"] = _rel(str(star), root)
        summary["mean_total_motion_A"] = round(float(np.mean([o.result["total_motion"] for o in ok])), 3)
        rejected = [o.result["name"] for o in ok if o.result.get("local_rejected")]
        if rejected:
            # said once per job, not per movie (on small or low-dose frames it is every movie), and counted:
            # a job of thousands of movies keeps a short result
            summary["local_model_not_used"] = len(rejected)
            summary["local_model_not_used_first"] = rejected[:10]
            ctx.log.info("%d of %d movies: the patch model did not predict held-out patches (their shifts are "
                         "noise at this exposure and frame size); those sums use the global trajectory",
                         len(rejected), len(ok))
    return summary


def _rel(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)

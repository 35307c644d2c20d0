"""``cistem-mpi compress-movies``: the seed's advice (LZW TIFF, as IMOD's ``mrc2tif -s -c lzw``) as a job.

Each movie of the project (or ``--movies ID ...``) is one task of the dynamic
queue: its frames are read one at a time and written as an LZW-compressed
multi-page TIFF, integer frames kept as integers (``--apply-gain`` writes the
gain-corrected float32 frames instead).  Every written frame is read back
and compared bit for bit with the source before the movie counts as done.
The job's result reports the size ratio.  With ``--switch`` the project's
movie records are pointed at the compressed files in one transaction once
the job is registered; the source is deleted only with ``--delete-source``
(and only after the switch).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np

from cistem_mpi.drivers.itemjob import ItemContext, ItemOutcome, ItemPlan, add_item_arguments, run_item_job
from cistem_mpi.drivers.jobrun import JobContext, add_job_arguments
from cistem_mpi.errors import InputError

__all__ = ["register", "plan", "compute", "register_outputs", "compress_one"]

JOB_TYPE = "compress_movies"


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``compress-movies``."""
    p = sub.add_parser("compress-movies", help="write movies as LZW TIFF (verified bit for bit), optionally switch records",
                       description=__doc__.split("\n\n")[0])
    add_job_arguments(p)
    add_item_arguments(p)
    p.add_argument("--movies", type=int, nargs="+", metavar="ID", help="movie ids (default: all)")
    p.add_argument("--out", help="directory for the compressed movies (default: beside each source)")
    p.add_argument("--apply-gain", action="store_true", help="write the gain-corrected (float32) frames")
    p.add_argument("--switch", action="store_true", help="point the movie records at the compressed files")
    p.add_argument("--delete-source", action="store_true", help="delete each source after the switch (needs --switch)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.delete_source and not args.switch:
        raise InputError("--delete-source", "only together with --switch (the records must not point at deleted files)")
    rc = run_item_job(args, JOB_TYPE, plan, compute, register_outputs)
    if rc == 0 and args.switch and not (args.array_prepare or args.array_run):
        from cistem_mpi.drivers.runtime import get_world

        if get_world().is_controller:
            _switch(args)
    return rc


def _switch(args: argparse.Namespace) -> None:
    from cistem_mpi.db import jobs as jobs_db
    from cistem_mpi.db import movies as movies_db
    from cistem_mpi.db.project import Project

    with Project.open(args.project) as project:
        done = (jobs_db.newest_finished_result(project.conn, JOB_TYPE) or {}).get("compressed", [])
        mapping = {int(d["movie_id"]): project.store_path(d["output"]) for d in done if Path(d["output"]).is_file()}
        movies_db.switch_movie_paths(project.conn, mapping)
        if args.delete_source:
            for d in done:
                if int(d["movie_id"]) in mapping and Path(d["source"]).resolve() != Path(d["output"]).resolve():
                    Path(d["source"]).unlink(missing_ok=True)
    print(f"compress-movies: {len(mapping)} movie record(s) switched to the compressed files")


def plan(project, args: argparse.Namespace) -> ItemPlan:
    """Rank 0: the movies to compress and where their TIFFs go."""
    from cistem_mpi.db import movies as movies_db

    try:
        movies = movies_db.list_movies(project.conn, args.movies)
    except KeyError as exc:
        raise InputError("--movies", f"no movie with id {exc.args[0]} in this project") from None
    if not movies:
        raise InputError(project.root, "no movies in the project")
    out_dir = Path(args.out).absolute() if args.out else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    items, names, seen = [], [], set()
    for m in movies:
        src = project.resolve(m["path"])
        if src.suffix.lower() == ".eer":
            raise InputError(src, "EER movies are compressed already (EER is a compressed format)")
        folder = out_dir or src.parent
        name = f"{src.stem}.tif" if src.suffix.lower() not in (".tif", ".tiff") else f"{src.stem}_lzw.tif"
        dst = folder / name
        if dst in seen or dst.exists():
            raise InputError(dst, "output file exists already (choose --out)")
        seen.add(dst)
        gain = str(project.resolve(m["gain_path"])) if (args.apply_gain and m["gain_path"]) else None
        if args.apply_gain and gain is None:
            raise InputError(src, "--apply-gain: this movie has no gain reference")
        items.append({"movie_id": m["id"], "source": str(src), "output": str(dst), "gain": gain})
        names.append(str(src))
    return ItemPlan(items, names, {"apply_gain": bool(args.apply_gain)})


def compress_one(item: dict, stage=lambda p: Path(p)) -> dict[str, Any]:
    """Write one movie as LZW TIFF through ``stage``, verify every frame, return sizes."""
    from cistem_mpi.io.gain import apply_gain, read_gain
    from cistem_mpi.io.movies import TiffMovie, open_movie, write_tiff_movie

    src = Path(item["source"])
    gain = read_gain(item["gain"]) if item["gain"] else None
    target = stage(item["output"])

    def frames(movie):
        for i in range(len(movie)):
            f = movie[i]
            yield apply_gain(f, gain, item["gain"], src) if gain is not None else f

    with open_movie(src) as movie:
        n = len(movie)
        write_tiff_movie(target, frames(movie), compression="lzw", n_frames=n)
    # verify bit for bit
    with open_movie(src) as a, TiffMovie(target) as b:  # the staged name has no .tif suffix
        if len(a) != len(b):
            raise ValueError(f"{target}: {len(b)} frames written, source has {len(a)}")
        for i, (fa, fb) in enumerate(zip(frames(a), b)):
            if fa.dtype != fb.dtype or not np.array_equal(fa, fb):
                raise ValueError(f"{target}: frame {i + 1} differs from the source after writing")
    s, o = src.stat().st_size, os.path.getsize(target)
    return {"movie_id": item["movie_id"], "source": str(src), "output": item["output"], "frames": n,
            "source_bytes": int(s), "output_bytes": int(o)}


def compute(payload: dict, options: dict, ictx: ItemContext) -> dict[str, Any]:
    """One movie (any rank)."""
    return compress_one(payload, ictx.stage)


def register_outputs(ctx: JobContext, the_plan: ItemPlan, outcomes: list[ItemOutcome]) -> dict[str, Any]:
    """Report the size ratio; the records are switched after the job is registered (``--switch``)."""
    ok = [o.result for o in outcomes if o.result is not None]
    s = sum(r["source_bytes"] for r in ok)
    o = sum(r["output_bytes"] for r in ok)
    ratio = s / o if o else 0.0
    ctx.log.info("compressed %d movie(s): %.1f MB -> %.1f MB (ratio %.2f)", len(ok), s / 1e6, o / 1e6, ratio)
    print(f"compress-movies: {len(ok)} movie(s), {s / 1e6:.1f} MB -> {o / 1e6:.1f} MB, size ratio {ratio:.2f}")
    return {"compressed": ok, "source_bytes": s, "output_bytes": o, "size_ratio": round(ratio, 4)}

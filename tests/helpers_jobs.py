"""Run small jobs in-process or in a subprocess for the lifecycle tests."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cistem_mpi.drivers.jobrun import JobContext, run_job


def job_args(project: Path, **extra) -> argparse.Namespace:
    """The options every job has, plus ``extra``."""
    return argparse.Namespace(project=str(project), keep_scratch=False, resume=None, **extra)


def db_dump(root: Path) -> list[str]:
    """The project database as SQL text (to prove a command changed nothing)."""
    from cistem_mpi.db.project import Project

    with Project.open(root, readonly=True) as p:
        return list(p.conn.iterdump())


def positions_body(n_positions: int, image_path: str, announce: bool = False):
    """A job body registering one image and ``n_positions`` particle positions."""

    def body(ctx: JobContext) -> dict:
        if announce:
            # the job record exists from here on; the lifecycle test times its kills from this line
            print("body", flush=True)
        if ctx.is_controller:
            img = ctx.register("images", path=image_path, name="img", nx=64, ny=64, pixel_size=1.0, voltage=300.0,
                               cs=2.7, amplitude_contrast=0.07)
            rows = ((float(i % 4000), float(i // 4000), 1.0) for i in range(n_positions))
            ctx.register_many("particle_positions", ("x", "y", "peak"), rows, image_id=img)
        return {"n": n_positions}

    return body


if __name__ == "__main__":
    # python tests/helpers_jobs.py PROJECT N IMAGE  -> one positions job
    project, n, image = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    raise SystemExit(run_job(job_args(Path(project)), "find_particles", positions_body(n, image, announce=True)))

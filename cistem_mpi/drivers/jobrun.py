"""Job lifecycle: the record, the scratch folder, the log, and asset registration.

Every action runs through :func:`run_job`.  On every MPI rank it calls the
driver's ``body(ctx)``; only rank 0 (the controller) opens the database.  The
assets a body registers with :meth:`JobContext.register` are buffered and
inserted in the one transaction that marks the job finished, so a job that
dies at any point registers nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cistem_mpi.db import jobs as jobs_db
from cistem_mpi.db.project import Project
from cistem_mpi.errors import CistemError, InputError, JobFailed

#: Scratch folder of each job type (cisTEM's names where the seed has them).
SCRATCH_FOLDERS: dict[str, str] = {
    "auto_refine": "AutoRefine3D",
    "manual_refine": "ManualRefine3D",
    "classify2d": "Refine2DScratch",
    "ab_initio": "Refine2DScratch/Startup",
}

#: Seconds between progress writes to the database (a job record is not a log).
PROGRESS_DB_INTERVAL = 2.0
#: Seconds between plain progress lines in the log.
PROGRESS_LOG_INTERVAL = 10.0


class JobCancelled(CistemError):
    """SIGTERM (``scancel``) or Ctrl-C stopped the job."""

    exit_code = 130


def scratch_folder(job_type: str) -> str:
    """``Scratch/<JobType>`` folder name for a job type."""
    return SCRATCH_FOLDERS.get(job_type, "".join(part.capitalize() for part in job_type.split("_")))


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every job takes."""
    parser.add_argument("--project", "-p", required=True, help="project directory")
    parser.add_argument("--keep-scratch", action="store_true", help="keep the job's scratch folder when it finishes")
    parser.add_argument("--resume", type=int, metavar="JOB", help="continue job JOB from its last finished iteration")


@dataclass
class JobContext:
    """What a job body gets.  Attributes marked (rank 0) are None elsewhere."""

    comm: Any
    rank: int
    size: int
    host: str
    job_id: int
    job_type: str
    scratch: Path
    checkpoint_dir: Path
    log: logging.Logger
    args: dict[str, Any] = field(default_factory=dict)
    resumed_from: int | None = None
    project: Project | None = None  # (rank 0)
    result: dict[str, Any] = field(default_factory=dict)  # (rank 0) stored with the record
    _rows: list[jobs_db.PendingRow | jobs_db.PendingBulk] = field(default_factory=list)
    _last_db: float = 0.0
    _last_log: float = 0.0
    _t0: float = field(default_factory=time.monotonic)
    _tty: bool = False

    @property
    def is_controller(self) -> bool:
        """True on rank 0."""
        return self.rank == 0

    def register(self, table: str, **fields: Any) -> jobs_db.PendingRow:
        """Register a row (an asset) to insert when the job finishes (rank 0).

        Paths given as :class:`Path` are stored project-relative when inside
        the project.  Returns a handle other rows may use as a foreign key.
        """
        if self.project is None:
            raise RuntimeError("only the controller (rank 0) registers assets")
        for key, value in fields.items():
            if isinstance(value, Path):
                fields[key] = self.project.store_path(value)
        row = jobs_db.PendingRow(table, fields)
        self._rows.append(row)
        return row

    def register_many(self, table: str, columns: tuple[str, ...], rows: Any, **fixed: Any) -> None:
        """Register many rows of one table at once (rank 0), e.g. per-particle membership.

        ``rows`` is an iterable of tuples matching ``columns``; ``fixed``
        values are shared by every row.
        """
        if self.project is None:
            raise RuntimeError("only the controller (rank 0) registers assets")
        self._rows.append(jobs_db.PendingBulk(table, fixed, tuple(columns), rows))

    def progress(self, done: int, total: int, message: str = "") -> None:
        """Report progress (rank 0): terminal bar, log line, job record."""
        if self.project is None:
            return
        now = time.monotonic()
        elapsed = now - self._t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else float("inf")
        finished = done >= total
        text = f"{done}/{total} ({rate:.1f}/s, ETA {_fmt_seconds(eta)})" + (f" {message}" if message else "")
        if self._tty:
            width = 30
            filled = int(width * done / total) if total else width
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\033[K" + ("\n" if finished else ""))
            sys.stderr.flush()
        if finished or now - self._last_log >= PROGRESS_LOG_INTERVAL:
            self._last_log = now
            self.log.info("progress %s", text)
        if finished or now - self._last_db >= PROGRESS_DB_INTERVAL:
            self._last_db = now
            jobs_db.update_progress(self.project.conn, self.job_id, done, total, message)


def _fmt_seconds(s: float) -> str:
    if s == float("inf"):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _world() -> tuple[Any, int, int]:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return comm, comm.Get_rank(), comm.Get_size()


def _sigterm(signum: int, frame: Any) -> None:
    raise JobCancelled(f"job received signal {signum}")


def run_job(args: argparse.Namespace, job_type: str, body: Callable[[JobContext], Any]) -> int:
    """Run ``body`` as a recorded job on every rank; return the exit code.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed command line (``project``, ``keep_scratch``, ``resume`` and
        the job's own options, recorded as the job's arguments).
    job_type : str
        Name of the job (``import``, ``reconstruct``, ...).
    body : callable
        ``body(ctx) -> dict | None``; runs on every rank.  Its return value
        on rank 0 is merged into ``ctx.result``.
    """
    comm, rank, size = _world()
    host = socket.gethostname()
    signal.signal(signal.SIGTERM, _sigterm)
    project: Project | None = None
    setup: dict[str, Any] | None = None
    log = logging.getLogger(f"cistem_mpi.job.{job_type}")
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
    if rank == 0:
        try:
            project = Project.open(args.project)
            setup = _start(project, args, job_type, size)
        except BaseException as exc:  # tell the workers not to wait for a job id
            if size > 1:
                comm.bcast({"error": str(exc)}, root=0)
            if project is not None:
                project.close()
            raise
    if size > 1:
        setup = comm.bcast(setup, root=0)
        if "error" in setup:
            return 2
    assert setup is not None
    ctx = JobContext(
        comm=comm, rank=rank, size=size, host=host, job_id=setup["job_id"], job_type=job_type,
        scratch=Path(setup["scratch"]), checkpoint_dir=Path(setup["scratch"]) / "checkpoints",
        log=log, resumed_from=setup["resumed_from"], project=project,
        args={k: v for k, v in vars(args).items() if k != "func"},
    )
    if rank == 0:
        fh = logging.FileHandler(setup["log_path"])
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(fh)
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(logging.Formatter(f"[{job_type} #{ctx.job_id}] %(message)s"))
        sh.setLevel(logging.INFO)
        log.addHandler(sh)
        ctx._tty = sys.stderr.isatty()
        log.info("job %d (%s) started: %d rank(s), controller on %s, project %s", ctx.job_id, job_type, size, host,
                 project.root if project else "")
    else:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(logging.Formatter(f"[{job_type} #{ctx.job_id} rank {rank}@{host}] %(message)s"))
        sh.setLevel(logging.WARNING)
        log.addHandler(sh)
    try:
        out = body(ctx)
        if rank == 0:
            assert project is not None
            if isinstance(out, dict):
                ctx.result.update(out)
            jobs_db.finish_job(project.conn, ctx.job_id, ctx._rows, ctx.result)
            log.info("job %d finished in %.1f s; registered %d record(s)", ctx.job_id,
                     time.monotonic() - ctx._t0, len(ctx._rows))
            if not args.keep_scratch:
                shutil.rmtree(ctx.scratch, ignore_errors=True)
        return 0
    except BaseException as exc:
        cancelled = isinstance(exc, (JobCancelled, KeyboardInterrupt))
        message = str(exc) if isinstance(exc, CistemError) else f"{type(exc).__name__}: {exc}"
        if rank == 0 and project is not None and isinstance(exc, InputError):
            # Bad input: the job never really started.  Leave the database and
            # the project as they were (SPEC §6): no record, no scratch, no log.
            jobs_db.delete_job(project.conn, ctx.job_id)
            for h in list(log.handlers):
                h.close()
                log.removeHandler(h)
            Path(setup["log_path"]).unlink(missing_ok=True)
            try:
                Path(setup["log_path"]).parent.rmdir()  # only if this was the first job
            except OSError:
                pass
            if ctx.resumed_from is None:
                shutil.rmtree(ctx.scratch, ignore_errors=True)
        elif rank == 0 and project is not None:
            if not isinstance(exc, JobFailed):
                message = f"rank 0 on {host}: {message}"
            try:
                jobs_db.end_job(project.conn, ctx.job_id, "cancelled" if cancelled else "failed", message)
            finally:
                log.error("job %d %s: %s (scratch kept for post-mortem: %s)", ctx.job_id,
                          "cancelled" if cancelled else "failed", message, ctx.scratch)
        if size > 1 and not isinstance(exc, JobFailed):
            # The failure did not come through the task queue, so other ranks
            # may be waiting in a collective: stop them all now.
            sys.stderr.write(f"error: rank {rank} on {host}: {message}\n")
            sys.stderr.flush()
            comm.Abort(3)
        if isinstance(exc, CistemError):
            raise
        if cancelled:
            raise JobCancelled(message) from exc
        raise JobFailed(message) from exc
    finally:
        for h in list(log.handlers):
            h.close()
            log.removeHandler(h)
        if project is not None:
            project.close()


def _start(project: Project, args: argparse.Namespace, job_type: str, size: int) -> dict[str, Any]:
    """Create the job record, scratch folder and log (rank 0)."""
    conn = project.conn
    jobs_db.mark_dead_jobs(conn)
    resumed_from = getattr(args, "resume", None)
    scratch: Path | None = None
    if resumed_from is not None:
        old = jobs_db.get_job(conn, resumed_from)
        if old is None:
            raise InputError("--resume", f"no job {resumed_from} in this project")
        if old["type"] != job_type:
            raise InputError("--resume", f"job {resumed_from} is a {old['type']} job, not {job_type}")
        if old["status"] == "finished":
            raise InputError("--resume", f"job {resumed_from} already finished")
        if old["status"] == "running" and jobs_db.liveness(old) == "running":
            raise InputError("--resume", f"job {resumed_from} is still running")
        if old["scratch_path"] and Path(old["scratch_path"]).is_dir():
            scratch = Path(old["scratch_path"])  # its checkpoints live there
    arguments = {k: v for k, v in vars(args).items() if k not in ("func",) and not k.startswith("_")}
    job_id = jobs_db.create_job(conn, job_type, arguments, size, resumed_from=resumed_from)
    if scratch is None:
        scratch = project.scratch_root / scratch_folder(job_type) / f"job_{job_id:04d}"
    scratch.mkdir(parents=True, exist_ok=True)
    logs = project.root / "Logs"
    logs.mkdir(exist_ok=True)
    log_path = logs / f"job_{job_id:04d}_{job_type}.log"
    jobs_db.set_paths(conn, job_id, str(log_path), str(scratch))
    return {"job_id": job_id, "scratch": str(scratch), "log_path": str(log_path), "resumed_from": resumed_from,
            "arguments": json.dumps(arguments, default=str)}


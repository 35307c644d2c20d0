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
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cistem_mpi.db import jobs as jobs_db
from cistem_mpi.db.project import Project
from cistem_mpi.drivers.runtime import FailureInfo, Progress, World, get_world, guarded
from cistem_mpi.errors import CistemError, InputError, JobFailed

#: Scratch folder of each job type (cisTEM's names where the seed has them).
SCRATCH_FOLDERS: dict[str, str] = {
    "auto_refine": "AutoRefine3D",
    "manual_refine": "ManualRefine3D",
    "classify_2d": "Refine2DScratch",
    "ab_initio": "Refine2DScratch/Startup",
}

#: Seconds between progress writes to the database (a job record is not a log).
PROGRESS_DB_INTERVAL = 2.0
#: Seconds between plain progress lines in the log.
PROGRESS_LOG_INTERVAL = 10.0
#: Exception types that mean the user stopped the job (scancel, Ctrl-C).
CANCEL_TYPES = ("Terminated", "KeyboardInterrupt")


def scratch_folder(job_type: str) -> str:
    """``Scratch/<JobType>`` folder name for a job type."""
    return SCRATCH_FOLDERS.get(job_type, "".join(part.capitalize() for part in job_type.split("_")))


#: Key of the job result that lists the staged files (``[[staged, final], ...]``) of a finished job.
STAGED_KEY = "staged_outputs"


def staged_path(final: str | os.PathLike, token: str) -> Path:
    """The job-private temporary name of an asset file until its job is registered.

    ``.<name>.<token>.part`` beside ``final``: a hidden name that no reader
    takes for an asset, and that ``project clean`` recognises as a leftover.

    Parameters
    ----------
    final : path
        Where the file belongs once the job is registered.
    token : str
        Names the writer, ``job<id>`` for a job (or an array step's token).

    Returns
    -------
    Path

    >>> staged_path("Assets/Volumes/volume_1_1.mrc", "job12").name
    '.volume_1_1.mrc.job12.part'
    """
    f = Path(final)
    return f.with_name(f".{f.name}.{token}.part")


def promote_staged(pairs: list[tuple[str, str]]) -> list[str]:
    """Rename every staged file that still exists to its final name; return the final names done.

    Idempotent: a pair whose staged file is gone (renamed already) is left
    alone, so a job interrupted between its commit and its renames is rolled
    forward by calling this again with the pairs stored in its result.
    """
    done = []
    for staged, final in pairs:
        if os.path.lexists(staged):
            os.replace(staged, final)
            done.append(str(final))
    return done


def check_options(args: argparse.Namespace, *, symmetry: tuple[str, ...] = (), positive: tuple[str, ...] = (),
                  non_negative: tuple[str, ...] = (), at_least_one: tuple[str, ...] = ()) -> None:
    """Validate options before a job record exists (every rank runs the same check: no deadlock).

    Each name is an ``args`` attribute; ``None`` (not given) passes.  Raises
    :class:`InputError` naming the option.

    >>> check_options(argparse.Namespace(classes=2, symmetry="C4"), symmetry=("symmetry",), at_least_one=("classes",))
    """
    import math

    def opt(name: str) -> str:
        return "--" + name.replace("_", "-")

    for name in symmetry:
        v = getattr(args, name, None)
        if v is None:
            continue
        from cistem_mpi.kernels.symmetry import parse_symmetry

        try:
            parse_symmetry(str(v))
        except ValueError as exc:
            raise InputError(opt(name), str(exc)) from None
    for names, ok, what in ((positive, lambda x: x > 0, "a positive number"),
                            (non_negative, lambda x: x >= 0, "zero or a positive number"),
                            (at_least_one, lambda x: x >= 1, "at least 1")):
        for name in names:
            v = getattr(args, name, None)
            if v is None:
                continue
            values = v if isinstance(v, (list, tuple)) else [v]
            for x in values:
                if not (isinstance(x, (int, float)) and math.isfinite(x) and ok(x)):
                    subject = "the number of classes " if name == "classes" else ""
                    raise InputError(opt(name), f"{subject}must be {what}, got {x}")


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every job takes."""
    parser.add_argument("--project", "-p", required=True, help="project directory")
    parser.add_argument("--keep-scratch", action="store_true", help="keep the job's scratch folder when it finishes")
    parser.add_argument("--resume", type=int, metavar="JOB", help="continue job JOB from its last finished iteration")


@dataclass
class JobContext:
    """What a job body gets.  Attributes marked (rank 0) are None elsewhere."""

    world: World
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
    _staged: dict[str, str] = field(default_factory=dict)  # final -> staged (rank 0)
    _meter: Progress | None = None
    _last_db: float = -1e300

    @property
    def rank(self) -> int:
        """This process's MPI rank."""
        return self.world.rank

    @property
    def size(self) -> int:
        """Number of ranks in the job."""
        return self.world.size

    @property
    def host(self) -> str:
        """Host name of this rank."""
        return self.world.host

    @property
    def is_controller(self) -> bool:
        """True on rank 0."""
        return self.world.rank == 0

    def stage(self, final: str | os.PathLike) -> Path:
        """Where to write the asset file ``final`` (any rank); renamed to ``final`` once the job is registered.

        On rank 0 the pair is also recorded, so the rename happens right
        after the transaction that registers the job's rows commits.  A
        worker that writes a file calls this too (same name); rank 0 must
        call it (or :meth:`adopt`) for that file as well.  Until then the
        file has a job-private hidden name: a job killed at any moment
        leaves no file under an asset's name.
        """
        staged = staged_path(final, f"job{self.job_id}")
        if self.project is not None:
            self._staged[str(Path(final))] = str(staged)
        return staged

    def adopt(self, staged: str | os.PathLike, final: str | os.PathLike) -> None:
        """Record an already written staged file (e.g. by a Slurm array task) to rename to ``final`` (rank 0)."""
        if self.project is None:
            raise RuntimeError("only the controller (rank 0) registers assets")
        self._staged[str(Path(final))] = str(staged)

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
        """Report progress (rank 0): terminal bar, plain log lines, the job record.

        Safe to call often: the log gets a line every
        :data:`PROGRESS_LOG_INTERVAL` s and the database a write every
        :data:`PROGRESS_DB_INTERVAL` s (and both at the end).
        """
        if self.project is None:
            return
        if self._meter is None:
            tty = sys.stderr.isatty()
            self._meter = Progress(self.job_type, stream=sys.stderr if tty else None, interval=PROGRESS_LOG_INTERVAL)
        line = self._meter.update(done, total, message)
        if line is not None:
            self.log.info("progress %s", line)
        now = time.monotonic()
        if done >= total or now - self._last_db >= PROGRESS_DB_INTERVAL:
            self._last_db = now
            jobs_db.update_progress(self.project.conn, self.job_id, done, total, self._meter.line())


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
        ``body(ctx) -> dict | None``; runs on every rank inside the runtime's
        guard (a failure on any rank stops all of them).  Its return value on
        rank 0 is merged into ``ctx.result``.

    Raises
    ------
    InputError
        Bad input found on rank 0: the job record, scratch and log are
        removed again, so the project is exactly as before.
    JobFailed
        Any other failure; the record says ``failed`` (or ``cancelled``) with
        the rank, host and message.
    """
    world = get_world()
    project: Project | None = None
    setup: dict[str, Any] | None = None
    if world.is_controller:
        try:
            project = Project.open(args.project)
            setup = _start(project, args, job_type, world.size)
        except BaseException as exc:  # tell the workers not to wait for a job id
            world.bcast({"error": str(exc)})
            if project is not None:
                project.close()
            raise
    setup = world.bcast(setup)
    if "error" in setup:
        raise JobFailed(f"rank {world.rank} on {world.host}: job not started: {setup['error']}")
    log = _job_logger(job_type, world, setup)
    job_args = {k: v for k, v in vars(args).items() if k != "func"}
    if setup.get("resumed_args") is not None:  # --resume: the killed job's recorded settings (every rank)
        job_args.update(setup["resumed_args"])
    ctx = JobContext(
        world=world, job_id=setup["job_id"], job_type=job_type, scratch=Path(setup["scratch"]),
        checkpoint_dir=Path(setup["scratch"]) / "checkpoints", log=log, resumed_from=setup["resumed_from"],
        project=project, args=job_args,
    )
    t0 = time.monotonic()
    bad_input: list[InputError] = []

    def record_failure(info: FailureInfo) -> None:  # rank 0, after every rank stopped
        assert project is not None
        if bad_input and info.rank == 0:
            _forget(project, ctx, setup)
            return
        status = "cancelled" if info.exc_type in CANCEL_TYPES else "failed"
        for staged in ctx._staged.values():  # nothing half written stays behind (project clean: the rest)
            try:
                os.unlink(staged)
            except OSError:
                pass
        jobs_db.end_job(project.conn, ctx.job_id, status, info.line())
        _mark_dead_quietly(project)
        log.error("job %d %s: %s (scratch kept for post-mortem: %s)", ctx.job_id, status, info.line(), ctx.scratch)

    try:
        with guarded(world, on_failure=record_failure):
            try:
                out = body(ctx)
            except InputError as exc:
                if world.is_controller:
                    bad_input.append(exc)
                raise
            if world.is_controller:
                assert project is not None
                if isinstance(out, dict):
                    ctx.result.update(out)
                if ctx._meter is not None:
                    ctx._meter.close()
                pairs = [(st, fi) for fi, st in ctx._staged.items()]
                missing = [st for st, _ in pairs if not os.path.lexists(st)]
                if missing:
                    raise RuntimeError(f"{missing[0]}: staged output missing ({len(missing)} of {len(pairs)} files)")
                if pairs:
                    ctx.result[STAGED_KEY] = pairs
                jobs_db.finish_job(project.conn, ctx.job_id, ctx._rows, ctx.result)
                # committed: the files take their asset names (rolled forward by `project clean` if killed here)
                promote_staged(pairs)
                _mark_dead_quietly(project)  # other jobs found dead meanwhile (never on a rejected command)
        if world.is_controller:
            log.info("job %d finished in %.1f s on %d rank(s); registered %d record set(s)", ctx.job_id,
                     time.monotonic() - t0, world.size, len(ctx._rows))
            if not args.keep_scratch:
                shutil.rmtree(ctx.scratch, ignore_errors=True)
        return 0
    except CistemError:
        raise
    except Exception as exc:  # one rank (the guard re-raises as is): same one-line failure as with many
        raise JobFailed(f"rank {world.rank} on {world.host}: {type(exc).__name__}: {exc}") from exc
    finally:
        if ctx._meter is not None:
            ctx._meter.close()
        for h in list(log.handlers):
            h.close()
            log.removeHandler(h)
        if project is not None:
            project.close()


def _job_logger(job_type: str, world: World, setup: dict[str, Any]) -> logging.Logger:
    """Rank 0 logs to the job's log file and stderr; workers only warn on stderr."""
    log = logging.getLogger(f"cistem_mpi.job.{job_type}.{setup['job_id']}")
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
    sh = logging.StreamHandler(sys.stderr)
    if world.is_controller:
        fh = logging.FileHandler(setup["log_path"])
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(fh)
        sh.setFormatter(logging.Formatter(f"[{job_type} #{setup['job_id']}] %(message)s"))
        sh.setLevel(logging.INFO)
        log.info("job %d (%s) started: %d rank(s), controller on %s", setup["job_id"], job_type, world.size, world.host)
    else:
        sh.setFormatter(logging.Formatter(f"[{job_type} #{setup['job_id']} rank {world.rank}@{world.host}] %(message)s"))
        sh.setLevel(logging.WARNING)
    log.addHandler(sh)
    return log


def _forget(project: Project, ctx: JobContext, setup: dict[str, Any]) -> None:
    """Bad input: the job never really started.  Remove its record, scratch and log (SPEC §6)."""
    jobs_db.delete_job(project.conn, ctx.job_id)
    for h in list(ctx.log.handlers):
        if isinstance(h, logging.FileHandler):
            h.close()
            ctx.log.removeHandler(h)
    log_path = Path(setup["log_path"])
    log_path.unlink(missing_ok=True)
    try:
        log_path.parent.rmdir()  # only if this was the first job
    except OSError:
        pass
    if ctx.resumed_from is None:
        shutil.rmtree(ctx.scratch, ignore_errors=True)


def _start(project: Project, args: argparse.Namespace, job_type: str, size: int) -> dict[str, Any]:
    """Create the job record, scratch folder and log (rank 0)."""
    conn = project.conn
    # dead jobs are recorded only once this job is accepted (a rejected command changes nothing)
    resumed_from = getattr(args, "resume", None)
    scratch: Path | None = None
    resumed_args: dict[str, Any] | None = None
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
        resumed_args = _resumed_arguments(old, args)
    arguments = {k: v for k, v in vars(args).items() if k not in ("func",) and not k.startswith("_")}
    if resumed_args is not None:
        arguments.update(resumed_args)
    job_id = jobs_db.create_job(conn, job_type, arguments, size, resumed_from=resumed_from)
    if scratch is None:
        scratch = project.scratch_root / scratch_folder(job_type) / f"job_{job_id:04d}"
    scratch.mkdir(parents=True, exist_ok=True)
    logs = project.root / "Logs"
    logs.mkdir(exist_ok=True)
    log_path = logs / f"job_{job_id:04d}_{job_type}.log"
    jobs_db.set_paths(conn, job_id, str(log_path), str(scratch))
    return {"job_id": job_id, "scratch": str(scratch), "log_path": str(log_path), "resumed_from": resumed_from,
            "arguments": json.dumps(arguments, default=str), "resumed_args": resumed_args}


#: Options that belong to one invocation, not to a job's settings (a resume may change them).
_PER_RUN_OPTIONS: set[str] = {"project", "resume", "keep_scratch", "debug", "command"}


def per_run_options(*names: str) -> None:
    """Declare a driver's options that belong to one run, not to the job's settings.

    ``--resume`` neither takes them from the killed job's record nor refuses
    a new value (e.g. ``mpi-check``'s fault injection: a resumed job must not
    kill itself again).  Call it from the driver's ``register``.
    """
    _PER_RUN_OPTIONS.update(names)


def _resumed_arguments(old: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The killed job's recorded settings; an option given now that contradicts them is an InputError.

    ``args._explicit`` (set by the CLI) names the options given on this
    command line; without it every option that differs from the recorded
    value counts as given.
    """
    try:
        recorded = json.loads(old["arguments"] or "{}")
    except ValueError:
        recorded = {}
    recorded = {k: v for k, v in recorded.items() if k not in _PER_RUN_OPTIONS and not k.startswith("_")}
    explicit = getattr(args, "_explicit", None)
    now = json.loads(json.dumps({k: v for k, v in vars(args).items() if k != "func" and not k.startswith("_")},
                                default=str))
    for key, value in sorted(now.items()):
        if key in _PER_RUN_OPTIONS or key not in recorded:
            continue
        if explicit is not None and key not in explicit:
            continue
        if value != recorded[key]:
            option = "--" + key.replace("_", "-")
            raise InputError(option, f"job {old['id']} ran with {option} {_shown(recorded[key])}; --resume "
                                     f"continues with the recorded settings (leave out {option}, or start a new job)")
    return recorded


def _shown(value: Any) -> str:
    if value is None:
        return "(not given)"
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)


def _mark_dead_quietly(project: Project) -> None:
    """Record jobs of this host whose process is gone as failed; a failure here is never the job's."""
    try:
        jobs_db.mark_dead_jobs(project.conn)
    except Exception:  # noqa: BLE001 - e.g. a full disk; status still shows them 'died'
        pass


"""``cistem-mpi project create|info|check|clean``."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

from cistem_mpi.db import jobs as jobs_db
from cistem_mpi.db.project import Project
from cistem_mpi.drivers.jobrun import STAGED_KEY, promote_staged


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``project`` command."""
    p = sub.add_parser("project", help="create, inspect, check or clean a project")
    psub = p.add_subparsers(dest="project_command", metavar="<action>", required=True)

    c = psub.add_parser("create", help="create the project directory tree and database")
    c.add_argument("directory")
    c.add_argument("--database", help="put the database here (e.g. on NFS when the project is on Lustre/BeeGFS)")
    c.add_argument("--scratch", help="put job scratch folders here (e.g. node-local SSD, BeeOND)")
    c.set_defaults(func=_create)

    i = psub.add_parser("info", help="where the project, database and scratch are; asset counts")
    _directory_arguments(i)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_info)

    k = psub.add_parser("check", help="list assets whose files are missing (exit 1 if any)")
    _directory_arguments(k)
    k.set_defaults(func=_check)

    cl = psub.add_parser("clean", help="remove scratch and unregistered partial files left by ended jobs; "
                                       "record dead jobs as failed; finish the renames of finished jobs")
    _directory_arguments(cl)
    cl.set_defaults(func=_clean)


def _directory_arguments(p: argparse.ArgumentParser) -> None:
    """The project as a positional argument or ``-p/--project`` (like every other command)."""
    p.add_argument("directory", nargs="?", help="project directory")
    p.add_argument("--project", "-p", dest="project_option", metavar="DIR", help="project directory")


def _directory(args: argparse.Namespace) -> str:
    from cistem_mpi.errors import InputError

    d, o = getattr(args, "directory", None), getattr(args, "project_option", None)
    if d and o and d != o:
        raise InputError("--project", f"two project directories given ({d}, {o})")
    if not (d or o):
        raise InputError("--project", "give the project directory (-p DIR)")
    return d or o


def _create(args: argparse.Namespace) -> int:
    with Project.create(args.directory, database=args.database, scratch=args.scratch) as project:
        print(f"created project {project.name} at {project.root}")
        print(f"database: {project.db_path}")
        print(f"scratch:  {project.scratch_root}")
    return 0


def _info(args: argparse.Namespace) -> int:
    with Project.open(_directory(args), readonly=True) as project:
        info = project.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("name", "project_dir", "database", "scratch", "schema_version"):
        print(f"{key:15s} {info[key]}")
    if info["database_is_link"]:
        print(f"{'':15s} (the project's .db is a link to the database)")
    if info["missing_folders"]:
        print(f"{'missing':15s} {', '.join(info['missing_folders'])}")
    for table, n in info["counts"].items():  # type: ignore[union-attr]
        print(f"{table:22s} {n}")
    return 0


def _check(args: argparse.Namespace) -> int:
    with Project.open(_directory(args), readonly=True) as project:
        missing = project.missing_assets()
    for m in missing:
        print(f"missing: {m.table} #{m.row_id} {m.column}: {m.resolved_path}")
    if missing:
        sys.stderr.write(f"error: {_directory(args)}: {len(missing)} asset file(s) missing\n")
        return 1
    print("all asset files present")
    return 0


#: A job-private staged name (``.<name>.job<id>.part``) and what writers derive from it.
_STAGED_RE = re.compile(r"\.job(\d+)\.part")
#: Temporary names of the atomic writers (``.<name>.XXXX.tmp``, ``<name>.part``): no job id.
_TEMP_SUFFIXES = (".tmp", ".part")


def leftovers(project: Project) -> tuple[list[tuple[Path, int | None]], set[int]]:
    """Unregistered partial files under ``Assets``: ``[(path, job id or None)]`` and the live job ids.

    A file counts when its name is a staged name (``.job<id>.part``) or a
    temporary name (``.tmp``/``.part``) and no registered row points at it.
    """
    states = jobs_db.job_states(project.conn)
    live = {j for j, st in states.items() if st in ("running", "stalled?")}
    registered = project.registered_files()
    out: list[tuple[Path, int | None]] = []
    assets = project.root / "Assets"
    if not assets.is_dir():
        return out, live
    for dirpath, _dirs, files in os.walk(assets):
        for name in files:
            path = Path(dirpath) / name
            m = _STAGED_RE.search(name)
            if m is None and not name.endswith(_TEMP_SUFFIXES):
                continue
            if Path(os.path.abspath(path)) in registered:
                continue
            out.append((path, int(m.group(1)) if m else None))
    return out, live


def _clean(args: argparse.Namespace) -> int:
    with Project.open(_directory(args)) as project:
        before_failed = jobs_db.died_job_ids(project.conn)
        dead = jobs_db.mark_dead_jobs(project.conn)
        for job_id in dead:
            print(f"job {job_id}: process gone, recorded as failed")
        # a finished job killed between its commit and its renames: roll the renames forward
        rolled = 0
        for job_id, pairs in jobs_db.finished_staged_outputs(project.conn, STAGED_KEY):
            done = promote_staged([(st, fi) for st, fi in pairs])
            if done:
                print(f"job {job_id}: finished; {len(done)} output file(s) renamed to their asset names")
                rolled += len(done)
        removed = 0
        for job_id, path in jobs_db.ended_job_scratch(project.conn):
            if path and project.resolve(path).is_dir():
                shutil.rmtree(project.resolve(path))
                print(f"removed scratch of job {job_id}: {path}")
                removed += 1
        files, live = leftovers(project)
        deleted, kept, freed = 0, 0, 0
        for path, job_id in files:
            if (job_id is not None and job_id in live) or (job_id is None and live):
                kept += 1  # a running job's file (an unnamed temporary file may be one's)
                continue
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            freed += size
            deleted += 1
            print(f"removed unregistered partial file: {project.store_path(path)}")
        n_dead = len(set(dead) | before_failed)
    print(f"cleaned: {removed} scratch folder(s), {deleted} partial file(s) ({freed / 1e6:.1f} MB), "
          f"{len(dead)} job(s) found dead now ({n_dead} dead job(s) on record)"
          + (f", {rolled} finished output(s) rolled forward" if rolled else "")
          + (f"; {kept} file(s) of running jobs kept" if kept else ""))
    return 0

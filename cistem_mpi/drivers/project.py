"""``cistem-mpi project create|info|check|clean``."""

from __future__ import annotations

import argparse
import json
import shutil
import sys

from cistem_mpi.db import jobs as jobs_db
from cistem_mpi.db.project import Project


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
    i.add_argument("directory")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_info)

    k = psub.add_parser("check", help="list assets whose files are missing (exit 1 if any)")
    k.add_argument("directory")
    k.set_defaults(func=_check)

    cl = psub.add_parser("clean", help="remove scratch left by ended jobs; record dead jobs as failed")
    cl.add_argument("directory")
    cl.set_defaults(func=_clean)


def _create(args: argparse.Namespace) -> int:
    with Project.create(args.directory, database=args.database, scratch=args.scratch) as project:
        print(f"created project {project.name} at {project.root}")
        print(f"database: {project.db_path}")
        print(f"scratch:  {project.scratch_root}")
    return 0


def _info(args: argparse.Namespace) -> int:
    with Project.open(args.directory, readonly=True) as project:
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
    with Project.open(args.directory, readonly=True) as project:
        missing = project.missing_assets()
    for m in missing:
        print(f"missing: {m.table} #{m.row_id} {m.column}: {m.resolved_path}")
    if missing:
        sys.stderr.write(f"error: {args.directory}: {len(missing)} asset file(s) missing\n")
        return 1
    print("all asset files present")
    return 0


def _clean(args: argparse.Namespace) -> int:
    with Project.open(args.directory) as project:
        dead = jobs_db.mark_dead_jobs(project.conn)
        for job_id in dead:
            print(f"job {job_id}: process gone, recorded as failed")
        removed = 0
        for row in project.conn.execute("SELECT id, scratch_path FROM jobs WHERE status != 'running'"):
            path = row["scratch_path"]
            if path and project.resolve(path).is_dir():
                shutil.rmtree(project.resolve(path))
                print(f"removed scratch of job {row['id']}: {path}")
                removed += 1
    print(f"cleaned: {removed} scratch folder(s), {len(dead)} dead job(s)")
    return 0

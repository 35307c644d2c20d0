"""``cistem-mpi status``: running and recent jobs, from any shell.

Reads the database read-only, so it never waits for or blocks the job's
controller for more than one short transaction.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sqlite3

from cistem_mpi.db import jobs as jobs_db
from cistem_mpi.db.project import Project


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``status`` command."""
    p = sub.add_parser("status", help="list running and recent jobs with progress")
    p.add_argument("--project", "-p", required=True, help="project directory")
    p.add_argument("--limit", type=int, default=20, help="how many recent jobs (default 20)")
    p.add_argument("--job", type=int, help="show one job in full")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def job_dict(row) -> dict:
    """A job record as plain data (``--json``)."""
    d = {k: row[k] for k in row.keys()}
    d["shown_status"] = jobs_db.liveness(row)
    for key in ("arguments", "result"):
        if d.get(key):
            d[key] = json.loads(d[key])
    return d


def _when(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _record_dead_jobs(root: str) -> None:
    """A job whose process is gone is recorded as failed as soon as it is seen (if the database is writable)."""
    from cistem_mpi.errors import CistemError

    with Project.open(root, readonly=True) as project:
        running = jobs_db.running_jobs(project.conn)
        if not any(jobs_db.liveness(r) == "died" for r in running):
            return
    try:
        with Project.open(root) as project:
            jobs_db.mark_dead_jobs(project.conn)
    except (CistemError, OSError, sqlite3.Error):  # read-only project: status still shows 'died'
        pass


def run(args: argparse.Namespace) -> int:
    """Print the job table."""
    _record_dead_jobs(args.project)
    with Project.open(args.project, readonly=True) as project:
        if args.job is not None:
            row = jobs_db.get_job(project.conn, args.job)
            rows = [row] if row is not None else []
            if not rows:
                from cistem_mpi.errors import InputError

                raise InputError(args.project, f"no job {args.job}")
        else:
            rows = jobs_db.list_jobs(project.conn, args.limit)
        jobs = [job_dict(r) for r in rows]
    if args.json:
        print(json.dumps(jobs, indent=2, default=str))
        return 0
    if not jobs:
        print("no jobs yet")
        return 0
    print(f"{'id':>5} {'type':16} {'status':10} {'ranks':>5} {'progress':>14} {'started':19} {'ended':19} host")
    for j in jobs:
        prog = f"{j['progress_done']}/{j['progress_total']}" if j["progress_total"] else "-"
        print(f"{j['id']:>5} {j['type']:16} {j['shown_status']:10} {j['ranks'] or '-':>5} {prog:>14} "
              f"{_when(j['started_at'])} {_when(j['ended_at'])} {j['host'] or '-'}")
        if j["shown_status"] in ("failed", "cancelled", "died") and j["error"]:
            print(f"{'':6}error: {j['error']}")
        if j["status"] == "running" and j["progress_message"]:
            print(f"{'':6}{j['progress_message']}")
    if args.job is not None:
        j = jobs[0]
        print(f"log:     {j['log_path']}")
        print(f"scratch: {j['scratch_path']}")
        print(f"args:    {json.dumps(j['arguments'])}")
        if j.get("result"):
            print(f"result:  {json.dumps(j['result'])}")
    return 0

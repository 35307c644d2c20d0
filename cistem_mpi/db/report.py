"""The queries of ``cistem-mpi report``: everything the HTML report shows, read-only.

Every function takes an open connection and returns plain dictionaries, so
the report writer never sees SQL or ``sqlite3.Row`` objects.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from cistem_mpi.db import jobs as jobs_db


def _dicts(cur: sqlite3.Cursor) -> list[dict[str, Any]]:
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur]


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}


def jobs(conn: sqlite3.Connection, now: float | None = None) -> list[dict[str, Any]]:
    """Every job, oldest first, with its shown status, wall time and decoded settings.

    Parameters
    ----------
    conn : sqlite3.Connection
        The project database.
    now : float, optional
        The time a running job's wall time runs to (default: now).

    Returns
    -------
    list of dict
        The ``jobs`` columns plus ``shown_status`` (``died`` for a running job
        whose process is gone), ``wall_time`` (s, or None) and ``settings``
        (the decoded ``arguments``).

    >>> import sqlite3; c = sqlite3.connect(":memory:"); c.row_factory = sqlite3.Row
    >>> from cistem_mpi.db import schema; _ = schema.migrate(c)
    >>> jobs(c)
    []
    """
    now = time.time() if now is None else now
    out = []
    for row in conn.execute("SELECT * FROM jobs ORDER BY id"):
        d = {k: row[k] for k in row.keys()}
        d["shown_status"] = jobs_db.liveness(row)
        start, end = d.get("started_at"), d.get("ended_at")
        if start is None:
            d["wall_time"] = None
        else:
            d["wall_time"] = max(0.0, float(end if end is not None else now) - float(start))
        for key, dest in (("arguments", "settings"), ("result", "result")):
            try:
                d[dest] = json.loads(d[key]) if d.get(key) else {}
            except ValueError:
                d[dest] = {"(unreadable)": d[key]}
        out.append(d)
    return out


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Rows per asset table (the index page's summary).

    >>> import sqlite3; c = sqlite3.connect(":memory:")
    >>> from cistem_mpi.db import schema; _ = schema.migrate(c)
    >>> counts(c)["images"]
    0
    """
    tables = ("movies", "images", "ctf_estimates", "particle_positions", "particle_stacks", "refinement_packages",
              "classifications_2d", "refinements", "volumes")
    return {t: int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in tables}


def images(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every image with its newest CTF estimate and its number of picked positions.

    Returns
    -------
    list of dict
        ``id, name, path, pixel_size, nx, ny, shifts_path, trajectory_path, spectrum_path`` and, when the image
        has them, ``df1, df2, angast, fit_resolution, score, diagnostic_path, poor_fit`` (newest estimate) and
        ``n_picks`` (positions of the newest picking job of that image).
    """
    traj = "i.trajectory_path" if "trajectory_path" in _columns(conn, "images") else "NULL"
    poor = "e.poor_fit" if "poor_fit" in _columns(conn, "ctf_estimates") else "0"
    cur = conn.execute(
        f"SELECT i.id, i.name, i.path, i.pixel_size, i.nx, i.ny, i.shifts_path, {traj} AS trajectory_path,"
        " i.spectrum_path, e.df1, e.df2, e.angast, e.fit_resolution, e.score, e.diagnostic_path,"
        f" {poor} AS poor_fit,"
        " (SELECT count(*) FROM particle_positions p WHERE p.image_id = i.id AND p.job_id ="
        "   (SELECT max(q.job_id) FROM particle_positions q WHERE q.image_id = i.id)) AS n_picks,"
        " (SELECT max(q.job_id) FROM particle_positions q WHERE q.image_id = i.id) AS pick_job"
        " FROM images i LEFT JOIN ctf_estimates e"
        "   ON e.id = (SELECT max(x.id) FROM ctf_estimates x WHERE x.image_id = i.id)"
        " ORDER BY i.id")
    return _dicts(cur)


def classifications(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every 2D classification (oldest first) with its classes (``classes``: list of dict, by class number)."""
    out = _dicts(conn.execute("SELECT c.*, p.name AS package_name FROM classifications_2d c"
                              " LEFT JOIN refinement_packages p ON p.id = c.package_id ORDER BY c.number"))
    for c in out:
        c["classes"] = _dicts(conn.execute("SELECT * FROM classification_2d_classes WHERE classification_id = ?"
                                           " ORDER BY class_number", (c["id"],)))
    return out


def refinement_packages(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every refinement package with its stack's pixel size and box."""
    return _dicts(conn.execute("SELECT p.*, s.pixel_size, s.box, s.path AS stack_path FROM refinement_packages p"
                               " LEFT JOIN particle_stacks s ON s.id = p.stack_id ORDER BY p.id"))


def refinements(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every refinement (oldest first) with its classes and their volumes.

    Returns
    -------
    list of dict
        ``refinements`` columns plus ``package_name`` and ``classes``: the ``refinement_classes`` rows, each with
        ``volume`` (the newest ``volumes`` row of that refinement and class, or None).
    """
    out = _dicts(conn.execute("SELECT r.*, p.name AS package_name FROM refinements r"
                              " LEFT JOIN refinement_packages p ON p.id = r.package_id ORDER BY r.id"))
    for r in out:
        r["classes"] = _dicts(conn.execute("SELECT * FROM refinement_classes WHERE refinement_id = ?"
                                           " ORDER BY class_number", (r["id"],)))
        for c in r["classes"]:
            vols = _dicts(conn.execute("SELECT * FROM volumes WHERE refinement_id = ? AND"
                                       " (class_number = ? OR class_number IS NULL) ORDER BY id DESC LIMIT 1",
                                       (r["id"], c["class_number"])))
            c["volume"] = vols[0] if vols else None
    return out


def volumes(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every volume, oldest first."""
    return _dicts(conn.execute("SELECT * FROM volumes ORDER BY id"))


def any_job_running(conn: sqlite3.Connection) -> bool:
    """True while some job is recorded as running and its process is alive (``--watch`` stops otherwise)."""
    return any(jobs_db.liveness(r) == "running" for r in jobs_db.running_jobs(conn))

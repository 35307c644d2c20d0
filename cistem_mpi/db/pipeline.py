"""Queries of ``cistem-mpi pipeline``: which job of a step finished, and what it produced.

The pipeline keeps no table of its own: every step is an ordinary recorded
job, so the ``jobs`` table (type, recorded arguments, status) tells which
step finished with which settings, and the asset tables (``images``,
``ctf_estimates``, ``refinement_packages``, ``refinements`` ...) tell what
each job registered (their ``job_id`` column).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any

__all__ = ["job_arguments", "newest_job", "movie_ids", "image_ids", "images_of_job", "ctf_images_of_job",
           "images_with_ctf", "positions_of_job", "package_of_job", "refinement_of_job",
           "classification_of_job", "resolution_of_job", "wall_time"]


def job_arguments(row: sqlite3.Row) -> dict[str, Any]:
    """The recorded arguments of a job record (``{}`` if unreadable).

    >>> job_arguments({"arguments": '{"box": 512}'})
    {'box': 512}
    """
    try:
        out = json.loads(row["arguments"] or "{}")
    except (TypeError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


def newest_job(conn: sqlite3.Connection, job_type: str, where: Callable[[dict[str, Any]], bool] | None = None,
               status: str | None = None) -> sqlite3.Row | None:
    """The newest job of ``job_type`` (optionally with ``status``) whose arguments satisfy ``where``.

    Parameters
    ----------
    conn : sqlite3.Connection
    job_type : str
        ``find_ctf``, ``create_package``, ...
    where : callable, optional
        Predicate on the recorded arguments (e.g. ``lambda a: a.get("from_positions")``).
    status : str, optional
        Only jobs with this recorded status (``finished``); default any.

    Returns
    -------
    sqlite3.Row or None

    >>> from cistem_mpi.db import schema
    >>> c = sqlite3.connect(":memory:"); c.row_factory = sqlite3.Row; _ = schema.migrate(c)
    >>> newest_job(c, "find_ctf", status="finished") is None
    True
    """
    sql = "SELECT * FROM jobs WHERE type = ?"
    params: list[Any] = [job_type]
    if status is not None:
        sql += " AND status = ?"
        params.append(status)
    for row in conn.execute(sql + " ORDER BY id DESC", params):
        if where is None or where(job_arguments(row)):
            return row
    return None


def movie_ids(conn: sqlite3.Connection) -> list[int]:
    """Every movie of the project, by id."""
    return [int(r[0]) for r in conn.execute("SELECT id FROM movies ORDER BY id")]


def image_ids(conn: sqlite3.Connection) -> list[int]:
    """Every image of the project, by id."""
    return [int(r[0]) for r in conn.execute("SELECT id FROM images ORDER BY id")]


def images_of_job(conn: sqlite3.Connection, job_id: int) -> list[int]:
    """Images a job (align-movies, import images) registered."""
    return [int(r[0]) for r in conn.execute("SELECT id FROM images WHERE job_id = ? ORDER BY id", (int(job_id),))]


def ctf_images_of_job(conn: sqlite3.Connection, job_id: int) -> list[int]:
    """Images that a find-ctf (or import ctf) job estimated."""
    return [int(r[0]) for r in conn.execute(
        "SELECT DISTINCT image_id FROM ctf_estimates WHERE job_id = ? ORDER BY image_id", (int(job_id),))]


def images_with_ctf(conn: sqlite3.Connection) -> list[int]:
    """Images that have at least one CTF estimate."""
    return [int(r[0]) for r in conn.execute("SELECT DISTINCT image_id FROM ctf_estimates ORDER BY image_id")]


def positions_of_job(conn: sqlite3.Connection, job_id: int) -> int:
    """Number of particle positions a job registered."""
    return int(conn.execute("SELECT count(*) FROM particle_positions WHERE job_id = ?", (int(job_id),)).fetchone()[0])


def package_of_job(conn: sqlite3.Connection, job_id: int) -> int | None:
    """The refinement package a ``package create`` job registered (its id), or None."""
    row = conn.execute("SELECT id FROM refinement_packages WHERE job_id = ? ORDER BY id DESC LIMIT 1",
                       (int(job_id),)).fetchone()
    return None if row is None else int(row[0])


def refinement_of_job(conn: sqlite3.Connection, job_id: int) -> int | None:
    """The newest refinement (its id, what ``--refinement`` takes) a job registered, or None."""
    row = conn.execute("SELECT id FROM refinements WHERE job_id = ? ORDER BY id DESC LIMIT 1",
                       (int(job_id),)).fetchone()
    return None if row is None else int(row[0])


def classification_of_job(conn: sqlite3.Connection, job_id: int) -> int | None:
    """The last Classification # (the final iteration) a classify-2d job registered, or None."""
    row = conn.execute("SELECT max(number) FROM classifications_2d WHERE job_id = ?", (int(job_id),)).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def resolution_of_job(conn: sqlite3.Connection, job_id: int) -> float | None:
    """Best class resolution (Å) of the newest refinement a job registered, or None."""
    row = conn.execute(
        "SELECT min(rc.resolution) FROM refinement_classes rc WHERE rc.refinement_id = "
        "(SELECT id FROM refinements WHERE job_id = ? ORDER BY id DESC LIMIT 1)", (int(job_id),)).fetchone()
    return None if row is None or row[0] is None else float(row[0])


def wall_time(conn: sqlite3.Connection, job_id: int) -> float | None:
    """Seconds from a job's start to its end (None while it runs)."""
    row = conn.execute("SELECT started_at, ended_at FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
    if row is None or row[0] is None or row[1] is None:
        return None
    return float(row[1]) - float(row[0])

"""Queries of 2D classification (``classify-2d``) and of its automatic class selection.

Tables: ``classifications_2d`` (one row per iteration: its Classification #,
class averages, per-particle parameter file, iteration, parent, resolution
limit) and ``classification_2d_classes`` (population, resolution, score,
rank and automatic selection of each class).
"""

from __future__ import annotations

import sqlite3
from typing import Any

__all__ = ["package_source", "classification_by_number", "class_rows", "auto_selected_classes",
           "classification_numbers"]


def package_source(conn: sqlite3.Connection, package_id: int | None) -> dict[str, Any] | None:
    """A refinement package to classify: its row, its stack and its newest class-1 parameter file.

    Parameters
    ----------
    conn : sqlite3.Connection
    package_id : int or None
        None: the newest package.

    Returns
    -------
    dict or None
        ``{"package": row, "stack": row, "params_path": str | None}``; None if there is no such package.

    >>> import sqlite3
    >>> from cistem_mpi.db import schema
    >>> c = sqlite3.connect(":memory:"); c.row_factory = sqlite3.Row; _ = schema.migrate(c)
    >>> package_source(c, None) is None
    True
    """
    if package_id is None:
        pkg = conn.execute("SELECT * FROM refinement_packages ORDER BY id DESC LIMIT 1").fetchone()
    else:
        pkg = conn.execute("SELECT * FROM refinement_packages WHERE id = ?", (int(package_id),)).fetchone()
    if pkg is None:
        return None
    stack = conn.execute("SELECT * FROM particle_stacks WHERE id = ?", (pkg["stack_id"],)).fetchone()
    row = conn.execute(
        "SELECT rc.params_path FROM refinement_classes rc JOIN refinements r ON r.id = rc.refinement_id "
        "WHERE r.package_id = ? AND rc.class_number = 1 ORDER BY r.id DESC LIMIT 1", (pkg["id"],)).fetchone()
    return {"package": pkg, "stack": stack, "params_path": row[0] if row else None}


def classification_by_number(conn: sqlite3.Connection, number: int) -> sqlite3.Row | None:
    """The ``classifications_2d`` row of Classification #number (None if absent)."""
    return conn.execute("SELECT * FROM classifications_2d WHERE number = ?", (int(number),)).fetchone()


def classification_numbers(conn: sqlite3.Connection, job_id: int) -> list[int]:
    """Classification numbers a job registered, in order."""
    return [int(r[0]) for r in conn.execute(
        "SELECT number FROM classifications_2d WHERE job_id = ? ORDER BY number", (int(job_id),))]


def class_rows(conn: sqlite3.Connection, number: int) -> list[sqlite3.Row]:
    """Per-class rows (class_number, population, resolution, score, rank, selected) of Classification #number,
    best rank first."""
    return conn.execute(
        "SELECT c.class_number, c.population, c.resolution, c.score, c.rank, c.selected "
        "FROM classification_2d_classes c JOIN classifications_2d k ON k.id = c.classification_id "
        "WHERE k.number = ? ORDER BY c.rank, c.class_number", (int(number),)).fetchall()


def auto_selected_classes(conn: sqlite3.Connection, number: int) -> list[int]:
    """Classes of Classification #number that the automatic ranking selected (``package create --select auto``).

    >>> import sqlite3
    >>> from cistem_mpi.db import schema
    >>> c = sqlite3.connect(":memory:"); _ = schema.migrate(c)
    >>> auto_selected_classes(c, 1)
    []
    """
    return [int(r[0]) for r in conn.execute(
        "SELECT c.class_number FROM classification_2d_classes c JOIN classifications_2d k "
        "ON k.id = c.classification_id WHERE k.number = ? AND c.selected = 1 ORDER BY c.class_number",
        (int(number),))]

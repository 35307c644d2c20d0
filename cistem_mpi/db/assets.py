"""Queries of imported assets: movies, images, their CTF estimates and particle positions.

Drivers call these functions instead of writing SQL (``import``,
``package create --from-positions``).
"""

from __future__ import annotations

import sqlite3
from typing import Sequence

from cistem_mpi.db.selection import by_id_or_name

__all__ = ["ASSET_TABLES", "registered_paths", "image_rows", "newest_ctf_estimate", "positions_to_extract"]

#: Tables whose rows are files the project imported (a ``path`` column each).
ASSET_TABLES = ("movies", "images", "particle_stacks", "volumes")


def registered_paths(conn: sqlite3.Connection, table: str) -> list[tuple[int, str]]:
    """``(id, stored path)`` of every row of an asset table.

    Raises
    ------
    ValueError
        ``table`` is not one of :data:`ASSET_TABLES` (table names cannot be SQL parameters).

    >>> from cistem_mpi.db import schema
    >>> c = sqlite3.connect(":memory:"); c.row_factory = sqlite3.Row; _ = schema.migrate(c)
    >>> registered_paths(c, "movies")
    []
    """
    if table not in ASSET_TABLES:
        raise ValueError(f"not an asset table: {table!r}")
    return [(int(r[0]), r[1]) for r in conn.execute(f"SELECT id, path FROM {table}")]


def image_rows(conn: sqlite3.Connection) -> dict[int, sqlite3.Row]:
    """Every ``images`` row by id (one query: tens of thousands of ids exceed SQLite's variable limit)."""
    return {int(r["id"]): r for r in conn.execute("SELECT * FROM images")}


def newest_ctf_estimate(conn: sqlite3.Connection, image_id: int) -> tuple[float, float, float, float] | None:
    """``(df1 Å, df2 Å, angast deg, pshift rad)`` of an image's newest CTF estimate (None: no estimate)."""
    row = conn.execute("SELECT df1, df2, angast, pshift FROM ctf_estimates WHERE image_id = ? "
                       "ORDER BY id DESC LIMIT 1", (int(image_id),)).fetchone()
    return None if row is None else tuple(float(v) for v in row)  # type: ignore[return-value]


def positions_to_extract(conn: sqlite3.Connection, jobs: Sequence[int] | None = None,
                         images: Sequence[str] | None = None) -> list[tuple[int, int, float, float]]:
    """``(position id, image id, x Å, y Å)`` of the particle positions to cut, by image then position id.

    Parameters
    ----------
    conn : sqlite3.Connection
    jobs : sequence of int, optional
        Only positions registered by these jobs (default: all).
    images : sequence of str, optional
        Only positions on these images, given by id (digits) or name.

    >>> from cistem_mpi.db import schema
    >>> c = sqlite3.connect(":memory:"); c.row_factory = sqlite3.Row; _ = schema.migrate(c)
    >>> positions_to_extract(c, jobs=[1], images=["mic_1", "2"])
    []
    """
    where: list[str] = []
    args: list = []
    if jobs:
        where.append(f"p.job_id IN ({','.join('?' * len(jobs))})")
        args += [int(j) for j in jobs]
    if images:
        sel, sel_args = by_id_or_name(images, "i")
        where.append(sel)
        args += sel_args
    sql = ("SELECT p.id, p.image_id, p.x, p.y FROM particle_positions p JOIN images i ON i.id = p.image_id"
           + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY p.image_id, p.id")
    return [tuple(r) for r in conn.execute(sql, args).fetchall()]  # type: ignore[misc]

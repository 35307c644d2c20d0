"""Queries of particle picking (``find-particles``): the images to pick with their newest CTF.

Positions go to ``particle_positions`` (the table ``import positions``
writes: x, y in Å from the first pixel, ``peak`` = the pick's score), one
row per pick, with the picking job's id.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from cistem_mpi.db.selection import by_id_or_name

__all__ = ["images_to_pick", "positions_of_job"]


def images_to_pick(conn: sqlite3.Connection, selection: Sequence[str] | None = None) -> list[sqlite3.Row]:
    """The project's images (all, or those named/numbered in ``selection``) with their newest CTF estimate.

    Parameters
    ----------
    conn : sqlite3.Connection
    selection : image ids (as text) or names; None = every image

    Returns
    -------
    list of rows, id order: id, name, path, nx, ny, pixel_size, voltage, cs,
    amplitude_contrast, and of the newest estimate (NULL when there is none)
    ctf_id, df1, df2, angast, pshift, poor_fit.

    >>> import sqlite3; from cistem_mpi.db import schema
    >>> c = sqlite3.connect(":memory:", isolation_level=None); _ = schema.migrate(c)
    >>> images_to_pick(c)
    []
    """
    sql = ("SELECT i.id, i.name, i.path, i.nx, i.ny, i.pixel_size, i.voltage, i.cs, i.amplitude_contrast, "
           "e.id AS ctf_id, e.df1, e.df2, e.angast, e.pshift, e.poor_fit "
           "FROM images i LEFT JOIN ctf_estimates e ON e.id = "
           "(SELECT max(id) FROM ctf_estimates WHERE image_id = i.id)")
    where, args = by_id_or_name(selection, "i")
    sql += " WHERE " + where
    return list(conn.execute(sql + " ORDER BY i.id", args))


def positions_of_job(conn: sqlite3.Connection, job_id: int) -> list[sqlite3.Row]:
    """Positions (image_id, x, y, peak; Å) registered by one job, in id order.

    >>> import sqlite3; from cistem_mpi.db import schema
    >>> c = sqlite3.connect(":memory:", isolation_level=None); _ = schema.migrate(c)
    >>> positions_of_job(c, 1)
    []
    """
    return list(conn.execute("SELECT image_id, x, y, peak FROM particle_positions WHERE job_id = ? ORDER BY id",
                             (int(job_id),)))

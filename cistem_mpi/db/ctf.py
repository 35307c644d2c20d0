"""Queries of CTF estimation (``find-ctf``): the images to fit, file numbering, newest estimates.

Table ``ctf_estimates`` (shared with ``import ctf``): one row per estimate;
an image's newest estimate (highest id) is the one every later job uses.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from cistem_mpi.db.selection import by_id_or_name

__all__ = ["images_to_fit", "estimate_count", "newest_estimates", "output_path_taken"]


def images_to_fit(conn: sqlite3.Connection, selection: Sequence[str] | None = None) -> list[sqlite3.Row]:
    """The project's images (all, or those named/numbered in ``selection``) in id order.

    Parameters
    ----------
    conn : sqlite3.Connection
    selection : image ids (as text) or names; None = every image

    Returns
    -------
    list of rows with id, name, path, unweighted_path, nx, ny, pixel_size, voltage, cs, amplitude_contrast,
    movie_id, shifts_path (the align-movies movie and trajectory, or NULL)

    >>> import sqlite3; from cistem_mpi.db import schema
    >>> c = sqlite3.connect(":memory:", isolation_level=None); _ = schema.migrate(c)
    >>> images_to_fit(c)
    []
    """
    sql = ("SELECT id, name, path, unweighted_path, nx, ny, pixel_size, voltage, cs, amplitude_contrast, "
           "movie_id, shifts_path FROM images")
    where, args = by_id_or_name(selection, "")
    sql += " WHERE " + where
    return list(conn.execute(sql + " ORDER BY id", args))


def estimate_count(conn: sqlite3.Connection) -> dict[int, int]:
    """Number of CTF estimates of each image (image id -> count).

    >>> import sqlite3; from cistem_mpi.db import schema
    >>> c = sqlite3.connect(":memory:", isolation_level=None); _ = schema.migrate(c)
    >>> estimate_count(c)
    {}
    """
    rows = conn.execute("SELECT image_id, count(*) FROM ctf_estimates GROUP BY image_id")
    return {int(r[0]): int(r[1]) for r in rows}


def output_path_taken(conn: sqlite3.Connection, stored_path: str) -> bool:
    """True when a CTF estimate already points at ``stored_path`` (txt, avrot or diagnostic).

    >>> import sqlite3; from cistem_mpi.db import schema
    >>> c = sqlite3.connect(":memory:", isolation_level=None); _ = schema.migrate(c)
    >>> output_path_taken(c, "Assets/CTF/a.txt")
    False
    """
    row = conn.execute("SELECT 1 FROM ctf_estimates WHERE output_path = ? OR avrot_path = ? OR diagnostic_path = ? "
                       "LIMIT 1", (stored_path, stored_path, stored_path)).fetchone()
    return row is not None


def newest_estimates(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    """Every image's newest CTF estimate with the image's path and optics, in image id order.

    >>> import sqlite3; from cistem_mpi.db import schema
    >>> c = sqlite3.connect(":memory:", isolation_level=None); _ = schema.migrate(c)
    >>> newest_estimates(c)
    []
    """
    return list(conn.execute(
        "SELECT e.image_id, i.name, i.path, i.pixel_size, i.voltage, i.cs, i.amplitude_contrast, "
        "e.df1, e.df2, e.angast, e.pshift, e.fit_resolution, e.score "
        "FROM ctf_estimates e JOIN images i ON i.id = e.image_id "
        "WHERE e.id = (SELECT max(id) FROM ctf_estimates WHERE image_id = e.image_id) ORDER BY e.image_id"))

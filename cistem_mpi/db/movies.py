"""Queries of the movie assets and of the images aligned from them (align-movies, compress-movies)."""

from __future__ import annotations

import sqlite3
from typing import Any

from cistem_mpi.db.connection import transaction

__all__ = ["list_movies", "aligned_movie_ids", "used_image_names", "switch_movie_paths", "IMAGES_DIR"]

#: Where aligned sums live (cisTEM's layout), with ``Scaled`` and ``Spectra`` below it.
IMAGES_DIR = "Assets/Images"

_MOVIE_COLUMNS = ("id", "path", "name", "n_frames", "nx", "ny", "pixel_size", "voltage", "cs",
                  "amplitude_contrast", "dose_per_frame", "gain_path")


def list_movies(conn: sqlite3.Connection, ids: list[int] | None = None) -> list[dict[str, Any]]:
    """Movie records (all, or those with the given ids) in id order, as dicts.

    Raises
    ------
    KeyError
        An id that is not a movie of the project (the message lists them).
    """
    rows = conn.execute(f"SELECT {', '.join(_MOVIE_COLUMNS)} FROM movies ORDER BY id").fetchall()
    out = [dict(zip(_MOVIE_COLUMNS, tuple(r))) for r in rows]
    if ids is not None:
        wanted = {int(i) for i in ids}
        missing = sorted(wanted - {m["id"] for m in out})
        if missing:
            raise KeyError(", ".join(str(m) for m in missing))
        out = [m for m in out if m["id"] in wanted]
    return out


def aligned_movie_ids(conn: sqlite3.Connection) -> set[int]:
    """Ids of movies that already have an image registered by a finished job."""
    rows = conn.execute("SELECT DISTINCT i.movie_id FROM images i JOIN jobs j ON j.id = i.job_id "
                        "WHERE i.movie_id IS NOT NULL AND j.status = 'finished'").fetchall()
    return {int(r[0]) for r in rows}


def used_image_names(conn: sqlite3.Connection) -> set[str]:
    """Names of every registered image (to give new sums unique file names)."""
    return {str(r[0]) for r in conn.execute("SELECT name FROM images").fetchall()}


def switch_movie_paths(conn: sqlite3.Connection, new_paths: dict[int, str]) -> int:
    """Point movie records at new files (compress-movies) in one transaction; returns rows changed."""
    with transaction(conn):
        n = 0
        for movie_id, path in new_paths.items():
            n += conn.execute("UPDATE movies SET path = ? WHERE id = ?", (path, int(movie_id))).rowcount
    return n

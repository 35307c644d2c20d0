"""Queries of ``cistem-mpi demo``: what the chain registered, and where each particle came from.

The demo compares a project's result with the simulator's truth, so it needs
(a) the refinements and maps a job registered and (b) for every particle of
a refinement package, the image and the position on it that the particle was
cut from: the package's members lead (``parent_position``, through
``parent_id`` packages) to the ``particle_positions`` row of the package that
was cut from positions.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

__all__ = ["volume_table", "refinement_summary", "package_of_refinement", "start_params_of_package",
           "particle_origins", "image_table"]


def volume_table(conn: sqlite3.Connection) -> list[tuple[str, str, float | None]]:
    """Every registered map: (display name, stored path, resolution in Å or None), oldest first.

    >>> from cistem_mpi.db import schema
    >>> c = sqlite3.connect(":memory:"); c.row_factory = sqlite3.Row; _ = schema.migrate(c)
    >>> volume_table(c)
    []
    """
    return [(str(r[0]), str(r[1]), None if r[2] is None else float(r[2]))
            for r in conn.execute("SELECT display_name, path, resolution FROM volumes ORDER BY id")]


def refinement_summary(conn: sqlite3.Connection, refinement_id: int) -> dict[str, Any] | None:
    """Class 1 of a refinement: its parameter file, map, half maps and resolution.

    Returns
    -------
    dict or None
        ``params_path``, ``resolution`` (Å or None), ``volume`` / ``half_map_1`` / ``half_map_2``
        (stored paths or None when no map was registered), ``package_id``; None for an unknown refinement.

    >>> from cistem_mpi.db import schema
    >>> c = sqlite3.connect(":memory:"); c.row_factory = sqlite3.Row; _ = schema.migrate(c)
    >>> refinement_summary(c, 1) is None
    True
    """
    row = conn.execute(
        "SELECT r.package_id, rc.params_path, rc.resolution FROM refinements r "
        "JOIN refinement_classes rc ON rc.refinement_id = r.id WHERE r.id = ? AND rc.class_number = 1",
        (int(refinement_id),)).fetchone()
    if row is None:
        return None
    vol = conn.execute("SELECT path, half_map_1, half_map_2 FROM volumes WHERE refinement_id = ? "
                       "AND (class_number = 1 OR class_number IS NULL) ORDER BY id DESC LIMIT 1",
                       (int(refinement_id),)).fetchone()
    return {"package_id": int(row[0]), "params_path": str(row[1]),
            "resolution": None if row[2] is None else float(row[2]),
            "volume": None if vol is None else vol[0], "half_map_1": None if vol is None else vol[1],
            "half_map_2": None if vol is None else vol[2]}


def package_of_refinement(conn: sqlite3.Connection, refinement_id: int) -> int | None:
    """The refinement package (id) of a refinement, or None."""
    row = conn.execute("SELECT package_id FROM refinements WHERE id = ?", (int(refinement_id),)).fetchone()
    return None if row is None else int(row[0])


def start_params_of_package(conn: sqlite3.Connection, package_id: int) -> dict[str, Any] | None:
    """The package's starting refinement (``kind = 'start'``): its id, class-1 parameter file and stack.

    Returns
    -------
    dict or None
        ``refinement_id``, ``params_path``, ``stack_path``, ``pixel_size``, ``box`` (stored paths).
    """
    row = conn.execute(
        "SELECT r.id, rc.params_path, s.path, s.pixel_size, s.box FROM refinements r "
        "JOIN refinement_classes rc ON rc.refinement_id = r.id AND rc.class_number = 1 "
        "JOIN refinement_packages p ON p.id = r.package_id JOIN particle_stacks s ON s.id = p.stack_id "
        "WHERE r.package_id = ? AND r.kind = 'start' ORDER BY r.id LIMIT 1", (int(package_id),)).fetchone()
    if row is None:
        return None
    return {"refinement_id": int(row[0]), "params_path": str(row[1]), "stack_path": str(row[2]),
            "pixel_size": float(row[3]), "box": int(row[4])}


def particle_origins(conn: sqlite3.Connection, package_id: int) -> dict[int, tuple[int, float, float]]:
    """Where each particle of a package was cut: ``{position: (image id, x Å, y Å)}``.

    Follows the package's ``parent_id`` chain (packages made from classes or
    refinements) down to the package cut from positions, whose members'
    ``parent_position`` is a ``particle_positions`` id.  Particles whose
    chain does not end at a position (an imported stack) are left out.

    >>> from cistem_mpi.db import schema
    >>> c = sqlite3.connect(":memory:"); c.row_factory = sqlite3.Row; _ = schema.migrate(c)
    >>> particle_origins(c, 1)
    {}
    """
    mapping = {int(p): int(pp) for p, pp in conn.execute(
        "SELECT position, parent_position FROM refinement_package_members WHERE package_id = ?",
        (int(package_id),)) if pp is not None}
    pkg = conn.execute("SELECT parent_id, job_id FROM refinement_packages WHERE id = ?", (int(package_id),)).fetchone()
    seen = {int(package_id)}
    while pkg is not None and pkg[0] is not None and int(pkg[0]) not in seen:
        parent = int(pkg[0])
        seen.add(parent)
        up = {int(p): int(pp) for p, pp in conn.execute(
            "SELECT position, parent_position FROM refinement_package_members WHERE package_id = ?", (parent,))
            if pp is not None}
        mapping = {k: up[v] for k, v in mapping.items() if v in up}
        pkg = conn.execute("SELECT parent_id, job_id FROM refinement_packages WHERE id = ?", (parent,)).fetchone()
    if pkg is None:
        return {}
    job = conn.execute("SELECT arguments FROM jobs WHERE id = ?", (int(pkg[1]),)).fetchone()
    try:
        cut = bool(json.loads(job[0] or "{}").get("from_positions")) if job is not None else False
    except (ValueError, AttributeError):
        cut = False
    if not cut:
        return {}
    positions = {int(i): (int(img), float(x), float(y)) for i, img, x, y in conn.execute(
        "SELECT id, image_id, x, y FROM particle_positions")}
    return {k: positions[v] for k, v in mapping.items() if v in positions}


def image_table(conn: sqlite3.Connection) -> dict[int, dict[str, Any]]:
    """Every image: ``{id: {name, path, pixel_size, nx, ny, movie (movie file path or None), shifts_path}}``.

    >>> from cistem_mpi.db import schema
    >>> c = sqlite3.connect(":memory:"); c.row_factory = sqlite3.Row; _ = schema.migrate(c)
    >>> image_table(c)
    {}
    """
    out = {}
    for r in conn.execute("SELECT i.id, i.name, i.path, i.pixel_size, i.nx, i.ny, m.path, i.shifts_path "
                          "FROM images i LEFT JOIN movies m ON m.id = i.movie_id ORDER BY i.id"):
        out[int(r[0])] = {"name": str(r[1]), "path": str(r[2]), "pixel_size": float(r[3]), "nx": int(r[4]),
                          "ny": int(r[5]), "movie": r[6], "shifts_path": r[7]}
    return out

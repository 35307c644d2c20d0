"""Queries of particle stacks, refinement packages, refinements and their class parameter files.

Tables: ``particle_stacks`` (a stack file and its optics), ``refinement_packages``
(a stack, its classes and symmetry), ``refinements`` (a run: starting parameters
or a refinement round) and ``refinement_classes`` (the parameter file of each
class of a run).  Drivers call these functions instead of writing SQL.
"""

from __future__ import annotations

import sqlite3

__all__ = ["stack_by_id", "package_by_id", "refinement_by_id", "newest_refinement_id", "refinement_class_rows",
           "next_package_number"]


def stack_by_id(conn: sqlite3.Connection, stack_id: int) -> sqlite3.Row | None:
    """The ``particle_stacks`` row with this id (None if absent).

    >>> from cistem_mpi.db import schema
    >>> c = sqlite3.connect(":memory:"); c.row_factory = sqlite3.Row; _ = schema.migrate(c)
    >>> stack_by_id(c, 1) is None
    True
    """
    return conn.execute("SELECT * FROM particle_stacks WHERE id = ?", (int(stack_id),)).fetchone()


def package_by_id(conn: sqlite3.Connection, package_id: int) -> sqlite3.Row | None:
    """The ``refinement_packages`` row with this id (None if absent)."""
    return conn.execute("SELECT * FROM refinement_packages WHERE id = ?", (int(package_id),)).fetchone()


def refinement_by_id(conn: sqlite3.Connection, run: int) -> sqlite3.Row | None:
    """The ``refinements`` row of run ``run`` (None if absent)."""
    return conn.execute("SELECT * FROM refinements WHERE id = ?", (int(run),)).fetchone()


def newest_refinement_id(conn: sqlite3.Connection) -> int | None:
    """The run number of the newest refinement, None when the project has none.

    >>> from cistem_mpi.db import schema
    >>> c = sqlite3.connect(":memory:"); c.row_factory = sqlite3.Row; _ = schema.migrate(c)
    >>> newest_refinement_id(c) is None
    True
    """
    row = conn.execute("SELECT max(id) FROM refinements").fetchone()
    return None if row[0] is None else int(row[0])


def refinement_class_rows(conn: sqlite3.Connection, run: int) -> list[sqlite3.Row]:
    """The ``refinement_classes`` rows of run ``run``, class 1 first."""
    return list(conn.execute("SELECT * FROM refinement_classes WHERE refinement_id = ? ORDER BY class_number",
                             (int(run),)))


def next_package_number(conn: sqlite3.Connection) -> int:
    """The number the next refinement package gets (``Refinement Package #n``, ``particle_stack_<n>``).

    >>> from cistem_mpi.db import schema
    >>> c = sqlite3.connect(":memory:"); c.row_factory = sqlite3.Row; _ = schema.migrate(c)
    >>> next_package_number(c)
    1
    """
    return int(conn.execute("SELECT coalesce(max(id), 0) + 1 FROM refinement_packages").fetchone()[0])

"""Opening the project database with settings that are safe on NFS.

SQLite on a network file system needs the rollback journal (WAL's shared
memory does not work across hosts), a busy timeout so a reader and the one
writer wait for each other instead of failing, and short transactions.  Only
the controller (MPI rank 0) ever opens the database for writing.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from cistem_mpi.errors import InputError

#: Milliseconds a connection waits for a lock before giving up.
BUSY_TIMEOUT_MS = 60_000


def connect(path: str | Path, readonly: bool = False) -> sqlite3.Connection:
    """Open the database at ``path``.

    Parameters
    ----------
    path : str or Path
        The ``.db`` file (a symlink to the real file is followed).
    readonly : bool
        Open read-only (``status`` and other readers); a reader never takes
        a write lock and never creates the file.

    Returns
    -------
    sqlite3.Connection
        Autocommit connection (``isolation_level=None``); use
        :func:`transaction` for writes. Rows are :class:`sqlite3.Row`.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "project database not found")
    uri = f"file:{path.resolve()}?mode={'ro' if readonly else 'rw'}"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        if not readonly:
            # Rollback journal, not WAL: WAL needs shared memory, which NFS/Lustre lack.
            mode = conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
            if mode.lower() != "delete":
                raise InputError(path, f"cannot set rollback journal (journal_mode is {mode})")
            conn.execute("PRAGMA synchronous = FULL")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        raise InputError(path, f"not a usable SQLite database ({exc})") from exc
    return conn


def create(path: str | Path) -> sqlite3.Connection:
    """Create a new, empty database file at ``path`` and open it for writing."""
    path = Path(path)
    if path.exists():
        raise InputError(path, "a database already exists here")
    path.parent.mkdir(parents=True, exist_ok=True)
    sqlite3.connect(path).close()
    return connect(path)


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One short write transaction: ``BEGIN IMMEDIATE`` … ``COMMIT``.

    ``IMMEDIATE`` takes the write lock up front, so two writers queue on the
    busy timeout instead of deadlocking half-way.  Any exception rolls the
    whole transaction back and propagates.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    else:
        conn.execute("COMMIT")

"""Opening the project database with settings that are safe on NFS.

SQLite on a network file system needs the rollback journal (WAL's shared
memory does not work across hosts), a busy timeout so a reader and the one
writer wait for each other instead of failing, and short transactions.  Only
the controller (MPI rank 0) ever opens the database for writing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from cistem_mpi.errors import InputError

#: Milliseconds a connection waits for a lock before giving up.
BUSY_TIMEOUT_MS = 60_000

#: The database this process opened last (named in one-line database errors).
_last_path: Path | None = None


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
    global _last_path
    _last_path = path
    if not readonly:
        real = path.resolve()
        if not os.access(real, os.W_OK):
            raise InputError(real, "the project database is read-only (no write permission); "
                                   "only `status` and `project info/check` work on a read-only project")
        if not os.access(real.parent, os.W_OK | os.X_OK):
            raise InputError(real.parent, "the database's directory is read-only (SQLite writes its journal "
                                          "there); only `status` and `project info/check` work")
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
        low = str(exc).lower()
        if "malformed" in low or "corrupt" in low:
            raise InputError(path.resolve(), f"the database file is damaged ({exc}); restore it from a backup, or "
                                             f"rescue what is left with `sqlite3 {path.resolve()} .recover | "
                                             f"sqlite3 recovered.db`") from exc
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
        if conn.in_transaction:  # SQLite rolls back by itself on e.g. a full disk
            conn.execute("ROLLBACK")
        raise
    else:
        conn.execute("COMMIT")


def database_error_line(exc: BaseException) -> tuple[str, int]:
    """One line and an exit code for an SQLite error that reached the command line.

    A damaged file (``database disk image is malformed``) names the database
    and what to do; a read-only file or a full disk say so (exit 2: the
    project, not the program, needs attention).
    """
    where = str(_last_path.resolve()) if _last_path is not None else "project database"
    text = str(exc)
    low = text.lower()
    if "malformed" in low or "not a database" in low or "corrupt" in low:
        return (f"{where}: the database file is damaged ({text}); restore it from a backup, or rescue what is "
                f"left with `sqlite3 {where} .recover | sqlite3 recovered.db` and put recovered.db in its place", 2)
    if "readonly" in low or "read-only" in low:
        return f"{where}: the project database is read-only ({text})", 2
    if "disk is full" in low or "disk full" in low:
        return f"{where}: disk full writing the project database ({text}); free space and run the job again", 2
    if "locked" in low:
        return f"{where}: the database stayed locked by another process ({text}); try again", 2
    return f"{where}: database error: {text}", 2


def is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC/EDQUOT (``OSError``) or SQLite's ``database or disk is full``."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower()

"""A project: its directory, its database, and where each asset file lives.

The database file is ``<project>/<name>.db``; when the user puts it on
another file system (``--database``), ``<name>.db`` in the project is a
symbolic link to the real file, as cisTEM's FAQ recommends for Lustre.
Asset paths inside the project are stored relative to the project directory,
so ``mv``-ing the project keeps them valid; imported files are stored with
their absolute path and must stay reachable there.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from cistem_mpi import __version__
from cistem_mpi.db import connection, schema
from cistem_mpi.errors import InputError
from cistem_mpi.db.naming import create_tree, missing_folders

#: Tables whose rows point at files, and the columns holding paths.
PATH_COLUMNS: dict[str, tuple[str, ...]] = {
    "movies": ("path", "gain_path"),
    "images": ("path", "scaled_path", "spectrum_path", "shifts_path"),
    "ctf_estimates": ("diagnostic_path",),
    "particle_stacks": ("path", "params_path"),
    "refinement_classes": ("params_path",),
    "classifications_2d": ("path", "params_path"),
    "volumes": ("path", "half_map_1", "half_map_2", "orth_view"),
}


@dataclass
class MissingAsset:
    """An asset whose file cannot be found."""

    table: str
    row_id: int
    column: str
    stored_path: str
    resolved_path: Path


class Project:
    """An open project (directory + database connection).

    Use :meth:`create` or :meth:`open`; close with :meth:`close` or a
    ``with`` block.
    """

    def __init__(self, root: Path, db_path: Path, conn: sqlite3.Connection, readonly: bool):
        self.root = root
        self.db_path = db_path
        self.conn = conn
        self.readonly = readonly

    # ------------------------------------------------------------------ open
    @classmethod
    def create(cls, root: str | Path, database: str | Path | None = None, scratch: str | Path | None = None) -> "Project":
        """Create the project tree and database.

        Parameters
        ----------
        root : path
            Project directory; must not exist or be empty.
        database : path, optional
            Where the database file really lives (e.g. an NFS path when the
            project is on Lustre/BeeGFS).  A directory means ``<dir>/<name>.db``.
        scratch : path, optional
            Where jobs put temporary files (node-local SSD, BeeOND); default
            ``<project>/Scratch``.
        """
        root = Path(root).absolute()
        name = root.name
        if not name:
            raise InputError(root, "cannot use this path as a project directory")
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise InputError(root, "already exists and is not an empty directory")
        link = root / f"{name}.db"
        if database is not None:
            real = Path(database).absolute()
            if real.is_dir():
                real = real / f"{name}.db"
            if real.exists():
                raise InputError(real, "a database already exists here")
            if not real.parent.is_dir():
                raise InputError(real.parent, "database directory does not exist")
        else:
            real = link
        if scratch is not None:
            scratch = Path(scratch).absolute()
            if scratch.exists() and not scratch.is_dir():
                raise InputError(scratch, "scratch path exists and is not a directory")
        created_root = not root.exists()
        try:
            root.mkdir(parents=True, exist_ok=True)
            create_tree(root)
            conn = connection.create(real)
            if real != link:
                os.symlink(real, link)
            schema.migrate(conn)
            now = time.time()
            with connection.transaction(conn):
                conn.executemany(
                    "INSERT INTO settings(key, value) VALUES (?, ?)",
                    [
                        ("name", name),
                        ("created_at", repr(now)),
                        ("created_by", f"cistem-mpi {__version__}"),
                        ("project_dir", str(root)),
                        ("database_path", str(real)),
                        ("scratch_dir", str(scratch) if scratch else ""),
                    ],
                )
        except BaseException:
            # Leave nothing half-made behind.
            if real != link and real.exists():
                real.unlink()
            if created_root:
                import shutil

                shutil.rmtree(root, ignore_errors=True)
            raise
        if scratch is not None:
            scratch.mkdir(parents=True, exist_ok=True)
        return cls(root, real, conn, readonly=False)

    @classmethod
    def open(cls, root: str | Path, readonly: bool = False) -> "Project":
        """Open an existing project directory.

        A writable open records the directory's current location (a moved
        project) and brings an old schema up to date.  Read-only opens
        change nothing.
        """
        root = Path(root).absolute()
        if not root.is_dir():
            raise InputError(root, "project directory not found")
        dbs = sorted(root.glob("*.db"))
        if len(dbs) != 1:
            what = "no" if not dbs else "more than one"
            raise InputError(root, f"not a cistem-mpi project ({what} .db file)")
        link = dbs[0]
        if link.is_symlink() and not link.exists():
            raise InputError(link, f"database link points to a missing file ({os.readlink(link)})")
        conn = connection.connect(link, readonly=readonly)
        project = cls(root, link.resolve(), conn, readonly=readonly)
        ver = schema.version(conn)
        if ver == 0:
            conn.close()
            raise InputError(link, "database has no cistem-mpi schema")
        if not readonly:
            for d in (root, root / "Assets", root / "Logs"):
                if d.is_dir() and not os.access(d, os.W_OK | os.X_OK):
                    conn.close()
                    raise InputError(d, "is read-only (no write permission or a read-only mount); "
                                        "only `status` and `project info/check` work on a read-only project")
            schema.migrate(conn)
            old_root = project.setting("project_dir")
            if old_root != str(root):  # the project was moved: record where everything is now
                project.set_setting("project_dir", str(root))
                if old_root:
                    from cistem_mpi.db.jobs import relocate_job_paths

                    relocate_job_paths(conn, old_root, str(root))
            if project.setting("database_path") != str(project.db_path):
                project.set_setting("database_path", str(project.db_path))
        elif ver < schema.LATEST_VERSION:
            conn.close()
            raise InputError(link, f"database schema version {ver} is old; open it once without --readonly to upgrade")
        return project

    def close(self) -> None:
        """Close the database connection."""
        self.conn.close()

    def __enter__(self) -> "Project":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- settings
    @property
    def name(self) -> str:
        """Project name (the directory name at creation)."""
        return self.setting("name")

    def setting(self, key: str, default: str = "") -> str:
        """Read one project setting."""
        row = self.conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def set_setting(self, key: str, value: str) -> None:
        """Write one project setting (controller only)."""
        with connection.transaction(self.conn):
            self.conn.execute(
                "INSERT INTO settings(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    @property
    def scratch_root(self) -> Path:
        """Top of the scratch area (``<project>/Scratch`` unless set elsewhere)."""
        custom = self.setting("scratch_dir")
        return Path(custom) if custom else self.root / "Scratch"

    # ----------------------------------------------------------------- paths
    def store_path(self, path: str | Path) -> str:
        """The string to store for ``path``: relative inside the project, else absolute."""
        p = Path(path).absolute()
        try:
            return p.relative_to(self.root).as_posix()
        except ValueError:
            return str(p)

    def resolve(self, stored: str) -> Path:
        """The file a stored path refers to now."""
        p = Path(stored)
        return p if p.is_absolute() else self.root / p

    def missing_assets(self) -> list[MissingAsset]:
        """Every asset whose file is missing (``project check``)."""
        missing: list[MissingAsset] = []
        for table, cols in PATH_COLUMNS.items():
            rowid = "rowid" if table == "refinement_classes" else "id"
            for col in cols:
                for row in self.conn.execute(f"SELECT {rowid}, {col} FROM {table} WHERE {col} IS NOT NULL AND {col} != ''"):
                    resolved = self.resolve(row[1])
                    if not resolved.exists():
                        missing.append(MissingAsset(table, int(row[0]), col, row[1], resolved))
        return missing

    def registered_files(self) -> set[Path]:
        """Every file a registered row points at (any ``*path*``/map column of an asset table), resolved."""
        out: set[Path] = set()
        tables = [r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            if table in ("jobs", "settings") or table.startswith("sqlite_"):
                continue
            cols = [r[1] for r in self.conn.execute(f"PRAGMA table_info({table})")]
            for col in cols:
                if "path" in col or col in PATH_COLUMNS.get(table, ()):
                    for (v,) in self.conn.execute(f"SELECT {col} FROM {table} WHERE {col} IS NOT NULL AND {col} != ''"):
                        if isinstance(v, str):
                            out.add(Path(os.path.abspath(self.resolve(v))))
        return out

    def info(self) -> dict[str, object]:
        """Summary for ``project info``."""
        counts = {
            t: int(self.conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0])
            for t in (
                "movies", "images", "ctf_estimates", "particle_positions", "particle_stacks",
                "refinement_packages", "refinements", "classifications_2d", "volumes", "jobs",
            )
        }
        return {
            "name": self.name,
            "project_dir": str(self.root),
            "database": str(self.db_path),
            "database_is_link": (self.root / f"{self.name}.db").is_symlink(),
            "scratch": str(self.scratch_root),
            "schema_version": schema.version(self.conn),
            "missing_folders": missing_folders(self.root),
            "counts": counts,
        }

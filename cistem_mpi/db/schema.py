"""The project database schema, versioned by ``PRAGMA user_version``.

``MIGRATIONS[k]`` takes a database from version ``k`` to ``k + 1``.  A new
version is added by appending a migration, never by editing an old one, so
every project ever created can be brought forward step by step.

Per-particle alignment parameters are *not* rows here: a refinement of ten
million particles with several classes and rounds would make the database
the bottleneck on NFS.  Each (refinement, class) row points to a parameter
file in ``Assets/Parameters`` (HDF5, one array of the 17 Frealign X columns);
the database holds the summary (resolution, occupancy, FSC).
"""

from __future__ import annotations

import sqlite3

from cistem_mpi.db.connection import transaction

_V1 = """
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE jobs (
    id               INTEGER PRIMARY KEY,
    type             TEXT NOT NULL,
    arguments        TEXT NOT NULL DEFAULT '{}',
    status           TEXT NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued','running','finished','failed','cancelled')),
    ranks            INTEGER,
    host             TEXT,
    pid              INTEGER,
    queued_at        REAL NOT NULL,
    started_at       REAL,
    ended_at         REAL,
    heartbeat_at     REAL,
    log_path         TEXT,
    scratch_path     TEXT,
    error            TEXT,
    progress_done    INTEGER NOT NULL DEFAULT 0,
    progress_total   INTEGER NOT NULL DEFAULT 0,
    progress_message TEXT NOT NULL DEFAULT '',
    result           TEXT,
    resumed_from     INTEGER REFERENCES jobs(id)
);
CREATE INDEX jobs_status ON jobs(status);

-- Paths: relative to the project directory when the file lives inside it
-- (so moving the project keeps them valid), absolute for imported files.
CREATE TABLE movies (
    id                 INTEGER PRIMARY KEY,
    path               TEXT NOT NULL,
    name               TEXT NOT NULL,
    n_frames           INTEGER NOT NULL,
    nx                 INTEGER NOT NULL,
    ny                 INTEGER NOT NULL,
    pixel_size         REAL NOT NULL,
    voltage            REAL NOT NULL,
    cs                 REAL NOT NULL,
    amplitude_contrast REAL NOT NULL,
    dose_per_frame     REAL NOT NULL,
    gain_path          TEXT,
    job_id             INTEGER NOT NULL REFERENCES jobs(id)
);

CREATE TABLE images (
    id                 INTEGER PRIMARY KEY,
    movie_id           INTEGER REFERENCES movies(id),
    path               TEXT NOT NULL,
    name               TEXT NOT NULL,
    nx                 INTEGER NOT NULL,
    ny                 INTEGER NOT NULL,
    pixel_size         REAL NOT NULL,
    voltage            REAL NOT NULL,
    cs                 REAL NOT NULL,
    amplitude_contrast REAL NOT NULL,
    scaled_path        TEXT,
    spectrum_path      TEXT,
    shifts_path        TEXT,
    job_id             INTEGER NOT NULL REFERENCES jobs(id)
);

CREATE TABLE ctf_estimates (
    id              INTEGER PRIMARY KEY,
    image_id        INTEGER NOT NULL REFERENCES images(id),
    df1             REAL NOT NULL,
    df2             REAL NOT NULL,
    angast          REAL NOT NULL,
    pshift          REAL NOT NULL DEFAULT 0,
    fit_resolution  REAL,
    score           REAL,
    diagnostic_path TEXT,
    job_id          INTEGER NOT NULL REFERENCES jobs(id)
);

CREATE TABLE particle_positions (
    id       INTEGER PRIMARY KEY,
    image_id INTEGER NOT NULL REFERENCES images(id),
    x        REAL NOT NULL,
    y        REAL NOT NULL,
    peak     REAL,
    job_id   INTEGER NOT NULL REFERENCES jobs(id)
);
CREATE INDEX particle_positions_image ON particle_positions(image_id);

CREATE TABLE particle_stacks (
    id                 INTEGER PRIMARY KEY,
    path               TEXT NOT NULL,
    name               TEXT NOT NULL,
    n_particles        INTEGER NOT NULL,
    box                INTEGER NOT NULL,
    pixel_size         REAL NOT NULL,
    voltage            REAL NOT NULL,
    cs                 REAL NOT NULL,
    amplitude_contrast REAL NOT NULL,
    params_path        TEXT,
    job_id             INTEGER NOT NULL REFERENCES jobs(id)
);

CREATE TABLE refinement_packages (
    id                INTEGER PRIMARY KEY,
    name              TEXT NOT NULL,
    stack_id          INTEGER NOT NULL REFERENCES particle_stacks(id),
    n_classes         INTEGER NOT NULL DEFAULT 1,
    symmetry          TEXT NOT NULL DEFAULT 'C1',
    molecular_weight  REAL,
    largest_dimension REAL,
    n_particles       INTEGER NOT NULL,
    parent_id         INTEGER REFERENCES refinement_packages(id),
    job_id            INTEGER NOT NULL REFERENCES jobs(id)
);

-- Which stack position each package particle is, and where it came from.
CREATE TABLE refinement_package_members (
    package_id      INTEGER NOT NULL REFERENCES refinement_packages(id),
    position        INTEGER NOT NULL,
    parent_position INTEGER,
    class_number    INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (package_id, position)
) WITHOUT ROWID;

CREATE TABLE refinements (
    id           INTEGER PRIMARY KEY,
    package_id   INTEGER NOT NULL REFERENCES refinement_packages(id),
    kind         TEXT NOT NULL CHECK (kind IN ('start','local','global','startup')),
    round        INTEGER NOT NULL DEFAULT 0,
    n_classes    INTEGER NOT NULL DEFAULT 1,
    parent_id    INTEGER REFERENCES refinements(id),
    job_id       INTEGER NOT NULL REFERENCES jobs(id)
);

CREATE TABLE refinement_classes (
    refinement_id  INTEGER NOT NULL REFERENCES refinements(id),
    class_number   INTEGER NOT NULL,
    params_path    TEXT NOT NULL,
    resolution     REAL,
    occupancy      REAL,
    fsc            TEXT,
    PRIMARY KEY (refinement_id, class_number)
);

CREATE TABLE classifications_2d (
    id          INTEGER PRIMARY KEY,
    number      INTEGER NOT NULL UNIQUE,
    package_id  INTEGER REFERENCES refinement_packages(id),
    n_classes   INTEGER NOT NULL,
    path        TEXT NOT NULL,
    params_path TEXT,
    job_id      INTEGER NOT NULL REFERENCES jobs(id)
);

CREATE TABLE volumes (
    id            INTEGER PRIMARY KEY,
    path          TEXT NOT NULL,
    display_name  TEXT NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('imported','startup','refinement','reconstruction')),
    run_number    INTEGER,
    class_number  INTEGER,
    box           INTEGER NOT NULL,
    pixel_size    REAL NOT NULL,
    refinement_id INTEGER REFERENCES refinements(id),
    half_map_1    TEXT,
    half_map_2    TEXT,
    orth_view     TEXT,
    resolution    REAL,
    fsc           TEXT,
    job_id        INTEGER NOT NULL REFERENCES jobs(id)
);
"""

# Version 2: what the front-half jobs (align-movies, find-ctf, find-particles,
# classify-2d) record, and the contrast convention of a particle stack.
_V2 = """
ALTER TABLE images ADD COLUMN unweighted_path TEXT;
ALTER TABLE images ADD COLUMN trajectory_path TEXT;

ALTER TABLE ctf_estimates ADD COLUMN tilt_axis REAL;
ALTER TABLE ctf_estimates ADD COLUMN tilt_angle REAL;
ALTER TABLE ctf_estimates ADD COLUMN thickness REAL;
ALTER TABLE ctf_estimates ADD COLUMN poor_fit INTEGER NOT NULL DEFAULT 0;
ALTER TABLE ctf_estimates ADD COLUMN output_path TEXT;
ALTER TABLE ctf_estimates ADD COLUMN avrot_path TEXT;

ALTER TABLE classifications_2d ADD COLUMN iteration INTEGER;
ALTER TABLE classifications_2d ADD COLUMN parent_id INTEGER REFERENCES classifications_2d(id);
ALTER TABLE classifications_2d ADD COLUMN resolution_limit REAL;

CREATE TABLE classification_2d_classes (
    classification_id INTEGER NOT NULL REFERENCES classifications_2d(id),
    class_number      INTEGER NOT NULL,
    population        REAL NOT NULL,
    resolution        REAL,
    score             REAL,
    rank              INTEGER,
    PRIMARY KEY (classification_id, class_number)
);
ALTER TABLE classification_2d_classes ADD COLUMN selected INTEGER NOT NULL DEFAULT 0;

ALTER TABLE particle_stacks ADD COLUMN protein_is_white INTEGER NOT NULL DEFAULT 0;
"""

# Version 3: two jobs finishing at once (``reconstruct`` twice on one refinement) can pick the same free
# volume name; the second would rename its files over the first's.  Writers are serialised (BEGIN
# IMMEDIATE), so refusing the second insert inside its transaction makes that job fail with nothing
# registered and its files left under their staged names.  A trigger, not a unique index: a project
# made before the check may hold duplicates, and the upgrade must not fail on it.
_V3 = """
CREATE TRIGGER volumes_path_unique BEFORE INSERT ON volumes
WHEN EXISTS (SELECT 1 FROM volumes WHERE path = NEW.path)
BEGIN
    SELECT RAISE(ABORT, 'a volume of this name already exists in the project');
END;
"""

#: ``MIGRATIONS[k]`` upgrades version k to k + 1.
MIGRATIONS: list[str] = [_V1, _V2, _V3]

#: The version a database has after every migration.
LATEST_VERSION = len(MIGRATIONS)


def version(conn: sqlite3.Connection) -> int:
    """Return the database's schema version (``PRAGMA user_version``)."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, target: int = LATEST_VERSION) -> int:
    """Apply migrations until the database is at ``target``.

    Each step runs in its own transaction together with the version bump, so
    an interrupted upgrade leaves the database at the last complete version.

    Returns
    -------
    int
        The version reached.
    """
    current = version(conn)
    if current > LATEST_VERSION:
        raise RuntimeError(
            f"database schema version {current} is newer than this cistem-mpi ({LATEST_VERSION}); upgrade cistem-mpi"
        )
    while current < target:
        with transaction(conn):
            for statement in _statements(MIGRATIONS[current]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {current + 1}")
        current += 1
    return current


def _statements(script: str) -> list[str]:
    """Split a migration script into statements (executescript would COMMIT)."""
    out: list[str] = []
    buf = ""
    for line in script.splitlines():
        if line.strip().startswith("--"):
            continue
        buf += line + "\n"
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out

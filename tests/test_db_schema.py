"""Every migration, applied to a database of the version before it."""

from __future__ import annotations

import sqlite3

import pytest

from cistem_mpi.db import connection, schema


def _at_version(path, v):
    conn = connection.create(path)
    schema.migrate(conn, target=v)
    assert schema.version(conn) == v
    return conn


def _columns(conn) -> set[tuple[str, str]]:
    """Every (table, column) of the database."""
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    objects = {(r[0], r[1]) for r in conn.execute("SELECT type, name FROM sqlite_master WHERE type != 'table'")}
    return {(t, r[1]) for t in tables for r in conn.execute(f"PRAGMA table_info({t})")} | objects


@pytest.mark.parametrize("k", range(schema.LATEST_VERSION))
def test_migration_from_version_before(tmp_path, k):
    conn = _at_version(tmp_path / "p.db", k)
    before = _columns(conn)
    if k >= 1:  # data written at version k survives the step
        conn.execute("INSERT INTO settings(key, value) VALUES ('probe', 'kept')")
    schema.migrate(conn, target=k + 1)
    assert schema.version(conn) == k + 1
    after = _columns(conn)
    assert before < after, f"migration {k} -> {k + 1} adds no table, column, index or trigger"
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    if k >= 1:
        assert conn.execute("SELECT value FROM settings WHERE key='probe'").fetchone()[0] == "kept"


def test_version_1_project_data_migrates_to_latest(tmp_path):
    """A project written by the first release (schema 1) keeps every row, with defaults in the new columns."""
    conn = _at_version(tmp_path / "p.db", 1)
    conn.execute("INSERT INTO jobs(id, type, status, queued_at) VALUES (1, 'import_images', 'finished', 0)")
    conn.execute("INSERT INTO images(id, path, name, nx, ny, pixel_size, voltage, cs, amplitude_contrast, job_id)"
                 " VALUES (1, 'Assets/Images/a.mrc', 'a', 64, 64, 1.0, 300, 2.7, 0.07, 1)")
    conn.execute("INSERT INTO ctf_estimates(image_id, df1, df2, angast, job_id) VALUES (1, 15000, 14000, 30, 1)")
    conn.execute("INSERT INTO particle_stacks(id, path, name, n_particles, box, pixel_size, voltage, cs,"
                 " amplitude_contrast, job_id) VALUES (1, 's.mrcs', 's', 10, 64, 1.0, 300, 2.7, 0.07, 1)")
    conn.execute("INSERT INTO classifications_2d(number, n_classes, path, job_id) VALUES (1, 5, 'c.mrc', 1)")
    dump_v1 = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
               for t in ("jobs", "images", "ctf_estimates", "particle_stacks", "classifications_2d")}
    schema.migrate(conn)
    assert schema.version(conn) == schema.LATEST_VERSION
    for t, n in dump_v1.items():
        assert conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] == n
    est = conn.execute("SELECT df1, df2, angast, poor_fit, tilt_angle FROM ctf_estimates").fetchone()
    assert tuple(est) == (15000, 14000, 30, 0, None)
    assert conn.execute("SELECT protein_is_white FROM particle_stacks").fetchone()[0] == 0
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_latest_schema_has_every_record_type(tmp_path):
    conn = _at_version(tmp_path / "p.db", schema.LATEST_VERSION)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    for t in ("movies", "images", "ctf_estimates", "particle_positions", "particle_stacks",
              "refinement_packages", "refinement_package_members", "refinements", "refinement_classes",
              "classifications_2d", "volumes", "jobs"):
        assert t in tables


def test_interrupted_migration_leaves_previous_version(tmp_path, monkeypatch):
    conn = _at_version(tmp_path / "p.db", 0)
    monkeypatch.setattr(schema, "MIGRATIONS", [schema.MIGRATIONS[0] + "\nCREATE TABLE broken (;"])
    with pytest.raises(sqlite3.OperationalError):
        schema.migrate(conn, target=1)
    assert schema.version(conn) == 0
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0] == 0


def test_newer_database_is_refused(tmp_path):
    conn = _at_version(tmp_path / "p.db", schema.LATEST_VERSION)
    conn.execute(f"PRAGMA user_version = {schema.LATEST_VERSION + 1}")
    with pytest.raises(RuntimeError, match="newer"):
        schema.migrate(conn)


def test_a_second_volume_under_a_registered_path_is_refused(tmp_path):
    """Two jobs that picked the same free volume name: the one committing second registers nothing."""
    import sqlite3

    conn = _at_version(tmp_path / "p.db", schema.LATEST_VERSION)
    conn.execute("INSERT INTO jobs(id, type, status, queued_at) VALUES (1, 'reconstruct', 'finished', 0)")
    row = ("INSERT INTO volumes(kind, path, display_name, box, pixel_size, job_id)"
           " VALUES ('reconstruction', 'Assets/Volumes/volume_9_1_2.mrc', ?, 64, 1.0, 1)")
    conn.execute(row, ("Local #9 - Class #1 #2",))
    with pytest.raises(sqlite3.IntegrityError, match="a volume of this name already exists"):
        conn.execute(row, ("Local #9 - Class #1 #2",))
    assert conn.execute("SELECT count(*) FROM volumes").fetchone()[0] == 1

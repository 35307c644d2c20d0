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


@pytest.mark.parametrize("k", range(schema.LATEST_VERSION))
def test_migration_from_version_before(tmp_path, k):
    conn = _at_version(tmp_path / "p.db", k)
    before = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if k >= 1:  # data written at version k survives the step
        conn.execute("INSERT INTO settings(key, value) VALUES ('probe', 'kept')")
    schema.migrate(conn, target=k + 1)
    assert schema.version(conn) == k + 1
    after = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert before <= after and after != before or k + 1 > 1
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    if k >= 1:
        assert conn.execute("SELECT value FROM settings WHERE key='probe'").fetchone()[0] == "kept"


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

"""Job records: one row per job, written only by the job's controller (rank 0).

A job's assets are inserted in the same transaction that marks it finished
(:func:`finish_job`), so a job killed at any moment leaves either all of its
assets registered and ``status = 'finished'``, or none of them.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

from cistem_mpi.db.connection import transaction

STATUSES = ("queued", "running", "finished", "failed", "cancelled")


@dataclass
class PendingRow:
    """A row to insert when the job finishes.

    ``fields`` may hold other :class:`PendingRow` objects; they are replaced
    by the ids those rows get, so a job can register e.g. a refinement and
    the volumes that point at it in one go.
    """

    table: str
    fields: dict[str, Any]
    row_id: int | None = field(default=None, init=False)


@dataclass
class PendingBulk:
    """Many rows of one table to insert when the job finishes (``executemany``).

    ``fixed`` holds values shared by every row (may be :class:`PendingRow`);
    ``columns`` names the per-row values in ``rows`` (an iterable of tuples).
    """

    table: str
    fixed: dict[str, Any]
    columns: tuple[str, ...]
    rows: Any


def create_job(
    conn: sqlite3.Connection,
    job_type: str,
    arguments: dict[str, Any],
    ranks: int,
    log_path: str | None = None,
    scratch_path: str | None = None,
    resumed_from: int | None = None,
) -> int:
    """Insert a running job record and return its id."""
    now = time.time()
    with transaction(conn):
        cur = conn.execute(
            "INSERT INTO jobs(type, arguments, status, ranks, host, pid, queued_at, started_at, heartbeat_at,"
            " log_path, scratch_path, resumed_from) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job_type, json.dumps(arguments, sort_keys=True, default=str), ranks, socket.gethostname(),
             os.getpid(), now, now, now, log_path, scratch_path, resumed_from),
        )
        return int(cur.lastrowid)


def set_paths(conn: sqlite3.Connection, job_id: int, log_path: str, scratch_path: str) -> None:
    """Record where a job's log and scratch folder are."""
    with transaction(conn):
        conn.execute("UPDATE jobs SET log_path = ?, scratch_path = ? WHERE id = ?", (log_path, scratch_path, job_id))


def update_progress(conn: sqlite3.Connection, job_id: int, done: int, total: int, message: str = "") -> None:
    """Record progress and a heartbeat (one short transaction)."""
    with transaction(conn):
        conn.execute(
            "UPDATE jobs SET progress_done = ?, progress_total = ?, progress_message = ?, heartbeat_at = ?"
            " WHERE id = ?",
            (int(done), int(total), message, time.time(), job_id),
        )


def _insert(conn: sqlite3.Connection, row: PendingRow, columns_cache: dict[str, set[str]]) -> int:
    cols = columns_cache.get(row.table)
    if cols is None:
        cols = {r[1] for r in conn.execute(f"PRAGMA table_info({row.table})")}
        if not cols:
            raise ValueError(f"unknown table {row.table!r}")
        columns_cache[row.table] = cols
    unknown = set(row.fields) - cols
    if unknown:
        raise ValueError(f"table {row.table} has no column(s) {sorted(unknown)}")
    values = []
    for v in row.fields.values():
        if isinstance(v, PendingRow):
            if v.row_id is None:
                raise ValueError(f"row of {v.table} referenced before it was inserted")
            v = v.row_id
        values.append(v)
    names = ", ".join(row.fields)
    marks = ", ".join("?" * len(values))
    cur = conn.execute(f"INSERT INTO {row.table}({names}) VALUES ({marks})", values)
    row.row_id = int(cur.lastrowid)
    return row.row_id


def _insert_bulk(conn: sqlite3.Connection, bulk: PendingBulk, cache: dict[str, set[str]]) -> None:
    cols = _columns(conn, bulk.table, cache)
    names = tuple(bulk.fixed) + tuple(bulk.columns)
    unknown = set(names) - cols
    if unknown:
        raise ValueError(f"table {bulk.table} has no column(s) {sorted(unknown)}")
    fixed = tuple(v.row_id if isinstance(v, PendingRow) else v for v in bulk.fixed.values())
    sql = f"INSERT INTO {bulk.table}({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
    conn.executemany(sql, (fixed + tuple(r) for r in bulk.rows))


def finish_job(
    conn: sqlite3.Connection, job_id: int, rows: list[PendingRow | PendingBulk], result: dict[str, Any] | None = None
) -> None:
    """Register ``rows`` and mark the job finished, atomically."""
    cache: dict[str, set[str]] = {}
    with transaction(conn):
        for row in rows:
            if isinstance(row, PendingBulk):
                if "job_id" in _columns(conn, row.table, cache) and "job_id" not in row.fixed:
                    row.fixed["job_id"] = job_id
                _insert_bulk(conn, row, cache)
                continue
            if "job_id" in _columns(conn, row.table, cache) and "job_id" not in row.fields:
                row.fields["job_id"] = job_id
            _insert(conn, row, cache)
        conn.execute(
            "UPDATE jobs SET status = 'finished', ended_at = ?, heartbeat_at = ?, result = ? WHERE id = ?",
            (time.time(), time.time(), json.dumps(result or {}, sort_keys=True, default=str), job_id),
        )


def _columns(conn: sqlite3.Connection, table: str, cache: dict[str, set[str]]) -> set[str]:
    if table not in cache:
        cache[table] = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
    return cache[table]


def end_job(conn: sqlite3.Connection, job_id: int, status: str, error: str) -> None:
    """Mark a job failed or cancelled with its error text; registers nothing."""
    if status not in ("failed", "cancelled"):
        raise ValueError(status)
    with transaction(conn):
        conn.execute(
            "UPDATE jobs SET status = ?, error = ?, ended_at = ? WHERE id = ?",
            (status, error, time.time(), job_id),
        )


def delete_job(conn: sqlite3.Connection, job_id: int) -> None:
    """Remove a job record that registered nothing (a job refused for bad input)."""
    with transaction(conn):
        conn.execute("DELETE FROM jobs WHERE id = ? AND status = 'running'", (job_id,))


def get_job(conn: sqlite3.Connection, job_id: int) -> sqlite3.Row | None:
    """One job record."""
    return conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()


def list_jobs(conn: sqlite3.Connection, limit: int = 20) -> list[sqlite3.Row]:
    """The newest jobs, newest first."""
    return list(conn.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,)))


def liveness(row: sqlite3.Row) -> str:
    """The status to show: a 'running' job whose process is gone is 'died'.

    Only a job on this host can be checked by pid; elsewhere the heartbeat
    tells (no heartbeat for 10 minutes: 'stalled?').
    """
    status = row["status"]
    if status != "running":
        return status
    if row["host"] == socket.gethostname() and row["pid"]:
        if not _pid_alive(int(row["pid"])):
            return "died"
        return status
    if row["heartbeat_at"] and time.time() - float(row["heartbeat_at"]) > 600:
        return "stalled?"
    return status


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def newest_finished_result(conn: sqlite3.Connection, job_type: str) -> dict[str, Any] | None:
    """The result (decoded JSON) of the newest finished job of ``job_type``, or None."""
    row = conn.execute("SELECT result FROM jobs WHERE type = ? AND status = 'finished' ORDER BY id DESC LIMIT 1",
                       (job_type,)).fetchone()
    if row is None:
        return None
    return json.loads(row[0]) if row[0] else {}


def running_jobs(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    """Every job recorded as running (some may have died)."""
    return list(conn.execute("SELECT * FROM jobs WHERE status = 'running'"))


def mark_dead_jobs(conn: sqlite3.Connection) -> list[int]:
    """Record jobs of this host whose process is gone as failed; return their ids."""
    dead = [int(r["id"]) for r in conn.execute("SELECT * FROM jobs WHERE status = 'running'") if liveness(r) == "died"]
    for job_id in dead:
        end_job(conn, job_id, "failed", "process died without finishing (killed?)")
    return dead


def finished_staged_outputs(conn: sqlite3.Connection, key: str = "staged_outputs") -> list[tuple[int, list]]:
    """``(job id, [[staged, final], ...])`` of every finished job that recorded staged outputs."""
    out = []
    for row in conn.execute("SELECT id, result FROM jobs WHERE status = 'finished' AND result LIKE ?",
                            (f'%"{key}"%',)):
        try:
            pairs = json.loads(row["result"]).get(key) or []
        except ValueError:
            continue
        out.append((int(row["id"]), [tuple(p) for p in pairs]))
    return out


def job_states(conn: sqlite3.Connection) -> dict[int, str]:
    """Job id -> shown status (:func:`liveness`), for every job."""
    return {int(r["id"]): liveness(r) for r in conn.execute("SELECT * FROM jobs")}


def relocate_job_paths(conn: sqlite3.Connection, old_root: str, new_root: str) -> int:
    """A moved project: job log and scratch paths under ``old_root`` now under ``new_root``."""
    old = old_root.rstrip("/") + "/"
    new = new_root.rstrip("/") + "/"
    n = 0
    with transaction(conn):
        for col in ("log_path", "scratch_path"):
            cur = conn.execute(f"UPDATE jobs SET {col} = ? || substr({col}, ?) WHERE {col} LIKE ? ESCAPE '\\'",
                               (new, len(old) + 1, old.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"))
            n += cur.rowcount
    return n


def died_job_ids(conn: sqlite3.Connection) -> set[int]:
    """Ids of the jobs already on record as failed because their process died (``clean`` counts them)."""
    return {int(r["id"]) for r in conn.execute(
        "SELECT id FROM jobs WHERE status = 'failed' AND error LIKE 'process died%'")}


def ended_job_scratch(conn: sqlite3.Connection) -> list[tuple[int, str]]:
    """``(job id, scratch path)`` of every job that is not running (its scratch folder may go)."""
    return [(int(r["id"]), r["scratch_path"])
            for r in conn.execute("SELECT id, scratch_path FROM jobs WHERE status != 'running'")]

"""Issue #13 item 3: a full disk gives "disk full writing FILE (needs N, M free)" and leaves nothing half written.

Uses a real 1 MB tmpfs (root only; skipped otherwise).
"""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

from cistem_mpi.cli import main
from cistem_mpi.errors import DiskFull
from helpers_jobs import db_dump
from helpers_reliability import simulated, unregistered_files


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "full"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a 1 MB tmpfs")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_stack_writer_reserves_space_or_says_disk_full(tiny_disk):
    from cistem_mpi.io.mrc import MrcStackWriter

    path = tiny_disk / "stack.mrcs"
    with pytest.raises(DiskFull) as e:  # 1.6 MB into 1 MB: no SIGBUS later, a message now
        MrcStackWriter(path, (64, 64), 100, 1.0)
    assert str(path) in str(e.value) and "needs 1.6 MB" in str(e.value) and "free" in str(e.value)
    assert list(tiny_disk.iterdir()) == []
    with MrcStackWriter(path, (64, 64), 10, 1.0) as w:  # what fits still works
        for i in range(10):
            w.append(np.full((64, 64), i, np.float32))
    assert path.stat().st_size == 1024 + 10 * 64 * 64 * 4


def test_write_mrc_disk_full_leaves_no_temporary(tiny_disk):
    from cistem_mpi.io.mrc import write_mrc

    with pytest.raises(DiskFull, match="disk full writing"):
        write_mrc(tiny_disk / "big.mrc", np.zeros((64, 64, 64), np.float32), 1.0)
    assert list(tiny_disk.iterdir()) == []


def test_reconstruct_checks_space_up_front(tiny_disk, tmp_path, capsys):
    sim = simulated(tmp_path / "sim", n=30, box=48, pixel_size=4.0)
    root = tiny_disk / "p"
    assert main(["project", "create", str(root)]) == 0
    assert main(["import", "particles", "-p", str(root), str(sim.stack), "--params", str(sim.par),
                 "--pixel-size", "4"]) == 0
    before = db_dump(root)
    capsys.readouterr()
    assert main(["reconstruct", "-p", str(root)]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "disk full" in lines[0] and "free" in lines[0], lines
    assert db_dump(root) == before
    assert unregistered_files(root) == set()
    assert not list((root / "Assets" / "Volumes").rglob("*.mrc"))


def test_failed_transaction_keeps_its_own_error(tmp_path):
    """SQLite rolls back by itself on a full disk; the error must not become "cannot rollback"."""
    import sqlite3

    from cistem_mpi.db.connection import database_error_line, transaction

    conn = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    conn.execute("CREATE TABLE t(x)")
    with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
        with transaction(conn):
            conn.execute("INSERT INTO t VALUES (1)")
            conn.execute("ROLLBACK")  # what SQLite does itself on SQLITE_FULL
            raise sqlite3.OperationalError("database or disk is full")
    line, code = database_error_line(sqlite3.OperationalError("database or disk is full"))
    assert "disk full" in line and code == 2

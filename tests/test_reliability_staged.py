"""Issue #13 items 2, 12, 14, 15, 18: staged outputs, `project clean`, dead jobs, file modes, moved projects."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from cistem_mpi.cli import main
from helpers_jobs import db_dump
from helpers_reliability import CLI, asset_files, db_rows, imported_project, unregistered_files


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return imported_project(tmp_path_factory.mktemp("rel_staged"), n=40, box=32)


def _copy(base, tmp_path):
    from cistem_mpi.db.project import Project

    sim, root = base
    dst = tmp_path / "p"
    shutil.copytree(root, dst, symlinks=True)
    Project.open(dst).close()
    return sim, dst


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_kill_while_writing_then_clean_and_rerun(base, tmp_path):
    """The issue's repro: kill -9 once the volume's file appears; clean; rerun works."""
    sim, root = _copy(base, tmp_path)
    vol_dir = root / "Assets" / "Volumes"
    proc = subprocess.Popen(CLI + ["reconstruct", "-p", str(root)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.name.startswith(".volume_1_1.mrc") for p in vol_dir.iterdir()):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (vol_dir / "volume_1_1.mrc").exists() or db_rows(root, "SELECT count(*) FROM volumes") == [(1,)]
    r = subprocess.run(CLI + ["project", "clean", str(root)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert unregistered_files(root) == set(), r.stdout
    assert main(["reconstruct", "-p", str(root)]) == 0
    assert (vol_dir / "volume_1_1.mrc").is_file()
    assert main(["project", "check", str(root)]) == 0
    assert unregistered_files(root) == set()


def test_unregistered_file_never_blocks_a_name(base, tmp_path):
    sim, root = _copy(base, tmp_path)
    stray = root / "Assets" / "Volumes" / "volume_1_1.mrc"
    stray.write_bytes(b"left by a killed job of an old version")
    assert main(["reconstruct", "-p", str(root)]) == 0
    import mrcfile

    assert mrcfile.read(stray).shape == (32, 32, 32)  # replaced by the registered volume
    assert db_rows(root, "SELECT path FROM volumes") == [("Assets/Volumes/volume_1_1.mrc",)]
    # a registered name is not reused: reconstructing again gives the next free name (issue #16 item 4)
    assert main(["reconstruct", "-p", str(root), "--refinement", "1"]) == 0
    assert db_rows(root, "SELECT path FROM volumes ORDER BY id") == [("Assets/Volumes/volume_1_1.mrc",),
                                                                     ("Assets/Volumes/volume_1_1_2.mrc",)]


def test_finished_job_killed_before_its_renames_is_rolled_forward(base, tmp_path, monkeypatch):
    import cistem_mpi.drivers.jobrun as jobrun

    sim, root = _copy(base, tmp_path)
    monkeypatch.setattr(jobrun, "promote_staged", lambda pairs: [])  # "killed" right after the commit
    assert main(["reconstruct", "-p", str(root)]) == 0
    monkeypatch.undo()
    vol = root / "Assets" / "Volumes" / "volume_1_1.mrc"
    assert not vol.exists() and db_rows(root, "SELECT count(*) FROM volumes") == [(1,)]
    assert main(["project", "check", str(root)]) == 1  # registered, file not yet under its name
    assert main(["project", "clean", str(root)]) == 0
    assert vol.is_file()
    assert main(["project", "check", str(root)]) == 0
    assert unregistered_files(root) == set()


def test_clean_removes_partial_files_of_dead_jobs_only(base, tmp_path, capsys):
    """Item 14: .part, staged and .tmp leftovers of killed jobs (package create) are removed; a live job's kept."""
    from cistem_mpi.db import jobs as jobs_db
    from cistem_mpi.db.project import Project

    sim, root = _copy(base, tmp_path)
    stacks = root / "Assets" / "ParticleStacks"
    params = root / "Assets" / "Parameters"
    stacks.mkdir(parents=True, exist_ok=True)
    with Project.open(root) as p:
        dead = jobs_db.create_job(p.conn, "create_package", {}, 1)
        p.conn.execute("UPDATE jobs SET pid = ? WHERE id = ?", (_dead_pid(), dead))
        live = jobs_db.create_job(p.conn, "reconstruct", {}, 1)  # this process: alive
    leftovers = [stacks / "particle_stack_2.mrcs.part", stacks / f".particle_stack_3.mrcs.job{dead}.part",
                 params / ".params_1_1.par.tmp", params / f".params_2_1.h5.job{dead}.part.part"]
    for f in leftovers:
        f.write_bytes(b"x" * 1000)
    mine = root / "Assets" / "Volumes" / f".volume_9_1.mrc.job{live}.part"
    mine.write_bytes(b"x")
    capsys.readouterr()
    assert main(["project", "clean", str(root)]) == 0
    out = capsys.readouterr().out
    # the live job's own file stays, and so do the unnamed temporaries (they could be the live job's)
    assert mine.exists()
    assert not (stacks / f".particle_stack_3.mrcs.job{dead}.part").exists()
    assert not (params / f".params_2_1.h5.job{dead}.part.part").exists()
    assert "1 dead job(s) on record" in out, out
    with Project.open(root) as p:
        jobs_db.end_job(p.conn, live, "failed", "test")
    assert main(["project", "clean", str(root)]) == 0
    assert not any(f.exists() for f in leftovers) and not mine.exists()
    assert unregistered_files(root) == set()
    out = capsys.readouterr().out
    assert "1 dead job(s) on record" in out, out  # item 18: the job found dead earlier still counts


def test_assets_follow_the_umask(tmp_path):
    from cistem_mpi.io.mrc import write_mrc

    for mask, mode in ((0o022, 0o644), (0o002, 0o664)):
        old = os.umask(mask)
        try:
            f = tmp_path / f"v{mask:o}.mrc"
            write_mrc(f, np.zeros((4, 4, 4), np.float32), 1.0)
        finally:
            os.umask(old)
        assert stat.S_IMODE(f.stat().st_mode) == mode, oct(f.stat().st_mode)


def test_dead_job_marked_when_seen_and_rejected_command_changes_nothing(base, tmp_path, capsys):
    from cistem_mpi.db import jobs as jobs_db
    from cistem_mpi.db.project import Project

    sim, root = _copy(base, tmp_path)
    with Project.open(root) as p:
        job = jobs_db.create_job(p.conn, "reconstruct", {}, 3)
        p.conn.execute("UPDATE jobs SET pid = ? WHERE id = ?", (_dead_pid(), job))
    before = db_dump(root)
    # a rejected command: bad input found inside the job (no refinement #99) -> nothing changes
    assert main(["reconstruct", "-p", str(root), "--refinement", "99"]) == 2
    assert db_dump(root) == before
    assert db_rows(root, f"SELECT status FROM jobs WHERE id = {job}") == [("running",)]
    # status sees it died and records it
    assert main(["status", "-p", str(root)]) == 0
    assert db_rows(root, f"SELECT status FROM jobs WHERE id = {job}") == [("failed",)]


def test_moved_project_points_at_its_new_place(base, tmp_path):
    sim, root = _copy(base, tmp_path)
    new = tmp_path / "moved"
    shutil.move(str(root), str(new))
    assert main(["project", "clean", "-p", str(new)]) == 0
    (db_path,), = db_rows(new, "SELECT value FROM settings WHERE key = 'database_path'")
    assert Path(db_path) == next(new.glob("*.db")).resolve()
    for (log,) in db_rows(new, "SELECT log_path FROM jobs"):
        assert log.startswith(str(new) + "/") and Path(log).is_file(), log

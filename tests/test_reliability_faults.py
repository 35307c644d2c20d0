"""Issue #13 acceptance: kill a job (1 and 3 ranks) at 20 moments over its whole run, final writes included.

After each kill: ``PRAGMA integrity_check`` is ok, ``project clean`` leaves no unregistered file, and a
rerun gives the same volumes as an uninterrupted run, bit for bit on the same number of ranks.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import mrcfile
import numpy as np
import pytest

from helpers_reliability import CLI, db_rows, imported_project, unregistered_files
from runtime_helpers import need_mpiexec

MAPS = ("volume_1_1.mrc", "volume_1_1_half1.mrc", "volume_1_1_half2.mrc", "volume_1_1_sharpened.mrc")


def _cmd(root, ranks, mpiexec):
    cmd = CLI + ["reconstruct", "-p", str(root)]
    return ([mpiexec, "-n", str(ranks)] + cmd) if ranks > 1 else cmd


def _maps(root):
    return {m: mrcfile.read(root / "Assets/Volumes" / m) for m in MAPS}


def _integrity(root) -> str:
    db = next(root.glob("*.db"))
    conn = sqlite3.connect(str(db))
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def _kill_at(root, ranks, mpiexec, moment):
    """Start the job and SIGKILL its whole process group at ``moment``: seconds, 'staged' (the first
    staged output file appears) or 'finished' (the finishing transaction committed)."""
    proc = subprocess.Popen(_cmd(root, ranks, mpiexec), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    t0 = time.monotonic()
    vol = root / "Assets" / "Volumes"
    while proc.poll() is None and time.monotonic() - t0 < 600:
        if isinstance(moment, float) and time.monotonic() - t0 >= moment:
            break
        if moment == "staged" and vol.is_dir() and any(".job" in p.name for p in vol.iterdir()):
            break
        if moment == "finished" and db_rows(root, "SELECT count(*) FROM jobs WHERE type = 'reconstruct' "
                                                  "AND status = 'finished'") == [(1,)]:
            break
        time.sleep(0.002)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("ranks, n_timed", [(1, 12), (3, 4)])
def test_kill_anywhere_then_clean_and_rerun(tmp_path, ranks, n_timed):
    mpiexec = need_mpiexec() if ranks > 1 else None
    sim, root = imported_project(tmp_path, n=40, box=24, pixel_size=5.0)
    ref = tmp_path / "ref"
    shutil.copytree(root, ref, symlinks=True)
    t0 = time.monotonic()
    r = subprocess.run(_cmd(ref, ranks, mpiexec), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    duration = time.monotonic() - t0
    expect = _maps(ref)
    # moments spread over the whole run (process start, imports, insertion, reduction, writing) + the final writes
    moments: list = [duration * (k + 0.5) / n_timed for k in range(n_timed)] + ["staged", "finished"]
    for k, moment in enumerate(moments):
        proj = tmp_path / f"kill{k}"
        shutil.copytree(root, proj, symlinks=True)
        _kill_at(proj, ranks, mpiexec, moment)
        assert _integrity(proj) == "ok", moment
        c = subprocess.run(CLI + ["project", "clean", str(proj)], capture_output=True, text=True, timeout=300)
        assert c.returncode == 0, c.stderr
        assert unregistered_files(proj) == set(), (moment, c.stdout)
        registered = db_rows(proj, "SELECT count(*) FROM volumes")[0][0]
        if not registered:  # killed before the commit: the rerun does it all
            r = subprocess.run(_cmd(proj, ranks, mpiexec), capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, (moment, r.stderr)
        got = _maps(proj)
        for m in MAPS:
            assert np.array_equal(got[m], expect[m]), (moment, m)
        assert subprocess.run(CLI + ["project", "check", str(proj)], capture_output=True).returncode == 0
        assert unregistered_files(proj) == set()
        shutil.rmtree(proj)

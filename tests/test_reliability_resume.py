"""Issue #13 item 6: ``--resume`` continues with the killed job's recorded settings; a contradicting option
is a clear error."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from helpers_reliability import CLI, db_rows, imported_project, run_cli

OPTS = ["--max-rounds", "2", "--angle-step", "5", "--seed", "3"]


def _final_params(root):
    from cistem_mpi.io.param_store import read_params_h5

    (path,), = db_rows(root, "SELECT params_path FROM refinement_classes ORDER BY refinement_id DESC LIMIT 1")
    return read_params_h5(root / path)


@pytest.mark.slow
def test_resume_uses_recorded_settings(tmp_path):
    sim, root = imported_project(tmp_path, n=30, box=24, pixel_size=5.0)
    ref = tmp_path / "ref"
    shutil.copytree(root, ref, symlinks=True)
    run_cli("auto-refine", "-p", ref, *OPTS, check=True)
    expect = _final_params(ref)

    proc = subprocess.Popen(CLI + ["auto-refine", "-p", str(root)] + OPTS, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 400
    manifest = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((root / "Scratch").rglob("iter_000001/manifest.json"))
        if found:
            manifest = found[0]
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert manifest is not None, "the job ended before its first checkpoint"
    (job,), = db_rows(root, "SELECT id FROM jobs WHERE type = 'auto_refine'")
    job = job[0] if isinstance(job, tuple) else job

    # an option that contradicts the killed job: a clear error, nothing changes
    r = run_cli("auto-refine", "-p", root, "--resume", job, "--angle-step", "2")
    assert r.returncode == 2, r.stderr
    assert "--angle-step" in r.stderr and "recorded settings" in r.stderr and "internal error" not in r.stderr
    # repeating an option with its recorded value is fine; everything else comes from the record
    r = run_cli("auto-refine", "-p", root, "--resume", job, "--seed", "3")
    assert r.returncode == 0, r.stderr
    got = _final_params(root)
    for name in ("psi", "theta", "phi", "shx", "shy", "score", "occ"):
        assert np.array_equal(got[name], expect[name]), name

"""Real Slurm: srun, salloc ... srun, sbatch and the job-array mode run mpi-check on a local cluster.

The session fixture installs (apt) and starts a one-node Slurm (slurmctld,
slurmd, munge) with tests/slurm/start-local-slurm.sh and stops what it
started at the end.  The tests skip, printing why, only when Slurm cannot
start here.  The pip MPICH needs ``srun --mpi=pmi2``.
"""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from helpers_slurm import cistem_exe, wait_for_job
from runtime_helpers import REPO, jobs, new_project, run

pytestmark = pytest.mark.slurm

@pytest.fixture
def env(slurm):
    exe = cistem_exe()
    return {**slurm.env, "CISTEM_MPI": exe, "PATH": f"{os.path.dirname(exe)}:{os.environ.get('PATH', '')}"}


@pytest.fixture
def project(tmp_path):
    return new_project(tmp_path / "proj")


def _check_job(project, n, tasks):
    j = jobs(project)[0]
    assert j["status"] == "finished", j
    assert j["ranks"] == n
    r = j["result"]
    assert r["world_size"] == n and len(r["hosts"]) == n
    assert r["hosts"] == [socket.gethostname()] * n
    assert r["parallel_equals_serial"] is True
    assert sum(r["tasks_per_rank"]) == tasks and r["tasks_per_rank"][0] == 0
    assert r["slurm_job_id"]
    return j


def test_srun(env, project):
    res = run(["srun", "--mpi=pmi2", "--kill-on-bad-exit=1", "-n", "4", env["CISTEM_MPI"], "mpi-check",
               "--project", str(project), "--tasks", "200"], env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    _check_job(project, 4, 200)


def test_salloc_srun_via_jobscript(env, project):
    res = run([str(REPO / "jobscripts" / "slurm_salloc.sh"), "-N", "1", "-n", "3", "-c", "1", "--",
               "mpi-check", "--project", str(project), "--tasks", "150"], env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Granted job allocation" in res.stderr
    _check_job(project, 3, 150)


def test_sbatch_via_jobscript(env, project, tmp_path):
    out = tmp_path / "sbatch-%j.out"
    res = run(["sbatch", "--parsable", "-n", "5", "-o", str(out), str(REPO / "jobscripts" / "slurm_sbatch.sh"),
               "mpi-check", "--project", str(project), "--tasks", "250"], env=env, cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    slurm_id = res.stdout.strip().split(";")[0]
    state = wait_for_job(slurm_id, env, timeout=180)
    assert state == "COMPLETED", (tmp_path / f"sbatch-{slurm_id}.out").read_text()
    j = _check_job(project, 5, 250)
    assert j["result"]["slurm_job_id"] == slurm_id
    log = (tmp_path / f"sbatch-{slurm_id}.out").read_text()
    assert "srun --mpi=pmi2" in log and "mpi-check passed: 5 rank(s)" in log


def test_srun_without_pmi_is_refused_and_database_untouched(env, project):
    res = run(["srun", "--mpi=none", "-n", "2", env["CISTEM_MPI"], "mpi-check", "--project", str(project),
               "--tasks", "10"], env=env, timeout=120)
    assert res.returncode != 0
    assert "srun started 2 tasks but MPI sees a world of 1 rank" in res.stderr
    assert jobs(project) == []


def test_worker_failure_under_srun(env, project):
    res = run(["srun", "--mpi=pmi2", "--kill-on-bad-exit=1", "-n", "4", env["CISTEM_MPI"], "mpi-check",
               "--project", str(project), "--tasks", "300", "--task-ms", "1", "--fail-rank", "3",
               "--fail-task", "30"], env=env, timeout=120)
    assert res.returncode != 0
    assert res.elapsed < 30  # type: ignore[attr-defined]
    js = jobs(project)
    assert js, res.stderr
    j = js[0]
    assert j["status"] == "failed" and j["error"].startswith(f"rank 3 on {socket.gethostname()}: ")


def test_sigkill_under_srun_then_resume(env, project):
    args = ["mpi-check", "--project", str(project), "--tasks", "100", "--iterations", "3"]
    res = run(["srun", "--mpi=pmi2", "--kill-on-bad-exit=1", "-n", "3", env["CISTEM_MPI"], *args,
               "--kill-rank", "2", "--kill-iteration", "1"], env=env, timeout=120)
    assert res.returncode != 0
    assert res.elapsed < 30, res.stderr  # type: ignore[attr-defined]  # KillWait 5 s on the test cluster
    killed = jobs(project)[0]
    # srun -K terminates the other ranks (SIGTERM): rank 0 records the job as cancelled
    assert killed["shown_status"] in ("died", "failed", "cancelled")
    res = run(["srun", "--mpi=pmi2", "--kill-on-bad-exit=1", "-n", "4", env["CISTEM_MPI"], *args,
               "--resume", str(killed["id"])], env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    resumed = jobs(project)[0]
    assert resumed["status"] == "finished" and resumed["resumed_from"] == killed["id"]
    ref = subprocess.run([env["CISTEM_MPI"], *args], capture_output=True, text=True, timeout=120)
    assert ref.returncode == 0, ref.stderr
    assert jobs(project)[0]["result"]["digest"] == resumed["result"]["digest"]


def test_job_array_and_dependent_merge(env, project):
    res = run([str(REPO / "jobscripts" / "slurm_array.sh"), "--tasks", "3", "--wait", "--",
               "mpi-check", "--project", str(project), "--tasks", "40"], env=env, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    js = jobs(project)
    assert len(js) == 1  # only the merge wrote the database
    r = js[0]["result"]
    assert js[0]["status"] == "finished" and js[0]["ranks"] == 1
    assert r["mode"] == "array" and r["array_tasks"] == 3 and r["items_per_array_task"] == [14, 13, 13]
    assert r["parallel_equals_serial"] is True

"""``cistem-mpi mpi-check`` end to end: job records, rank counts, failures, kill + resume, array mode.

The check's data are integer-valued, so the distributed sums are exact and
the digest must be *bitwise* identical for 1, 3 and 8 ranks.
"""

from __future__ import annotations

import socket
import sqlite3

import pytest

from runtime_helpers import cli, jobs, mpi_cli, new_project, run


@pytest.fixture
def project(tmp_path):
    return new_project(tmp_path / "proj")


def _only_job(project):
    js = jobs(project)
    assert len(js) >= 1
    return js[0]


def test_one_rank_without_mpirun(project):
    res = run(cli("mpi-check", "--project", str(project), "--tasks", "300", "--iterations", "2"))
    assert res.returncode == 0, res.stderr
    j = _only_job(project)
    assert j["type"] == "mpi_check" and j["status"] == "finished" and j["ranks"] == 1
    r = j["result"]
    assert r["world_size"] == 1 and r["hosts"] == [socket.gethostname()]
    assert r["parallel_equals_serial"] is True
    assert r["tasks_per_rank"] == [600]  # rank 0 did everything itself
    assert j["progress_done"] == j["progress_total"] == 300
    assert r["mpi_library"]


@pytest.mark.mpi
def test_same_digest_for_1_3_8_ranks(project):
    digests = {}
    a = ("mpi-check", "--project", str(project), "--tasks", "400", "--iterations", "2")
    for n in (1, 3, 8):
        cmd = cli(*a) if n == 1 else mpi_cli(n, *a)
        res = run(cmd, timeout=60)
        assert res.returncode == 0, res.stderr
        j = _only_job(project)
        assert j["ranks"] == n and j["result"]["world_size"] == n and len(j["result"]["hosts"]) == n
        per_rank = j["result"]["tasks_per_rank"]
        assert sum(per_rank) == 800
        if n > 1:
            assert per_rank[0] == 0 and all(c > 0 for c in per_rank[1:])  # workers shared the queue
        digests[n] = j["result"]["digest"]
    assert digests[1] == digests[3] == digests[8]


@pytest.mark.mpi
@pytest.mark.parametrize("fail_rank,what", [(2, "RuntimeError: injected failure at task"),
                                            (0, "RuntimeError: injected failure on the controller")])
def test_failure_on_any_rank_is_recorded(project, fail_rank, what):
    res = run(mpi_cli(4, "mpi-check", "--project", str(project), "--tasks", "400", "--task-ms", "1",
                      "--fail-rank", str(fail_rank), "--fail-task", "20"), timeout=60)
    assert res.returncode == 3, res.stderr
    assert res.elapsed < 15  # type: ignore[attr-defined]
    j = _only_job(project)
    assert j["status"] == "failed"
    assert j["error"].startswith(f"rank {fail_rank} on {socket.gethostname()}: ")
    assert what in j["error"]
    assert j["result"] is None  # nothing of the failed job was stored as finished


@pytest.mark.mpi
def test_stuck_worker_is_aborted_after_the_failure_is_recorded(project):
    res = run(mpi_cli(3, "mpi-check", "--project", str(project), "--tasks", "50", "--fail-rank", "1",
                      "--hang-rank", "2"), timeout=60, env={"CISTEM_MPI_STOP_GRACE": "2"})
    assert res.returncode != 0
    assert res.elapsed < 20  # type: ignore[attr-defined]
    j = _only_job(project)
    assert j["status"] == "failed" and j["error"].startswith("rank 1 on ")


@pytest.mark.mpi
def test_sigkill_then_resume_gives_uninterrupted_result(project, tmp_path):
    args = ("--tasks", "200", "--iterations", "3")
    ref = run(cli("mpi-check", "--project", str(project), *args))
    assert ref.returncode == 0, ref.stderr
    want = _only_job(project)["result"]["digest"]
    killed = run(mpi_cli(3, "mpi-check", "--project", str(project), *args, "--kill-rank", "1",
                         "--kill-iteration", "2"), timeout=60)
    assert killed.returncode != 0
    j = _only_job(project)
    # its processes are gone: shown as died, or already recorded as failed by the status that saw it (#13.12)
    assert (j["status"], j["shown_status"]) in (("running", "died"), ("failed", "failed"))
    db = next(project.glob("*.db"))
    with sqlite3.connect(db) as conn:  # SIGKILL did not corrupt the database
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    resumed = run(mpi_cli(2, "mpi-check", "--project", str(project), *args, "--resume", str(j["id"])), timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming job" in resumed.stderr and "after iteration 1" in resumed.stderr
    r = _only_job(project)
    assert r["status"] == "finished" and r["resumed_from"] == j["id"]
    assert r["result"]["digest"] == want


def test_array_mode_prepare_tasks_merge(project, tmp_path):
    d = tmp_path / "array"
    base = ("mpi-check", "--project", str(project), "--tasks", "50")
    assert run(cli(*base, "--array-prepare", str(d))).returncode == 0
    n_before = len(jobs(project))
    assert n_before == 0  # prepare and tasks never write the database
    for k in (0, 2):
        res = run(cli(*base, "--array-run", str(d), "--array-task", str(k), "--array-count", "3"))
        assert res.returncode == 0, res.stderr
    # task 1 missing: the merge refuses (bad input: exit 2, database unchanged)
    res = run(cli(*base, "--array-merge", str(d)))
    assert res.returncode == 2 and "array tasks 1 of 0..2 left no results" in res.stderr
    assert len(jobs(project)) == 0
    assert run(cli(*base, "--array-run", str(d), "--array-task", "1", "--array-count", "3")).returncode == 0
    res = run(cli(*base, "--array-merge", str(d)))
    assert res.returncode == 0, res.stderr
    j = _only_job(project)
    assert j["status"] == "finished" and j["result"]["mode"] == "array"
    assert j["result"]["array_tasks"] == 3 and j["result"]["items_per_array_task"] == [17, 17, 16]
    assert j["result"]["parallel_equals_serial"] is True


def test_bad_options_are_one_line(project):
    res = run(cli("mpi-check", "--project", str(project), "--tasks", "0"))
    assert res.returncode == 2 and res.stderr.strip() == "error: --tasks: must be >= 1, got 0"

"""Job records: atomic registration, SIGKILL, readers beside the writer, naming."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cistem_mpi.db import jobs as jobs_db
from cistem_mpi.db import naming
from cistem_mpi.db.project import Project
from cistem_mpi.drivers.jobrun import run_job
from cistem_mpi.errors import InputError, JobFailed
from helpers_jobs import db_dump, job_args, positions_body

HELPER = Path(__file__).with_name("helpers_jobs.py")


def test_finished_job_registers_everything_with_its_record(project):
    assert run_job(job_args(project), "find_particles", positions_body(1000, "/data/img.mrc")) == 0
    with Project.open(project, readonly=True) as p:
        job = jobs_db.list_jobs(p.conn)[0]
        assert job["status"] == "finished" and job["ranks"] == 1 and job["ended_at"] >= job["started_at"]
        assert p.conn.execute("SELECT count(*) FROM particle_positions WHERE job_id = ?", (job["id"],)).fetchone()[0] == 1000
        assert Path(job["log_path"]).is_file() and "finished" in Path(job["log_path"]).read_text()
        assert not Path(job["scratch_path"]).exists()  # scratch emptied at the end


def test_failed_job_registers_nothing_and_records_error(project):
    def body(ctx):
        ctx.register("volumes", path="x.mrc", display_name="x", kind="imported", box=2, pixel_size=1.0)
        raise ValueError("numbers went bad")

    with pytest.raises(JobFailed, match="numbers went bad"):
        run_job(job_args(project), "reconstruct", body)
    with Project.open(project, readonly=True) as p:
        job = jobs_db.list_jobs(p.conn)[0]
        assert job["status"] == "failed"
        assert "numbers went bad" in job["error"] and "rank 0" in job["error"]
        assert p.conn.execute("SELECT count(*) FROM volumes").fetchone()[0] == 0


def test_bad_input_leaves_database_unchanged(project):
    before = db_dump(project)

    def body(ctx):
        raise InputError("/data/stack.mrcs", "file is truncated")

    with pytest.raises(InputError):
        run_job(job_args(project), "import", body)
    assert db_dump(project) == before
    assert not (project / "Logs").exists()
    assert list((project / "Scratch").rglob("job_*")) == []


def _start_positions_job(project: Path, n: int) -> tuple[subprocess.Popen, float, float]:
    """Start the helper job; return it, its start time and when its body began (record exists)."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(HELPER), str(project), str(n), "/data/img.mrc"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "body", line
    return proc, t0, time.monotonic()


def _outcome(project: Path, n: int) -> str:
    with Project.open(project) as p:  # reopen writable: nothing to repair
        assert p.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        job = jobs_db.list_jobs(p.conn, 1)[0]
        count = p.conn.execute("SELECT count(*) FROM particle_positions WHERE job_id = ?", (job["id"],)).fetchone()[0]
        images = p.conn.execute("SELECT count(*) FROM images WHERE job_id = ?", (job["id"],)).fetchone()[0]
        if job["status"] == "finished":
            assert (count, images) == (n, 1)
            return "finished"
        assert (count, images) == (0, 0)
        assert jobs_db.liveness(job) in ("died", "failed")
        return "killed"


def test_sigkill_at_any_moment_registers_all_or_nothing(project):
    """Kill a job process at spread-out moments; each time all or nothing is registered.

    The moments are fractions of the time an uninterrupted run of the same job takes on this
    machine, counted from when its body starts, so the test covers the whole registration on a
    fast machine as on a slow one.
    """
    n = 150_000
    proc, _, t_body = _start_positions_job(project, n)
    proc.wait()
    t_end = time.monotonic()
    assert _outcome(project, n) == "finished"
    span = t_end - t_body
    outcomes = []
    for fraction in (0.0, 0.15, 0.3, 0.45, 0.6, 0.75, 0.85, 0.92, 0.97):
        proc, _, t_body = _start_positions_job(project, n)
        try:
            proc.wait(timeout=fraction * span)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        outcomes.append(_outcome(project, n))
    # a kill right after the record appeared cannot have finished
    assert outcomes[0] == "killed", outcomes
    r = subprocess.run([sys.executable, "-m", "cistem_mpi", "status", "-p", str(project)], capture_output=True, text=True)
    assert r.returncode == 0 and ("died" in r.stdout or "failed" in r.stdout)


def test_reader_while_writer(project, tmp_path):
    """status (read-only, other processes) keeps working while a job writes."""
    stop_file = tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, "-c", f"""
import os, time
from cistem_mpi.db.project import Project
from cistem_mpi.db import jobs
p = Project.open({str(project)!r})
jid = jobs.create_job(p.conn, 'align_movies', {{}}, 2)
print('started', flush=True)  # the readers start only once the job exists
i = 0
while not os.path.exists({str(stop_file)!r}):
    i += 1
    jobs.update_progress(p.conn, jid, i, 10**9, 'working')
    time.sleep(0.01)  # 100 writes/s: 200x the controller's progress rate
jobs.finish_job(p.conn, jid, [], {{'writes': i}})
print(i)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "started"
        seen = []
        for _ in range(3):  # readers in other processes, as a user in another shell
            r = subprocess.run([sys.executable, "-m", "cistem_mpi", "status", "-p", str(project), "--json"],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            seen.append(r.stdout)
        t_end = time.monotonic() + 1.5
        n_reads = 0
        while time.monotonic() < t_end:  # and many quick readers
            with Project.open(project, readonly=True) as p:
                rows = jobs_db.list_jobs(p.conn)
                assert rows and rows[0]["status"] == "running"
                n_reads += 1
    finally:
        stop_file.touch()
        out, _ = writer.communicate(timeout=60)
    assert writer.returncode == 0
    assert int(out) > 20 and n_reads > 20
    assert all('"running"' in s for s in seen)
    with Project.open(project, readonly=True) as p:
        assert jobs_db.list_jobs(p.conn)[0]["status"] == "finished"


def test_progress_visible_from_another_process(project):
    seen = {}

    def body(ctx):
        ctx.progress(3, 10, "movie 3")
        r = subprocess.run([sys.executable, "-m", "cistem_mpi", "status", "-p", str(project), "--json"],
                           capture_output=True, text=True)
        import json

        seen["job"] = json.loads(r.stdout)[0]

    assert run_job(job_args(project), "align_movies", body) == 0
    assert seen["job"]["status"] == "running"
    assert (seen["job"]["progress_done"], seen["job"]["progress_total"]) == (3, 10)
    assert "3/10" in seen["job"]["progress_message"] and seen["job"]["progress_message"].endswith("movie 3")


def test_asset_names_from_database(project):
    with Project.open(project) as p:
        assert naming.next_classification_number(p.conn) == 1
        assert naming.class_averages_name(4) == "class_averages_0004.mrc"
        assert naming.next_refinement_run(p.conn) == 1
        assert naming.next_startup_run(p.conn) == 1

    def body(ctx):
        ctx.register("classifications_2d", number=1, n_classes=50, path="Assets/ClassAverages/class_averages_0001.mrc")
        ctx.register("volumes", path="Assets/Volumes/startup_volume_1_1.mrc", kind="startup", run_number=1,
                     class_number=1, display_name=naming.volume_display_name("startup", 1, 1), box=8, pixel_size=1.0)

    run_job(job_args(project), "classify_2d", body)
    with Project.open(project) as p:
        assert naming.next_classification_number(p.conn) == 2
        assert naming.next_startup_run(p.conn) == 2
    assert naming.volume_file_name("startup", 2, 1) == "startup_volume_2_1.mrc"
    assert naming.volume_file_name("local", 4, 1) == "volume_4_1.mrc"
    assert naming.volume_display_name("startup", 3, 1) == "Volume From Startup #3 - Class #1"
    assert naming.volume_display_name("start", 1, 1) == "Start Params #1 - Class #1"
    assert naming.volume_display_name("local", 2, 2, 1) == "Local #2 (Rnd. 1) - Class #2"
    assert naming.volume_display_name("global", 5, 1, 3) == "Global #5 (Rnd. 3) - Class #1"
    assert naming.orth_view_name("volume_2_1.mrc") == "Assets/Volumes/OrthViews/volume_2_1.mrc"

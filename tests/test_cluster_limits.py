"""Resource limits: the file descriptors rank 0 holds do not grow with the number of ranks.

With MPI, rank 0 talks to its workers through MPI (shared memory on a node, the fabric between
nodes), never through a socket or file per worker.  Measured here at 8 ranks (oversubscribed on
this machine) during a real task-queue job (``mpi-check``): rank 0 holds what the MPI library
itself opens in a bare 8-rank mpi4py program, plus the job's own few files (database, the job
log, a checkpoint being written).  Figures on this machine (MPICH 5 wheel, ch4:ucx): bare MPI 28-30
fds at 2 and at 8 ranks alike; the job's rank 0 at most 30-31 at 8 ranks (and 31 at 2 ranks).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime_helpers import MPIEXEC, REPO, need_mpiexec, new_project

pytestmark = pytest.mark.mpi

#: The job's own descriptors beyond MPI's: database + WAL + shm index, log, a checkpoint file,
#: and a little slack for the interpreter (numba cache index, /dev/urandom ...).
JOB_FILES = 6
BARE = """
from mpi4py import MPI
import os
c = MPI.COMM_WORLD
c.Barrier()
c.gather(os.getpid())
if c.rank == 0:
    for f in os.listdir('/proc/self/fd'):
        try:
            print(os.readlink('/proc/self/fd/' + f), flush=True)
        except OSError:  # the listdir's own descriptor, closed again
            pass
c.Barrier()
"""


def _mpi_env() -> dict[str, str]:
    return {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def _launch(n: int) -> list[str]:
    cmd = [need_mpiexec(), "-n", str(n)]
    # Open MPI refuses more ranks than cores without --oversubscribe; MPICH oversubscribes anyway
    probe = subprocess.run([MPIEXEC, "--version"], capture_output=True, text=True, timeout=30)
    if "Open MPI" in probe.stdout + probe.stderr or "OpenRTE" in probe.stdout + probe.stderr:
        cmd.append("--oversubscribe")
    return cmd


def bare_mpi_fds(n: int) -> list[str]:
    """What rank 0 of a bare n-rank mpi4py program holds open after a barrier and a gather."""
    r = subprocess.run([*_launch(n), sys.executable, "-c", BARE], capture_output=True, text=True, timeout=120,
                       env=_mpi_env())
    assert r.returncode == 0, r.stderr
    return sorted(r.stdout.splitlines())


def _channels(links: list[str]) -> int:
    return sum(1 for x in links if x.startswith(("socket:", "pipe:")))


def rank0_fds_during_job(tmp_path: Path, n: int) -> tuple[int, list[str]]:
    """The most descriptors rank 0 (the pid the job recorded) held while the job ran, and what they were."""
    root = new_project(tmp_path / f"p{n}")
    db = next(root.glob("*.db"))
    cmd = [*_launch(n), sys.executable, "-m", "cistem_mpi", "mpi-check", "--project", str(root),
           "--tasks", "300", "--task-ms", "20", "--iterations", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_mpi_env(),
                            cwd=REPO, start_new_session=True)
    best: list[str] = []
    seen_running = False
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        pid = None
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as c:
                row = c.execute("SELECT pid FROM jobs WHERE status = 'running'").fetchone()
            pid = row[0] if row else None
        except sqlite3.Error:
            pass
        if pid:
            seen_running = True
            links = []
            try:
                for f in os.listdir(f"/proc/{pid}/fd"):
                    try:
                        links.append(os.readlink(f"/proc/{pid}/fd/{f}"))
                    except OSError:
                        pass
            except OSError:
                pass
            if len(links) > len(best):
                best = sorted(links)
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
        pytest.fail("mpi-check did not end within 180 s")
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert seen_running, "never saw the job running"
    return len(best), best


def test_rank0_descriptors_at_8_ranks_are_what_mpi_needs(tmp_path):
    bare = bare_mpi_fds(8)
    n, links = rank0_fds_during_job(tmp_path, 8)
    print(f"\nrank 0 file descriptors at 8 ranks: bare MPI {len(bare)}, cistem-mpi job {n}")
    # 7 workers: one file or socket each would be 7 more than this bound
    assert n <= len(bare) + JOB_FILES, (links, bare)
    # no socket or pipe of its own: the workers are reached through MPI only
    assert _channels(links) <= _channels(bare), (links, bare)

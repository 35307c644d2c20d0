"""Launch cistem-mpi or a test program under mpiexec with a hard timeout (a hung MPI job fails the test)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: the mpiexec of the MPI mpi4py uses (the venv's MPICH wheel), else the one on PATH
MPIEXEC = os.environ.get("CISTEM_MPI_TEST_MPIEXEC") or (
    str(BIN / "mpiexec") if (BIN / "mpiexec").exists() else (shutil.which("mpiexec") or "mpiexec"))
PROG = REPO / "tests" / "runtime_prog.py"


def need_mpiexec() -> str:
    """Path of mpiexec, or skip (with the reason) when there is none."""
    if not (Path(MPIEXEC).exists() or shutil.which(MPIEXEC)):
        pytest.skip(f"no mpiexec found ({MPIEXEC})")
    return MPIEXEC


def run(cmd: list[str], timeout: float = 60, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; kill the whole group on timeout and fail the test."""
    full_env = dict(os.environ)
    full_env.setdefault("CISTEM_MPI_STOP_GRACE", "3")
    if env:
        full_env.update(env)
    t0 = time.monotonic()
    shm_before = _mpich_shm()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                            cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        if env and "SLURM_CONF" in env:  # ranks started by slurmd are not our children
            subprocess.run(["scancel", "--full", "-u", str(os.getuid())], env=full_env, capture_output=True, timeout=30)
        _kill_session(proc.pid)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # a grandchild in another process group still holds the pipes
            proc.kill()
            out, err = "", ""
        pytest.fail(f"timed out after {timeout} s (hung?): {' '.join(cmd)}\nstdout:\n{out}\nstderr:\n{err}")
    _remove_leaked_shm(shm_before)
    res = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    res.elapsed = time.monotonic() - t0  # type: ignore[attr-defined]
    return res


def _mpich_shm() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("mpich_shm_")}
    except OSError:
        return set()


def _remove_leaked_shm(before: set[str]) -> None:
    """Remove MPICH shared-memory segments our command created and left behind.

    A rank killed by SIGKILL or MPI_Abort never unlinks its segment; on a
    Slurm test cluster whose job ids repeat, a stale segment with the same
    name makes the next job hang in MPI_Init.  Only segments that appeared
    during the command and are mapped by no live process are removed.
    """
    new = _mpich_shm() - before
    if not new:
        return
    mapped: set[str] = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/maps") as f:
                    text = f.read()
            except OSError:
                continue
            mapped.update(n for n in new if n in text)
    for name in new - mapped:
        try:
            os.unlink(f"/dev/shm/{name}")
        except OSError:
            pass


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (the command and all it started, e.g. salloc's srun)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # state ppid pgrp session
            try:
                os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass


def cli(*args: str) -> list[str]:
    """The cistem-mpi command line (same interpreter as the tests)."""
    return [sys.executable, "-m", "cistem_mpi", *args]


def mpi_cli(n: int, *args: str) -> list[str]:
    return [need_mpiexec(), "-n", str(n), *cli(*args)]


def new_project(path: Path) -> Path:
    res = run(cli("project", "create", str(path)), timeout=60)
    assert res.returncode == 0, res.stderr
    return path


def jobs(project: Path) -> list[dict]:
    """Job records as ``cistem-mpi status --json`` prints them (newest first)."""
    res = run(cli("status", "--project", str(project), "--json", "--limit", "1000"), timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)

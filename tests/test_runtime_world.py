"""World: launch checks and the stop protocol when a rank fails outside the task queue."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from cistem_mpi.drivers.runtime.world import LaunchError, World, check_launch, expected_world_size
from cistem_mpi.errors import InputError
from runtime_helpers import PROG, need_mpiexec, run


def test_expected_world_size_from_launchers():
    assert expected_world_size({}) is None
    assert expected_world_size({"PMI_SIZE": "4"}) == 4  # MPICH mpiexec / srun --mpi=pmi2
    assert expected_world_size({"OMPI_COMM_WORLD_SIZE": "8"}) == 8
    assert expected_world_size({"SLURM_STEP_NUM_TASKS": "3", "SLURM_STEP_ID": "0"}) == 3
    # the batch script of sbatch is not an N-task step
    assert expected_world_size({"SLURM_NTASKS": "3", "SLURM_PROCID": "0"}) is None
    assert expected_world_size({"SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_ID": "batch"}) is None


def test_srun_without_mpi_plugin_is_refused():
    # srun --mpi=none with the pip MPICH: 2 tasks, each a world of 1
    env = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_ID": "0"}
    with pytest.raises(LaunchError, match="srun started 2 tasks but MPI sees a world of 1 rank.*--mpi=pmi2"):
        check_launch(1, env)
    assert issubclass(LaunchError, InputError)  # exit code 2, database untouched
    check_launch(2, env)
    check_launch(1, {})


def test_local_world_is_trivial():
    w = World(None)
    assert (w.rank, w.size, w.is_controller, w.n_workers) == (0, 1, True, 1)
    assert w.bcast({"a": 1}) == {"a": 1} and w.gather(5) == [5]
    assert np.array_equal(w.allreduce_sum(np.arange(3)), np.arange(3))
    w.barrier()
    w.check()
    w.finish()


@pytest.mark.mpi
def test_worker_failing_outside_queue_stops_everyone(tmp_path):
    """Rank 2 raises while ranks 0, 1, 3 wait in a reduce-scatter: no hang, rank 0 knows who/where/what."""
    out = tmp_path / "f.npz"
    res = run([need_mpiexec(), "-n", "4", sys.executable, str(PROG), "collective_fail", str(out), "--fail-rank", "2"],
              timeout=30)
    assert res.returncode != 0
    assert res.elapsed < 10  # type: ignore[attr-defined]
    d = np.load(out)
    assert str(d["failed"]).startswith("rank 2 on ")
    assert "ValueError: broken on purpose on rank 2" in str(d["failed"])
    assert list(d["unresponsive"]) == []  # every worker acknowledged the stop
    assert "rank 1: stopped by rank 0" in res.stderr and "rank 3: stopped by rank 0" in res.stderr


@pytest.mark.mpi
def test_controller_failure_with_a_stuck_worker_aborts_after_grace(tmp_path):
    """Rank 0 raises; rank 3 is stuck in a computation that never checks: MPI_Abort after the grace period."""
    out = tmp_path / "f.npz"
    res = run([need_mpiexec(), "-n", "4", sys.executable, str(PROG), "collective_fail", str(out),
               "--fail-rank", "0", "--hang-rank", "3"], timeout=40, env={"CISTEM_MPI_STOP_GRACE": "2"})
    assert res.returncode != 0
    assert res.elapsed < 15  # type: ignore[attr-defined]  # grace 2 s, not the 3600 s sleep
    d = np.load(out)  # the failure was recorded before the abort
    assert str(d["failed"]).startswith("rank 0 on ")
    assert list(d["unresponsive"]) == [3]
    assert "did not stop within 2 s" in res.stderr

"""Shared fixtures: the real data of other programs, a new project, the local Slurm."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import slurm_setup

REPO = Path(__file__).resolve().parents[1]
#: Real files written by other programs (read only): ../shared/data beside the checkout.
SHARED_DATA = Path(os.environ.get("CISTEM_MPI_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ``shared/data``; tests that need it skip (with the reason) if it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def project(tmp_path) -> Path:
    """A new, empty project directory."""
    from cistem_mpi.db.project import Project

    root = tmp_path / "proj"
    Project.create(root).close()
    return root


@pytest.fixture(scope="session")
def slurm():
    """A one-node Slurm started for this session (and stopped after it), or skip with the reason."""
    cluster, reason = slurm_setup.start()
    if cluster is None:
        print(f"\nSlurm tests skipped: {reason}")
        pytest.skip(f"Slurm could not start: {reason}")
    try:
        yield cluster
    finally:
        out = slurm_setup.stop_prefix(cluster.prefix)
        print(f"\n{out}")

"""Shared fixtures: the real data of other programs (bundled and interop), a new project, the local Slurm."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import slurm_setup

REPO = Path(__file__).resolve().parents[1]
#: Real files written by other programs under BSD-compatible licences, bundled in the
#: repository (origin, licence and SHA-256 of each: tests/data/PROVENANCE.md).
TEST_DATA = REPO / "tests" / "data"
#: Real files under GPL or unclear licences, not in the repository (read only), for the
#: interop tests (``make test-interop``): ../shared/data beside the checkout, or
#: $CISTEM_MPI_SHARED_DATA.
SHARED_DATA = Path(os.environ.get("CISTEM_MPI_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_itemcollected(item):
    """A test that reads the shared data directory is an interop test, marked or not.

    So ``make test`` (``-m "not interop"``) never skips for missing data, even for a new
    test whose author forgot ``@pytest.mark.interop``.
    """
    if "shared_data" in getattr(item, "fixturenames", ()) and item.get_closest_marker("interop") is None:
        item.add_marker(pytest.mark.interop)


@pytest.fixture(scope="session")
def test_data() -> Path:
    """Path of ``tests/data``: bundled real files of other programs (always present)."""
    return TEST_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of the shared data directory (interop tests only); skip with the reason if absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (set CISTEM_MPI_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture
def real_data(request) -> Path:
    """For a test parametrized over both kinds of file: ``tests/data``, or the shared data
    directory (skip if absent) for a parameter marked ``interop``."""
    if request.node.get_closest_marker("interop") is not None:
        return request.getfixturevalue("shared_data")
    return TEST_DATA


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

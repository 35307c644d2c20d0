"""Helpers shared by the Slurm tests (test_slurm, test_slurm_pipeline, test_openmpi)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest


def wait_for_job(job_id: str, env: dict, timeout: float) -> str:
    """Poll ``scontrol show job`` until the job ends (faster than ``sbatch --wait``); its final state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env={**os.environ, **env},
                             capture_output=True, text=True, timeout=30).stdout
        state = out.split("JobState=", 1)[1].split()[0] if "JobState=" in out else ""
        if state and state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            return state
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], env={**os.environ, **env}, capture_output=True, timeout=30)
    pytest.fail(f"Slurm job {job_id} did not end within {timeout} s")


def cistem_exe() -> str:
    """The cistem-mpi command of the interpreter running the tests."""
    exe = Path(sys.executable).parent / "cistem-mpi"
    if exe.exists():
        return str(exe)
    found = shutil.which("cistem-mpi")
    if not found:
        pytest.skip("the cistem-mpi command is not installed (pip install -e .)")
    return found

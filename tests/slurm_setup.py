"""Start a real one-node Slurm for the tests (and stop only what was started).

Uses tests/slurm/start-local-slurm.sh (the team's recipe proven on these
machines: Debian's slurm-wlm + munge as plain daemons, no systemd) with a
private prefix under /tmp, free ports, and no files in /etc/slurm: clients
find the cluster through ``SLURM_CONF``.  If a test process cannot start
Slurm (not root, no apt, install failure) the reason is returned and the
Slurm tests skip with it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent / "slurm"
START = HERE / "start-local-slurm.sh"
STOP = HERE / "stop-local-slurm.sh"


@dataclass
class SlurmCluster:
    prefix: Path
    env: dict[str, str]  # add to a subprocess's environment (SLURM_CONF)
    start_log: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(timeout: float = 900) -> tuple[SlurmCluster | None, str]:
    """Start the cluster; returns (cluster, "") or (None, reason it could not start)."""
    if os.geteuid() != 0:
        return None, "starting a local Slurm needs root (slurmd runs as root)"
    if not (shutil.which("apt-get") or shutil.which("slurmctld") or Path("/usr/sbin/slurmctld").exists()):
        return None, "no apt-get to install slurm-wlm and no Slurm installed"
    prefix = Path(tempfile.mkdtemp(prefix="cistem-slurm-"))
    env = dict(os.environ)
    env.update(
        SLURM_LOCAL_PREFIX=str(prefix),
        SLURM_LOCAL_NO_ETC="1",
        SLURM_LOCAL_CTLD_PORT=str(_free_port()),
        SLURM_LOCAL_D_PORT=str(_free_port()),
        SLURM_LOCAL_TIMEOUT="60",
        SLURM_LOCAL_KILLWAIT="5",
        # job ids never seen before on this machine (see start-local-slurm.sh)
        SLURM_LOCAL_FIRST_JOB_ID=str(1000 + (int(time.time() * 10) % 60_000_000)),  # a killed step's survivors get SIGKILL 5 s after SIGTERM
    )
    try:
        res = subprocess.run(["bash", str(START)], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        stop_prefix(prefix)
        return None, f"start-local-slurm.sh timed out after {timeout} s: {exc.stdout or ''}{exc.stderr or ''}"
    log = res.stdout + res.stderr
    if res.returncode != 0:
        stop_prefix(prefix)
        return None, f"start-local-slurm.sh failed (exit {res.returncode}):\n{log[-3000:]}"
    return SlurmCluster(prefix, {"SLURM_CONF": str(prefix / "etc" / "slurm.conf")}, log), ""


def stop_prefix(prefix: Path) -> str:
    """Stop the daemons this prefix started (by pid file) and remove the prefix."""
    env = dict(os.environ, SLURM_LOCAL_PREFIX=str(prefix))
    try:
        res = subprocess.run(["bash", str(STOP)], env=env, capture_output=True, text=True, timeout=120)
        out = res.stdout + res.stderr
    except subprocess.TimeoutExpired:
        out = "stop-local-slurm.sh timed out"
    shutil.rmtree(prefix, ignore_errors=True)
    return out

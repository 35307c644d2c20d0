"""Peak memory per node of a reconstruction: shared-memory accumulators against one set per rank.

    .venv/bin/python benchmarks/bench_node_memory.py [--box 128] [--n 2000] [--ranks 3] [--padding 2]

Simulates particles, then reconstructs them with ``mpiexec -n RANKS`` on this
node twice, with ``CISTEM_MPI_NODE_MEMORY=per-rank`` and ``=shared``
(the program is ``tests/reconstruct_prog.py``, the one the equality test runs).
While a run goes, every rank's proportional set size (``Pss`` of
``/proc/PID/smaps_rollup``: a shared page counts 1/k in each of the k
processes that map it, so the sum over ranks is the node's real use) is
polled every 20 ms; the peak of the sum is the node's peak.  The sum of the
ranks' RSS is printed too: it counts shared pages once per rank, which is
what a naive per-process monitor would report.

It also prints the paper model of one node of an 8-node x 44-rank job
(bytes per node and the reduce-scatter traffic per rank) for box 256.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cistem_mpi.drivers.node_reconstruction import batch_size, window_bytes  # noqa: E402
from cistem_mpi.kernels.projection import padded_size  # noqa: E402

PROG = REPO / "tests" / "reconstruct_prog.py"
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")


def _descendants(root: int) -> list[int]:
    """Process ids below ``root`` (from /proc/*/stat parent links)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
                parent[int(d)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out.extend(kids)
        todo.extend(kids)
    return out


def _rollup(pid: int) -> tuple[int, int]:
    """(Pss, Rss) of a process in kB (0, 0 once it is gone)."""
    pss = rss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
    except OSError:
        pass
    return pss, rss


def run_measured(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run ``cmd``; peak over time of the summed Pss and Rss of its python processes (MB), and wall s."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_pss = peak_rss = 0
    each: dict[int, int] = {}  # peak Pss of each rank process
    while proc.poll() is None:
        ranks = [p for p in [proc.pid] + _descendants(proc.pid) if "python" in _comm(p)]
        use = [_rollup(p) for p in ranks]
        peak_pss = max(peak_pss, sum(u[0] for u in use))
        peak_rss = max(peak_rss, sum(u[1] for u in use))
        for pid, u in zip(ranks, use):
            each[pid] = max(each.get(pid, 0), u[0])
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    peaks = sorted(each.values())
    # rank 0 (it finishes the maps) has the largest peak; the others are the workers
    return {"wall": time.monotonic() - t0, "pss_mb": peak_pss / 1024, "rss_mb": peak_rss / 1024,
            "rank0_mb": peaks[-1] / 1024 if peaks else 0.0,
            "worker_mb": float(np.median(peaks[:-1])) / 1024 if len(peaks) > 1 else 0.0}


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text()
    except OSError:
        return ""


def model_node(box: int, padding: float, ranks_per_node: int, nodes: int, worker_mb: float,
               rank0_extra_mb: float) -> str:
    """The paper model of one node: the window, the ranks' own memory, rank 0's finishing, the traffic."""
    p = padded_size(box, padding)
    acc = p * p * (p // 2 + 1) * 24  # d1, d2 complex64 + w1, w2 float32
    win = window_bytes(box, p, ranks_per_node, batch_size(box))
    mb, gib = 2.0 ** 20, 2.0 ** 30
    # rank 0's finishing (inverse FFTs) and the other ranks' memory scale as P^3 and stay as measured
    shared_node = win + ranks_per_node * worker_mb * mb + rank0_extra_mb * mb
    per_rank_node = shared_node - win + ranks_per_node * (acc + acc / (ranks_per_node * nodes))
    traffic = 2 * (nodes - 1) / nodes * acc  # ring all-reduce between the leaders, each way
    return "\n".join([
        f"model, box {box}, padding {padding:g} (P = {p}), {nodes} nodes x {ranks_per_node} ranks "
        f"({worker_mb:.0f} MB per rank besides the arrays, rank 0 {rank0_extra_mb:.0f} MB more):",
        f"  shared:   window {win / gib:.2f} GiB + ranks {ranks_per_node * worker_mb * mb / gib:.2f} GiB"
        f" + rank 0 {rank0_extra_mb * mb / gib:.2f} GiB = {shared_node / gib:.1f} GiB per node;"
        f" each node leader sends and receives {traffic / gib:.2f} GiB",
        f"  per-rank: {per_rank_node / gib:.1f} GiB per node ({acc / gib:.2f} GiB of accumulators per rank)",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--ranks", type=int, default=3)
    ap.add_argument("--padding", type=float, default=2.0)
    ap.add_argument("--shared-only", action="store_true",
                    help="skip the per-rank and 1-rank runs (44 ranks x box 256 per rank would need 70 GB)")
    a = ap.parse_args()
    from cistem_mpi.drivers.simulate import simulate_particles

    with tempfile.TemporaryDirectory() as tmp:
        sim = simulate_particles(Path(tmp), n_particles=a.n, box=a.box, pixel_size=1.5, snr=0.1, seed=3)
        rows = []
        for mode in (("shared",) if a.shared_only else ("per-rank", "shared")):
            cmd = [MPIEXEC, "-n", str(a.ranks), sys.executable, str(PROG), str(sim.stack), str(sim.cistem_star),
                   str(Path(tmp) / f"{mode}.npz"), "C1", str(a.padding)]
            rows.append((mode, run_measured(cmd, {"CISTEM_MPI_NODE_MEMORY": mode})))
        one = None if a.shared_only else run_measured([sys.executable, str(PROG), str(sim.stack), str(sim.cistem_star), str(Path(tmp) / "1.npz"),
                            "C1", str(a.padding)], {"CISTEM_MPI_NODE_MEMORY": "per-rank"})
    p = padded_size(a.box, a.padding)
    print(f"reconstruct, {a.n} particles, box {a.box}, padding {a.padding:g} (P = {p}), {a.ranks} ranks on one node")
    print(f"{'mode':<10}{'wall s':>8}{'particles/s':>13}{'node peak (PSS) MB':>20}{'sum of RSS MB':>15}")
    for mode, r in rows + ([("1 rank", one)] if one else []):
        print(f"{mode:<10}{r['wall']:>8.1f}{a.n / r['wall']:>13.0f}{r['pss_mb']:>20.0f}{r['rss_mb']:>15.0f}")
    sh = rows[-1][1]
    if len(rows) == 2:
        print(f"shared / per-rank node peak: {sh['pss_mb'] / rows[0][1]['pss_mb']:.2f}")
    print(f"shared mode: rank 0 peak {sh['rank0_mb']:.0f} MB, other ranks {sh['worker_mb']:.0f} MB (PSS)")
    # a worker's own memory: its peak less its share (1/R) of the window
    win_mb = window_bytes(a.box, p, a.ranks, batch_size(a.box)) / 2 ** 20
    worker = sh["worker_mb"] - win_mb / a.ranks
    rank0_extra = sh["rank0_mb"] - sh["worker_mb"]
    for box in sorted({a.box, 256, 512}):
        scale = (padded_size(box, a.padding) / p) ** 3  # rank 0's finishing grows with the padded volume
        print(model_node(box, a.padding, 44, 8, worker, rank0_extra * scale))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

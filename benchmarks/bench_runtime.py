"""Benchmark of the MPI runtime: controller throughput and parallel efficiency.

    .venv/bin/python benchmarks/bench_runtime.py [--quick]

Measures, each under ``mpiexec -n N`` (the pip MPICH; N > cores is oversubscribed):

1. tasks/s the controller sustains with trivial tasks (chunk size 1: one
   request/reply round trip per task, the controller's worst case) at 2, 4
   and 8 ranks, and with guided chunks (the default);
2. tasks/s with 1 ms tasks (sleep: does not compete for the CPU) at 2, 4, 8
   ranks, against the ideal ``workers x 1000/s``;
3. parallel efficiency of a real kernel (numpy FFTs of 256^2 images) at 1,
   2 and 3 ranks on this machine, against 1 rank (the baseline);
4. message volume per task, to extrapolate to 352 ranks (README.md, "Running in parallel").

Prints a table and writes benchmarks/out/bench_runtime.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")


# ---------------------------------------------------------------------- inside mpiexec
def _fft_task(i: int) -> float:
    rng = np.random.default_rng(i)
    img = rng.standard_normal((256, 256)).astype(np.float32)
    acc = 0.0
    for _ in range(12):
        f = np.fft.rfft2(img)
        img = np.fft.irfft2(f * np.float32(0.999), s=img.shape).astype(np.float32)
        acc += float(img[0, 0])
    return acc


def _inner(mode: str, n_tasks: int, chunk: int | None) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from cistem_mpi.drivers.runtime import get_world, guarded, map_tasks

    world = get_world()
    if mode == "trivial":
        fn = lambda i: i  # noqa: E731
    elif mode == "sleep1ms":
        def fn(i: int) -> int:
            time.sleep(0.001)
            return i
    elif mode == "fft":
        fn = _fft_task
    else:
        raise SystemExit(mode)
    with guarded(world):
        world.barrier()
        t0 = time.perf_counter()
        res = map_tasks(world, n_tasks, fn, chunk_size=chunk)
        dt = time.perf_counter() - t0
    if world.is_controller:
        assert res is not None and len(res) == n_tasks
        msg = len(pickle.dumps((0, [res[0]]), protocol=pickle.HIGHEST_PROTOCOL))
        print("RESULT " + json.dumps({"seconds": dt, "tasks": n_tasks, "ranks": world.size,
                                      "result_msg_bytes": msg}), flush=True)


# ---------------------------------------------------------------------- driver
def _run(ranks: int, mode: str, n_tasks: int, chunk: int | None) -> dict:
    cmd = [sys.executable, __file__, "--inner", mode, str(n_tasks), str(chunk or 0)]
    if ranks > 1:
        cmd = [MPIEXEC, "-n", str(ranks)] + cmd
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[7:])


def _best(ranks: int, mode: str, n: int, chunk: int | None, repeat: int) -> dict:
    runs = [_run(ranks, mode, n, chunk) for _ in range(repeat)]
    return min(runs, key=lambda r: r["seconds"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--inner", nargs=3)
    a = ap.parse_args()
    if a.inner:
        mode, n, chunk = a.inner
        _inner(mode, int(n), int(chunk) or None)
        return 0
    rep = 1 if a.quick else 3
    n_trivial = 5000 if a.quick else 20000
    out: dict = {"cores": os.cpu_count(), "trivial_chunk1": {}, "trivial_guided": {}, "sleep1ms": {}, "fft": {}}

    # baselines: the same trivial tasks in one process (same chunking, no messages at all)
    base = _best(1, "trivial", n_trivial, 1, rep)
    out["trivial_local_tasks_per_s"] = base["tasks"] / base["seconds"]
    base_g = _best(1, "trivial", n_trivial * 5, None, rep)
    out["trivial_local_guided_tasks_per_s"] = base_g["tasks"] / base_g["seconds"]
    print(f"{'what':44} {'ranks':>5} {'tasks/s':>12} {'vs ideal/base':>14}")
    print(f"{'trivial, chunk 1, 1 rank (baseline)':44} {1:>5} {out['trivial_local_tasks_per_s']:>12.0f} {'1.00':>14}")
    print(f"{'trivial, guided, 1 rank (baseline)':44} {1:>5} {out['trivial_local_guided_tasks_per_s']:>12.0f} "
          f"{'1.00':>14}")
    for ranks in (2, 4, 8):
        r = _best(ranks, "trivial", n_trivial, 1, rep)
        tps = r["tasks"] / r["seconds"]
        out["trivial_chunk1"][ranks] = tps
        out["result_msg_bytes"] = r["result_msg_bytes"]
        print(f"{'trivial tasks, chunk 1 (1 round trip/task)':44} {ranks:>5} {tps:>12.0f} "
              f"{tps / out['trivial_local_tasks_per_s']:>14.3f}")
    for ranks in (2, 4, 8):
        r = _best(ranks, "trivial", n_trivial * 5, None, rep)
        tps = r["tasks"] / r["seconds"]
        out["trivial_guided"][ranks] = tps
        print(f"{'trivial tasks, guided chunks':44} {ranks:>5} {tps:>12.0f} "
              f"{tps / out['trivial_local_guided_tasks_per_s']:>14.3f}")
    n_sleep = 1000 if a.quick else 3000
    for ranks in (2, 4, 8):
        r = _best(ranks, "sleep1ms", n_sleep, 1, rep)
        tps = r["tasks"] / r["seconds"]
        ideal = (ranks - 1) * 1000.0
        out["sleep1ms"][ranks] = {"tasks_per_s": tps, "ideal": ideal}
        print(f"{'1 ms tasks, chunk 1':44} {ranks:>5} {tps:>12.0f} {tps / ideal:>14.3f}")
    n_fft = 60 if a.quick else 160
    t1 = _best(1, "fft", n_fft, None, rep)["seconds"]
    out["fft"][1] = {"seconds": t1, "speedup": 1.0, "efficiency_per_rank": 1.0}
    print(f"{'FFT kernel (12 rfft2/irfft2 256^2 per task)':44} {1:>5} {n_fft / t1:>12.2f} {'1.00 (base)':>14}")
    for ranks in (2, 3):
        t = _best(ranks, "fft", n_fft, None, rep)["seconds"]
        sp = t1 / t
        workers = ranks - 1
        out["fft"][ranks] = {"seconds": t, "speedup": sp, "efficiency_per_rank": sp / ranks,
                             "efficiency_per_worker": sp / workers}
        print(f"{'FFT kernel':44} {ranks:>5} {n_fft / t:>12.2f} {sp:>14.2f}  speedup; "
              f"per rank {sp / ranks:.2f}, per worker {sp / workers:.2f}")
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "bench_runtime.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

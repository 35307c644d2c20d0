"""File I/O each job needs per rank: bytes read and written per rank-second, measured.

Simulates a few movies, then runs align-movies, find-ctf, find-particles, package create
--from-positions and reconstruct on them, each under ``mpiexec -n RANKS``.  Every rank runs the
job through a small wrapper that reads ``/proc/self/io`` just before and just after the job
(the modules are imported first, so the figures are the job's, not Python's imports):

* ``rchar`` / ``wchar``: bytes passed to read()/write() (what the file system must deliver,
  page cache or not; includes the database and logs, a few kB);
* ``read_bytes`` / ``write_bytes``: what reached the block device (0 reads when the data sit
  in the page cache, as here right after simulating them).

Per rank-second = bytes / wall seconds of the job on that rank.  Rank 0 (the controller:
database, registration, assembling outputs) and the workers (reading the inputs) are shown
apart.  Use the worker figure x workers per node to size a node's share of a shared file
system (and multiply by the speed-up of faster CPUs: these are 2 slow shared cores).

Usage::

    python benchmarks/bench_io_rates.py              # 2 movies 1024^2 x 16 frames, 3 ranks (< 3 min)
    python benchmarks/bench_io_rates.py --ranks 2 --movies 2 --size 768
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Run one job on this rank with /proc/self/io read around it (argv: OUTDIR cistem-mpi words...).
WRAPPER = r"""
import json, os, sys, time
def io():
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f.read().splitlines())}
import numpy, numba, scipy  # imports first: their files are not the job's I/O
from mpi4py import MPI
from cistem_mpi import cli
cli.build_parser()  # imports every driver
out, argv = sys.argv[1], sys.argv[2:]
a, t0 = io(), time.perf_counter()
rc = cli.main(argv)
b, dt = io(), time.perf_counter() - t0
rank = MPI.COMM_WORLD.Get_rank()
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"rank": rank, "seconds": dt, "rc": rc, **{k: b[k] - a[k] for k in b}}, f)
sys.exit(rc)
"""


def _mpiexec() -> str:
    found = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if not found:
        sys.exit("bench_io_rates: mpiexec not found")
    return found


def run_job(words: list[str], ranks: int, work: Path, name: str) -> list[dict]:
    out = work / "io" / name
    out.mkdir(parents=True, exist_ok=True)
    wrapper = work / "io_wrapper.py"
    wrapper.write_text(WRAPPER)
    cmd = [_mpiexec(), "-n", str(ranks), sys.executable, str(wrapper), str(out), *words]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        sys.exit(f"bench_io_rates: {name} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")), key=lambda d: d["rank"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=3)
    ap.add_argument("--movies", type=int, default=2)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    from cistem_mpi import cli
    from cistem_mpi.db.project import Project
    from cistem_mpi.drivers.simulate import simulate_movies

    ps, epf = 1.5, 4.0
    work = Path(tempfile.mkdtemp(prefix="bench-io-rates-"))
    t0 = time.perf_counter()
    try:
        sim = simulate_movies(work / "sim", args.movies, (args.size, args.size), args.frames, epf, ps, seed=3,
                              formats=("tiff",), ice_sigma=0.02, n_per_micrograph=30, particle_contrast=0.3,
                              box=96)
        root = work / "proj"
        Project.create(root).close()
        assert cli.main(["import", "movies", "-p", str(root), *map(str, sim.movies["tiff"]), "--pixel-size",
                         str(ps), "--dose-per-frame", str(epf), "--gain", str(sim.gain)]) == 0
        movie_bytes = sum(Path(m).stat().st_size for m in sim.movies["tiff"])
        p = ["--project", str(root)]
        jobs = [
            ("align-movies", ["align-movies", *p, "--max-iterations", "5"]),
            ("find-ctf", ["find-ctf", *p, "--box", "256", "--max-resolution", "8", "--min-defocus", "8000",
                          "--max-defocus", "25000", "--defocus-step", "500"]),
            ("find-particles", ["find-particles", *p, "--maximum-radius", "60", "--characteristic-radius", "45",
                                "--edge", "48", "--threshold", "3.0"]),
            ("package-positions", ["package", "create", *p, "--from-positions", "--box", "96",
                                   "--largest-dimension", "120"]),
            ("reconstruct", ["reconstruct", *p]),
        ]
        rows = []
        for name, words in jobs:
            ranks = args.ranks
            per = run_job(words, ranks, work, name)
            rows.append((name, ranks, per))
        total = time.perf_counter() - t0
        print(f"# I/O per rank: {args.movies} movies {args.size}^2 x {args.frames} frames "
              f"(LZW TIFF, {movie_bytes / 1e6:.1f} MB), {args.ranks} ranks, {os.cpu_count()} cores; "
              f"MB = 1e6 bytes; rate = MB per rank-second")
        print(f"{'job':<18} {'rank':<8} {'wall s':>7} {'read MB':>8} {'write MB':>8} {'read MB/s':>9} "
              f"{'write MB/s':>10} {'disk rd MB':>10} {'disk wr MB':>10}")
        for name, ranks, per in rows:
            groups = [("0", [d for d in per if d["rank"] == 0]), ("workers", [d for d in per if d["rank"] > 0])]
            for label, ds in groups:
                if not ds:
                    continue
                sec = sum(d["seconds"] for d in ds) / len(ds)
                rd = sum(d["rchar"] for d in ds) / len(ds) / 1e6
                wr = sum(d["wchar"] for d in ds) / len(ds) / 1e6
                drd = sum(d["read_bytes"] for d in ds) / len(ds) / 1e6
                dwr = sum(d["write_bytes"] for d in ds) / len(ds) / 1e6
                print(f"{name:<18} {label:<8} {sec:7.1f} {rd:8.2f} {wr:8.2f} {rd / sec:9.2f} {wr / sec:10.2f} "
                      f"{drd:10.2f} {dwr:10.2f}")
        print(f"# total {total:.0f} s (work directory {work}{'' if args.keep else ', removed'})")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

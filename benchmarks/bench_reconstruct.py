"""Throughput of the MPI reconstruction (``reconstruct_particles``) against a numpy baseline.

    .venv/bin/python benchmarks/bench_reconstruct.py [--small] [--boxes 128 256] [--n 400 300] [--ranks 1 2 3]

For each box (128 and 256 by default; ``--small``: 64 and 96 with fewer
particles, < 1 min) particles are simulated from the built-in map at
``2.5 * 64 / box`` Å/pixel (the molecule fills the box alike) into a temporary
directory, then ``reconstruct_particles`` (C1, padding 2, trilinear) runs in
a fresh process for each rank count:

* 1 rank: ``python bench_reconstruct.py --worker ...`` (no launcher; rank 0
  inserts itself).  A subprocess rather than this process, so that its peak
  RSS is the reconstruction's and not the simulation's;
* N ranks: ``mpiexec -n N python bench_reconstruct.py --worker ...``: rank 0
  hands out chunks, ranks 1..N-1 insert (``-n 2``: one inserting rank;
  ``-n 3``: two inserting ranks + the mostly idle controller, on 2 cores).

Every process first reconstructs a tiny warm-up stack (numba caches, FFT
plans of the small sizes, MPI connections), then runs the timed job after a
barrier.  Rank 0 splits the wall time by wrapping the driver's own calls:

* insertion: start -> first ``reduce_scatter_z`` (all chunks inserted and
  reported; includes reading, normalising, FFT, CTF and shifting the images);
* finishing: reduce-scatter of the 4 accumulators + per-shell Wiener
  iterations and normalisation of the slabs + gather on rank 0 + ``_finish``
  (3 inverse 3D FFTs with crop and gridding correction, then FSC, Guinier
  B-factor and sharpening -- the last three shown separately);
* peak RSS (``ru_maxrss``) of every rank, gathered on rank 0, with the RSS
  after the warm-up (interpreter + numba + MPI) and the accumulators' size.

Baseline, measured in this process in the same run: a plain single-process
numpy reconstruction of the first ``--n-numpy`` of the same particles --
numpy FFTs of the images, the numpy half-storage trilinear insertion of
``bench_kernels.insert_numpy`` (same accumulator layout), per-shell Wiener
iterations with ``np.bincount``, ``np.fft.irfftn``, crop and gridding
correction -- reported as particles/s and finishing seconds, with the ratios
to the 1-rank package run.  The numpy finishing is checked against the
package's (same accumulators, max relative difference of the volume).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")
VOLTAGE, CS, AMPLITUDE_CONTRAST = 300.0, 2.7, 0.07
WARMUP_BOX = 32


def pixel_size_for(box: int) -> float:
    """Å/pixel so the built-in molecule fills every box alike (2.5 Å at 64)."""
    return 2.5 * 64 / box


def _simulate(out: Path, box: int, n: int) -> dict:
    from cistem_mpi.drivers.simulate import simulate_particles

    ps = pixel_size_for(box)
    sim = simulate_particles(out, n_particles=n, box=box, pixel_size=ps, snr=0.1, seed=box, name=f"box{box}")
    params = out / f"box{box}_params.npy"
    np.save(params, sim.particles.params)
    return {"box": box, "n": n, "pixel_size": ps, "stack": str(sim.stack), "params": str(params)}


def _particles(params_path: str, pixel_size: float):
    from cistem_mpi.io.params import Optics, ParticleSet

    params = np.load(params_path)
    return ParticleSet(params=params, optics=[Optics(pixel_size, VOLTAGE, CS, AMPLITUDE_CONTRAST)])


def _rss_bytes() -> int:
    """Peak resident set size of this process (bytes).

    ``VmHWM`` of /proc/self/status: ``ru_maxrss`` would do, but Linux carries
    it over ``exec`` from the forking parent, so a subprocess of a big parent
    would report the parent's size.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


# ---------------------------------------------------------------------- inside the timed process
def _worker(job: dict, warm: dict) -> None:
    from cistem_mpi.drivers import volumejob as rc
    from cistem_mpi.drivers.runtime import get_world, guarded
    from cistem_mpi.drivers.runtime.slab import accumulator_bytes
    from cistem_mpi.kernels import backprojection as bp
    from cistem_mpi.kernels import fft

    fft.use_pyfftw(True, threads=1)
    world = get_world()
    settings = rc.ReconstructionSettings()
    marks: dict[str, float] = {}
    ift_time = [0.0]

    def mark(name: str) -> None:
        marks.setdefault(name, time.perf_counter())

    def timed(fn, first: str, last: str):
        def wrapper(*a, **k):
            mark(first)
            out = fn(*a, **k)
            marks[last] = time.perf_counter()  # the last call's end
            return out
        return wrapper

    def timed_ift(*a, **k):
        t = time.perf_counter()
        out = orig_ift(*a, **k)
        ift_time[0] += time.perf_counter() - t
        return out

    with guarded(world):
        # warm-up: numba caches, small FFT plans, MPI connections
        rc.reconstruct_particles(world, warm["stack"], _particles(warm["params"], warm["pixel_size"])
                                 if world.is_controller else None, settings)
        rss_before = _rss_bytes()
        orig = (rc.reduce_scatter_z, rc.gather_z, rc._finish, bp.ft_to_volume)
        orig_ift = orig[3]
        rc.reduce_scatter_z = timed(orig[0], "rs0", "rs1")
        rc.gather_z = timed(orig[1], "g0", "g1")
        rc._finish = timed(orig[2], "f0", "f1")
        bp.ft_to_volume = timed_ift
        particles = _particles(job["params"], job["pixel_size"]) if world.is_controller else None
        try:
            world.barrier()
            t0 = time.perf_counter()
            r = rc.reconstruct_particles(world, job["stack"], particles, settings)
            t1 = time.perf_counter()
        finally:
            rc.reduce_scatter_z, rc.gather_z, rc._finish, bp.ft_to_volume = orig
        rss = world.gather({"rank": world.rank, "peak": _rss_bytes(), "before": rss_before})
    if world.is_controller:
        assert r is not None
        m = {k: v - t0 for k, v in marks.items()}
        acc = accumulator_bytes(job["box"], 2, world.size)
        print("RESULT " + json.dumps({
            "ranks": world.size, "box": job["box"], "n": job["n"], "total_s": t1 - t0,
            "insert_s": m["rs0"], "reduce_scatter_s": m["rs1"] - m["rs0"], "normalise_s": m["g0"] - m["rs1"],
            "gather_s": m["g1"] - m["g0"], "finish_s": m["f1"] - m["f0"], "ift_s": ift_time[0],
            "after_finish_s": (t1 - t0) - m["f1"], "finishing_s": (t1 - t0) - m["rs0"],
            "resolution": r.resolution, "rss": rss,
            "accumulators_bytes": 2 * acc["accumulator"], "sum_slabs_bytes": 2 * acc["slab"],
        }), flush=True)


def _run_worker(ranks: int, job: dict, warm: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(job), json.dumps(warm)]
    if ranks > 1:
        cmd = [MPIEXEC, "-n", str(ranks)] + cmd
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{out.stdout}\n{out.stderr}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[7:])


# ---------------------------------------------------------------------- numpy baseline
def _numpy_insert(job: dict, n_sub: int) -> tuple[tuple[np.ndarray, ...], float]:
    """Plain numpy: read, normalise, np.fft, shift, CTF, numpy half-storage insertion (two half sets)."""
    from bench_kernels import insert_numpy

    from cistem_mpi.io.mrc import open_stack
    from cistem_mpi.kernels.backprojection import new_accumulators
    from cistem_mpi.kernels.ctf import ctf_2d_stack
    from cistem_mpi.kernels.euler import rotation_matrix
    from cistem_mpi.kernels.reconstruction import half_sets

    n, ps = job["box"], job["pixel_size"]
    p = 2 * n
    rows = np.load(job["params"])[:n_sub]
    half = half_sets(rows["position"])
    d1, w1 = new_accumulators(p)
    d2, w2 = new_accumulators(p)
    ky = np.fft.fftfreq(n)[:, None]
    kx = np.fft.rfftfreq(n)[None, :]
    t0 = time.perf_counter()
    with open_stack(job["stack"], pixel_size=ps) as st:
        imgs = st[rows["position"] - 1].astype(np.float32)
    imgs = imgs - imgs.mean(axis=(1, 2), keepdims=True)
    imgs = imgs / imgs.std(axis=(1, 2), keepdims=True)
    f = np.fft.rfft2(np.fft.ifftshift(imgs, axes=(-2, -1))).astype(np.complex64)
    # undo the shifts: content moved by -shift (pixels)
    dx, dy = rows["shx"] / ps, rows["shy"] / ps
    f *= np.exp(2j * np.pi * (kx[None] * dx[:, None, None] + ky[None] * dy[:, None, None])).astype(np.complex64)
    ctf = ctf_2d_stack(n, ps, VOLTAGE, CS, AMPLITUDE_CONTRAST, rows["df1"], rows["df2"], rows["angast"],
                       rows["pshift"])
    rot = rotation_matrix(rows["phi"], rows["theta"], rows["psi"]).reshape(-1, 3, 3)
    for h, (d, w) in ((1, (d1, w1)), (2, (d2, w2))):
        m = half == h
        insert_numpy(d, w, f[m], rot[m], ctf[m])
    return (d1, w1, d2, w2), time.perf_counter() - t0


def numpy_finish(d1, w1, d2, w2, n: int, iterations: int = 3) -> tuple[list[np.ndarray], float]:
    """Per-shell Wiener normalisation (np.bincount) and np.fft.irfftn of the half maps and the full map."""
    from cistem_mpi.kernels.interpolation import apodization_3d

    t0 = time.perf_counter()
    p = d1.shape[0]
    kz = np.fft.fftfreq(p, 1.0 / p).astype(np.float32)
    kx = np.arange(p // 2 + 1, dtype=np.float32)
    r = np.sqrt(kz[:, None, None] ** 2 + kz[None, :, None] ** 2 + kx[None, None, :] ** 2) * (n / p)
    nb = n // 2 + 2  # shells 0..n//2, plus one bin for everything beyond
    shell = np.minimum(np.floor(r + 0.5), nb - 1).astype(np.int32).ravel()
    del r
    mult = np.broadcast_to(np.where((kx == 0) | (2 * kx == p), 1.0, 2.0)[None, None, :], d1.shape).ravel()

    def shell_sum(x: np.ndarray) -> np.ndarray:
        return np.bincount(shell, weights=(mult * x.ravel()), minlength=nb)

    sw1, sw2, count = shell_sum(w1), shell_sum(w2), np.maximum(shell_sum(np.ones(d1.shape, np.float32)), 1.0)
    reg = 0.5 * (sw1 + sw2) / count
    reg[-1] = 0.0
    f = np.zeros(nb)
    for _ in range(iterations):
        den1 = w1 + reg[shell].reshape(w1.shape).astype(np.float32)
        den2 = w2 + reg[shell].reshape(w2.shape).astype(np.float32)
        a = np.where(den1 > 0, d1 / np.where(den1 > 0, den1, 1), 0)
        b = np.where(den2 > 0, d2 / np.where(den2 > 0, den2, 1), 0)
        num = shell_sum((a * np.conj(b)).real)
        pa, pb = shell_sum(np.abs(a) ** 2), shell_sum(np.abs(b) ** 2)
        f = np.divide(num, np.sqrt(pa * pb), out=np.zeros(nb), where=pa * pb > 0)
        fc = np.clip(f, 1e-3, 0.999)
        reg = 0.5 * (sw1 + sw2) / count * (1 - fc) / fc
        reg[-1] = 0.0
    reg_full = (sw1 + sw2) / count * (1 - fc) / (2 * fc)
    apod = apodization_3d(n, p, "linear")
    o = p // 2 - n // 2
    vols = []
    for d, w, rg in ((d1, w1, reg), (d2, w2, reg), (d1 + d2, w1 + w2, reg_full)):
        den = w + rg[shell].reshape(w.shape).astype(np.float32)
        ft = np.where((den > 0) & (shell.reshape(w.shape) < nb - 1), d / np.where(den > 0, den, 1), 0)
        big = np.fft.fftshift(np.fft.irfftn(ft.astype(np.complex64), s=(p, p, p), axes=(0, 1, 2)))
        vols.append((big[o:o + n, o:o + n, o:o + n] / apod).astype(np.float32))
    return vols, time.perf_counter() - t0


def package_finish_volume(d1, w1, d2, w2, n: int) -> np.ndarray:
    """The package's finishing on one rank (same kernels as reconstruct_particles), full map only."""
    from cistem_mpi.drivers.volumejob import WIENER_ITERATIONS
    from cistem_mpi.kernels import backprojection as bp
    from cistem_mpi.kernels import reconstruction as rec

    p = d1.shape[0]
    shells = n // 2 + 1
    reg_half = np.zeros(shells)
    reg_full = np.zeros(shells)
    for it in range(WIENER_ITERATIONS + 1):
        sums = rec.slab_shell_sums(d1, w1, d2, w2, 0, p, n, reg_half, reg_half)
        if it == 0:
            reg_half = 0.5 * (sums[3] + sums[4]) / np.maximum(sums[5], 1.0)
            continue
        reg_half, reg_full = rec.wiener_regularisers(sums, rec.fsc_from_sums(sums))
    return bp.ft_to_volume(rec.normalise_slab(d1 + d2, w1 + w2, 0, p, n, reg_full), n, "linear")


def bench_numpy(job: dict, n_sub: int) -> dict:
    from cistem_mpi.drivers import volumejob as rc
    from cistem_mpi.kernels.backprojection import new_accumulators

    acc, t_ins = _numpy_insert(job, n_sub)
    # the package's insertion of the same particles (its _Inserter), to check the baseline
    parts = _particles(job["params"], job["pixel_size"]).take(np.arange(n_sub))
    settings = rc.ReconstructionSettings()
    plan = rc._plan(job["stack"], parts, settings)
    p = plan["padded"]
    pk = new_accumulators(p) + new_accumulators(p)
    ins = rc._Inserter(plan, settings, pk)
    ins(0, n_sub, None)
    ins.close()
    ins_diff = max(float(np.abs(x - y).max() / np.abs(x).max()) for x, y in zip(pk, acc))
    del pk
    vols, t_fin = numpy_finish(*acc, job["box"])
    ref = package_finish_volume(*acc, job["box"])
    diff = float(np.abs(vols[2] - ref).max() / np.abs(ref).max())
    return {"n": n_sub, "insert_per_s": n_sub / t_ins, "finish_s": t_fin, "finish_max_rel_diff": diff,
            "insert_max_rel_diff": ins_diff}


# ---------------------------------------------------------------------- driver
def _mb(b: float) -> str:
    return f"{b / 2 ** 20:.0f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="boxes 64 and 96, few particles (< 1 min)")
    ap.add_argument("--boxes", type=int, nargs="+")
    ap.add_argument("--n", type=int, nargs="+", help="particles per box (one value, or one per box)")
    ap.add_argument("--n-numpy", type=int, nargs="+", help="particles for the numpy baseline (per box)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3], help="mpiexec -n values (1: no launcher)")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        _worker(json.loads(a.worker[0]), json.loads(a.worker[1]))
        return 0
    boxes = a.boxes or ([64, 96] if a.small else [128, 256])
    n = a.n or ([120] if a.small else [400, 300])
    n_np = a.n_numpy or ([6] if a.small else [12, 6])
    n = n * len(boxes) if len(n) == 1 else n
    n_np = n_np * len(boxes) if len(n_np) == 1 else n_np
    from cistem_mpi.kernels import fft

    fft.use_pyfftw(True, threads=1)
    print(f"cores: {os.cpu_count()}, load before: {Path('/proc/loadavg').read_text().split()[:3]}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_reconstruct_") as tmp:
        t = time.perf_counter()
        warm = _simulate(Path(tmp), WARMUP_BOX, 24)
        jobs = [_simulate(Path(tmp), b, k) for b, k in zip(boxes, n)]
        print(f"simulated {sum(n)} particles in {time.perf_counter() - t:.1f} s", flush=True)
        for job, k_np in zip(jobs, n_np):
            base = bench_numpy(job, k_np)
            runs = [_run_worker(r, job, warm) for r in a.ranks]
            rows.append((job, base, runs))
            box = job["box"]
            one = next((x for x in runs if x["ranks"] == 1), runs[0])
            print(f"\nbox {box} ({job['pixel_size']:.3f} Å/px, padded {2 * box}), {job['n']} particles; "
                  f"accumulators (2 half sets) {_mb(one['accumulators_bytes'])} MB per rank", flush=True)
            print(f"{'ranks':>5} {'inserters':>9} {'part/s':>8} {'vs numpy':>8} {'insert s':>8} {'finish s':>8} "
                  f"{'(redscat':>8} {'wiener':>7} {'gather':>7} {'3 iFFT':>7} {'fsc+shp)':>8} {'total s':>8}  "
                  f"peak RSS MB per rank (after warm-up)")
            for x in runs:
                ips = x["n"] / x["insert_s"]
                rss = ", ".join(f"{_mb(q['peak'])} ({_mb(q['before'])})" for q in x["rss"])
                print(f"{x['ranks']:5d} {max(1, x['ranks'] - 1):9d} {ips:8.1f} {ips / base['insert_per_s']:8.1f} "
                      f"{x['insert_s']:8.2f} {x['finishing_s']:8.2f} {x['reduce_scatter_s']:8.2f} "
                      f"{x['normalise_s']:7.2f} {x['gather_s']:7.2f} {x['ift_s']:7.2f} "
                      f"{x['finish_s'] - x['ift_s']:8.2f} {x['total_s']:8.2f}  {rss}", flush=True)
            pk_norm_ift = one["reduce_scatter_s"] + one["normalise_s"] + one["gather_s"] + one["ift_s"]
            print(f"numpy baseline (1 process, {base['n']} particles): {base['insert_per_s']:.2f} particles/s "
                  f"inserted; Wiener normalisation + 3 np.fft.irfftn {base['finish_s']:.2f} s vs package "
                  f"(1 rank, without FSC/sharpening) {pk_norm_ift:.2f} s = ratio {base['finish_s'] / pk_norm_ift:.1f}; "
                  f"numpy vs package max rel. diff: accumulators {base['insert_max_rel_diff']:.1e}, "
                  f"map {base['finish_max_rel_diff']:.1e}", flush=True)
    print(f"\nload after: {Path('/proc/loadavg').read_text().split()[:3]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

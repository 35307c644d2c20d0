"""Benchmark of ``ab-initio``: wall time and memory per rank, per-round split, and an extrapolation.

1. The job itself (CLI, 1 and 2 ranks) on simulated particles at a size that
   runs in a few minutes: per round the global search, reconstruction and
   bookkeeping seconds, peak RSS of every rank.
2. The global search per particle at box 96 at the schedule's resolutions,
   ours (grid projections made once per round, coarse-to-fine grid) against a
   plain-numpy implementation of the same step (every orientation projected
   per particle and scored at the full band with numpy FFTs), in the same run.
3. An extrapolation to the issue's 10,000 particles at box 96 with cisTEM's
   defaults (2 starts x 40 rounds, every particle searched every round since
   5 x the percentage used reaches 100 %), from the measured per-particle and
   per-reconstruction costs.  This is an estimate, not a measurement.

Run: ``.venv/bin/python benchmarks/bench_ab_initio.py [--particles 300] [--box 48] [--rounds 6]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _job(root: Path, ranks: int, args: list[str]) -> dict:
    cli = [sys.executable, "-m", "cistem_mpi"]
    cmd = cli + ["ab-initio", "-p", str(root)] + args
    if ranks > 1:
        mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
        if mpiexec is None:
            return {}
        cmd = [mpiexec, "-n", str(ranks)] + cmd
    t = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - t
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    from cistem_mpi.db.project import Project

    with Project.open(root, readonly=True) as p:
        res = json.loads(p.conn.execute("SELECT result FROM jobs WHERE type='ab_initio' ORDER BY id DESC").fetchone()[0])
    res["wall"] = wall
    return res


def _search_costs(box: int, pixel_size: float, resolutions: list[float], n_particles: int = 3) -> dict:
    """Seconds per particle of our search and of the plain-numpy one at each resolution (box ``box``)."""
    from cistem_mpi.drivers.simulate import builtin_map
    from cistem_mpi.kernels import ab_initio as ai
    from cistem_mpi.kernels import alignment as al
    from cistem_mpi.kernels.euler import rotation_matrix
    from cistem_mpi.kernels.projection import extract_slices_numpy, prepare_volume_ft

    vol = builtin_map(box, pixel_size)
    vft = prepare_volume_ft(vol)
    rng = np.random.default_rng(0)
    out = {}
    for res in resolutions:
        band = al.make_band(box, pixel_size, res)
        step = ai.angular_step(res)
        grid = al.orientation_grid(step)
        t0 = time.perf_counter()
        proj = ai.grid_projections(vft, grid, band)
        coarse = ai.coarse_grid(vft, grid, step, band, pixel_size, res)
        prep = time.perf_counter() - t0
        ctf = np.ones((band.m, band.m // 2 + 1), np.float32)
        xs = [proj[j] + 0.5 * (rng.normal(size=proj[j].shape) + 1j * rng.normal(size=proj[j].shape)).astype(np.complex64)
              for j in rng.choice(len(grid), n_particles)]
        t0 = time.perf_counter()
        for x in xs:
            ai.search_grid(x, ctf, proj, band, 0.1 * box, coarse=coarse)
        ours = (time.perf_counter() - t0) / n_particles
        t0 = time.perf_counter()
        for x in xs:
            ai.search_grid(x, ctf, proj, band, 0.1 * box)
        exhaustive = (time.perf_counter() - t0) / n_particles
        # plain numpy: every orientation projected for the particle (numpy slice extraction) and scored
        t0 = time.perf_counter()
        x = xs[0]
        best = -np.inf
        for s in range(0, len(grid), 512):
            g = grid[s:s + 512]
            rot = rotation_matrix(g[:, 0], g[:, 1], g[:, 2]).reshape(-1, 3, 3)
            models = al.crop_ft(extract_slices_numpy(vft, rot, max_radius=band.m // 2), band.m) * ctf
            score, _, _ = al.shift_search(x, models, band, 0.1 * box)
            best = max(best, float(score.max()))
        plain = time.perf_counter() - t0
        out[res] = {"orientations": len(grid), "band_box": band.m, "ours_s": ours, "plain_numpy_s": plain,
                    "exhaustive_s": exhaustive,
                    "per_round_setup_s": prep}
    return out


def _reconstruction_cost(box: int, pixel_size: float, n: int = 200) -> float:
    """Seconds of one single-rank reconstruction of ``n`` particles at ``box`` (simulated)."""
    from cistem_mpi.drivers.reconstruct import ReconstructionSettings, reconstruct_particles
    from cistem_mpi.drivers.runtime import get_world
    from cistem_mpi.drivers.simulate import simulate_particles

    with tempfile.TemporaryDirectory() as d:
        sim = simulate_particles(d, n_particles=n, box=box, pixel_size=pixel_size, snr=0.1, seed=2)
        t0 = time.perf_counter()
        reconstruct_particles(get_world(), str(sim.stack), sim.particles, ReconstructionSettings(bfactor=0.0))
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--particles", type=int, default=200)
    ap.add_argument("--box", type=int, default=40)
    ap.add_argument("--pixel-size", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--end-resolution", type=float, default=8.0,
                    help="the job's last round's resolution limit (Å; the schedule ramps to it from 20 Å)")
    ap.add_argument("--no-job", action="store_true", help="only the per-particle costs and the extrapolation")
    a = ap.parse_args()
    from cistem_mpi.db.project import Project
    from cistem_mpi.drivers.simulate import simulate_particles
    from cistem_mpi.kernels import ab_initio as ai

    if not a.no_job:
        with tempfile.TemporaryDirectory() as d:
            base = Path(d)
            sim = simulate_particles(base / "data", n_particles=a.particles, box=a.box, pixel_size=a.pixel_size,
                                     snr=0.1, seed=1)
            root = base / "proj"
            Project.create(root).close()
            r = subprocess.run([sys.executable, "-m", "cistem_mpi", "import", "particles", "-p", str(root),
                                str(sim.stack), "--params", str(sim.par), "--pixel-size", str(a.pixel_size)],
                               capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            for ranks in (1, 2):
                proj = base / f"p{ranks}"
                shutil.copytree(root, proj)
                res = _job(proj, ranks, ["--rounds", str(a.rounds), "--starts", "1", "--end-resolution", str(a.end_resolution)])
                if not res:
                    print(f"{ranks} ranks: mpiexec not found")
                    continue
                sec = res["seconds"]
                print(f"\n== job: {a.particles} particles, box {a.box}, {a.rounds} rounds x 1 start, {ranks} rank(s)")
                print(f"wall {res['wall']:.1f} s (incl. start-up and registration); search {sec['search']:.1f} s, "
                      f"reconstruction {sec['reconstruction']:.1f} s, bookkeeping {sec['bookkeeping']:.1f} s")
                print(f"peak RSS per rank (MB): {res['peak_rss_mb_per_rank']}")
                print("round  limit(Å)  searched  search(s)  recon(s)  bookkeeping(s)")
                for x in res["rounds"]:
                    s = x["seconds"]
                    print(f"{x['round']:5d}  {x['resolution_limit']:8.2f}  {x['searched']:8d}  {s['search']:9.2f}  "
                          f"{s['reconstruction']:8.2f}  {s['bookkeeping']:14.2f}")
                print(f"throughput: {sum(x['searched'] for x in res['rounds']) / sec['search']:.1f} particle "
                      "searches/s")
    # per-particle costs at box 96 (2 Å/px: a 192 Å box) and the extrapolation
    box, ps = 96, 2.0
    schedule = [ai.high_resolution_limit(r, 40) for r in range(40)]
    probe = [20.0, 14.0, 10.0, 8.0]
    costs = _search_costs(box, ps, probe)
    print(f"\n== global search per particle at box {box} ({ps} Å/px), one rank")
    print("limit(Å)  orientations  band  ours(s)  exhaustive(s)  plain-numpy(s)  ratio  per-round setup(s)")
    for res, c in costs.items():
        print(f"{res:8.1f}  {c['orientations']:12d}  {c['band_box']:4d}  {c['ours_s']:7.3f}  {c['exhaustive_s']:13.3f}  "
              f"{c['plain_numpy_s']:14.3f}  {c['plain_numpy_s'] / c['ours_s']:5.0f}  {c['per_round_setup_s']:8.2f}")
    print("(exhaustive: every orientation at the full band from the cached projections; plain numpy: every "
          "orientation projected for the particle with numpy and scored with numpy FFTs)")
    per = np.interp(schedule, probe[::-1], [costs[r]["ours_s"] for r in probe[::-1]])
    setup = np.interp(schedule, probe[::-1], [costs[r]["per_round_setup_s"] for r in probe[::-1]])
    rec100, rec300 = _reconstruction_cost(box, ps, 100), _reconstruction_cost(box, ps, 300)
    per_particle = max((rec300 - rec100) / 200, 1e-4)
    fixed = max(rec100 - 100 * per_particle, 0.0)
    n = 10_000
    # every particle is reconstructed every round (5 x percent >= 100 for 10,000 particles)
    # cisTEM's schedule for 10,000 particles: 25 % -> 100 % used, 5 x that searched: every particle every round
    print(f"\n== extrapolation (estimate) for {n} particles at box {box}, cisTEM defaults (2 x 40 rounds):")
    for ranks in (1, 2, 3, 9):
        # the dynamic queue's rank 0 only hands out work: ranks - 1 workers search and insert (1 with 1 rank)
        workers = max(1, ranks - 1)
        s_r = 2 * float(np.sum(per * n / workers + setup))
        r_r = 2 * 40 * (fixed + per_particle * n / workers)
        print(f"{ranks} rank(s): global search ~{s_r / 3600:.1f} h, reconstruction ~{r_r / 3600:.2f} h, "
              f"total ~{(s_r + r_r) / 3600:.1f} h")
    print(f"(reconstruction at box {box}: {fixed:.1f} s fixed + {per_particle * 1000:.1f} ms per particle; peak RSS of this process "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; grid projections at 8 Å: "
          f"{costs[8.0]['orientations'] * costs[8.0]['band_box'] * (costs[8.0]['band_box'] // 2 + 1) * 8 / 1e6:.0f} MB "
          f"per class and rank)")


if __name__ == "__main__":
    main()

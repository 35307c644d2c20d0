"""Local refinement against cisTEM's refine3d on the same particles, one core each, in one run.

    CISTEM_BIN=/path/to/cisTEM/build/src [LD_LIBRARY_PATH=...] \\
        .venv/bin/python benchmarks/bench_refine_vs_cistem.py [--n 1000] [--small 100] [--paddings 1 2]

Issue #16's setup: ``cistem-mpi simulate particles --box 128 --pixel-size 1.5
--snr 0.1 --seed 3 -n N``; the reference is the true map, the band 300-8 Å,
the mask 90 Å, local refinement of the three angles and both shifts, no
defocus refinement, no global search.  Both programs start from the same
cisTEM ``.star``: the true parameters with every angle moved by N(0, 3°) and
both shifts by U(-2, 2) Å (so a refinement has something to do; the seed is
fixed).  Both read the simulator's stack and the true map unchanged.

* ours: ``align_round`` (what ``cistem-mpi manual-refine`` runs per round)
  on one rank in a fresh process (``--worker``), reference padding 2 (the
  refine driver's);
* cisTEM: ``refine3d`` under ``CISTEM_BIN``, answers on stdin (question order
  of src/programs/refine3d/refine3d.cpp), default statistics from a 1000 kDa
  mass, normalised particles and input map, at each ``--paddings`` value
  (its "padding factor" pads the reference it projects).

Each program runs on all N particles and on the first ``--small`` (both the
least CPU of ``--repeats``); the difference gives the rate per particle
without the fixed costs (start-up, reading, the reference's preparation),
the whole-process rate is printed too.  Accuracy: the median angular error
(geodesic, degrees) and shift error (Å) of each program's output against
the truth, and of the start.  Measured like the other peer benchmarks
(:func:`peers.run_command`: the child's user + system CPU, ``VmHWM``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from peers import PeerRun, find_peer, peer_status, run_command, run_peer  # noqa: E402

CLI = Path(sys.executable).parent / "cistem-mpi"
HIGH, LOW, MASK = 8.0, 300.0, 90.0  # Å: the band and the mask radius of the run
MASS_KDA = 1000.0


def simulate(out: Path, n: int) -> dict:
    """The issue's particles (CLI, files used unchanged) and the perturbed start as a cisTEM .star."""
    from cistem_mpi.io.star import read_star, write_cistem_star

    run = run_command([CLI, "simulate", "particles", "--out", out, "--box", 128, "--pixel-size", 1.5,
                       "--snr", 0.1, "--seed", 3, "-n", n], out.parent, label="simulate")
    if run.returncode != 0:
        raise RuntimeError(f"simulate failed:\n{run.output[-2000:]}")
    files = {k: out / v for k, v in json.loads((out / "particles_truth.json").read_text())["files"].items()}
    truth = read_star(files["cistem_star"])
    start = truth.params.copy()
    rng = np.random.default_rng(16)
    for name in ("phi", "theta", "psi"):
        start[name] = start[name] + rng.normal(0.0, 3.0, n)
    for name in ("shx", "shy"):
        start[name] = start[name] + rng.uniform(-2.0, 2.0, n)
    truth.params = start
    write_cistem_star(out / "start.star", truth, stack=files["stack"])
    return {"dir": out, "n": n, "box": 128, "pixel_size": 1.5, "start_star": out / "start.star", **files}


# ---------------------------------------------------------------------- ours, in a fresh process
def _worker(stack: str, star: str, ref: str, limit: int, out: str) -> None:
    """Refine (1 rank, no launcher) and save the refined parameters; prints the CPU spent before the call."""
    from cistem_mpi.drivers.refine_rounds import align_round
    from cistem_mpi.drivers.runtime import get_world, guarded
    from cistem_mpi.io.mrc import read_mrc
    from cistem_mpi.io.star import read_star
    from cistem_mpi.kernels import fft
    from cistem_mpi.kernels.refinement import AlignSettings

    fft.use_pyfftw(True, threads=1)
    parts = read_star(star)
    o = parts.optics[0]
    params = parts.params[:limit] if limit else parts.params
    ps = float(o.pixel_size)
    volume = read_mrc(ref, pixel_size=ps)[0].astype(np.float32)
    box = volume.shape[0]
    startup = time.process_time()
    # the refine driver's local round (drivers/refine.py): mask, 3° steps, shifts up to 0.1 box
    plan = {"stack": stack, "box": box, "pixel_size": ps, "optics": (o.voltage, o.cs, o.amplitude_contrast),
            "params": params, "class_params": [params],
            "align": AlignSettings(mask_radius=MASK / ps, global_search=False, angle_step=3.0, max_shift=0.1 * box),
            "high_resolution": HIGH, "low_resolution": LOW, "global_resolution": HIGH, "kind": "local"}
    world = get_world()
    with guarded(world):
        result = align_round(world, plan, [volume])
    assert result is not None
    np.save(out, result[0][0])
    print("RESULT " + json.dumps({"startup_cpu_s": startup, "call_cpu_s": time.process_time() - startup}),
          flush=True)


def run_ours(sim: dict, wd: Path, limit: int = 0) -> tuple[PeerRun, np.ndarray]:
    out = wd / f"ours_{limit or sim['n']}.npy"
    run = run_command([sys.executable, Path(__file__).resolve(), "--worker", sim["stack"], sim["start_star"],
                       sim["map"], limit, out], wd, label=f"ours_{limit or sim['n']}", timeout=3600)
    if run.returncode != 0 or not out.is_file():
        raise RuntimeError(f"ours failed (rc {run.returncode}):\n{run.output[-3000:]}")
    return run, np.load(out)


# ---------------------------------------------------------------------- cisTEM
def refine3d_answers(sim: dict, wd: Path, padding: float, limit: int, out_star: Path) -> list:
    """Answers to refine3d's questions, in the order of refine3d.cpp (local refinement only)."""
    return [sim["stack"], sim["start_star"], sim["map"], wd / "no_statistics.txt", "no",
            wd / "matching_projections.mrc", out_star, wd / "changes.star", "C1", 1, limit, 1.0,
            sim["pixel_size"], MASS_KDA, 0.0, MASK, LOW, HIGH, 0.0, 0.0, MASK, 20.0, 0.0, 20, 0.0, 0.0,
            100.0, 100.0, 100.0, 100.0, 500.0, 50.0, padding,
            "no", "yes",  # global search, local refinement
            "yes", "yes", "yes", "yes", "yes",  # psi, theta, phi, x, y
            "no", "no", "no",  # matching projections, 2D masking, defocus
            "yes", "no", "no", "yes", "no",  # normalise particles, invert, blank edges, normalise 3D, threshold
            1]  # threads (OpenMP builds only)


def run_cistem(sim: dict, wd: Path, padding: float, limit: int = 0) -> tuple[PeerRun, np.ndarray]:
    from cistem_mpi.io.star import read_star

    out_star = wd / f"cistem_pad{padding:g}_{limit or sim['n']}.star"
    run = run_peer("refine3d", refine3d_answers(sim, wd, padding, limit, out_star), wd, timeout=3600)
    if run.returncode != 0 or not out_star.is_file():
        raise RuntimeError(f"refine3d failed (rc {run.returncode}):\n{run.output[-3000:]}")
    return run, read_star(out_star, pixel_size=sim["pixel_size"]).params


# ---------------------------------------------------------------------- accuracy
def errors(params: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Median angular (degrees) and shift (Å) error against the truth, matched by stack position."""
    from cistem_mpi.kernels.euler import angular_distance, rotation_matrix

    t = truth[np.searchsorted(truth["position"], params["position"])]
    ang = angular_distance(rotation_matrix(params["phi"], params["theta"], params["psi"]),
                           rotation_matrix(t["phi"], t["theta"], t["psi"]))
    sh = np.hypot(params["shx"] - t["shx"], params["shy"] - t["shy"])
    return float(np.median(ang)), float(np.median(sh))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="particles (default 1000)")
    ap.add_argument("--small", type=int, default=100, help="the small run's particles (fixed costs)")
    ap.add_argument("--paddings", type=float, nargs="+", default=[1.0, 2.0], help="cisTEM's padding factors")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each (the least CPU kept)")
    ap.add_argument("--keep", help="keep the simulation and the outputs in this directory")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        _worker(a.worker[0], a.worker[1], a.worker[2], int(a.worker[3]), a.worker[4])
        return 0
    from cistem_mpi.io.star import read_star

    print(f"cores: {os.cpu_count()}, load before: {Path('/proc/loadavg').read_text().split()[:3]}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_refine_vs_cistem_") as tmp:
        wd = Path(a.keep).resolve() if a.keep else Path(tmp)
        wd.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        sim = simulate(wd / f"sim_n{a.n}", a.n)
        print(f"simulated {a.n} particles in {time.perf_counter() - t:.1f} s", flush=True)
        truth = read_star(sim["cistem_star"]).params
        start_err = errors(read_star(sim["start_star"]).params, truth)
        programs = [("ours", "2", lambda lim: run_ours(sim, wd, lim))]
        if find_peer("refine3d"):
            print(f"cisTEM: {peer_status('refine3d')}", flush=True)
            programs += [("cisTEM", f"{p:g}", (lambda p: lambda lim: run_cistem(sim, wd, p, lim))(p))
                         for p in a.paddings]
        else:
            print(f"cisTEM: not available{peer_status('refine3d').split('not available', 1)[1]}", flush=True)
        run_ours(sim, wd, 16)  # numba's caches and the page cache: warm, untimed
        rows = []
        for name, pad, fn in programs:
            few = min((fn(a.small)[0] for _ in range(a.repeats)), key=lambda r: r.cpu_s)
            runs = [fn(0) for _ in range(a.repeats)]
            run, params = min(runs, key=lambda o: o[0].cpu_s)
            rows.append((name, pad, run, few, errors(params, truth)))
            print(f"  {name} padding {pad}: " + ", ".join(f"{o[0].cpu_s:.1f}" for o in runs)
                  + f" s CPU ({a.small} particles: {few.cpu_s:.1f} s), peak {run.peak_mb:.0f} MB", flush=True)
    n, k = a.n, a.small
    print(f"\nbox 128, 1.5 Å/px, {n} particles, local refinement {LOW:g}-{HIGH:g} Å, mask {MASK:g} Å, one core each; "
          f"start: median error {start_err[0]:.2f}° / {start_err[1]:.2f} Å")
    print(f"{'program':8} {'pad':>3} {'CPU s':>7} {'part/CPU s':>10} {'fixed s':>8} {'marginal p/s':>12} "
          f"{'ratio':>6} {'peak MB':>8} {'ang err °':>9} {'shift err Å':>11}")
    ours_marg = None
    for name, pad, run, few, (ea, es) in rows:
        marg = (n - k) / max(run.cpu_s - few.cpu_s, 1e-9)
        fixed = run.cpu_s - n / marg
        if name == "ours":
            ours_marg = marg
        ratio = (ours_marg or marg) / marg
        print(f"{name:8} {pad:>3} {run.cpu_s:7.1f} {n / run.cpu_s:10.1f} {fixed:8.1f} {marg:12.1f} {ratio:6.2f} "
              f"{run.peak_mb:8.0f} {ea:9.2f} {es:11.2f}")
    print("ratio: ours' marginal particles/CPU s over the program's")
    print(f"\nload after: {Path('/proc/loadavg').read_text().split()[:3]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

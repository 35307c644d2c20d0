"""Reconstruction against the peers (cisTEM reconstruct3d, RELION relion_reconstruct) on the same particles.

    CISTEM_BIN=/path/to/cisTEM/build/src [LD_LIBRARY_PATH=...] RELION_BIN=/path/to/relion/build/bin \\
        .venv/bin/python benchmarks/bench_vs_peers.py [--n 4000] [--box 128] [--paddings 1 2] [--small 400]

The particles come from ``cistem-mpi simulate particles --box B --pixel-size
1.5 --snr 0.1 --seed 3 -n N`` (box 256: 0.75 Å/pixel, the same molecule at
twice the sampling), and every program reads the simulator's files unchanged:

* ours: ``reconstruct_particles`` (what ``cistem-mpi reconstruct`` runs) on
  one rank, in a fresh process (``--worker``) reading the stack and the
  cisTEM ``.star``; the full (Wiener-filtered, unsharpened) map is written;
* cisTEM: ``reconstruct3d`` under ``CISTEM_BIN``, answers on stdin, reading
  the same cisTEM ``.star``; its "filtered reconstruction" is the full map.
  It always reconstructs in the unpadded box (its "padding factor" pads only
  the reference of likelihood blurring), so it runs at padding 1 only;
* RELION: ``relion_reconstruct --ctf --pad P`` under ``RELION_BIN``, reading
  the simulator's RELION 3.1 ``.star`` (our ``write_relion_star``: origins
  ``rlnOriginXAngst = -SHX``, angles unchanged).

One thread / one rank each, every program at every ``--paddings`` value, all
measured alike by :func:`peers.run_command` (the child's user + system CPU
time, its ``VmHWM`` peak memory and its largest anonymous memory ``RssAnon``:
ours reads the stack through a memory map, whose pages ``VmHWM`` counts),
whole processes: for ours that includes the interpreter, imports and numba's
cache loading, printed separately.  Ratios are ours / the peer's.

Per particle beyond the fixed costs (``--small K``, default 400): every
program and padding also runs on the stack's first K particles, and
``(N - K) / (CPU(N) - CPU(K))`` is its throughput without what does not grow
with the particle count -- start-up, reading the inputs, the Wiener
iterations and the volume-sized finishing.  That is the rate a large data set
sees; the same measure for every program.  (Ours and cisTEM's noise spectrum
samples up to 2,000 particles, K of them in the small run: the extra samples
count against the per-particle rate.)
Without ``CISTEM_BIN`` / ``RELION_BIN`` the peer is reported "not available"
and ours is measured alone.

Quality: the FSC of each full map against the true map, both multiplied by
the same soft sphere (radius 0.4 box, 6 px cosine edge), nothing aligned or
flipped -- all three programs share the conventions, so a mirrored, shifted
or inverted peer map shows up as a low or negative FSC (and is reported as
such, with the FSC of the negated map when the correlation is negative, since
the stack is protein dark -- cisTEM's convention -- while RELION expects
protein white).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # RELION is built with OpenMP: one thread, like the others

import numpy as np

from peers import (
    PeerRun,
    find_peer,
    find_relion,
    peer_status,
    relion_status,
    run_command,
    run_peer,
)

CLI = Path(sys.executable).parent / "cistem-mpi"
SHELLS = (0.1, 0.2, 0.3, 0.4, 0.47)  # cycles/pixel at which the FSC against the truth is printed
MASK_RADIUS, MASK_EDGE = 0.4, 6.0  # soft sphere: radius in boxes, cosine edge in pixels
WARMUP_PARTICLES = 32


@dataclass
class Result:
    """One program at one padding: its measured run and the FSC of its map against the truth."""

    program: str
    padding: float
    run: PeerRun
    fsc: np.ndarray
    negated: bool = False  # True when the map anti-correlates with the truth (fsc is then of -map)
    startup: dict | None = None  # ours: CPU s and peak MB before the reconstruction starts
    small: PeerRun | None = None  # the same program on the first ``small`` particles (fixed costs)
    small_n: int = 0

    def marginal(self, n: int) -> float:
        """Particles per CPU second beyond the fixed costs: ``(n - small) / (CPU(n) - CPU(small))``."""
        if self.small is None or self.run.cpu_s <= self.small.cpu_s:
            return float("nan")
        return (n - self.small_n) / (self.run.cpu_s - self.small.cpu_s)


def simulate(out: Path, n: int, box: int) -> dict:
    """Run the simulator CLI (its outputs are used unchanged); returns the file names and geometry."""
    ps = 1.5 * 128 / box
    run = run_command([CLI, "simulate", "particles", "--out", out, "--box", box, "--pixel-size", ps,
                       "--snr", 0.1, "--seed", 3, "-n", n], out.parent, label="simulate")
    if run.returncode != 0:
        raise RuntimeError(f"simulate failed:\n{run.output[-2000:]}")
    files = json.loads((out / "particles_truth.json").read_text())["files"]
    return {"dir": out, "n": n, "box": box, "pixel_size": ps, **{k: out / v for k, v in files.items()}}


def outer_mask_radius(sim: dict) -> float:
    """Å: the mask radius for the half-map FSC (and so the Wiener filter), the same for ours and cisTEM."""
    return 0.45 * sim["box"] * sim["pixel_size"]


# ---------------------------------------------------------------------- ours, in a fresh process
def _worker(stack: str, star: str, padding: float, out: str, limit: int, mask_radius: float) -> None:
    """Reconstruct (1 rank, no launcher) and write the full map; prints the CPU spent before the call."""
    from cistem_mpi.drivers import volumejob as rc
    from cistem_mpi.drivers.runtime import get_world, guarded
    from cistem_mpi.io.mrc import write_mrc
    from cistem_mpi.io.star import read_star
    from cistem_mpi.kernels import fft

    from bench_reconstruct import _rss_bytes

    fft.use_pyfftw(True, threads=1)
    parts = read_star(star)
    if limit:
        parts = parts.take(np.arange(min(limit, len(parts))))
    world = get_world()
    startup = time.process_time()  # interpreter + imports: not the reconstruction's, printed apart
    startup_mb = _rss_bytes() / 2 ** 20  # VmHWM so far (ru_maxrss would carry the parent's over exec)
    with guarded(world):
        settings = rc.ReconstructionSettings(padding=padding, mask_radius=mask_radius)
        r = rc.reconstruct_particles(world, stack, parts, settings)
    assert r is not None
    write_mrc(out, r.volume.astype(np.float32), float(parts.optics[0].pixel_size))
    print("RESULT " + json.dumps({"startup_cpu_s": startup, "startup_mb": startup_mb,
                                  "call_cpu_s": time.process_time() - startup}), flush=True)


def run_ours(sim: dict, padding: float, wd: Path, limit: int = 0) -> tuple[PeerRun, Path, dict]:
    """Run :func:`_worker` in a fresh process (its first ``limit`` particles; 0: all).

    Returns
    -------
    (PeerRun, Path, dict)
        The measured run, the map, and the worker's CPU s / peak MB before the reconstruction.
    """
    out = wd / f"ours_pad{padding:g}.mrc"
    run = run_command([sys.executable, Path(__file__).resolve(), "--worker", sim["stack"], sim["cistem_star"],
                       padding, out, limit, outer_mask_radius(sim)], wd, label=f"ours_pad{padding:g}", timeout=3600)
    line = next((x for x in run.output.splitlines() if x.startswith("RESULT ")), None)
    if run.returncode != 0 or line is None:
        raise RuntimeError(f"ours failed (rc {run.returncode}):\n{run.output[-3000:]}")
    return run, out, json.loads(line[7:])


# ---------------------------------------------------------------------- the peers
def reconstruct3d_answers(sim: dict, wd: Path, padding: float, limit: int = 0) -> list:
    """Answers to cisTEM's reconstruct3d (src/programs/reconstruct3d/reconstruct3d.cpp, question order).

    Molecular mass 1000 kDa (the default; it scales the particle SSNR of the
    Wiener filter), the outer mask radius ours gets as ``mask_radius``, no
    particle weighting (0 Å², as ours: score_weighting 0), no score adjustment, no contrast inversion (the stack is protein dark, cisTEM's
    convention), even/odd half sets, no likelihood blurring or dumps; the
    last answer (threads) is only read by OpenMP builds.  ``limit``: the last particle (0: all).
    """
    files = [sim["stack"], sim["cistem_star"], wd / "none.mrc", wd / "cistem_half1.mrc", wd / "cistem_half2.mrc",
             wd / f"cistem_pad{padding:g}.mrc", wd / "cistem_statistics.txt"]
    # symmetry, first/last particle, pixel, mass, inner/outer mask, rec./ref. limits, weighting, threshold,
    # smoothing, padding; normalise, adjust scores, invert, blank edges, crop, even/odd, centre, blurring,
    # threshold input, dump; dump files; threads
    return files + ["C1", 1, limit, sim["pixel_size"], 1000.0, 0.0, outer_mask_radius(sim), 0.0, 0.0, 0.0, 1.0, 1.0,
                    padding, "yes", "no", "no", "no", "no", "yes", "no", "no", "no", "no",
                    wd / "dump1.dat", wd / "dump2.dat", 1]


def run_cistem(sim: dict, padding: float, wd: Path, limit: int = 0) -> tuple[PeerRun, Path]:
    """Run cisTEM's reconstruct3d on the simulator's cisTEM .star (its first ``limit`` particles); (run, full map)."""
    run = run_peer("reconstruct3d", reconstruct3d_answers(sim, wd, padding, limit), wd, timeout=3600)
    out = wd / f"cistem_pad{padding:g}.mrc"
    if run.returncode != 0 or not out.is_file():
        raise RuntimeError(f"reconstruct3d failed (rc {run.returncode}):\n{run.output[-3000:]}")
    return run, out


def first_particles_star(src: Path, dst: Path, limit: int) -> Path:
    """A copy of a RELION .star whose particles block keeps only its first ``limit`` rows."""
    out, block, in_loop, rows = [], "", False, 0
    for line in src.read_text().splitlines():
        t = line.strip()
        if t.startswith("data_"):
            block, in_loop = t, False
        elif t.startswith("loop_"):
            in_loop = True
        elif in_loop and block == "data_particles" and t and not t.startswith("_") and not t.startswith("#"):
            rows += 1
            if rows > limit:
                continue
        out.append(line)
    dst.write_text("\n".join(out) + "\n")
    return dst


def run_relion(sim: dict, padding: float, wd: Path, limit: int = 0) -> tuple[PeerRun, Path]:
    """Run relion_reconstruct with CTF correction on the simulator's RELION .star; (run, map)."""
    # relion_reconstruct resolves the .star's relative image names against its working directory:
    # run it in the simulator's directory, output into ours
    out = wd / f"relion_pad{padding:g}.mrc"
    star = sim["relion_star"]
    if limit:
        star = first_particles_star(star, Path(sim["dir"]) / f"first_{limit}_relion.star", limit)
    argv = [find_relion("relion_reconstruct"), "--i", star, "--o", out, "--ctf", "--pad", padding,
            "--angpix", sim["pixel_size"]]
    run = run_command(argv, sim["dir"], label=f"relion_pad{padding:g}", timeout=3600)
    if run.returncode != 0 or not out.is_file():
        raise RuntimeError(f"relion_reconstruct failed (rc {run.returncode}):\n{run.output[-3000:]}")
    return run, out


# ---------------------------------------------------------------------- quality
def fsc_vs_truth(path: Path, truth: np.ndarray, mask: np.ndarray, pixel_size: float) -> tuple[np.ndarray, bool]:
    """Masked FSC of a map against the truth; (curve, negated) -- negated maps are reported, not hidden."""
    from cistem_mpi.io.mrc import read_mrc
    from cistem_mpi.kernels.fsc import fsc

    vol = read_mrc(path, pixel_size=pixel_size)[0].astype(np.float32)
    if vol.shape != truth.shape:
        raise ValueError(f"{path}: shape {vol.shape}, truth {truth.shape}")
    _, curve = fsc(vol, truth, mask)
    # the low shells decide the sign: an inverted map (contrast convention) has FSC near -1 there
    negated = bool(np.mean(curve[1:6]) < 0)
    if negated:
        _, curve = fsc(-vol, truth, mask)
    return curve, negated


def at(curve: np.ndarray, f: float) -> float:
    """The FSC at the shell nearest ``f`` cycles/pixel."""
    n = 2 * (len(curve) - 1)
    return float(curve[min(len(curve) - 1, round(f * n))])


def res_at(curve: np.ndarray, ps: float, threshold: float = 0.5) -> float:
    """Å where the FSC against the truth first drops below ``threshold``."""
    from cistem_mpi.kernels.fsc import resolution_at
    from cistem_mpi.kernels.radial import shell_frequencies

    return resolution_at(shell_frequencies(2 * (len(curve) - 1)), curve, threshold, ps)


# ---------------------------------------------------------------------- driver
def bench(sim: dict, paddings: list[float], wd: Path, repeats: int = 1, small: int = 0) -> list[Result]:
    """Run every available program at every padding (``repeats`` times, the least CPU kept) and score its map.

    With ``small``, each program and padding also runs on the first ``small`` particles (as often, least CPU
    kept, before the full runs so the full map is the one scored): the difference is its cost per particle
    without the fixed costs (start-up, reading, the volume-sized finishing), the same measure for all.
    """
    from cistem_mpi.io.mrc import read_mrc
    from cistem_mpi.kernels.masks import sphere_mask

    box, ps = sim["box"], sim["pixel_size"]
    truth = read_mrc(sim["map"], pixel_size=ps)[0].astype(np.float32)
    mask = sphere_mask(box, MASK_RADIUS * box, MASK_EDGE)
    programs = [("ours", run_ours)]
    for name, ok, status, fn in (("cisTEM", find_peer("reconstruct3d"), peer_status("reconstruct3d"), run_cistem),
                                 ("RELION", find_relion("relion_reconstruct"), relion_status("relion_reconstruct"),
                                  run_relion)):
        # status: "... not available (why)" -> "cisTEM: not available (why)"
        print(f"{name}: {status}" if ok else f"{name}: not available{status.split('not available', 1)[1]}",
              flush=True)
        if ok:
            programs.append((name, fn))
    # numba's on-disk caches and the page cache of the stack: warm, untimed, so no program pays for them
    run_ours(sim, paddings[0], wd, limit=WARMUP_PARTICLES)
    results = []
    for padding in paddings:
        for name, fn in programs:
            if name == "cisTEM" and padding != 1.0:
                # reconstruct3d always reconstructs in the unpadded box: its "padding factor" only pads the
                # input reference of likelihood blurring, and without one it crashes (reconstruct3d.cpp
                # allocates from the absent input map), so there is no padded cisTEM reconstruction
                print(f"  cisTEM padding {padding:g}: skipped (reconstruct3d has no reconstruction padding)")
                continue
            few = None
            if small:
                few = min((fn(sim, padding, wd, limit=small)[0] for _ in range(repeats)), key=lambda r: r.cpu_s)
            # the machine is shared: of several runs the one with the least CPU time is the least disturbed
            runs = [fn(sim, padding, wd) for _ in range(repeats)]
            out = min(runs, key=lambda o: o[0].cpu_s)
            run, path = out[0], out[1]
            curve, neg = fsc_vs_truth(path, truth, mask, ps)
            results.append(Result(name, padding, run, curve, neg, out[2] if len(out) > 2 else None, few, small))
            print(f"  {name} padding {padding:g}: " + ", ".join(f"{o[0].cpu_s:.1f}" for o in runs)
                  + f" s CPU, peak {run.peak_mb:.0f} MB ({run.peak_anon_mb:.0f} MB anonymous)"
                  + (f"; first {small} particles {few.cpu_s:.1f} s CPU" if few is not None else ""), flush=True)
    return results


def report(sim: dict, results: list[Result], repeats: int = 1) -> None:
    """Print the table: throughput, memory, ratios ours / program, FSC against the truth."""
    n, box, ps = sim["n"], sim["box"], sim["pixel_size"]
    print(f"\nbox {box}, {ps:g} Å/px, {n} particles (SNR 0.1, seed 3); one thread/rank each; "
          f"best of {repeats} run(s); FSC vs truth in a soft sphere of radius {MASK_RADIUS * box * ps:.1f} Å")
    shells = " ".join(f"{f'@{f:g}':>6}" for f in SHELLS)
    print(f"{'program':8} {'pad':>3} {'CPU s':>7} {'wall s':>7} {'part/CPU s':>10} {'peak MB':>8} {'anon MB':>8} "
          f"{'thr ratio':>9} {'mem ratio':>9} {'anon ratio':>10}  FSC vs truth at /px {shells}  {'FSC=0.5 Å':>9}")
    for r in results:
        ours = next(x for x in results if x.program == "ours" and x.padding == r.padding)
        thr = (n / ours.run.cpu_s) / (n / r.run.cpu_s)
        mem = ours.run.peak_mb / r.run.peak_mb
        anon = ours.run.peak_anon_mb / max(r.run.peak_anon_mb, 1e-9)
        sign = " (negated)" if r.negated else ""
        print(f"{r.program:8} {r.padding:3g} {r.run.cpu_s:7.1f} {r.run.wall_s:7.1f} {n / r.run.cpu_s:10.1f} "
              f"{r.run.peak_mb:8.0f} {r.run.peak_anon_mb:8.0f} {thr:9.2f} {mem:9.2f} {anon:10.2f}  {'':19} "
              + " ".join(f"{at(r.fsc, f):6.3f}" for f in SHELLS) + f"  {res_at(r.fsc, ps):9.2f}{sign}")
    if any(r.small is not None for r in results):
        k = next(r.small_n for r in results if r.small is not None)
        print(f"\nper particle beyond the fixed costs: (CPU({n}) - CPU({k})) / {n - k} particles")
        print(f"{'program':8} {'pad':>3} {'fixed CPU s':>11} {'ms/particle':>11} {'part/CPU s':>10} {'ratio':>6}")
        for r in results:
            ours = next(x for x in results if x.program == "ours" and x.padding == r.padding)
            m = r.marginal(n)
            fixed = r.run.cpu_s - n / m if m == m else float("nan")
            print(f"{r.program:8} {r.padding:3g} {fixed:11.1f} {1e3 / m:11.3f} {m:10.1f} {ours.marginal(n) / m:6.2f}")
    for r in results:
        if r.startup is not None:
            cpu0, mb0 = r.startup["startup_cpu_s"], r.startup["startup_mb"]
            print(f"ours padding {r.padding:g}: of the {r.run.cpu_s:.1f} CPU s and {r.run.peak_mb:.0f} MB, "
                  f"{cpu0:.1f} s and {mb0:.0f} MB are the interpreter, imports and reading the .star; "
                  f"the reconstruction alone {n / (r.run.cpu_s - cpu0):.1f} particles/CPU s, "
                  f"+{r.run.peak_mb - mb0:.0f} MB")
        if r.negated:
            print(f"{r.program} padding {r.padding:g}: map anti-correlates with the truth (FSC at 0.1/px of the map "
                  f"as written: {-at(r.fsc, 0.1):.3f}); shown negated -- the stack is protein dark, "
                  f"{r.program} expects protein white")


def main() -> int:
    """Simulate, run every program, print the table (``--worker``: the timed process of ours)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4000, help="particles (default 4000)")
    ap.add_argument("--box", type=int, default=128, help="box in pixels: 128 (1.5 Å/px) or 256 (0.75 Å/px)")
    ap.add_argument("--paddings", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--repeats", type=int, default=1, help="runs per program and padding (the least CPU kept)")
    ap.add_argument("--small", type=int, default=400,
                    help="also run every program on this many particles, for the cost per particle beyond the "
                         "fixed costs (0: skip)")
    ap.add_argument("--keep", help="keep the simulation and the maps in this directory")
    ap.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        _worker(a.worker[0], a.worker[1], float(a.worker[2]), a.worker[3], int(a.worker[4]), float(a.worker[5]))
        return 0
    print(f"cores: {os.cpu_count()}, load before: {Path('/proc/loadavg').read_text().split()[:3]}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_vs_peers_") as tmp:
        wd = Path(a.keep).resolve() if a.keep else Path(tmp)
        wd.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        sim = simulate(wd / f"sim_box{a.box}_n{a.n}", a.n, a.box)
        print(f"simulated {a.n} particles (box {a.box}) in {time.perf_counter() - t:.1f} s", flush=True)
        report(sim, bench(sim, a.paddings, wd, a.repeats, a.small), a.repeats)
    print(f"\nload after: {Path('/proc/loadavg').read_text().split()[:3]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

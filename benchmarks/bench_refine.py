"""Throughput of particle alignment (refine3d): local refinement and global search, against numpy.

    .venv/bin/python benchmarks/bench_refine.py [--small] [--boxes 128 256] [--ranks 1 2 3] [--kernels-only]

Issue #16's local-refinement setup (box 128, 300-8 Å): ``--boxes 128 --local-res 6.4``.

For each box (128 and 256 by default; ``--small``: 64 and 96, a quick run)
particles are simulated from the built-in map at ``2.5 * 64 / box`` Å/pixel
(SNR 0.1) into a temporary directory; their parameters are then perturbed
(angles by N(0, 3°) each, shifts by up to +/-2 Å) to give local refinement
something to do.  The reference is the true map (``prepare_volume_ft``).
Settings as the refine driver makes them: mask radius 0.45 box, shifts
searched up to 0.1 box, local band 300 Å .. ``--local-res`` pixels
(default 3 px, i.e. 2/3 of Nyquist, so the band grows with the box), global
search on an ``orientation_grid(--global-step)`` (default 15°) in a band up
to 8 Å (the driver's global resolution) -- the cropped box ``m`` is printed.

1. Kernels, 1 core, in this process:

   * local: ``align_particle`` (Nelder-Mead on angles and shifts) ->
     particles/s (wall and per CPU second), objective evaluations per
     particle (each scores one orientation at one shift,
     ``alignment.evaluation_count``) and the mean and median angular error
     and median shift error before/after against the truth (they must fall);
   * global: ``global_search`` alone (every grid orientation with an FFT
     search over shifts) -> orientations scored/s = grid size x particles /
     time, and how many particles land within 2 grid steps of the truth.

2. Driver: ``align_round`` (the refine driver's round: bcast, reference
   preparation on every rank, ``map_chunks`` over the particles, gather) in
   a fresh process per rank count: 1 rank without a launcher, then
   ``mpiexec -n 2`` (controller + 1 aligning worker) and ``mpiexec -n 3``
   (controller + 2 aligning workers on the 2 cores).  Throughput is taken
   over the task queue (rank 0's progress from 0 to n: MPI overhead included,
   reference preparation not); the total with preparation is printed too.
   "per worker" divides by the aligning ranks.  The driver's global round
   also polishes the 3 best orientations with a local refinement, so its
   orientations/s (grid x particles / time) are lower than the kernel's.

Baseline in the same run (1 core): a straightforward numpy scoring of the
same orientations on a few particles -- ``extract_slices_numpy`` of the full
image (no cropping to the band), times the CTF, then either a plain
``np.fft.irfft2`` cross-correlation over shifts (the global search's unit of
work) or the band correlation at one shift (a local-refinement evaluation).
Ratios: kernel orientations/s over numpy orientations/s (global), kernel
evaluations/s over numpy evaluations/s (local).  The numpy scores are checked
against the package's.
"""

from __future__ import annotations

import argparse
import json
import os
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
GLOBAL_RESOLUTION = 8.0  # Å: the refine driver's band for global searches (at least 8 Å)
WARMUP_BOX = 32


def pixel_size_for(box: int) -> float:
    """Å/pixel so the built-in molecule fills every box alike (2.5 Å at 64)."""
    return 2.5 * 64 / box


def _simulate(out: Path, box: int, n: int) -> dict:
    """Particles + true and perturbed parameters (npy) + the true map."""
    from cistem_mpi.drivers.simulate import simulate_particles

    ps = pixel_size_for(box)
    sim = simulate_particles(out, n_particles=n, box=box, pixel_size=ps, snr=0.1, seed=box, name=f"box{box}")
    truth = sim.particles.params
    rng = np.random.default_rng(box + 1)
    start = truth.copy()
    for name in ("phi", "theta", "psi"):
        start[name] = truth[name] + rng.normal(0.0, 3.0, n)
    start["shx"] = truth["shx"] + rng.uniform(-2.0, 2.0, n)
    start["shy"] = truth["shy"] + rng.uniform(-2.0, 2.0, n)
    np.save(out / f"box{box}_truth.npy", truth)
    np.save(out / f"box{box}_start.npy", start)
    return {"box": box, "n": n, "pixel_size": ps, "stack": str(sim.stack), "map": str(sim.map),
            "truth": str(out / f"box{box}_truth.npy"), "start": str(out / f"box{box}_start.npy")}


def _settings(box: int, global_step: float, global_search: bool):
    from cistem_mpi.kernels.refinement import AlignSettings

    return AlignSettings(mask_radius=0.45 * box, global_search=global_search, global_step=global_step,
                         angle_step=3.0, max_shift=0.1 * box)


def _bands(box: int, ps: float, local_res_px: float):
    from cistem_mpi.kernels import alignment as al

    high = local_res_px * ps
    return high, al.make_band(box, ps, high), al.make_band(box, ps, max(high, GLOBAL_RESOLUTION))


def _load_map(job: dict) -> np.ndarray:
    from cistem_mpi.io.mrc import read_mrc

    return read_mrc(job["map"], pixel_size=job["pixel_size"])[0].astype(np.float32)


# ---------------------------------------------------------------------- driver level, inside the timed process
def _plan(job: dict, mode: str, n: int, local_res_px: float, global_step: float) -> dict:
    """What the refine driver's ``_round_plan`` would hand ``align_round``."""
    box, ps = job["box"], job["pixel_size"]
    high = local_res_px * ps
    params = np.load(job["start"])[:n]
    return {"stack": job["stack"], "box": box, "pixel_size": ps, "optics": (VOLTAGE, CS, AMPLITUDE_CONTRAST),
            "params": params, "class_params": [params], "align": _settings(box, global_step, mode == "global"),
            "high_resolution": high, "low_resolution": 300.0, "global_resolution": max(high, GLOBAL_RESOLUTION),
            "kind": mode}


def _worker(spec: dict) -> None:
    from cistem_mpi.drivers.refine_rounds import align_round
    from cistem_mpi.drivers.runtime import get_world, guarded
    from cistem_mpi.kernels import alignment as al
    from cistem_mpi.kernels import fft

    fft.use_pyfftw(True, threads=1)
    world = get_world()
    job, warm = spec["job"], spec["warm"]
    with guarded(world):
        for mode in ("local", "global"):  # warm-up: numba caches, small FFT plans, MPI connections
            plan = _plan(warm, mode, warm["n"], spec["local_res_px"], spec["global_step"])
            align_round(world, plan if world.is_controller else None,
                        [_load_map(warm)] if world.is_controller else None)
        plan = refs = None
        if world.is_controller:
            plan = _plan(job, spec["mode"], spec["n"], spec["local_res_px"], spec["global_step"])
            refs = [_load_map(job)]
        marks: dict[int, float] = {}

        def progress(done: int, total: int) -> None:
            marks.setdefault(done, time.perf_counter())

        world.barrier()
        t0 = time.perf_counter()
        out = align_round(world, plan, refs, progress=progress)
        t1 = time.perf_counter()
    if world.is_controller:
        assert out is not None
        n = spec["n"]
        print("RESULT " + json.dumps({
            "ranks": world.size, "mode": spec["mode"], "n": n, "total_s": t1 - t0,
            "queue_s": marks[n] - marks[0], "grid": len(al.orientation_grid(spec["global_step"])),
        }), flush=True)


def _run_worker(ranks: int, spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    if ranks > 1:
        cmd = [MPIEXEC, "-n", str(ranks)] + cmd
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{out.stdout}\n{out.stderr}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[7:])


# ---------------------------------------------------------------------- kernels, in this process
def _particle(stack, row, box: int, ps: float, mask_radius: float):
    """Prepared particle FT and its CTF on the full n-grid (as align_particle makes them)."""
    from cistem_mpi.kernels import alignment as al
    from cistem_mpi.kernels.ctf import ctf_2d_stack
    from cistem_mpi.kernels.fft import ft2

    img = al.prepare_particle(stack[int(row["position"]) - 1], mask_radius)
    ctf = ctf_2d_stack(box, ps, VOLTAGE, CS, AMPLITUDE_CONTRAST, np.array([row["df1"]]), np.array([row["df2"]]),
                       np.array([row["angast"]]), np.array([row["pshift"]]))[0]
    return img, ft2(img), ctf


def bench_kernels(job: dict, vft, n_local: int, n_global: int, local_res_px: float, global_step: float) -> dict:
    from cistem_mpi.io.mrc import open_stack
    from cistem_mpi.kernels import alignment as al
    from cistem_mpi.kernels import refinement as rf
    from cistem_mpi.kernels.euler import angular_distance, rotation_matrix

    box, ps = job["box"], job["pixel_size"]
    _, band, sband = _bands(box, ps, local_res_px)
    s = _settings(box, global_step, False)
    truth, start = np.load(job["truth"]), np.load(job["start"])
    out: dict = {"m_local": band.m, "m_global": sband.m}
    with open_stack(job["stack"], pixel_size=ps) as st:
        images = [np.array(st[int(r["position"]) - 1]) for r in start[:n_local]]  # read outside the timing
        rf.align_particle(st[0], start[0], ps, (VOLTAGE, CS, AMPLITUDE_CONTRAST), [vft], band, s)  # warm-up
        count0 = al.evaluation_count[0]  # local_refine counts its score evaluations
        t, c = time.perf_counter(), time.process_time()
        res = [rf.align_particle(img, r, ps, (VOLTAGE, CS, AMPLITUDE_CONTRAST), [vft], band, s)
               for img, r in zip(images, start[:n_local])]
        dt, dc = time.perf_counter() - t, time.process_time() - c
        evals = al.evaluation_count[0] - count0
        a = [r.alignments[0] for r in res]
        r_true = rotation_matrix(truth["phi"][:n_local], truth["theta"][:n_local], truth["psi"][:n_local])
        r_start = rotation_matrix(start["phi"][:n_local], start["theta"][:n_local], start["psi"][:n_local])
        r_new = rotation_matrix([x.phi for x in a], [x.theta for x in a], [x.psi for x in a])
        e0, e1 = angular_distance(r_true, r_start), angular_distance(r_true, r_new)
        sh0 = np.hypot(start["shx"][:n_local] - truth["shx"][:n_local], start["shy"][:n_local] - truth["shy"][:n_local])
        sh1 = np.hypot(np.array([x.shx for x in a]) * ps - truth["shx"][:n_local],
                       np.array([x.shy for x in a]) * ps - truth["shy"][:n_local])
        # CPU time too: on a shared machine the wall clock counts the other jobs
        out.update(local_per_s=n_local / dt, local_per_cpu_s=n_local / dc, evals_per_particle=evals / n_local,
                   evals_per_s=evals / dt, err_before=float(e0.mean()), err_after=float(e1.mean()),
                   median_err_before=float(np.median(e0)), median_err_after=float(np.median(e1)),
                   median_shift_before=float(np.median(sh0)), median_shift_after=float(np.median(sh1)))

        grid = al.orientation_grid(global_step)
        hits = 0
        dt = 0.0
        for r in truth[:n_global]:  # global: the start parameters are irrelevant (only the CTF is used)
            _, f, ctf = _particle(st, r, box, ps, s.mask_radius)
            t = time.perf_counter()
            best = al.global_search(al.crop_ft(f, sband.m), al.crop_ft(ctf, sband.m), vft, sband, grid, s.max_shift)
            dt += time.perf_counter() - t
            rb = rotation_matrix(best[0].phi, best[0].theta, best[0].psi)
            hits += float(angular_distance(rotation_matrix(r["phi"], r["theta"], r["psi"]), rb)) <= 2 * global_step
        out.update(grid=len(grid), global_orient_per_s=len(grid) * n_global / dt, global_hits=hits,
                   n_local=n_local, n_global=n_global)
    return out


# ---------------------------------------------------------------------- numpy baseline
def _full_band(n: int, band) -> tuple[np.ndarray, np.ndarray]:
    """The band's mask and Friedel multiplicity on the full n-grid (the same frequencies)."""
    ps_r = np.hypot(np.fft.fftfreq(n, 1.0 / n)[:, None], np.arange(n // 2 + 1)[None, :])
    # the cropped band keeps the integer frequencies with r_lo <= r <= r_hi; recover them from its mask
    fy = np.fft.fftfreq(band.m, 1.0 / band.m)
    r_in = np.hypot(fy[:, None], np.arange(band.m // 2 + 1)[None, :])[band.mask]
    lo, hi = r_in.min(), r_in.max()
    mask = (ps_r >= lo - 1e-9) & (ps_r <= hi + 1e-9)
    mult = np.where(mask, 2.0, 0.0)
    mult[:, 0] = np.where(mask[:, 0], 1.0, 0.0)
    mult[:, -1] = np.where(mask[:, -1], 1.0, 0.0)
    return mask, mult


def numpy_global_scores(img: np.ndarray, ctf: np.ndarray, vft, band, rots: np.ndarray, max_shift: float) -> np.ndarray:
    """Score each orientation: full-size numpy slice x CTF, np.fft cross-correlation, best shift."""
    from cistem_mpi.kernels.projection import extract_slices_numpy

    n = img.shape[0]
    x = np.fft.rfft2(np.fft.ifftshift(img))
    mask, mult = _full_band(n, band)
    nx = np.sqrt(np.sum(mult * np.abs(x) ** 2))
    t = np.fft.fftfreq(n, 1.0 / n)
    allowed = (np.abs(t)[:, None] <= max_shift) & (np.abs(t)[None, :] <= max_shift)
    out = np.empty(len(rots))
    for i, r in enumerate(rots):
        model = extract_slices_numpy(vft, r[None])[0] * ctf
        ccmap = np.fft.irfft2(x * np.conj(model) * mask, s=(n, n)) * (n * n)
        nm = np.sqrt(np.sum(mult * np.abs(model) ** 2))
        out[i] = ccmap[allowed].max() / (nx * nm)
    return out


def numpy_local_scores(img: np.ndarray, ctf: np.ndarray, vft, band, rots: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Band correlation at one orientation and shift (pixels) each: a local-refinement evaluation."""
    from cistem_mpi.kernels.projection import extract_slices_numpy

    n = img.shape[0]
    x = np.fft.rfft2(np.fft.ifftshift(img))
    _, mult = _full_band(n, band)
    nx = np.sqrt(np.sum(mult * np.abs(x) ** 2))
    ky = np.fft.fftfreq(n, 1.0 / n)[:, None]
    kx = np.arange(n // 2 + 1)[None, :]
    out = np.empty(len(rots))
    for i, (r, (dx, dy)) in enumerate(zip(rots, shifts)):
        model = extract_slices_numpy(vft, r[None])[0] * ctf * np.exp(-2j * np.pi * (kx * dx + ky * dy) / n)
        num = np.sum(mult * (x.real * model.real + x.imag * model.imag))
        out[i] = num / (nx * np.sqrt(np.sum(mult * np.abs(model) ** 2)))
    return out


def bench_numpy(job: dict, vft, n_particles: int, n_orient: int, local_res_px: float, global_step: float) -> dict:
    from cistem_mpi.io.mrc import open_stack
    from cistem_mpi.kernels import alignment as al
    from cistem_mpi.kernels.euler import rotation_matrix

    box, ps = job["box"], job["pixel_size"]
    _, band, sband = _bands(box, ps, local_res_px)
    s = _settings(box, global_step, False)
    start = np.load(job["start"])
    grid = al.orientation_grid(global_step)
    rng = np.random.default_rng(0)
    t_glob = t_loc = 0.0
    d_glob = d_loc = 0.0
    with open_stack(job["stack"], pixel_size=ps) as st:
        for row in start[:n_particles]:
            img, f, ctf = _particle(st, row, box, ps, s.mask_radius)
            ang = grid[rng.choice(len(grid), n_orient, replace=False)]
            rots = rotation_matrix(ang[:, 0], ang[:, 1], ang[:, 2]).reshape(-1, 3, 3)
            t = time.perf_counter()
            g = numpy_global_scores(img, ctf, vft, sband, rots, s.max_shift)
            t_glob += time.perf_counter() - t
            pk, _, _ = al.shift_search(al.crop_ft(f, sband.m), al._models(vft, ang, al.crop_ft(ctf, sband.m), sband),
                                       sband, s.max_shift)
            d_glob = max(d_glob, float(np.abs(pk - g).max()))  # different shift sampling: close, not equal
            shifts = rng.uniform(-2, 2, (n_orient, 2))
            t = time.perf_counter()
            loc = numpy_local_scores(img, ctf, vft, band, rots, shifts)
            t_loc += time.perf_counter() - t
            x_c, c_c = al.crop_ft(f, band.m), al.crop_ft(ctf, band.m)
            for j in range(min(8, n_orient)):
                x0 = np.r_[ang[j], shifts[j]]
                pkg = -al._objective(x0, x0, np.ones(5, bool), x_c, c_c, vft, band, box, band.m,
                                     al.Alignment(*x0, 0.0), None)
                d_loc = max(d_loc, abs(pkg - loc[j]))
    k = n_particles * n_orient
    return {"global_orient_per_s": k / t_glob, "evals_per_s": k / t_loc, "global_max_diff": d_glob,
            "local_max_diff": d_loc, "n": n_particles, "orientations": n_orient}


# ---------------------------------------------------------------------- driver
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="boxes 64 and 96, few particles (quick)")
    ap.add_argument("--boxes", type=int, nargs="+")
    ap.add_argument("--n-local", type=int, nargs="+", help="particles for local refinement (per box)")
    ap.add_argument("--n-global", type=int, nargs="+", help="particles for the global search (per box)")
    ap.add_argument("--n-numpy", type=int, default=2, help="particles for the numpy baseline")
    ap.add_argument("--numpy-orientations", type=int, default=40, help="orientations per particle (numpy)")
    ap.add_argument("--local-res", type=float, default=3.0,
                    help="local band limit in pixels (3 = 2/3 Nyquist; 6.4 at box 128 = the 8 Å of issue #16)")
    ap.add_argument("--global-step", type=float, default=15.0, help="global grid step (degrees)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3], help="mpiexec -n values (1: no launcher)")
    ap.add_argument("--kernels-only", action="store_true", help="skip the driver runs (part 2)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        _worker(json.loads(a.worker))
        return 0
    boxes = a.boxes or ([64, 96] if a.small else [128, 256])
    n_loc = a.n_local or ([12] if a.small else [64, 32])
    n_glob = a.n_global or ([3] if a.small else [12, 8])
    n_loc = n_loc * len(boxes) if len(n_loc) == 1 else n_loc
    n_glob = n_glob * len(boxes) if len(n_glob) == 1 else n_glob
    from cistem_mpi.kernels import fft
    from cistem_mpi.kernels.projection import prepare_volume_ft

    fft.use_pyfftw(True, threads=1)
    print(f"cores: {os.cpu_count()}, load before: {Path('/proc/loadavg').read_text().split()[:3]}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_refine_") as tmp:
        t = time.perf_counter()
        warm = _simulate(Path(tmp), WARMUP_BOX, 4)
        jobs = [_simulate(Path(tmp), b, max(nl, ng)) for b, nl, ng in zip(boxes, n_loc, n_glob)]
        print(f"simulated in {time.perf_counter() - t:.1f} s", flush=True)
        for job, nl, ng in zip(jobs, n_loc, n_glob):
            box = job["box"]
            t = time.perf_counter()
            vft = prepare_volume_ft(_load_map(job), 2.0)
            t_prep = time.perf_counter() - t
            k = bench_kernels(job, vft, nl, ng, a.local_res, a.global_step)
            b = bench_numpy(job, vft, a.n_numpy, a.numpy_orientations, a.local_res, a.global_step)
            del vft
            spec = {"job": job, "warm": warm, "local_res_px": a.local_res, "global_step": a.global_step}
            runs = []
            for mode, n in (("local", nl), ("global", ng)):
                for r in ([] if a.kernels_only else a.ranks):
                    runs.append(_run_worker(r, dict(spec, mode=mode, n=n)))
            print(f"\nbox {box} ({job['pixel_size']:.3f} Å/px): local band to {a.local_res * job['pixel_size']:.2f} Å "
                  f"(cropped m = {k['m_local']}), global band to {max(a.local_res * job['pixel_size'], GLOBAL_RESOLUTION):.1f} Å "
                  f"(m = {k['m_global']}), grid {a.global_step:g}° = {k['grid']} orientations; "
                  f"reference preparation {t_prep:.2f} s", flush=True)
            print(f"kernels, 1 core: local {k['local_per_s']:.2f} particles/s ({k['local_per_cpu_s']:.2f} per CPU "
                  f"second; {k['n_local']} particles, "
                  f"{k['evals_per_particle']:.0f} evaluations each, {k['evals_per_s']:.0f} evaluations/s; "
                  f"angular error mean {k['err_before']:.2f}° -> {k['err_after']:.2f}°, median "
                  f"{k['median_err_before']:.2f}° -> {k['median_err_after']:.2f}°; shift error median "
                  f"{k['median_shift_before']:.2f} Å -> {k['median_shift_after']:.2f} Å); "
                  f"global {k['global_orient_per_s']:.0f} orientations/s ({k['n_global']} particles, "
                  f"{k['global_hits']}/{k['n_global']} within {2 * a.global_step:g}° of the truth)")
            print(f"numpy baseline, 1 core ({b['n']} particles x {b['orientations']} orientations): "
                  f"global {b['global_orient_per_s']:.1f} orientations/s -> ratio "
                  f"{k['global_orient_per_s'] / b['global_orient_per_s']:.1f}; local {b['evals_per_s']:.1f} "
                  f"evaluations/s -> ratio {k['evals_per_s'] / b['evals_per_s']:.1f} "
                  f"(numpy vs package CC max diff: local {b['local_max_diff']:.1e}, "
                  f"global {b['global_max_diff']:.1e} (shift sampling differs))", flush=True)
            if not runs:
                continue
            print(f"driver align_round: {'mode':>6} {'ranks':>5} {'workers':>7} {'particles':>9} {'part/s':>8} "
                  f"{'per worker':>10} {'orient/s':>9} {'queue s':>8} {'total s':>8}")
            for x in runs:
                w = max(1, x["ranks"] - 1)
                pps = x["n"] / x["queue_s"]
                orient = f"{x['grid'] * pps:9.0f}" if x["mode"] == "global" else f"{'-':>9}"
                print(f"{'':19} {x['mode']:>6} {x['ranks']:5d} {w:7d} {x['n']:9d} {pps:8.2f} {pps / w:10.2f} "
                      f"{orient} {x['queue_s']:8.2f} {x['total_s']:8.2f}", flush=True)
    print(f"\nload after: {Path('/proc/loadavg').read_text().split()[:3]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

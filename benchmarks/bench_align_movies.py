"""align-movies per core, side by side with cisTEM's unblur: CPU, peak memory, RMS shift error vs truth.

Simulates one movie with ``cistem_mpi.drivers.simulate.simulate_movies``
(as ``cistem-mpi simulate movies --size 2048 2048 --frames 30 --pixel-size 1
--exposure-per-frame 1 --drift 8``; MRC and LZW TIFF, a gain reference, the
true drift in ``<movie>_truth.npz``), then measures, each in a fresh process
on one core:

* ``ours full``: :func:`cistem_mpi.drivers.align_movies.align_one` with
  ``--full-frame-only`` (read + gain on the fly + outliers, one forward FFT per
  frame, pre-binned and refine alignment, shifted dose-weighted and unweighted
  sums, scaled image, spectrum, shifts, PNG, STAR), on the MRC and on the TIFF;
* ``ours patch``: the same with the 5 x 5 patch model (TIFF);
* ``unblur``: cisTEM's unblur at its defaults (gain on the fly, dose filter,
  restore noise power, one thread) on the same MRC and TIFF, when ``CISTEM_BIN``
  points at a directory holding it (``LD_LIBRARY_PATH`` is passed through);
  without it the benchmark says so and prints our side only;
* ``numpy``: the obvious numpy version of the full-frame steps (optional).

"CPU" is the CPU time of the whole process (imports, JIT cache loads, reading,
writing: what one movie in a fresh process costs; unblur likewise); "movie" is
ours per movie in a process that has aligned one before (a job of many movies).
Peak memory is the process's resident high-water mark (``VmHWM``, GiB; unblur's likewise).  The RMS error is the
distance between the estimated shifts and ``-drift_px`` (both conventions: the
shift applied to a frame; unblur's file is in Å, divided by the pixel size)
after removing the mean offset (:func:`cistem_mpi.kernels.motion.trajectory_rms`).

The machine's other load inflates CPU times of both sides alike; run it on an
idle machine for absolute figures.

Usage::

    CISTEM_BIN=/path/to/cistem/bin python benchmarks/bench_align_movies.py          # 2048^2 x 30
    python benchmarks/bench_align_movies.py --large      # 4096^2 x 40
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _make_movie(d: Path, size: int, n: int):
    from cistem_mpi.drivers.simulate import simulate_movies

    sim = simulate_movies(d / "sim", 1, (size, size), n, 1.0, 1.0, seed=1, formats=("mrc", "tiff"),
                          drift_total_px=8.0)
    truth = np.load(sim.truth.parent / "movie_0001_truth.npz")["drift_px"]
    return {"mrc": Path(sim.movies["mrc"][0]), "tiff": Path(sim.movies["tiff"][0])}, Path(sim.gain), truth


def _options(full_frame_only: bool) -> dict:
    return {"min_shift": 2.0, "max_shift": 80.0, "bfactor": 1500.0, "termination": 1.0, "max_iterations": 20,
            "mask_cross": True, "cross_half_width": (1, 1), "smoothing_window": None, "smoothing": "whittaker", "final_filter": "auto",
            "patches": None if full_frame_only else (5, 5), "full_frame_only": full_frame_only,
            "pre_exposure": 0.0, "dose_weighting": True, "restore_power": True, "output_binning": 1.0,
            "gain_rotate": 0, "gain_flip": "none", "dark": None, "defects": None, "outlier_sigma": 12.0,
            "eer_grouping": None, "project_root": "."}


def _item(movie: str, gain: str, out: str, size: int, n: int, tag: str) -> dict:
    o = Path(out)
    return {"movie_id": 1, "path": movie, "name": tag, "n_frames": n, "nx": size, "ny": size, "pixel_size": 1.0,
            "voltage": 300.0, "cs": 2.7, "amplitude_contrast": 0.07, "dose_per_frame": 1.0, "gain": gain,
            "out": {k: str(o / f"{tag}_{k}.{ext}") for k, ext in (
                ("image", "mrc"), ("unweighted", "mrc"), ("scaled", "mrc"), ("spectrum", "mrc"),
                ("shifts", "txt"), ("trajectory", "png"), ("star", "star"))}}


def _numpy_baseline(movie: str, gain_path: str, size: int, n: int) -> np.ndarray:
    """Plain numpy: whole movie in memory, numpy.fft, the same steps as the full-frame job."""
    import mrcfile

    from cistem_mpi.kernels.dose import dose_filter

    gain = mrcfile.read(gain_path).astype(np.float32)
    stack = mrcfile.read(movie).astype(np.float32) * gain
    for f in stack:
        m, s = f.mean(), f.std()
        f[np.abs(f - m) > 12 * s] = m
    fts = np.fft.rfft2(stack)
    del stack
    fts[:, 0, 0] = 0

    def crop(f, m):
        h = m // 2
        return np.concatenate([f[..., :h, :h + 1], f[..., size - h:, :h + 1]], axis=-2) * (m * m / size / size)

    def shift(f, m, sx, sy):
        ky = np.fft.fftfreq(m)[:, None]
        kx = np.fft.rfftfreq(m)[None, :]
        return f * np.exp(-2j * np.pi * (kx * sx + ky * sy))

    def align(st, m, px, sh, rmin, iters, thr):
        k2 = np.fft.rfftfreq(m)[None, :] ** 2 + np.fft.fftfreq(m)[:, None] ** 2
        filt = np.exp(-1500 / px ** 2 * k2 / 4)
        filt[0, :] = 0
        filt[:, 0] = 0
        rmax = 80 / px
        yy, xx = np.meshgrid(np.fft.fftfreq(m) * m, np.fft.fftfreq(m) * m, indexing="ij")
        rr = np.hypot(xx, yy)
        allowed = (rr >= rmin) & (rr <= rmax)
        for _ in range(iters):
            tot = st.sum(0)
            cur = np.zeros((len(st), 2))
            for i in range(len(st)):
                cc = np.fft.irfft2((tot - st[i]) * filt * np.conj(st[i]), (m, m))
                cc = np.where(allowed, cc, -np.inf)
                j = np.unravel_index(np.argmax(cc), cc.shape)
                c = [cc[(j[0] + a) % m, (j[1] + b) % m] for a in (-1, 0, 1) for b in (-1, 0, 1)]
                c = np.array(c).reshape(3, 3)
                ox = 0.5 * (c[1, 0] - c[1, 2]) / (c[1, 0] - 2 * c[1, 1] + c[1, 2])
                oy = 0.5 * (c[0, 1] - c[2, 1]) / (c[0, 1] - 2 * c[1, 1] + c[2, 1])
                cur[i] = (xx[j] + ox, yy[j] + oy)
            acc = sh + cur
            w = 5
            sm = np.stack([np.convolve(np.pad(acc[:, a], w // 2, mode="edge"), np.ones(w) / w, "valid")
                           for a in range(2)], axis=1)
            cur = sm - sh
            cur -= cur[len(st) // 2]
            for i in range(len(st)):
                st[i] = shift(st[i], m, *cur[i])
            sh += cur
            if np.hypot(cur[:, 0], cur[:, 1]).max() <= thr:
                break
        return sh

    mc = int(round(size / 5)) // 2 * 2
    mr = int(round(size / 1.5)) // 2 * 2
    coarse = crop(fts, mc)
    sh = np.zeros((n, 2))
    align(coarse, mc, size / mc, sh, 1.01, 1, 1.0)
    align(coarse, mc, size / mc, sh, 0.0, 20, 1.0)
    refine = crop(fts, mr)
    sh *= mr / mc
    for i in range(n):
        refine[i] = shift(refine[i], mr, *sh[i])
    align(refine, mr, size / mr, sh, 0.0, 20, 1.0 / (size / mr))
    sh *= size / mr
    unw = np.zeros_like(fts[0])
    wtd = np.zeros_like(fts[0])
    ss = np.zeros(fts[0].shape)
    for i in range(n):
        f = shift(fts[i], size, *sh[i])
        q = dose_filter((size, size), 1.0, i + 1.0)
        unw += f
        wtd += f * q
        ss += q ** 2
    np.fft.irfft2(unw, (size, size))
    np.fft.irfft2(wtd / np.sqrt(ss), (size, size))
    return sh


def _child(kind: str, movie: str, gain: str, out: str, size: int, n: int, threads: int, q) -> None:
    c_start = time.process_time()
    from cistem_mpi.kernels import fft as _fft

    _fft.use_pyfftw(True, threads=threads)
    t0 = time.perf_counter()
    if kind == "numpy":
        shifts = _numpy_baseline(movie, gain, size, n)
        again = None
    else:
        from cistem_mpi.drivers.align_movies import align_one

        full = kind.startswith("full")
        r = align_one(_item(movie, gain, out, size, n, kind), _options(full))
        shifts = r["shifts_px"]
        wall = time.perf_counter() - t0
        c1 = time.process_time()
        # the same movie again in this process: the per-movie cost inside a job
        t1 = time.perf_counter()
        align_one(_item(movie, gain, out, size, n, kind + "_again"), _options(full))
        again, wall_again = time.process_time() - c1, time.perf_counter() - t1
    if kind == "numpy":
        wall, wall_again = time.perf_counter() - t0, None
        c1 = time.process_time()
    q.put({"wall": wall, "cpu": c1 - c_start, "cpu_movie": again, "wall_movie": wall_again,
           "shifts": np.asarray(shifts).tolist(),
           "peak_gb": _peak_gb()})


def _peak_gb() -> float:
    """This process's resident high-water mark: VmHWM (reset at exec; ru_maxrss is not, so a spawned
    child would report the parent's size at fork)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0 ** 2
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 ** 2


def _measure(kind: str, *args) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(kind, *args, q))
    p.start()
    r = q.get()
    p.join()
    return r


def _unblur(movie: Path, gain: Path, wd: Path, n: int) -> dict:
    from peers import run_peer

    wd.mkdir(parents=True, exist_ok=True)
    shifts_txt = wd / "shifts.txt"
    answers = [movie, wd / "sum.mrc", shifts_txt, 1.0, 1, "yes", 300, 1.0, 0,
               "yes", 2, 80, 1500, 1, 1, 1, 20, "yes",          # expert options: unblur's defaults
               "yes", "no", gain,                               # dark-subtracted; gain on the fly
               1, 0, 1, "no", "no"]                             # all frames, no running average, no frames out
    run = run_peer("unblur", answers, wd)
    if run.returncode != 0 or not shifts_txt.is_file():
        raise RuntimeError(f"unblur failed (rc {run.returncode}):\n{run.output[-2000:]}")
    # one line per frame: x y, Å, the shift applied to the frame (middle frame 0), as ours
    sh = np.loadtxt(shifts_txt, comments="#").reshape(n, 2) / 1.0
    return {"cpu": run.cpu_s, "wall": run.wall_s, "peak_gb": run.peak_mb / 1024.0, "shifts": sh.tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--large", action="store_true", help="4096 x 4096 x 40 instead of 2048 x 2048 x 30")
    ap.add_argument("--no-baseline", action="store_true", help="skip the plain-numpy version")
    ap.add_argument("--no-patch", action="store_true", help="skip the patch (local motion) run")
    ap.add_argument("--threads", type=int, default=1,
                    help="also run ours with this many FFT threads in one process (as OMP_NUM_THREADS does) "
                         "and print the wall time per movie against one thread")
    a = ap.parse_args()
    from cistem_mpi.kernels.motion import trajectory_rms
    from peers import find_peer, peer_status

    size, n = (4096, 40) if a.large else (2048, 30)
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        t0 = time.perf_counter()
        movies, gain, truth = _make_movie(d, size, n)
        print(f"movie {size} x {size} x {n} (MRC {movies['mrc'].stat().st_size / 1e6:.0f} MB, LZW TIFF "
              f"{movies['tiff'].stat().st_size / 1e6:.0f} MB) simulated in {time.perf_counter() - t0:.0f} s")
        runs = [("full", "mrc"), ("full", "tiff")] + ([] if a.no_patch else [("patch", "tiff")])
        if not a.no_baseline:
            runs.append(("numpy", "mrc"))
        runs = [(k, f, 1) for k, f in runs]
        if a.threads > 1:
            runs += [(k, f, a.threads) for k, f, _ in runs if k != "numpy"]
        res = {}
        for kind, fmt, th in runs:
            key = f"{kind}_{fmt}" + (f"_t{th}" if th > 1 else "")
            res[key] = r = _measure(key if kind != "numpy" else "numpy", str(movies[fmt]), str(gain), td, size, n,
                                    th)
            r["rms_px"] = trajectory_rms(np.array(r["shifts"]), -truth)
            r["threads"] = th
        peer = find_peer("unblur")
        print(peer_status("unblur"))
        if peer is not None:
            for fmt in ("mrc", "tiff"):
                src = movies[fmt]  # our LZW TIFFs carry SampleFormat, which cisTEM needs
                r = _unblur(src, gain, d / f"unblur_{fmt}", n)
                r["rms_px"] = trajectory_rms(np.array(r["shifts"]), -truth)
                res[f"unblur_{fmt}"] = r
        print(f"\n{'run':14s} {'CPU s':>7s} {'movie s':>8s} {'wall s':>7s} {'movie wall':>10s} {'peak GB':>8s} "
              f"{'RMS px':>7s}")
        for k, r in res.items():
            mv = f"{r['cpu_movie']:8.1f}" if r.get("cpu_movie") is not None else f"{'':8s}"
            mw = f"{r['wall_movie']:10.1f}" if r.get("wall_movie") is not None else f"{'':10s}"
            print(f"{k:14s} {r['cpu']:7.1f} {mv} {r['wall']:7.1f} {mw} {r['peak_gb']:8.2f} {r['rms_px']:7.3f}")
        print("CPU s: whole fresh process (imports, JIT cache, I/O); movie s / movie wall: ours per movie after "
              "the first")
        for k, r in list(res.items()):
            one = res.get(k.rsplit("_t", 1)[0])
            if r["threads"] > 1 and one is not None and one.get("wall_movie"):
                same = np.array_equal(np.array(r["shifts"]), np.array(one["shifts"]))
                print(f"{k}: {r['threads']} FFT threads, wall per movie {one['wall_movie']:.1f} -> "
                      f"{r['wall_movie']:.1f} s ({one['wall_movie'] / r['wall_movie']:.2f}x); "
                      f"shifts {'bit-identical to' if same else 'differ from'} one thread's "
                      f"(max {np.abs(np.array(r['shifts']) - np.array(one['shifts'])).max():.2g} px)")
        for fmt in ("mrc", "tiff"):
            ub, us = res.get(f"unblur_{fmt}"), res.get(f"full_{fmt}")
            if ub and us:
                print(f"{fmt}: unblur CPU / ours = {ub['cpu'] / us['cpu']:.2f}x (fresh process), "
                      f"{ub['cpu'] / us['cpu_movie']:.2f}x (per movie); peak memory ours / unblur = "
                      f"{us['peak_gb'] / ub['peak_gb']:.2f}; RMS ours {us['rms_px']:.3f} px, unblur {ub['rms_px']:.3f} px")
        if peer is None:
            print("unblur not run (set CISTEM_BIN); cisTEM's unblur as measured by the issue author: "
                  "5.2-6.3 s CPU and 0.59 GB for 2048^2 x 30 on one core")
        if "numpy_mrc" in res:
            print(f"speed-up over plain numpy (full-frame, MRC): {res['numpy_mrc']['cpu'] / res['full_mrc']['cpu']:.2f}x")
        for r in res.values():
            r.pop("shifts", None)
        print(json.dumps({"size": size, "frames": n, **res}))


if __name__ == "__main__":
    main()

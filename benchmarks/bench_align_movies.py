"""align-movies throughput: seconds per movie on one core, full-frame and patch, against plain numpy.

Writes one synthetic counting-mode movie (LZW TIFF, uint8 counts, ~1 e/px per
frame, a smooth specimen drifting by a few pixels, a gain reference), then
times the work one rank does per movie:

* ``cistem-mpi full-frame``: :func:`cistem_mpi.drivers.align_movies.align_one`
  with ``--full-frame-only`` (read + gain on the fly + outliers, pre-binned
  and refine alignment, second read, dose-weighted and unweighted sums,
  scaled image, spectrum, shifts, PNG, STAR);
* ``cistem-mpi patch``: the same with a 5 x 5 patch model;
* ``numpy baseline``: the obvious numpy version of the full-frame steps
  (whole movie read into a float32 array, gain multiply, ``numpy.fft``, the
  same unblur iteration on the same cropped stacks with ``argmax`` +
  parabola, Savitzky-Golay smoothing, Fourier sums).

Peak memory (``ru_maxrss``) is reported for each, measured in a fresh child
process.  The file is read right after being written (page cache).  cisTEM's
unblur on one core, as measured by the issue author: 5.2-6.3 s of CPU for a
2048^2 x 30 movie (~30 s for 4096^2 x 40) and 0.59 GB.

Usage::

    python benchmarks/bench_align_movies.py            # 4096 x 4096 x 40 frames
    python benchmarks/bench_align_movies.py --small    # 2048 x 2048 x 30
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import numpy as np


def _make_movie(d: Path, size: int, n: int) -> tuple[Path, Path]:
    from cistem_mpi.io.movies import write_tiff_movie
    from cistem_mpi.io.mrc import write_mrc

    rng = np.random.default_rng(0)
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    spec = np.fft.rfft2(rng.standard_normal((size, size)).astype(np.float32)) * np.exp(-(fx ** 2 + fy ** 2) * 2e3)
    spec *= 0.3 / max(1e-9, float(np.fft.irfft2(spec, (size, size)).std()))
    t = np.arange(n)
    drift = np.stack([5 * (1 - np.exp(-t / 4)), -3 * (1 - np.exp(-t / 4))], axis=1)
    gain = rng.uniform(0.9, 1.1, (size, size)).astype(np.float32)

    def frames():
        for dx, dy in drift:
            img = np.fft.irfft2(spec * np.exp(-2j * np.pi * (fx * dx + fy * dy)), (size, size))
            yield np.minimum(rng.poisson(np.clip(1.0 + img, 0, None) / gain), 255).astype(np.uint8)

    movie = d / "bench.tif"
    write_tiff_movie(movie, frames(), compression="lzw", n_frames=n)
    gp = d / "gain.mrc"
    write_mrc(gp, gain, 1.0)
    return movie, gp


def _options(full_frame_only: bool) -> dict:
    return {"min_shift": 2.0, "max_shift": 80.0, "bfactor": 1500.0, "termination": 1.0, "max_iterations": 20,
            "mask_cross": True, "cross_half_width": (1, 1), "smoothing_window": None, "smoothing": "whittaker",
            "patches": None if full_frame_only else (5, 5), "full_frame_only": full_frame_only,
            "pre_exposure": 0.0, "dose_weighting": True, "restore_power": True, "output_binning": 1.0,
            "gain_rotate": 0, "gain_flip": "none", "dark": None, "defects": None, "outlier_sigma": 12.0,
            "eer_grouping": None, "project_root": "."}


def _ours(movie: str, gain: str, out: str, size: int, n: int, full: bool) -> None:
    from cistem_mpi.drivers.align_movies import align_one

    o = Path(out)
    item = {"movie_id": 1, "path": movie, "name": "bench", "n_frames": n, "nx": size, "ny": size, "pixel_size": 1.0,
            "voltage": 300.0, "cs": 2.7, "amplitude_contrast": 0.07, "dose_per_frame": 1.0, "gain": gain,
            "out": {k: str(o / f"bench_{k}.{ext}") for k, ext in (
                ("image", "mrc"), ("unweighted", "mrc"), ("scaled", "mrc"), ("spectrum", "mrc"),
                ("shifts", "txt"), ("trajectory", "png"), ("star", "star"))}}
    align_one(item, _options(full))


def _numpy_baseline(movie: str, gain_path: str, size: int, n: int) -> np.ndarray:
    """Plain numpy: whole movie in memory, numpy.fft, same steps as the full-frame job."""
    import mrcfile
    import tifffile

    from cistem_mpi.kernels.dose import dose_filter

    gain = mrcfile.read(gain_path).astype(np.float32)
    stack = tifffile.imread(movie)[:, ::-1, :].astype(np.float32) * gain
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
    return np.fft.irfft2(wtd / np.sqrt(ss), (size, size))


def _child(kind: str, movie: str, gain: str, out: str, size: int, n: int, q) -> None:
    from cistem_mpi.kernels import fft as _fft

    _fft.use_pyfftw(True, threads=1)
    t0, c0 = time.perf_counter(), time.process_time()
    if kind == "numpy":
        _numpy_baseline(movie, gain, size, n)
    else:
        _ours(movie, gain, out, size, n, kind == "full")
    q.put({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
           "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6})


def _measure(kind: str, *args) -> dict:
    q = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=_child, args=(kind, *args, q))
    p.start()
    r = q.get()
    p.join()
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="2048 x 2048 x 30 instead of 4096 x 4096 x 40")
    ap.add_argument("--no-baseline", action="store_true")
    a = ap.parse_args()
    size, n = (2048, 30) if a.small else (4096, 40)
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        t0 = time.perf_counter()
        movie, gain = _make_movie(d, size, n)
        print(f"movie {size} x {size} x {n} LZW TIFF ({movie.stat().st_size / 1e6:.0f} MB) written in "
              f"{time.perf_counter() - t0:.0f} s")
        res = {}
        kinds = ["full", "patch"] + ([] if a.no_baseline else ["numpy"])
        for kind in kinds:
            res[kind] = r = _measure(kind, str(movie), str(gain), td, size, n)
            print(f"{kind:6s}: {r['wall']:7.1f} s wall, {r['cpu']:7.1f} s CPU per movie on one core, "
                  f"{n / r['wall']:.2f} frames/s, peak {r['peak_gb']:.2f} GB")
        if "numpy" in res:
            print(f"speed-up over plain numpy (full-frame): {res['numpy']['wall'] / res['full']['wall']:.2f}x")
        print(json.dumps({"size": size, "frames": n, **res}))


if __name__ == "__main__":
    main()

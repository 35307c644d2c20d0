"""Throughput of the hot kernels, against numpy-vectorised versions measured in the same run.

Prints, per box size (128 and 256 by default; padding factor 2, trilinear):

* slice extractions per second: numba ``extract_slices`` vs the numpy
  version of the same interpolation (``extract_slices_numpy``),
* CTF-weighted insertions per second: numba ``insert_slices`` vs a numpy
  version of the same half-stored insertion written below,
* simulated particles per second (projection + CTF + shift + noise),
* milliseconds per inserted image at padding 1 and 2: the trilinear
  reconstruct kernel (fast path for interior taps) against the general
  tap-by-tap kernel it replaced (``_insert_slices(..., fast=False)``), the
  best of several repeats of short batches, in thread CPU time (robust on
  a shared machine).

Everything runs on one core (numba without parallel loops, one FFT thread):
the MPI model is one rank per core.

Usage: python benchmarks/bench_kernels.py [--boxes 128 256] [--n 200]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from cistem_mpi.kernels import fft  # noqa: E402
from cistem_mpi.kernels.backprojection import _insert_slices, insert_slices, new_accumulators  # noqa: E402
from cistem_mpi.kernels.ctf import ctf_2d_stack  # noqa: E402
from cistem_mpi.kernels.euler import random_rotations  # noqa: E402
from cistem_mpi.kernels.projection import extract_slices, extract_slices_numpy, prepare_volume_ft  # noqa: E402
from cistem_mpi.kernels.simulate import add_noise_at_snr, random_defocus, simulate_particle_images  # noqa: E402


def insert_numpy(data, weight, fts, rot, ctf):
    """numpy-vectorised trilinear insertion with the same half-storage rules as insert_slices."""
    p = data.shape[1]
    half = p // 2
    n = fts.shape[1]
    s = p / n
    ky = np.fft.fftfreq(n, 1.0 / n)[:, None] * np.ones((1, n // 2 + 1))
    kx = np.arange(n // 2 + 1)[None, :] * np.ones((n, 1))
    inside = (kx * kx + ky * ky) <= (n // 2) ** 2
    kx, ky = kx[inside], ky[inside]
    selfconj = (kx == 0) | (2 * kx == n)
    flat_d = data.reshape(-1).view(np.float32)
    flat_w = weight.reshape(-1)
    for i in range(fts.shape[0]):
        c = ctf[i][inside].astype(np.float64)
        g = np.where(selfconj, 0.5, 1.0)
        v = fts[i][inside].astype(np.complex128) * c * g
        cw = c * c * g
        m = rot[i] * s
        x = m[0, 0] * kx + m[0, 1] * ky
        y = m[1, 0] * kx + m[1, 1] * ky
        z = m[2, 0] * kx + m[2, 1] * ky
        flip = x < 0
        x, y, z = np.where(flip, -x, x), np.where(flip, -y, y), np.where(flip, -z, z)
        v = np.where(flip, np.conj(v), v)
        x0, y0, z0 = np.floor(x), np.floor(y), np.floor(z)
        fx, fy, fz = x - x0, y - y0, z - z0
        for dz in (0, 1):
            for dy in (0, 1):
                for dx in (0, 1):
                    w = (fx if dx else 1 - fx) * (fy if dy else 1 - fy) * (fz if dz else 1 - fz)
                    xi = (x0 + dx).astype(np.int64)
                    yi = (y0 + dy).astype(np.int64)
                    zi = (z0 + dz).astype(np.int64)
                    xr = (xi + half) % p - half
                    neg = xr < 0
                    xs = np.abs(xr)
                    ys = np.where(neg, -yi, yi) % p
                    zs = np.where(neg, -zi, zi) % p
                    val = w * np.where(neg, np.conj(v), v)
                    ww = w * cw
                    for zz, yy, conj in ((zs, ys, False), ((p - zs) % p, (p - ys) % p, True)):
                        if conj:
                            sel = (xs == 0) | ((p % 2 == 0) & (xs == half))
                            zz, yy, xx, vv, wv = zz[sel], yy[sel], xs[sel], np.conj(val[sel]), ww[sel]
                        else:
                            xx, vv, wv = xs, val, ww
                        idx = (zz * p + yy) * (p // 2 + 1) + xx
                        np.add.at(flat_d, 2 * idx, vv.real.astype(np.float32))
                        np.add.at(flat_d, 2 * idx + 1, vv.imag.astype(np.float32))
                        np.add.at(flat_w, idx, wv.astype(np.float32))


def _time(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_box(box: int, n: int, n_numpy: int) -> dict:
    rng = np.random.default_rng(0)
    vol = rng.standard_normal((box, box, box)).astype(np.float32)
    t0 = time.perf_counter()
    vft = prepare_volume_ft(vol, 2.0, "linear")
    t_prep = time.perf_counter() - t0
    rot = random_rotations(n, rng)
    extract_slices(vft, rot[:2])  # compile / load cache
    t_ext = _time(lambda: extract_slices(vft, rot), 2)
    t_ext_np = _time(lambda: extract_slices_numpy(vft, rot[:n_numpy]))
    a = extract_slices(vft, rot[:n_numpy])
    b = extract_slices_numpy(vft, rot[:n_numpy])
    ext_err = float(np.abs(a - b).max() / np.abs(a).max())

    fts = extract_slices(vft, rot)
    df1, df2, ang = random_defocus(n, rng)
    ctf = ctf_2d_stack(box, 1.5, 300, 2.7, 0.07, df1, df2, ang)
    d, w = new_accumulators(vft.size)
    insert_slices(d, w, fts[:2], rot[:2], ctf=ctf[:2])  # compile / load cache
    d[:] = 0
    w[:] = 0
    t_ins = _time(lambda: insert_slices(d, w, fts, rot, ctf=ctf))
    d1, w1 = new_accumulators(vft.size)
    insert_slices(d1, w1, fts[:n_numpy], rot[:n_numpy], ctf=ctf[:n_numpy])
    d2, w2 = new_accumulators(vft.size)
    t_ins_np = _time(lambda: insert_numpy(d2, w2, fts[:n_numpy], rot[:n_numpy], ctf[:n_numpy]))
    ins_err = float(np.abs(d1 - d2).max() / np.abs(d1).max())
    del d, w, d1, w1, d2, w2

    n_sim = min(n, 200)
    sh = rng.uniform(-3, 3, (n_sim, 2))

    def sim():
        imgs = simulate_particle_images(vft, rot[:n_sim], sh, 1.5, 300, 2.7, 0.07, df1[:n_sim], df2[:n_sim],
                                        ang[:n_sim])
        add_noise_at_snr(imgs, 0.1, rng)

    t_sim = _time(sim)
    return {
        "box": box, "prepare_s": t_prep,
        "extract_per_s": n / t_ext, "extract_numpy_per_s": n_numpy / t_ext_np,
        "insert_per_s": n / t_ins, "insert_numpy_per_s": n_numpy / t_ins_np,
        "simulate_per_s": n_sim / t_sim, "extract_max_rel_diff": ext_err, "insert_max_rel_diff": ins_err,
    }


def bench_insert_ms(box: int, pad: float, n: int = 100, chunk: int = 10, repeat: int = 20) -> dict:
    """ms per image of CTF-weighted trilinear insertion, fast kernel vs general kernel (best batch of ``chunk``)."""
    rng = np.random.default_rng(1)
    shape = (n, box, box // 2 + 1)
    fts = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    df1, df2, ang = random_defocus(n, rng)
    ctf = ctf_2d_stack(box, 1.5, 300, 2.7, 0.07, df1, df2, ang)
    rot = random_rotations(n, rng)
    d, w = new_accumulators(round(pad * box))
    best = {True: float("inf"), False: float("inf")}
    for fast in (True, False):  # compile / load cache
        _insert_slices(d, w, fts[:2], rot[:2], ctf[:2], None, None, "linear", None, "reconstruct", fast)
    for k in range(repeat):
        s = slice((k * chunk) % n, (k * chunk) % n + chunk)
        for fast in (True, False):  # interleaved, so both see the same load
            # CPU time of this thread (numba runs here, one core): time spent descheduled on a busy machine is out
            t = time.thread_time()
            _insert_slices(d, w, fts[s], rot[s], ctf[s], None, None, "linear", None, "reconstruct", fast)
            best[fast] = min(best[fast], time.thread_time() - t)
    return {"fast_ms": best[True] / chunk * 1e3, "general_ms": best[False] / chunk * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--boxes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--n", type=int, default=200, help="images per timing (numba)")
    ap.add_argument("--n-numpy", type=int, default=10, help="images per timing (numpy baseline)")
    ap.add_argument("--insert-pads", type=float, nargs="*", default=[1.0, 2.0],
                    help="padding factors of the ms-per-image insertion timing (none: skip it)")
    args = ap.parse_args()
    fft.use_pyfftw(True, threads=1)
    print(f"{'box':>5} {'extract/s':>10} {'numpy':>8} {'ratio':>6} {'insert/s':>9} {'numpy':>8} {'ratio':>6} "
          f"{'simulate/s':>10} {'prep s':>7}")
    for box in args.boxes:
        r = bench_box(box, args.n, args.n_numpy)
        print(f"{box:5d} {r['extract_per_s']:10.1f} {r['extract_numpy_per_s']:8.1f} "
              f"{r['extract_per_s'] / r['extract_numpy_per_s']:6.1f} {r['insert_per_s']:9.1f} "
              f"{r['insert_numpy_per_s']:8.1f} {r['insert_per_s'] / r['insert_numpy_per_s']:6.1f} "
              f"{r['simulate_per_s']:10.1f} {r['prepare_s']:7.2f}   "
              f"(numba vs numpy max rel. diff: extract {r['extract_max_rel_diff']:.1e}, "
              f"insert {r['insert_max_rel_diff']:.1e})", flush=True)
    if args.insert_pads:
        print(f"\n{'box':>5} {'pad':>4} {'insert ms/img':>14} {'general':>8} {'speedup':>8}")
        for box in args.boxes:
            for pad in args.insert_pads:
                r = bench_insert_ms(box, pad, n=100 if box <= 128 else 30, chunk=10 if box <= 128 else 3)
                print(f"{box:5d} {pad:4.1f} {r['fast_ms']:14.3f} {r['general_ms']:8.3f} "
                      f"{r['general_ms'] / r['fast_ms']:8.1f}", flush=True)


if __name__ == "__main__":
    main()

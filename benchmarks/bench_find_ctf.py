"""CTF estimation speed (``find-ctf``): CPU seconds per 4096² micrograph on one core.

Fits one micrograph with :func:`cistem_mpi.kernels.ctffind.estimate_ctf`
(box 512, ctffind's defaults: 30–5 Å, 5,000–50,000 Å in 100 Å steps), with
and without the phase-shift search (0–pi in 0.1 rad steps), and the same
search in plain numpy (the hot loops - tile FFTs, the 1D grid, the 2D
normalised cross-correlation - as numpy array expressions instead of pyFFTW
plans and numba loops; every other step shared) in the same run.  Reports
CPU seconds (``time.process_time``, as the issue's ctffind figures are CPU
time), the fits, and peak memory (``ru_maxrss``).

The micrographs are the real EPU files of ``../shared/data/mrcfile`` when
present (4096² at 0.6666 Å and 3838 x 3710 at 0.8538 Å, both resampled to
~1.4 Å as ctffind does), else a simulated 4096² micrograph at 0.6666 Å.

ctffind itself on the same EPU files, one core, box 512, defaults, no phase
shift (measured by the issue author, not by us): 0.74 s and 1.17 s CPU.

With ``CISTEM_BIN`` set to a directory of cisTEM console programs (see
``benchmarks/peers.py``; cisTEM is never built by this repository), the
same micrographs are also fitted by cisTEM's ``ctffind`` (box 512, 30-5 Å,
5,000-50,000 Å in 100 Å steps, no phase shift, one thread) in the same run,
and its CPU time (``getrusage`` of the child), peak memory and fit are
printed beside ours.

Sample thickness (``--thickness``, ctffind5's node model): the same
micrographs are timed with the thickness fit on, and simulated 1024² thick
samples (1000, 2000 and 3000 Å, the CTF integrated over the slab) are
fitted by us and, with ``CISTEM_BIN``, by ctffind5 with "Determine sample
thickness" (1D brute force, 2D refinement, 30-3 Å, its defaults) in the
same run: thickness and defocus errors against the truth, and CPU seconds.

Usage::

    python benchmarks/bench_find_ctf.py            # 2 repeats of each
    python benchmarks/bench_find_ctf.py --repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cistem_mpi.kernels import ctffind as K
from cistem_mpi.kernels.ctf import ctf_2d

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

SHARED = Path(os.environ.get("CISTEM_MPI_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _numpy_ncc_2d(values, base, a, ac, as_, m, dx, dy, p, norm_s, mean_s, table=None):
    v = np.abs(np.sin(base + m * a + dx * ac + dy * as_ + p))
    n = values.shape[0]
    sctf = v.sum()
    den = norm_s * (v @ v - sctf * sctf / n)
    return 0.0 if den <= 0 else float((values @ v - mean_s * sctf) / math.sqrt(den))


def _numpy_score_1d_grid(curve, base, a, defoci, phases, table=None):
    out = np.empty((defoci.size, phases.size))
    nc = curve @ curve
    for j, p in enumerate(phases):
        v = np.abs(np.sin(base[None, :] + defoci[:, None] * a[None, :] + p))
        out[:, j] = (v @ curve) / np.sqrt((v * v).sum(axis=1) * nc)
    return out


class _NumpyFFT:
    @staticmethod
    def rfftn(x, axes=None):
        return np.fft.rfftn(x, axes=axes)


@contextlib.contextmanager
def plain_numpy():
    """Swap the kernel's numba loops and pyFFTW plans for plain numpy while inside."""
    saved = (K._ncc_2d, K._score_1d_grid, K._fft)
    K._ncc_2d, K._score_1d_grid, K._fft = _numpy_ncc_2d, _numpy_score_1d_grid, _NumpyFFT
    try:
        yield
    finally:
        K._ncc_2d, K._score_1d_grid, K._fft = saved


def _micrographs() -> list[tuple[str, np.ndarray, float, Path | None]]:
    out = []
    for name, px in (("epu2.9_example.mrc", 0.6666), ("fei-extended.mrc", 0.8538)):
        p = SHARED / "mrcfile" / name
        if p.is_file():
            from cistem_mpi.io.mrc import read_mrc

            img, _ = read_mrc(p, pixel_size=px)
            out.append((name, np.asarray(img, np.float32).squeeze(), px, p))
    if not out:
        n, px = 4096, 0.6666
        rng = np.random.default_rng(0)
        ph = rng.normal(size=(n, n)).astype(np.float32) * 0.1
        c = ctf_2d(n, px, 300.0, 2.7, 0.07, 18400.0, 17600.0, 35.0, 0.0, 60.0)
        img = 1 + 2 * np.fft.irfft2(np.fft.rfft2(ph) * c, s=(n, n))
        out.append(("simulated 4096^2", rng.poisson(np.clip(img, 0, None) * 40 * px * px).astype(np.float32), px,
                    None))
    return out


def _time(fn, repeats: int) -> tuple[float, object]:
    best, res = float("inf"), None
    for _ in range(repeats):
        t = time.process_time()
        res = fn()
        best = min(best, time.process_time() - t)
    return best, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    mics = _micrographs()
    warm = mics[0][1][:1024, :1024]
    K.estimate_ctf(warm, mics[0][2], 300.0, 2.7, 0.07, K.CtffindOptions(box=256))  # numba compile, FFT plans
    K.estimate_ctf(warm, mics[0][2], 300.0, 2.7, 0.07, K.CtffindOptions(box=256, phase_plate=True))
    print(f"{'micrograph':<22} {'search':<12} {'cistem-mpi s':>12} {'numpy s':>9} {'speed-up':>8}   "
          "fit (DF1 DF2 ANGAST PSHIFT)")
    peer_rows = []
    for name, img, px, path in mics:
        if peers.find_peer("ctffind") is not None:
            peer_rows.append((name, img, px, path))
        for label, opts in (("no phase", K.CtffindOptions()), ("phase 0-pi", K.CtffindOptions(phase_plate=True)),
                            ("thickness", K.CtffindOptions(thickness=True))):
            t_ours, r = _time(lambda: K.estimate_ctf(img, px, 300.0, 2.7, 0.07, opts), a.repeats)
            with plain_numpy():
                t_np, rn = _time(lambda: K.estimate_ctf(img, px, 300.0, 2.7, 0.07, opts), 1)
            scale = img.size / 4096 ** 2
            print(f"{name:<22} {label:<12} {t_ours:12.2f} {t_np:9.2f} {t_np / t_ours:7.1f}x   "
                  f"{r.df1:.0f} {r.df2:.0f} {r.angast:.1f} {r.pshift:.2f} (numpy: {rn.df1:.0f} {rn.df2:.0f})"
                  f"  [{t_ours / scale:.2f} s per 4096^2]" + (f" t={r.thickness:.0f} Å" if opts.thickness else ""))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (ru_maxrss): {rss:.0f} MB (includes the micrographs held in memory: "
          f"{sum(m[1].nbytes for m in mics) / 2 ** 20:.0f} MB)")
    print("ctffind 4.1, one core, same EPU files, box 512, no phase shift: 0.74 s and 1.17 s CPU "
          "(measured by the issue author)")
    print(peers.peer_status("ctffind"))
    if peer_rows:
        print(f"{'micrograph':<22} {'ctffind s':>9} {'ours s':>7} {'ratio':>6}  {'ctffind DF1 DF2 ANGAST res':<30} "
              f"{'ours DF1 DF2 ANGAST res':<30} {'ctffind MB':>10}")
    for name, img, px, path in peer_rows:
        with tempfile.TemporaryDirectory() as td:
            if path is None:
                from cistem_mpi.io.mrc import write_mrc

                path = Path(td) / "micrograph.mrc"
                write_mrc(path, img, px)
            fit, run = peers.run_ctffind(path, px, Path(td))
        t_ours, r = _time(lambda: K.estimate_ctf(img, px, 300.0, 2.7, 0.07, K.CtffindOptions()), a.repeats)
        theirs = f"{fit['df1']:.0f} {fit['df2']:.0f} {fit['angast']:.1f} {fit['fit_resolution']:.2f}"
        ours = f"{r.df1:.0f} {r.df2:.0f} {r.angast:.1f} {r.fit_resolution:.2f}"
        print(f"{name:<22} {run.cpu_s:9.2f} {t_ours:7.2f} {run.cpu_s / t_ours:5.1f}x  {theirs:<30} {ours:<30} "
              f"{run.peak_mb:10.0f}")
    thickness_accuracy(a.repeats)


def _ctffind_thickness(path: Path, px: float, workdir: Path) -> tuple[list[float], object]:
    """ctffind5 with "Determine sample thickness" (its defaults); returns (the .txt row, run)."""
    ans = peers.ctffind_answers(path.resolve(), workdir / "diagnostic.mrc", px)
    k = len(ans) - 2  # ... tilt, thickness, expert options
    ans = ans[:k] + ["yes", "yes", "yes", 30.0, 3.0, "no", "no"] + ans[k + 1:]
    run = peers.run_peer("ctffind", ans, workdir)
    txt = workdir / "diagnostic.txt"
    if run.returncode != 0 or not txt.is_file():
        raise RuntimeError(f"ctffind failed (rc {run.returncode}):\n{run.output[-2000:]}")
    row = [ln.split() for ln in txt.read_text().splitlines() if ln.strip() and not ln.startswith("#")][0]
    return [float(x) for x in row], run


def thickness_accuracy(repeats: int) -> None:
    """Thickness and defocus of simulated thick samples: ours and (with CISTEM_BIN) ctffind5's, against the truth."""
    from cistem_mpi.drivers.simulate import simulate_micrographs
    from cistem_mpi.io.mrc import read_mrc

    have_peer = peers.find_peer("ctffind") is not None
    print("\nthick samples (1024^2, 1.5 Å, 40 e/Å^2, simulated slab): errors against the truth")
    print(f"{'truth t':>8} {'DF1 DF2':>12} | {'ours t':>7} {'dDF1 dDF2':>11} {'s':>6} | "
          f"{'ctffind5 t':>10} {'dDF1 dDF2':>11} {'s':>6} | {'ours, no --thickness dDF1 dDF2':>30}")
    for t, seed in ((1000.0, 10), (2000.0, 20), (3000.0, 30)):
        with tempfile.TemporaryDirectory() as td:
            sim = simulate_micrographs(Path(td) / "sim", n_micrographs=1, shape=(1024, 1024), pixel_size=1.5,
                                       defocus_mean=15000, defocus_spread=5000, astigmatism=500, exposure=40,
                                       seed=seed, n_per_micrograph=10, thickness_angstrom=t)
            img = np.asarray(read_mrc(sim.micrographs[0], pixel_size=1.5)[0], np.float32).squeeze()
            d1, d2 = float(max(sim.ctf[0][:2])), float(min(sim.ctf[0][:2]))
            t_ours, r = _time(lambda: K.estimate_ctf(img, 1.5, 300.0, 2.7, 0.07, K.CtffindOptions(thickness=True)),
                              repeats)
            plain = K.estimate_ctf(img, 1.5, 300.0, 2.7, 0.07)
            theirs = "(CISTEM_BIN not set)"
            if have_peer:
                wd = Path(td) / "peer"
                wd.mkdir()
                v, run = _ctffind_thickness(sim.micrographs[0], 1.5, wd)
                theirs = f"{v[9]:10.0f} {v[1] - d1:+5.0f} {v[2] - d2:+5.0f} {run.cpu_s:6.2f}"
            print(f"{t:8.0f} {d1:6.0f}{d2:6.0f} | {r.thickness:7.0f} {r.df1 - d1:+5.0f} {r.df2 - d2:+5.0f} "
                  f"{t_ours:6.2f} | {theirs} | {plain.df1 - d1:+15.0f} {plain.df2 - d2:+5.0f}")


if __name__ == "__main__":
    main()

"""Movie reading throughput: LZW TIFF and MRC against raw ``np.fromfile``.

Writes one synthetic counting-mode movie (Poisson counts, uint8) three ways -
LZW TIFF (as SerialEM writes K3 movies), MRC mode 0 and plain uncompressed
bytes - then streams each back frame by frame through
:func:`cistem_mpi.io.movies.open_movie` and reports frames/s, the ratio to
``np.fromfile`` of the same uncompressed bytes, and the peak memory traced
while streaming (tracemalloc; numpy buffers are traced).

The files are read right after being written, so they come from the page
cache: the numbers measure decoding and copying, not the disk.

Usage::

    python benchmarks/bench_io.py            # 4096 x 4096 x 40 (about 1.5 GB of files)
    python benchmarks/bench_io.py --small    # 1024 x 1024 x 10
    python benchmarks/bench_io.py --nx 2048 --ny 2048 --frames 20
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from cistem_mpi.io.movies import open_movie, write_mrc_movie, write_tiff_movie


def _frames(n: int, ny: int, nx: int, dose: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield rng.poisson(dose, size=(ny, nx)).astype(np.uint8)


def _stream(open_fn) -> tuple[float, int, float]:
    """Read every frame; return (seconds, checksum, peak traced MB)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    total = 0
    with open_fn() as movie:
        for frame in movie:
            total += int(frame[::97, ::89].sum())  # touch the frame without a big temporary
    dt = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return dt, total, peak / 1e6


class _RawMovie:
    """np.fromfile of one frame at a time: the baseline."""

    def __init__(self, path: Path, n: int, ny: int, nx: int):
        self.path, self.n, self.ny, self.nx = path, n, ny, nx

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def __iter__(self):
        size = self.ny * self.nx
        for k in range(self.n):
            yield np.fromfile(self.path, dtype=np.uint8, count=size, offset=k * size).reshape(self.ny, self.nx)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nx", type=int, default=4096)
    ap.add_argument("--ny", type=int, default=4096)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--small", action="store_true", help="1024 x 1024 x 10")
    ap.add_argument("--dose", type=float, default=1.0, help="mean counts per pixel per frame (default 1)")
    ap.add_argument("--dir", help="where to write the test files (default: a temporary directory)")
    ap.add_argument("--repeat", type=int, default=2, help="read each file this many times, keep the best")
    args = ap.parse_args(argv)
    if args.small:
        args.nx = args.ny = 1024
        args.frames = 10
    n, ny, nx = args.frames, args.ny, args.nx
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_io_"))
    workdir.mkdir(parents=True, exist_ok=True)
    raw, tif, mrc = workdir / "movie.raw", workdir / "movie.tif", workdir / "movie.mrc"
    frame_mb = ny * nx / 1e6
    try:
        print(f"movie {nx} x {ny} x {n} uint8, Poisson({args.dose}) counts; frame = {frame_mb:.1f} MB")
        t0 = time.perf_counter()
        with open(raw, "wb") as fh:
            for fr in _frames(n, ny, nx, args.dose):
                fr.tofile(fh)
        t_raw = time.perf_counter() - t0
        t0 = time.perf_counter()
        write_tiff_movie(tif, _frames(n, ny, nx, args.dose), compression="lzw", n_frames=n)
        t_tif = time.perf_counter() - t0
        t0 = time.perf_counter()
        write_mrc_movie(mrc, (f.astype(np.int8) for f in _frames(n, ny, nx, args.dose)), 1.0, n_frames=n,
                        dtype=np.int8)
        t_mrc = time.perf_counter() - t0
        sizes = {p.name: p.stat().st_size / 1e6 for p in (raw, tif, mrc)}
        print(f"written (incl. generating the counts): raw {t_raw:.1f} s, LZW TIFF {t_tif:.1f} s "
              f"({sizes['movie.tif']:.0f} MB, ratio {sizes['movie.raw'] / sizes['movie.tif']:.2f}), "
              f"MRC {t_mrc:.1f} s ({sizes['movie.mrc']:.0f} MB)")

        cases = {
            "np.fromfile (baseline)": lambda: _RawMovie(raw, n, ny, nx),
            "MRC mode 0 (open_movie)": lambda: open_movie(mrc),
            "LZW TIFF (open_movie)": lambda: open_movie(tif),
        }
        results = {}
        for name, fn in cases.items():
            best = None
            for _ in range(max(1, args.repeat)):
                dt, check, peak = _stream(fn)
                if best is None or dt < best[0]:
                    best = (dt, check, peak)
            results[name] = best
        checks = {v[1] for v in results.values()}
        assert len(checks) == 1, f"formats disagree: {results}"
        base_fps = n / results["np.fromfile (baseline)"][0]
        print(f"{'reader':28s} {'frames/s':>9s} {'MB/s':>8s} {'vs fromfile':>11s} {'peak traced MB':>15s}")
        for name, (dt, _, peak) in results.items():
            fps = n / dt
            print(f"{name:28s} {fps:9.1f} {fps * frame_mb:8.0f} {fps / base_fps:11.2f} {peak:15.1f}")
        print(f"(one frame is {frame_mb:.1f} MB; the whole movie {n * frame_mb:.0f} MB)")
    finally:
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Particle extraction throughput (``package create --from-positions``).

Writes synthetic float32 micrographs (4096 x 4096 by default) with random
particle positions, then cuts them two ways and reports micrographs/s and
particles/s:

* ``cistem-mpi``: :func:`cistem_mpi.drivers.extraction.cut_micrograph`
  (read, outlier replacement, edge-mean fill, cut, normalise) - the work one
  rank does per task - and the whole :func:`extract_stack` on one rank
  (including writing the stack).
* baseline: the obvious numpy version of the same steps (``mrcfile.read``,
  ``np.pad`` of the whole micrograph by half a box so every box is a plain
  slice, per-box mean/std).

The files are read right after being written, so they come from the page
cache: the numbers measure computing and copying, not the disk.

Usage::

    python benchmarks/bench_extraction.py            # 4 micrographs 4096^2, 300 particles each, box 256
    python benchmarks/bench_extraction.py --small    # 1024^2, 60 particles, box 128
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np

from cistem_mpi.drivers.extraction import ExtractionPlan, Micrograph, cut_micrograph, extract_stack
from cistem_mpi.drivers.runtime import World
from cistem_mpi.io.mrc import write_mrc
from cistem_mpi.io.params import Optics
from cistem_mpi.kernels.extraction import box_corners


def _baseline(path: str, x: np.ndarray, y: np.ndarray, box: int) -> np.ndarray:
    img = mrcfile.read(path).astype(np.float32)
    mean, sd = img.mean(), img.std()
    img = np.where(np.abs(img - mean) > 6 * sd, mean, img)
    edge = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]]).mean()
    h = box // 2
    padded = np.pad(img, box, constant_values=edge)
    out = np.empty((len(x), box, box), np.float32)
    for i, (cx, cy) in enumerate(zip(np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int))):
        b = padded[cy - h + box:cy - h + 2 * box, cx - h + box:cx - h + 2 * box]
        out[i] = (b - b.mean()) / b.std()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--micrographs", type=int, default=4)
    a = ap.parse_args()
    size, n_part, box = (1024, 60, 128) if a.small else (4096, 300, 256)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        mics = []
        for k in range(a.micrographs):
            path = Path(tmp) / f"mic_{k}.mrc"
            write_mrc(path, rng.normal(size=(size, size)).astype(np.float32), 1.5)
            xy = rng.uniform(0, size - 1, size=(n_part, 2))
            mics.append((str(path), xy[:, 0], xy[:, 1]))
        n_total = a.micrographs * n_part
        print(f"{a.micrographs} micrographs {size}x{size}, {n_part} particles each, box {box}")

        t0 = time.perf_counter()
        for path, x, y in mics:
            ref = _baseline(path, x, y, box)
        t_base = time.perf_counter() - t0

        t0 = time.perf_counter()
        for path, x, y in mics:
            x0, y0, _, _ = box_corners(x, y, box)
            got = cut_micrograph(path, x0, y0, box, False, 1.5)
        t_cut = time.perf_counter() - t0
        assert np.allclose(got, ref, atol=1e-4), "baseline and cistem-mpi disagree"

        micrographs, start = [], 0
        for k, (path, x, y) in enumerate(mics):
            x0, y0, _, _ = box_corners(x, y, box)
            micrographs.append(Micrograph(k + 1, f"mic_{k}", path, start, start + n_part, x0, y0))
            start += n_part
        plan = ExtractionPlan(box=box, optics=Optics(1.5, 300.0, 2.7, 0.07), invert=False, micrographs=micrographs,
                              position_ids=np.arange(n_total), film=np.ones(n_total, np.int32),
                              ctf=np.zeros((n_total, 4)), shift_px=np.zeros((n_total, 2)))
        t0 = time.perf_counter()
        extract_stack(World(None), plan, Path(tmp) / "stack.mrcs")
        t_job = time.perf_counter() - t0

    def line(name: str, t: float) -> str:
        return (f"{name:<34} {a.micrographs / t:7.2f} micrographs/s {n_total / t:9.0f} particles/s "
                f"({t_base / t:4.2f}x baseline)")

    print(line("baseline (numpy, np.pad)", t_base))
    print(line("cut_micrograph (one rank's task)", t_cut))
    print(line("extract_stack, 1 rank (+ writing)", t_job))


if __name__ == "__main__":
    main()

"""Particle-picking throughput: seconds per 4096^2 micrograph per core (``find-particles``).

One realistic micrograph (:func:`cistem_mpi.drivers.simulate.simulate_micrographs`,
physics "realistic", 4096^2 at 1.0 Å/pixel by default) is picked

* template-free (cisTEM's disc; highest resolution 30 Å, as cisTEM's GUI), and
* reference-based with 10 references x 36 in-plane rotations,

by :func:`cistem_mpi.kernels.picking.find_particles` (pyFFTW plans, numba
peak search and background boxes, cumulative-sum local statistics) and by a
plain-numpy version of the same steps in the same run (``numpy.fft``, local
statistics by an FFT convolution with a box, the greedy peak search as
repeated ``argmax`` + blanking, background boxes as repeated ``argmin``).
Reading the file is not timed there; beside cisTEM it is (as cisTEM's is).  Peak memory: ``resource.getrusage``.

With ``CISTEM_BIN`` set to a directory of cisTEM console programs (see
``benchmarks/peers.py``; cisTEM is never built by this repository), cisTEM's
``find_particles`` picks the same micrograph (written to a temporary MRC,
template-free, the same radii, resolution, threshold and edge, the true CTF)
in the same run: its CPU time (``getrusage`` of the child, reading the file
included), peak memory, and both pickers' precision / recall against the
simulated truth (a pick is right within 0.2 particle diameters).

Usage::

    python benchmarks/bench_find_particles.py            # 4096^2, 1.0 Å/px
    python benchmarks/bench_find_particles.py --small    # 2048^2
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

import cistem_mpi.kernels.picking as pk
from cistem_mpi.drivers.find_particles import view_directions
from cistem_mpi.drivers.simulate import assembly_map, simulate_micrographs
from cistem_mpi.io.mrc import read_mrc
from cistem_mpi.kernels.projection import project

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402


class _NumpyFFT:
    """The subset of :mod:`cistem_mpi.kernels.fft` the picker uses, in plain numpy."""

    @staticmethod
    def rfftn(a):
        return np.fft.rfftn(a).astype(np.complex64)

    @staticmethod
    def irfftn(f, n_last):
        return np.fft.irfftn(f, s=(f.shape[0], n_last), axes=(0, 1)).astype(np.float32)

    @staticmethod
    def rfft2_crop(a, shape):
        # the whole transform, then the kept block
        f = np.fft.rfft2(a)
        hy, hx = shape[0] // 2, shape[1] // 2 + 1
        return np.concatenate([f[:hy, :hx], f[a.shape[0] - hy:, :hx]]).astype(np.complex64)

    @staticmethod
    def ft2(a):
        return np.fft.rfft2(np.fft.ifftshift(a)).astype(np.complex64)

    @staticmethod
    def ift2(f, nx=None):
        n = f.shape[-2] if nx is None else nx
        return np.fft.fftshift(np.fft.irfft2(f, s=(f.shape[-2], n))).astype(np.float32)


def _np_local_mean_sigma(image, side):
    # box means by an FFT convolution of the mirrored image (the same boxes as the kernel's)
    ny, nx = image.shape
    h0, h1 = side // 2, side - side // 2
    a = np.pad(np.asarray(image, dtype=np.float64), ((h0, h1), (h0, h1)), mode="reflect")
    k = np.zeros_like(a)
    k[:side, :side] = 1.0 / (side * side)
    fk = np.conj(np.fft.rfft2(k))
    m = np.fft.irfft2(np.fft.rfft2(a) * fk, s=a.shape)[:ny, :nx]
    v = np.fft.irfft2(np.fft.rfft2(a * a) * fk, s=a.shape)[:ny, :nx] - m * m
    return m.astype(np.float32), np.sqrt(np.clip(v, 0, None)).astype(np.float32)


def _np_greedy(score, floor, radius, edge_y=0, edge_x=0):
    s = np.array(score, dtype=np.float32)
    ny, nx = s.shape
    if edge_y:
        s[:edge_y] = s[ny - edge_y:] = -np.inf
    if edge_x:
        s[:, :edge_x] = s[:, nx - edge_x:] = -np.inf
    yy, xx = np.mgrid[0:ny, 0:nx]
    out = []
    while True:
        k = int(np.argmax(s))
        y, x = divmod(k, nx)
        if s[y, x] < floor:
            break
        out.append((y, x))
        s[(yy - y) ** 2 + (xx - x) ** 2 <= radius * radius] = -np.inf
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def _np_background(local_sigma, box, n_boxes):
    s = np.array(local_sigma, dtype=np.float32)
    h = box // 2
    s[:h] = s[-h:] = np.inf
    s[:, :h] = s[:, -h:] = np.inf
    out = []
    for _ in range(n_boxes):
        k = int(np.argmin(s))
        y, x = divmod(k, s.shape[1])
        if not np.isfinite(s[y, x]):
            break
        out.append((y, x))
        s[max(0, y - h):y + h + 1, max(0, x - h):x + h + 1] = np.inf  # its own box (cisTEM)
    return np.array(out, dtype=np.int64).reshape(-1, 2)


@contextlib.contextmanager
def numpy_baseline():
    """Swap the picker's FFTs, local statistics, peak search and background boxes for plain numpy."""
    saved = (pk._fft, pk.local_mean_sigma, pk.greedy_peaks, pk.background_boxes)
    pk._fft, pk.local_mean_sigma, pk.greedy_peaks, pk.background_boxes = (
        _NumpyFFT, _np_local_mean_sigma, _np_greedy, _np_background)
    try:
        yield
    finally:
        pk._fft, pk.local_mean_sigma, pk.greedy_peaks, pk.background_boxes = saved


def _time(fn, repeat=1):
    """Best wall time of ``repeat`` calls (this process is one core: one FFTW thread, serial numba)."""
    best = np.inf
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _cpu(fn):
    """CPU seconds (user + system) of one call, to set beside the peer's CPU time."""
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="2048^2 instead of 4096^2")
    a = ap.parse_args()
    n, ps = (2048, 1.0) if a.small else (4096, 1.0)
    with tempfile.TemporaryDirectory() as d:
        # simulated at 2 Å/px (half the pixels to simulate), then Fourier-padded to n x n at 1 Å/px
        sim = simulate_micrographs(d, n_micrographs=1, shape=(n // 2, n // 2), n_per_micrograph=400,
                                   pixel_size=2 * ps, exposure=40.0, seed=1, physics="realistic",
                                   defocus_mean=17500, defocus_spread=100, astigmatism=200, contamination=2,
                                   carbon_fraction=0.1)
        small, _ = read_mrc(sim.micrographs[0])
        img = pk.fourier_resample(small, (n, n))
        df1, df2, ang, _ = sim.ctf[0]
        truth = sim.positions[0] * 2 * ps  # Å
        radius = float(sim.truths[0]["radius_angstrom"][0])
    refs = project(assembly_map(8, 4.0), view_directions(10), method="cubic")
    params = pk.PickingParams(characteristic_radius=72.5, maximum_radius=100.0, threshold=4.0)

    def free():
        return pk.find_particles(img, ps, 300.0, 2.7, 0.07, df1, df2, ang, params=params)

    def ref():
        return pk.find_particles(img, ps, 300.0, 2.7, 0.07, df1, df2, ang, params=params, references=refs,
                                 reference_pixel_size=4.0)

    free()  # numba compilation, FFT plans
    rows = []
    for name, fn in (("template-free", free), ("10 refs x 36 rotations", ref)):
        t_ours, r_ours = _time(fn)
        with numpy_baseline():
            t_np, r_np = _time(fn)
        same = len(r_ours.x) == len(r_np.x) and np.allclose(r_ours.x, r_np.x, atol=0.5 * r_ours.pixel_size)
        rows.append((name, t_ours, t_np, len(r_ours.x), same))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"micrograph {n}x{n} at {ps} Å/px, resampled to {rows and r_ours.image.shape} "
          f"({r_ours.pixel_size:.2f} Å/px); 1 core")
    print(f"{'mode':26s} {'cistem-mpi s':>13s} {'numpy s':>9s} {'speed-up':>9s} {'picks':>6s} same picks")
    for name, t1, t2, k, same in rows:
        print(f"{name:26s} {t1:13.2f} {t2:9.2f} {t2 / t1:9.2f} {k:6d} {same}")
    print(f"peak RSS {peak:.0f} MB")
    print(peers.peer_status("find_particles"))
    if peers.find_peer("find_particles") is None:
        return
    from cistem_mpi.io.mrc import write_mrc

    cpu_free, r_free = _cpu(free)
    with tempfile.TemporaryDirectory() as td:
        mic = Path(td) / "micrograph.mrc"
        write_mrc(mic, img.astype(np.float32), ps)
        with warnings.catch_warnings():  # 1 Å/px reads back as "unset" in MRC headers
            warnings.simplefilter("ignore")
            read_mrc(mic, pixel_size=ps)  # as the peer's: the file in the page cache
            cpu_read, _ = _cpu(lambda: read_mrc(mic, pixel_size=ps))
        picks, run = peers.run_find_particles(mic, ps, df1, df2, ang, Path(td), typical_radius=params.characteristic_radius,
                                              maximum_radius=params.maximum_radius,
                                              highest_resolution=params.highest_resolution,
                                              min_distance_from_edges=params.edge, threshold=params.threshold,
                                              avoid_high_variance=params.avoid_high_variance)
    edge_a = params.edge * ps
    print(f"{'template-free picker':26s} {'CPU s':>7s} {'picks':>6s} {'precision':>9s} {'recall':>7s}")
    for name, t, xy in (("cistem-mpi", cpu_free, np.stack([r_free.x, r_free.y], 1)),
                        ("cisTEM find_particles", run.cpu_s, picks[:, :2] * ps)):
        p_, r_ = _precision_recall(xy, truth, radius, n * ps, edge_a)
        print(f"{name:26s} {t:7.2f} {len(xy):6d} {p_:9.2f} {r_:7.2f}")
    print(peers.cpu_line("cisTEM find_particles", run) + " (includes reading the MRC file)")
    both = cpu_free + cpu_read
    print(f"template-free, CPU seconds per {n}^2 micrograph on one core, reading the MRC included: cistem-mpi "
          f"{both:.2f} ({cpu_read:.2f} of it reading), cisTEM find_particles {run.cpu_s:.2f} "
          f"(cisTEM / cistem-mpi = {run.cpu_s / both:.2f}); cisTEM's find_particles has no reference-based mode")


def _precision_recall(xy: np.ndarray, truth: np.ndarray, radius: float, size: float, edge: float):
    """Picks right within 0.2 diameters of a true centre; recall over particles inside the edge."""
    inside = np.all((truth > edge + radius) & (truth < size - edge - radius), axis=1)
    if not len(xy):
        return 0.0, 0.0
    d = np.sqrt(((xy[:, None] - truth[None]) ** 2).sum(-1))
    return float((d.min(1) < 0.4 * radius).mean()), float(((d.min(0) < 0.4 * radius) & inside).sum() / inside.sum())


if __name__ == "__main__":
    main()

"""Read and read-plus-align rate of LZW TIFF against MRC movies on a kernel-throttled block device.

Where does compression win?  An LZW TIFF of counting data is several times
smaller than the uint16 MRC of the same frames but costs CPU to decode; on a
slow (shared) file system the saved bytes outweigh the decoding.  This
benchmark measures the crossover on a real block device whose read rate the
kernel limits:

1. Simulates one movie with :func:`cistem_mpi.drivers.simulate.simulate_movies`
   (as ``cistem-mpi simulate movies --size 2048 2048 --frames 30 --pixel-size 1
   --exposure-per-frame 1 --formats mrc tiff``: Poisson counts, uint16 MRC and
   LZW TIFF, a gain reference) and prints both file sizes and their ratio.
2. Makes a file-backed ext4 image (``truncate`` + ``mkfs.ext4``), attaches it
   with ``losetup`` and mounts it; copies both movies onto it.  A child blkio
   cgroup (cgroup v1, ``blkio.throttle.read_bps_device``) limits reads from the
   loop device.  Each measured process joins that cgroup itself before it
   reads.  The page cache is dropped (``sync; echo 3 > drop_caches``) before
   every timed run, and the reader also calls ``posix_fadvise(DONTNEED)`` on
   the file, so every byte comes from the device through the throttle.
3. Verifies the throttle first: a plain ``os.read`` of the MRC (or, if that
   is read in under 1.5 s at the highest limit, of a random file that is not) in a fresh
   process under every limit; the rate after the first quarter of the file
   (blk-throttle lets a short burst through at first) must follow the limit
   (within -30 % / +15 %), else the throttle is tried on the loop's backing device, and
   if neither works the benchmark stops (it never simulates a throttle).
4. For every rate, in a fresh process in the cgroup, times on the MRC and on
   the TIFF: ``read`` (every frame through :func:`cistem_mpi.io.movies.open_movie`,
   as align-movies reads them: MRC memory-mapped, TIFF decoded by tifffile)
   and ``align`` (:func:`cistem_mpi.drivers.align_movies.align_one` with
   ``--full-frame-only``: read + gain + outliers + alignment + sums + outputs;
   one FFT thread, one movie per core as in a job).  Before the timed part the
   process aligns the same movie from the unthrottled disk once, so imports,
   JIT caches and FFTW plans are not in the figure (a job of many movies pays
   them once).  Outputs and the gain go to the unthrottled disk.

Reported: wall seconds, MB/s of file read (file size / wall), the bytes that
reached the block device (``/proc/self/io`` read_bytes: shows the cache was
cold), the TIFF/MRC wall ratio per rate (< 1: compression wins), the measured
crossover rate (log-linear interpolation between the rates bracketing ratio 1;
the unthrottled run counts at the device's measured plain-read rate)
and the crossover from the simple model ``wall = CPU + bytes / rate`` fitted to
the unthrottled runs.  MB = 10^6 bytes throughout; the limits are in MB/s.
The CPU other processes used during each run is recorded (``/proc/stat``); runs
during which they kept more than half a core busy are flagged, since
on a small machine they stretch the wall time.

Needs root (losetup, mount, cgroups, drop_caches) and cgroup v1 blkio mounted
at ``/sys/fs/cgroup/blkio``.  Cleans up (unmount, detach, remove the cgroup)
also on Ctrl-C.

Usage::

    sudo python benchmarks/bench_compressed_throttled.py                 # 2048^2 x 30, 25-200 MB/s
    sudo python benchmarks/bench_compressed_throttled.py --quick         # 1024^2 x 16, 25/100 MB/s
    sudo python benchmarks/bench_compressed_throttled.py --rates 10 25 50 100 200 400
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

BLKIO = Path("/sys/fs/cgroup/blkio")
MB = 1e6
CHUNK = 1 << 20  # plain-read block for the throttle check: large enough that syscalls cost nothing, small
                 # enough to time the rate after the throttle's initial burst


# ----------------------------------------------------------------------------------- child (measured) side
def _io_read_bytes() -> int:
    """Bytes this process caused to be fetched from a block device (cache misses only)."""
    with open("/proc/self/io") as fh:
        for line in fh:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def _drop_file_cache(path: str) -> None:
    """Evict this file's clean pages (in addition to the global drop_caches before the run)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _child_main(spec: dict) -> dict[str, Any]:
    # join the throttled cgroup before touching the measured file: the limit applies to this task's bios
    with open(spec["cgroup"], "w") as fh:
        fh.write(str(os.getpid()))
    mode, path = spec["mode"], spec["path"]
    if mode == "plain":
        _drop_file_cache(path)
        b0, t0 = _io_read_bytes(), time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        marks = []  # (seconds, bytes so far) after every chunk: the steady rate leaves out the first burst
        try:
            total = 0
            while True:
                got = os.read(fd, CHUNK)
                if not got:
                    break
                total += len(got)
                marks.append((time.perf_counter() - t0, total))
        finally:
            os.close(fd)
        wall = time.perf_counter() - t0
        tq, bq = next((t, b) for t, b in marks if b >= total / 4)
        steady = (total - bq) / (wall - tq) if wall > tq else total / wall
        return {"wall": wall, "bytes": total, "steady_bps": steady, "dev_bytes": _io_read_bytes() - b0}

    from cistem_mpi.kernels import fft as _fft

    _fft.use_pyfftw(True, threads=1)
    from cistem_mpi.drivers.align_movies import align_one
    from cistem_mpi.io.movies import open_movie
    from bench_align_movies import _item, _options

    size, n, out = spec["size"], spec["frames"], spec["out"]

    def read_all(p: str) -> int:
        s = 0
        with open_movie(p) as mv:
            for f in mv:
                s += int(f[0, 0])  # touch the frame; the copy/decode is what is measured
        return s

    # warm-up on the unthrottled original: imports, numba caches, tifffile/imagecodecs, FFTW plans
    if mode == "read":
        read_all(spec["warm"])
    else:
        align_one(_item(spec["warm"], spec["gain"], out, size, n, f"warm_{spec['fmt']}"), _options(True))
    _drop_file_cache(path)
    b0, c0, t0 = _io_read_bytes(), time.process_time(), time.perf_counter()
    if mode == "read":
        read_all(path)
    else:
        align_one(_item(path, spec["gain"], out, size, n, f"timed_{spec['fmt']}"), _options(True))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall": wall, "cpu": cpu, "bytes": os.path.getsize(path), "dev_bytes": _io_read_bytes() - b0}


# ----------------------------------------------------------------------------------- parent side
def _sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def _drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (user+nice+system+irq+softirq+steal, all cores)."""
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    return (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / os.sysconf("SC_CLK_TCK")


def _run_child(spec: dict) -> dict[str, Any]:
    """One measurement in a fresh interpreter (so no page, plan or allocator state carries over)."""
    _drop_caches()
    busy0, c0, t0 = _busy_cpu_s(), os.times(), time.perf_counter()
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    busy1, c1, life = _busy_cpu_s(), os.times(), time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"child {spec['mode']} {spec['path']} failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    # CPU the rest of the machine used while the child ran (the child's whole life, warm-up included):
    # on 2 cores, other load competes with the measured process and inflates its wall time
    child_cpu = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
    out["other_cpu"] = max(0.0, busy1 - busy0 - child_cpu)
    out["other_load"] = out["other_cpu"] / life  # mean cores busy with something else
    return out


class Throttle:
    """A child blkio cgroup whose read limit on one device can be changed between runs."""

    def __init__(self) -> None:
        if not (BLKIO / "blkio.throttle.read_bps_device").is_file():
            raise SystemExit(f"no cgroup v1 blkio throttle at {BLKIO} (blkio.throttle.read_bps_device missing)")
        self.dir = BLKIO / f"cistem_bench_throttle_{os.getpid()}"
        self.dir.mkdir()
        self.procs = str(self.dir / "cgroup.procs")
        self.dev: str | None = None

    def set(self, dev: str, rate_mb: float) -> None:
        """Limit reads from ``dev`` (MAJ:MIN) to ``rate_mb`` MB/s; 0 removes the limit."""
        f = self.dir / "blkio.throttle.read_bps_device"
        if self.dev and self.dev != dev:
            f.write_text(f"{self.dev} 0\n")  # one device throttled at a time
        self.dev = dev
        f.write_text(f"{dev} {int(rate_mb * MB)}\n")

    def remove(self) -> None:
        if self.dir.is_dir():
            if self.dev:
                try:
                    (self.dir / "blkio.throttle.read_bps_device").write_text(f"{self.dev} 0\n")
                except OSError:
                    pass
            for _ in range(50):  # children are gone, but the kernel may take a moment to drop them
                try:
                    self.dir.rmdir()
                    return
                except OSError:
                    time.sleep(0.1)
            print(f"warning: could not remove cgroup {self.dir}", file=sys.stderr)


class LoopFs:
    """A file-backed ext4 image, attached to a loop device and mounted."""

    def __init__(self, image: Path, size_bytes: int, mnt: Path) -> None:
        self.image, self.mnt, self.dev, self.mounted = image, mnt, None, False
        _sh("truncate", "-s", str(size_bytes), str(image))
        _sh("mkfs.ext4", "-q", "-F", str(image))
        self.dev = _sh("losetup", "--find", "--show", str(image))
        mnt.mkdir(parents=True, exist_ok=True)
        _sh("mount", self.dev, str(mnt))
        self.mounted = True
        self.majmin = _sh("lsblk", "-dno", "MAJ:MIN", self.dev).strip()
        st = image.stat()  # the device holding the image file: the other place a throttle may bite
        self.backing_majmin = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"

    def remove(self) -> None:
        if self.mounted:
            if subprocess.run(["umount", str(self.mnt)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)
            self.mounted = False
        if self.dev:
            subprocess.run(["losetup", "-d", self.dev], capture_output=True)
            self.dev = None


def _verify(throttle: Throttle, fs: LoopFs, path: Path, rates: list[float]) -> tuple[str, list[dict]]:
    """Find the device whose throttle limits our reads; print the plain-read rate under each limit."""
    for dev, what in ((fs.majmin, f"loop device {fs.dev}"), (fs.backing_majmin, "backing device of the image")):
        rows, ok = [], True
        for rate in [*rates, 0.0]:
            throttle.set(dev, rate)
            r = _run_child({"mode": "plain", "path": str(path), "cgroup": throttle.procs})
            got, steady = r["bytes"] / r["wall"] / MB, r["steady_bps"] / MB
            # blk-throttle lets a short burst through at the start: judge the rate after the first quarter
            good = rate == 0 or 0.7 * rate <= steady <= 1.15 * rate
            ok &= good
            rows.append({"limit": rate, "mb_s": got, "steady": steady, "wall": r["wall"],
                         "dev_mb": r["dev_bytes"] / MB, "ok": good})
        throttle.set(dev, 0)
        print(f"\nthrottle check on {what} ({dev}): plain os.read of {path.name}, {path.stat().st_size / MB:.0f} MB")
        print(f"{'limit MB/s':>10s} {'read MB/s':>10s} {'steady MB/s':>12s} {'wall s':>7s} {'from device MB':>15s}  ok")
        for x in rows:
            lim = "none" if x["limit"] == 0 else f"{x['limit']:g}"
            print(f"{lim:>10s} {x['mb_s']:10.1f} {x['steady']:12.1f} {x['wall']:7.2f} {x['dev_mb']:15.0f}  "
                  f"{'yes' if x['ok'] else 'NO'}")
        if ok:
            return dev, rows
    raise SystemExit("no kernel read throttle works here (see the tables above); nothing measured")


def _crossover(rates: list[float], ratio: list[float]) -> float | None:
    """Rate (MB/s) at which the TIFF/MRC wall ratio crosses 1, interpolated in log rate."""
    pts = sorted(zip(rates, ratio))
    for (r0, q0), (r1, q1) in zip(pts, pts[1:]):
        if (q0 - 1) * (q1 - 1) <= 0 and q0 != q1:
            t = (1 - q0) / (q1 - q0)
            return math.exp(math.log(r0) + t * (math.log(r1) - math.log(r0)))
    return None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048, help="frame edge in pixels (default 2048)")
    ap.add_argument("--frames", type=int, default=30, help="frames per movie (default 30)")
    ap.add_argument("--rates", type=float, nargs="+", default=[25, 50, 100, 200],
                    help="read limits in MB/s (an unthrottled run is always added)")
    ap.add_argument("--quick", action="store_true", help="1024 x 1024 x 16 frames, rates 25 and 100 MB/s")
    ap.add_argument("--workdir", default=None, help="where the movies, image and outputs go (default: a temp dir)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        print(json.dumps(_child_main(json.loads(a.child))))
        return
    if os.geteuid() != 0:
        raise SystemExit("needs root: losetup, mount, cgroups and drop_caches")
    if a.quick:
        a.size, a.frames, a.rates = 1024, 16, [25.0, 100.0]
    rates = sorted(set(a.rates))

    # SIGTERM as Ctrl-C, so the finally block below always unmounts and removes the cgroup
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # also when started in the background, where SIGINT is inherited ignored
    from cistem_mpi.drivers.simulate import simulate_movies

    with tempfile.TemporaryDirectory(dir=a.workdir) as td:
        d = Path(td)
        t0 = time.perf_counter()
        sim = simulate_movies(d / "sim", 1, (a.size, a.size), a.frames, 1.0, 1.0, seed=1, formats=("mrc", "tiff"),
                              drift_total_px=8.0)
        orig = {"mrc": Path(sim.movies["mrc"][0]), "tiff": Path(sim.movies["tiff"][0])}
        sizes = {k: p.stat().st_size for k, p in orig.items()}
        print(f"movie {a.size} x {a.size} x {a.frames}, 1 Å/px, 1 e/Å²/frame, simulated in "
              f"{time.perf_counter() - t0:.0f} s")
        print(f"MRC (uint16) {sizes['mrc'] / MB:.1f} MB, LZW TIFF {sizes['tiff'] / MB:.1f} MB, "
              f"MRC/TIFF = {sizes['mrc'] / sizes['tiff']:.2f}x")
        out = d / "out"
        out.mkdir()
        fs = throttle = None
        try:
            img_bytes = max(2 << 30, int(1.5 * (sum(sizes.values()) + 1.5 * max(rates) * MB)) + (256 << 20))
            fs = LoopFs(d / "slow.img", img_bytes, d / "mnt")
            slow = {k: fs.mnt / p.name for k, p in orig.items()}
            for k in orig:
                shutil.copyfile(orig[k], slow[k])
            os.sync()
            throttle = Throttle()
            # the check needs ~1.5 s at the highest limit, or blk-throttle's initial burst dominates it
            need = int(1.5 * max(rates) * MB)
            probe = slow["mrc"]
            if sizes["mrc"] < need:
                probe = fs.mnt / "throttle_check.bin"
                with open(probe, "wb") as fh:
                    for _ in range(0, need, 64 << 20):
                        fh.write(os.urandom(64 << 20))
            os.sync()
            dev, check = _verify(throttle, fs, probe, rates)

            res: dict[tuple[float, str, str], dict] = {}
            for rate in [*rates, 0.0]:
                throttle.set(dev, rate)
                for mode in ("read", "align"):
                    for fmt in ("mrc", "tiff"):
                        r = _run_child({"mode": mode, "path": str(slow[fmt]), "warm": str(orig[fmt]),
                                        "gain": str(sim.gain), "out": str(out), "size": a.size,
                                        "frames": a.frames, "fmt": fmt, "cgroup": throttle.procs})
                        res[(rate, mode, fmt)] = r
                        lim = "none" if rate == 0 else f"{rate:g}"
                        print(f"  limit {lim:>5s} MB/s {mode:5s} {fmt:4s}: {r['wall']:6.2f} s wall, "
                              f"{r['cpu']:6.2f} s CPU, {r['dev_bytes'] / MB:6.1f} MB from device; "
                              f"other processes {r['other_load']:.2f} cores", flush=True)
            throttle.set(dev, 0)
        finally:
            if throttle is not None:
                throttle.remove()
            if fs is not None:
                fs.remove()

    print(f"\n{a.size} x {a.size} x {a.frames} movie; MRC {sizes['mrc'] / MB:.1f} MB, LZW TIFF "
          f"{sizes['tiff'] / MB:.1f} MB ({sizes['mrc'] / sizes['tiff']:.2f}x smaller); one core per movie; "
          f"throttle on {dev}\n")
    print("| limit MB/s | step | MRC wall s | MRC MB/s | TIFF wall s | TIFF MB/s | TIFF/MRC wall |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    ratios: dict[str, list[float]] = {"read": [], "align": []}
    for rate in [*rates, 0.0]:
        for mode in ("read", "align"):
            m, t = res[(rate, mode, "mrc")], res[(rate, mode, "tiff")]
            q = t["wall"] / m["wall"]
            if rate:
                ratios[mode].append(q)
            lim = "none" if rate == 0 else f"{rate:g}"
            print(f"| {lim} | {mode} | {m['wall']:.2f} | {m['bytes'] / m['wall'] / MB:.1f} | {t['wall']:.2f} | "
                  f"{t['bytes'] / t['wall'] / MB:.1f} | {q:.2f} |")
    print("\nMB/s: file bytes / wall seconds of the step (for align, the file's share of the whole job)")
    busy = [f"{'none' if k[0] == 0 else f'{k[0]:g}'} {k[1]} {k[2]} ({v['other_load']:.2f})"
            for k, v in res.items() if v["other_load"] > 0.5]
    if busy:  # another job on the same cores stretches wall time: those rows are not clean
        print(f"WARNING: other processes kept > 0.5 cores busy during: {', '.join(busy)}")
    # the unthrottled run enters the crossover at the device's measured plain-read rate
    free = [x["mb_s"] for x in check if x["limit"] == 0][0]
    for mode in ("read", "align"):
        q0 = res[(0.0, mode, "tiff")]["wall"] / res[(0.0, mode, "mrc")]["wall"]
        xs, qs = [*rates, free], [*ratios[mode], q0]
        x = _crossover(xs, qs)
        m0, t0_ = res[(0.0, mode, "mrc")], res[(0.0, mode, "tiff")]
        # model wall = t_unthrottled + bytes / rate: the TIFF wins below (S_mrc - S_tiff) / (t_tiff - t_mrc)
        extra = t0_["wall"] - m0["wall"]
        model = (sizes["mrc"] - sizes["tiff"]) / MB / extra if extra > 0 else math.inf
        if x is not None:
            meas = f"compression wins below {x:.0f} MB/s"
        elif all(q < 1 for q in qs):
            meas = f"compression wins at every rate tried, up to {free:.0f} MB/s (unthrottled)"
        else:
            meas = f"compression loses at every rate tried, down to {min(rates):g} MB/s"
        print(f"{mode}: {meas} (measured, log-linear between rates; unthrottled at {free:.0f} MB/s); "
              f"model wall = unthrottled wall + (bytes / rate) puts it at {model:.0f} MB/s")
    print(json.dumps({"size": a.size, "frames": a.frames, "bytes": sizes, "throttled_device": dev,
                      "runs": [{"limit_mb_s": k[0], "step": k[1], "format": k[2], **v} for k, v in res.items()]}))


if __name__ == "__main__":
    main()

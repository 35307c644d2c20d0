"""Benchmark of 2D classification (classify-2d).

1. Kernel throughput: particle x class x rotation evaluations per second per
   core at box 128 (2 Å/px, 8 Å limit: binned box 64, 10 classes; simulated
   particles = a class turned, shifted, under a CTF, SNR 0.1), against a
   plain-numpy implementation of the same steps (rotation by
   ``scipy.ndimage.map_coordinates``, CTF by ``ctf_2d_stack``, correlation of
   every shift by ``numpy.fft.irfft2``, weights and the shifted-back sums in numpy)
   measured in the same run.
2. The issue's peer setting: 2,000 particles x 20 classes at box 64
   (2.5 Å/px, 15 Å limit), one iteration's CPU time, extrapolated from a
   sample of particles; cisTEM's 16-23 s (measured by the issue author) is
   quoted beside it.
2b. Side by side, measured in the same run: 2,000 simulated particles of 8
   well-separated views (``simulate_particles``, box 64, 2.5 Å/px, SNR 0.05),
   20 classes, 15 Å, mask radius 60 Å, search range 20 Å, automatic in-plane
   step, one core each.  Ours: the real ``classify-2d`` job with one round, as
   a child process (CPU time and ``VmHWM`` peak; the CPU of its phases, start-up,
   random-subset start, the iteration, registration, measured inside it).
   cisTEM: ``refine2d`` (from ``CISTEM_BIN``, see ``peers.py``) generating its
   20 starting classes, then one iteration from them, as its GUI runs them.
   Both: CPU, peak memory, the ratio, and the purity of the classes in the
   true views.  Without ``CISTEM_BIN`` ours is measured alone.
3. A scaled-down job (the issue asks for 10,000 particles x 50 classes x 20
   iterations; that is far beyond this shared 2-core machine): wall time and
   peak memory per rank of ``classify-2d`` on 1 and 2 ranks.

Run: ``OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_classify_2d.py [--quick] [--side-by-side-only]``
(with ``CISTEM_BIN=<dir of cisTEM console programs>`` and, if they need it, ``LD_LIBRARY_PATH``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")  # refine2d (the peer): one core

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from scipy.ndimage import map_coordinates  # noqa: E402

from cistem_mpi.kernels import classify2d as c2  # noqa: E402
from cistem_mpi.kernels.ctf import ctf_2d_stack  # noqa: E402
from cistem_mpi.kernels.fft import ft2  # noqa: E402

CISTEM_SECONDS = (16.0, 23.0)  # refine2d, 2,000 x 20 classes, box 64, one core: measured by the issue author
CISTEM_PEAK_MB = 35.0


def numpy_classify(image, ctf, optics, refs, log_prior, s: c2.ClassifySettings, angles, num, den, half):
    """The same steps as :func:`classify2d.classify_particle`, plain numpy/scipy (the baseline)."""
    x, noise = c2.particle_ft(image, s)
    band = c2.band_mask(s.m, s.n, s.pixel_size, s.low_resolution)
    x = x * band
    m = s.m
    img = np.fft.fftshift(np.fft.irfft2(c2.pad_half(x, 2 * m), s=(2 * m, 2 * m))) * 4.0
    c = m // 2
    yy, xx = np.mgrid[0:m, 0:m]
    u, v = (xx - c) * 2.0, (yy - c) * 2.0
    rots = []
    for a in np.deg2rad(angles):
        sx = np.cos(a) * u + np.sin(a) * v + m
        sy = -np.sin(a) * u + np.cos(a) * v + m
        rots.append(map_coordinates(img, [sy, sx], order=1, mode="constant"))
    xr = np.fft.rfft2(np.fft.ifftshift(np.array(rots), axes=(1, 2)))
    j = len(angles)
    cr = ctf_2d_stack(m, s.binned_pixel, optics[0], optics[1], optics[2], np.full(j, ctf[0]), np.full(j, ctf[1]),
                      ctf[2] + angles, np.full(j, ctf[3]))
    prod = (xr * cr)[:, None] * np.conj(refs)[None] * band
    cc = np.fft.irfft2(prod, s=(m, m)) * m * m
    mult = c2.multiplicity(m) * band
    norms = np.einsum("jf,kf->jk", (cr ** 2).reshape(j, -1), (np.abs(refs) ** 2 * mult).reshape(len(refs), -1))
    r = s.search_binned
    idx = np.arange(-r, r + 1) % m
    win = cc[:, :, idx[:, None], idx[None, :]]
    t = np.arange(-r, r + 1) * s.n / s.m
    sp = -(t[:, None] ** 2 + t[None, :] ** 2) / (2 * s.shift_sigma ** 2)
    scale = s.smoothing / (2 * noise)
    L = log_prior[None, :, None, None] - scale * norms[:, :, None, None] + 2 * scale * win + sp
    w = np.where(L >= L.max() - s.log_range, np.exp(L - L.max()), 0.0)
    w /= w.sum()
    maps = np.zeros((j, len(refs), m, m))
    maps[:, :, idx[:, None], idx[None, :]] = w
    wft = np.fft.rfft2(maps)
    num[half] += np.einsum("jyx,jyx,jkyx->kyx", cr, xr, np.conj(wft)) * band
    den[half] += np.einsum("jyx,jk->kyx", cr ** 2, w.sum(axis=(2, 3))) * band
    return np.unravel_index(np.argmax(L), L.shape)


def kernel_throughput(n: int, ps: float, res: float, k: int, mask_a: float, search_a: float, count: int,
                      numpy_count: int) -> dict:
    rng = np.random.default_rng(0)
    m = c2.binned_size(n, ps, res)
    s = c2.ClassifySettings(n=n, m=m, pixel_size=ps, mask_radius=mask_a / ps, mask_edge=4, low_resolution=300,
                            search_range=search_a / ps, shift_sigma=search_a / ps / 2, psi_step=0)
    angles = c2.rotation_angles(s.binned_pixel, mask_a)
    from scipy.ndimage import gaussian_filter

    classes = np.stack([gaussian_filter(rng.normal(size=(n, n)), 3).astype(np.float32) for _ in range(k)])
    refs = c2.image_to_ft(classes * c2.circle_mask(n, s.mask_radius, 4), m) * c2.band_mask(m, n, ps, 300)
    prior = np.log(np.full(k, 1.0 / k))
    ctf = (15000.0, 14500.0, 20.0, 0.0)
    optics = (300.0, 2.7, 0.07)
    # particles: a class turned by a random angle, shifted, under the CTF, at SNR 0.1, plus unit noise
    # (so that the weights concentrate as they do in a real iteration)
    from cistem_mpi.kernels.ctf import ctf_2d
    from cistem_mpi.kernels.fft import ift2
    from cistem_mpi.kernels.shifts import shift_image

    cimg = ctf_2d(n, ps, 300.0, 2.7, 0.07, ctf[0], ctf[1], ctf[2])
    imgs = []
    for i in range(count):
        sig = shift_image(c2.rotate_image(classes[i % k], float(rng.uniform(0, 360))), *rng.uniform(-3, 3, 2))
        sig = ift2(ft2(sig) * cimg)
        sig *= np.sqrt(0.1) / max(float(sig.std()), 1e-12)
        imgs.append((sig + rng.normal(size=(n, n))).astype(np.float32))
    num, den = c2.new_sums(k, m)
    c2.classify_particle(imgs[0], ctf, optics, refs, prior, s, angles, (num, den), 0)  # compile
    t0 = time.process_time()
    for img in imgs:
        c2.classify_particle(img, ctf, optics, refs, prior, s, angles, (num, den), 0)
    ours = (time.process_time() - t0) / count
    t0 = time.process_time()
    for img in imgs[:numpy_count]:
        numpy_classify(img, ctf, optics, refs, prior, s, angles, num, den, 0)
    base = (time.process_time() - t0) / numpy_count
    evals = k * len(angles)
    return {"box": n, "binned": m, "classes": k, "rotations": len(angles), "shifts": (2 * s.search_binned + 1) ** 2,
            "s_per_particle": ours, "numpy_s_per_particle": base, "evals_per_s": evals / ours,
            "numpy_evals_per_s": evals / base}


def scaled_job(n_particles: int, k: int, rounds: int, ranks_list: list[int]) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_classify2d_job import project_from, view_particles

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sim, _ = view_particles(tmp / "data", n_particles, box=64, pixel_size=2.5, snr=0.05)
        root0 = project_from(tmp, sim.stack, sim.par, 2.5)
        mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
        for ranks in ranks_list:
            root = tmp / f"p{ranks}"
            shutil.copytree(root0, root)
            cmd = [sys.executable, "-m", "cistem_mpi", "classify-2d", "-p", str(root), "--classes", str(k),
                   "--rounds", str(rounds), "--all-particles-rounds", "1", "--finish-resolution", "15",
                   "--mask-radius", "60", "--search-range", "20"]
            if ranks > 1:
                if mpiexec is None:
                    continue
                cmd = [mpiexec, "-n", str(ranks)] + cmd
            t0 = time.monotonic()
            r = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.monotonic() - t0
            if r.returncode != 0:
                print(r.stderr[-2000:])
            import re

            m = re.search(r"peak memory per rank \(MB\): \[([^\]]*)\]", r.stderr)
            peaks = [float(x) for x in m.group(1).split(",")] if m else []
            out.append({"ranks": ranks, "wall_s": wall, "peaks": peaks, "ok": r.returncode == 0})
    return out


# ------------------------------------------------------------------ side by side with cisTEM's refine2d
#: the issue's peer setting; the same for both programs
PEER = {"n": 2000, "box": 64, "pixel_size": 2.5, "snr": 0.05, "classes": 20, "resolution": 15.0,
        "mask_radius": 60.0, "search_range": 20.0, "low_resolution": 300.0}


#: a child that runs the cistem-mpi command line with the CPU time of classify-2d's phases (stderr
#: line ``PHASES {json}``): ``before_job`` (interpreter, imports, project, until the job body),
#: ``_pass`` (per pass over the particles: the random-subset start, then each round),
#: ``_round_done`` (class averages, re-seeding, FRCs, ranking per round) and ``_register``.
_TIMED_JOB = """
import atexit, json, sys, time
import cistem_mpi.drivers.classify_2d as d
acc = {"_pass": [], "_round_done": [], "_register": []}
def timed(name, f):
    def g(*a, **k):
        if "before_job" not in acc:
            acc["before_job"] = time.process_time()
        t = time.process_time()
        try:
            return f(*a, **k)
        finally:
            acc[name].append(time.process_time() - t)
    return g
for name in ("_pass", "_round_done", "_register"):
    setattr(d, name, timed(name, getattr(d, name)))
atexit.register(lambda: print("PHASES " + json.dumps(acc), file=sys.stderr))
from cistem_mpi.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_measured(cmd: list, env: dict | None = None, cwd: Path | None = None,
                 timeout: float = 900.0) -> tuple[subprocess.CompletedProcess, float, float, float]:
    """Run ``cmd``; returns (completed, CPU s of the child, wall s, peak MB of the child).

    Measured as :func:`peers.run_peer` measures a peer: children's user + system
    time from ``getrusage`` before/after, peak from the child's ``VmHWM``.
    """
    from peers import _vm_hwm_kb

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    peak = 0
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd)
        while proc.poll() is None:
            peak = max(peak, _vm_hwm_kb(proc.pid))
            if time.perf_counter() - t0 > timeout:
                proc.kill()
                proc.wait()
                raise TimeoutError(f"{cmd[:4]} ran longer than {timeout:g} s")
            time.sleep(0.01)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        r = subprocess.CompletedProcess(cmd, proc.returncode, out.read().decode(errors="replace"),
                                        err.read().decode(errors="replace"))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return r, cpu, wall, peak / 1024.0


def refine2d_answers(stack: Path, star_in: Path, classes_in: Path | str, star_out: Path, classes_out: Path,
                     n_classes: int, p: dict, auto_centre: bool) -> list:
    """refine2d's 25 answers (cisTEM 2.x, scripted): all particles, automatic in-plane step (binned pixel /
    mask radius, as ours), padding factor 2 (cisTEM's GUI), normalised, no inversion, no auto-mask, no dump,
    one thread.  ``n_classes`` > 0 makes refine2d generate its starting classes (random subsets)."""
    yn = lambda b: "yes" if b else "no"  # noqa: E731
    return [stack, star_in, classes_in, star_out, classes_out, n_classes, 1, 0, 1.0, p["pixel_size"],
            p["mask_radius"], p["low_resolution"], p["resolution"], 0.0, p["search_range"], 1.0, 2,
            "yes", "no", "yes", "no", yn(auto_centre), "no", "dump_file.dat", 1]


def read_cistem_star_column(path: Path, label: str) -> np.ndarray:
    """One numeric column of a cisTEM .star file, by its label (e.g. ``_cisTEMBest2DClass``)."""
    labels, rows = [], []
    for ln in Path(path).read_text().splitlines():
        s = ln.strip()
        if s.startswith("_"):
            labels.append(s.split()[0])
        elif labels and s and not s.startswith(("#", "data_", "loop_")):
            rows.append(s.split())
    return np.array([float(r[labels.index(label)]) for r in rows])


def agreement(classes: np.ndarray, truth: np.ndarray) -> dict:
    """Purity of the classes in the true views: population-weighted, the worst class, views found.

    A class's purity is the fraction of its particles from its commonest view; a view is
    found when it is the commonest view of a class of purity >= 0.9.  Particles of class
    <= 0 (refine2d's "not used") are left out and counted as ``unassigned``.

    >>> agreement(np.array([1, 1, 2, 2]), np.array([0, 0, 1, 0]))["weighted"]
    0.75
    """
    unassigned = int(np.sum(classes <= 0))
    truth, classes = truth[classes > 0], classes[classes > 0]
    ks = np.unique(classes)
    tab = np.array([np.bincount(truth[classes == c], minlength=int(truth.max()) + 1) for c in ks])
    pur = tab.max(axis=1) / tab.sum(axis=1)
    found = {int(np.argmax(t)) for t, q in zip(tab, pur) if q >= 0.9}
    return {"weighted": float(tab.max(axis=1).sum() / tab.sum()), "worst": float(pur.min()),
            "found": len(found), "views": int(truth.max()) + 1, "occupied": len(ks), "unassigned": unassigned}


def adjusted_rand(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labellings (1 = the same partition, ~0 = chance).

    >>> adjusted_rand(np.array([1, 1, 2, 2]), np.array([5, 5, 7, 7]))
    1.0
    """
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    tab = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(tab, (ia, ib), 1)
    comb = lambda x: (x * (x - 1) / 2).sum()  # noqa: E731
    n = len(a)
    sij, sa, sb = comb(tab), comb(tab.sum(axis=1)), comb(tab.sum(axis=0))
    expected = sa * sb / (n * (n - 1) / 2)
    return float((sij - expected) / (0.5 * (sa + sb) - expected))


def side_by_side(p: dict = PEER) -> None:
    """One refine2d iteration and our job's one iteration on the same simulated particles, same run."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from peers import find_peer, peer_status, run_peer
    from test_classify2d_job import final_classes, project_from, view_particles

    from cistem_mpi.io.params import ParticleSet
    from cistem_mpi.io.star import write_cistem_star

    print(f"load average before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} "
          f"({os.cpu_count()} cores)")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    with tempfile.TemporaryDirectory(prefix="bench_c2d_") as tmp:
        tmp = Path(tmp)
        sim, true = view_particles(tmp / "data", p["n"], box=p["box"], pixel_size=p["pixel_size"], snr=p["snr"])
        print(f"data: {p['n']} simulated particles of 8 well-separated views (random psi, shifts up to 5 Å, CTF, "
              f"SNR {p['snr']}), box {p['box']}, {p['pixel_size']} Å/px; settings for both: {p['classes']} classes, "
              f"{p['resolution']:g} Å limit, {p['low_resolution']:g} Å low limit, mask radius {p['mask_radius']:g} Å, "
              f"search range {p['search_range']:g} Å, in-plane step automatic (binned pixel / mask radius), "
              f"one core")
        # ---- ours: the real job (one round), with its phases' CPU time measured inside the process
        root = tmp / "ours"
        shutil.copytree(project_from(tmp, sim.stack, sim.par, p["pixel_size"]), root)
        cmd = [sys.executable, "-c", _TIMED_JOB, "classify-2d", "-p", str(root), "--classes", str(p["classes"]),
               "--rounds", "1", "--all-particles-rounds", "1", "--start-resolution", str(p["resolution"]),
               "--finish-resolution", str(p["resolution"]), "--low-resolution", str(p["low_resolution"]),
               "--mask-radius", str(p["mask_radius"]), "--search-range", str(p["search_range"])]
        r, cpu, wall, peak = run_measured(cmd, env=env)
        if r.returncode != 0:
            print(f"classify-2d failed (rc {r.returncode}):\n{r.stderr[-2000:]}")
            return
        phases = json.loads(next(ln for ln in r.stderr.splitlines() if ln.startswith("PHASES "))[7:])
        line = next((ln for ln in r.stderr.splitlines() if "round 1/1:" in ln), "")
        print("cistem-mpi:", line[line.find("round 1/1:"):])
        startup, it_pass = phases["_pass"]
        it_ours = it_pass + sum(phases["_round_done"])
        print(f"cistem-mpi classify-2d, whole 1-round job: {cpu:.1f} s CPU, {wall:.1f} s wall, peak {peak:.0f} MB; "
              f"of the CPU: start-up (imports, project, plan) {phases['before_job']:.1f} s, random-subset start "
              f"{startup:.1f} s, one iteration {it_ours:.1f} s (classification {it_pass:.1f} s + class averages, "
              f"FRCs, ranking {sum(phases['_round_done']):.1f} s), registration of the outputs (class averages, "
              f"gallery PNG, parameters, RELION stars) {sum(phases['_register']):.1f} s, the rest (finishing "
              f"transaction, exit) {cpu - phases['before_job'] - startup - it_ours - sum(phases['_register']):.1f} s")
        ours = final_classes(root)[1]
        a1 = agreement(ours, true)
        print(f"cistem-mpi after 1 iteration: purity {a1['weighted']:.2f} (worst class {a1['worst']:.2f}), "
              f"{a1['found']}/{a1['views']} views found, {a1['occupied']} classes occupied")
        # ---- cisTEM's refine2d: its own random-subset start (it writes only the classes), then one
        # iteration from them with the package's parameters (as its GUI runs them)
        if find_peer("refine2d") is None:
            print(peer_status("refine2d") + " -> cistem-mpi measured alone")
            return
        wd = tmp / "refine2d"
        wd.mkdir()
        prm = sim.particles.params.copy()
        prm["psi"] = prm["shx"] = prm["shy"] = 0.0  # as after picking: nothing known yet
        prm["sigma"] = 10.0  # cisTEM's default for a new package
        star0 = wd / "start.star"
        write_cistem_star(star0, ParticleSet(params=prm, optics=sim.particles.optics), stack=sim.stack.resolve())
        stack = sim.stack.resolve()
        start = run_peer("refine2d", refine2d_answers(stack, star0, "none.mrc", wd / "startup.star",
                                                      wd / "startup_classes.mrc", p["classes"], p, False), wd)
        if start.returncode != 0 or not (wd / "startup_classes.mrc").is_file():
            print(f"refine2d (start) failed (rc {start.returncode}):\n{start.output[-2000:]}")
            return
        it = run_peer("refine2d", refine2d_answers(stack, star0, wd / "startup_classes.mrc",
                                                   wd / "iteration1.star", wd / "iteration1_classes.mrc", 0, p,
                                                   True), wd)
        if it.returncode != 0 or not (wd / "iteration1.star").is_file():
            print(f"refine2d (iteration) failed (rc {it.returncode}):\n{it.output[-2000:]}")
            return
        line = next((ln for ln in it.output.splitlines() if "Number of classes =" in ln), "")
        print("refine2d:", line.strip())
        print(f"cisTEM refine2d, start (random subsets, {p['classes']} classes): {start.cpu_s:.1f} s CPU, "
              f"{start.wall_s:.1f} s wall, peak {start.peak_mb:.0f} MB")
        print(f"cisTEM refine2d, one iteration: {it.cpu_s:.1f} s CPU, {it.wall_s:.1f} s wall, "
              f"peak {it.peak_mb:.0f} MB")
        theirs = read_cistem_star_column(wd / "iteration1.star", "_cisTEMBest2DClass").astype(int)
        pos = read_cistem_star_column(wd / "iteration1.star", "_cisTEMPositionInStack").astype(int)
        theirs = theirs[np.argsort(pos)]
        at = agreement(theirs, true)
        print(f"cisTEM refine2d after 1 iteration: purity {at['weighted']:.2f} (worst class {at['worst']:.2f}), "
              f"{at['found']}/{at['views']} views found, {at['occupied']} classes occupied, {at['unassigned']} particles "
              f"not classified; adjusted Rand index "
              f"ours vs refine2d {adjusted_rand(ours, theirs):.2f} (different random starts)")
        print(f"ratio, one iteration, CPU: refine2d / cistem-mpi = {it.cpu_s / it_ours:.2f}x; "
              f"whole runs (refine2d start + 1 iteration, {start.cpu_s + it.cpu_s:.1f} s, vs our 1-round job with "
              f"start-up and registration, {cpu:.1f} s): {(start.cpu_s + it.cpu_s) / cpu:.2f}x; peak memory: refine2d "
              f"{max(start.peak_mb, it.peak_mb):.0f} MB, cistem-mpi {peak:.0f} MB")
    print(f"load average after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer particles (a smoke run)")
    ap.add_argument("--side-by-side-only", action="store_true",
                    help="only the measured comparison with cisTEM's refine2d (section 2b)")
    a = ap.parse_args()
    q = a.quick
    if a.side_by_side_only:
        print("== side by side: one iteration of cisTEM refine2d and of classify-2d, same particles, same run ==")
        side_by_side()
        return
    print("== kernel: particle x class x rotation evaluations per second per core (box 128) ==")
    r = kernel_throughput(128, 2.0, 8.0, 10, 100.0, 16.0, 2 if q else 6, 1 if q else 2)
    print(f"box {r['box']} -> binned {r['binned']}, {r['classes']} classes x {r['rotations']} rotations x "
          f"{r['shifts']} shifts")
    print(f"cistem-mpi: {r['s_per_particle'] * 1e3:.1f} ms/particle = {r['evals_per_s']:.0f} evaluations/s/core")
    print(f"plain numpy: {r['numpy_s_per_particle'] * 1e3:.1f} ms/particle = {r['numpy_evals_per_s']:.0f} "
          f"evaluations/s/core; ratio {r['numpy_s_per_particle'] / r['s_per_particle']:.1f}x")
    print("== the issue's peer setting: 2,000 particles x 20 classes, box 64, 2.5 Å/px, 15 Å ==")
    p = kernel_throughput(64, 2.5, 15.0, 20, 60.0, 20.0, 10 if q else 40, 2 if q else 5)
    it = p["s_per_particle"] * 2000
    print(f"binned {p['binned']}, {p['rotations']} rotations, {p['shifts']} shifts; "
          f"{p['s_per_particle'] * 1e3:.2f} ms/particle -> {it:.1f} s CPU per iteration of 2,000 particles "
          f"(extrapolated from {10 if q else 40}); plain numpy {p['numpy_s_per_particle'] * 2000:.1f} s")
    print(f"cisTEM refine2d (measured by the issue author): {CISTEM_SECONDS[0]:.0f}-{CISTEM_SECONDS[1]:.0f} s; "
          f"ratio cisTEM/ours {CISTEM_SECONDS[0] / it:.1f}-{CISTEM_SECONDS[1] / it:.1f}x (machine-dependent; "
          f"not measured in the same run)")
    print("== side by side: one iteration of cisTEM refine2d and of classify-2d, same particles, same run ==")
    side_by_side(dict(PEER, n=500) if q else PEER)
    print("== scaled-down job (NOT the issue's 10,000 x 50 x 20: 300 particles x 10 classes x 3 rounds) ==")
    for row in scaled_job(150 if q else 300, 10, 3, [1, 2]):
        print(f"{row['ranks']} rank(s): wall {row['wall_s']:.1f} s (incl. start-up and registration), peak RSS "
              f"per rank {row['peaks']} MB (rank 0 = controller), ok={row['ok']}")
    print(f"peak RSS of this benchmark process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB "
          f"(cisTEM's peak at the peer setting, measured by the issue author: {CISTEM_PEAK_MB:.0f} MB)")


if __name__ == "__main__":
    main()

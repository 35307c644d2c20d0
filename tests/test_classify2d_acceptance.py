"""Acceptance of classify-2d against ground truth (simulated from PDB 8ZPM; slow)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cistem_mpi.db import classification as cdb
from cistem_mpi.db.project import Project
from cistem_mpi.io.mrc import open_stack, write_mrc
from cistem_mpi.io.par import write_par
from cistem_mpi.io.param_store import read_params_column
from cistem_mpi.kernels import classify2d as c2
from cistem_mpi.kernels.euler import rotation_matrix
from cistem_mpi.kernels.fft import ft2, ift2
from cistem_mpi.kernels.projection import project
from test_classify2d_job import CLI, ENV, VIEWS, final_classes, project_from, run, view_particles

BOX, PS = 40, 3.2  # junk test: 128 Å boxes
SETTINGS = ["--mask-radius", "55", "--search-range", "12", "--finish-resolution", "10", "--reseed-fraction", "0.5"]
# views test: the box and pixel size; Nyquist 5 Å, "twice the pixel size's Nyquist" = 10 Å
BOX8, PS8 = 64, 2.5
SETTINGS8 = ["--mask-radius", "60", "--search-range", "12", "--finish-resolution", "8", "--reseed-fraction", "0.5"]


def _peak(cc: np.ndarray) -> tuple[float, float, float]:
    """Height and sub-pixel position (dy, dx from the centre) of a correlation map's peak."""
    n = cc.shape[0]
    y, x = np.unravel_index(np.argmax(cc), cc.shape)

    def par(a: float, b: float, c: float) -> float:
        d = a - 2 * b + c
        return 0.5 * (a - c) / d if d < 0 else 0.0

    oy = par(cc[(y - 1) % n, x], cc[y, x], cc[(y + 1) % n, x])
    ox = par(cc[y, (x - 1) % n], cc[y, x], cc[y, (x + 1) % n])
    return float(cc[y, x]), y + oy - n // 2, x + ox - n // 2


def _aligned_frc(avg: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """FRC of a class average with a true projection after the best in-plane rotation and sub-pixel shift."""
    from cistem_mpi.kernels.shifts import phase_shift

    ft_t = ft2(truth * mask)

    def score(a: float) -> tuple[float, float, float]:
        return _peak(ift2(ft2(c2.rotate_image(avg, a)) * np.conj(ft_t)))

    coarse = max(np.arange(0.0, 360.0, 2.0), key=lambda a: score(a)[0])
    fine = max(np.arange(coarse - 2.0, coarse + 2.01, 0.25), key=lambda a: score(a)[0])
    _, dy, dx = score(fine)
    moved = ift2(phase_shift(ft2(c2.rotate_image(avg, fine)), -dx, -dy))
    return c2.frc(ft2(moved * mask), ft_t)


@pytest.mark.slow
def test_eight_views_pure_classes_every_view_found_and_frc(tmp_path):
    """8 well-separated views at SNR 0.05, 10 classes: >= 90 % purity per class, every view found, and the
    average of each view's largest class has an FRC against the true projection >= 0.5 out to 10 Å (twice
    the Nyquist resolution of 2.5 Å pixels)."""
    sim, true = view_particles(tmp_path / "data", 480, box=BOX8, pixel_size=PS8, snr=0.05)
    root = project_from(tmp_path, sim.stack, sim.par, PS8)
    r = run(["classify-2d", "-p", str(root), "--classes", "10"] + SETTINGS8, timeout=2400)
    assert r.returncode == 0, r.stderr
    number, cls, rows = final_classes(root)
    tab = np.zeros((10, 8), int)
    np.add.at(tab, (cls - 1, true), 1)
    used = tab.sum(axis=1) >= 5  # classes with particles
    purity = tab.max(axis=1)[used] / tab.sum(axis=1)[used]
    assert purity.min() >= 0.9, tab
    assert set(tab.argmax(axis=1)[used]) == set(range(8)), tab
    with Project.open(root, readonly=True) as p:
        avgs = mrcfile.read(p.resolve(cdb.classification_by_number(p.conn, number)["path"]))
    vol = mrcfile.read(sim.map)
    proj = project(vol, rotation_matrix(VIEWS[:, 1], VIEWS[:, 0], np.zeros(8)))
    mask = c2.circle_mask(BOX8, 60 / PS8, 4)
    shell = BOX8 // 4  # 4 pixels = 10 Å
    major = tab.argmax(axis=1)
    for v in range(8):
        mine = np.nonzero(used & (major == v))[0]
        c = mine[np.argmax(tab[mine].sum(axis=1))]
        curve = _aligned_frc(avgs[c], proj[v], mask)
        assert curve[1:shell + 1].min() >= 0.5, (v, c, tab[c].sum(), np.round(curve, 2))


def _junk_stack(out: Path, n_real: int, n_noise: int, n_off: int, seed: int = 7) -> tuple[Path, Path, np.ndarray]:
    """Particles of 4 views plus noise-only boxes and off-centre particles; returns stack, par, is_junk."""
    real, _ = view_particles(out / "real", n_real, box=BOX, pixel_size=PS, snr=0.05, seed=seed, n_views=4)
    off, _ = view_particles(out / "off", n_off, box=BOX, pixel_size=PS, snr=0.05, seed=seed + 1, n_views=4)
    rng = np.random.default_rng(seed)
    with open_stack(real.stack) as st:
        imgs = [st[i] for i in range(n_real)]
    with open_stack(off.stack) as st:
        for i in range(n_off):  # the particle a third of the box away from the centre
            d = BOX // 3 * np.array([[1, 0], [0, 1], [-1, 0], [0, -1]])[rng.integers(4)]
            imgs.append(np.roll(st[i], tuple(d), axis=(0, 1)))
    imgs += list(rng.standard_normal((n_noise, BOX, BOX)).astype(np.float32))
    order = rng.permutation(len(imgs))
    stack = out / "mixed.mrcs"
    write_mrc(stack, np.stack([imgs[i] for i in order]).astype(np.float32), PS, stack=True)
    params = np.concatenate([real.particles.params, off.particles.params,
                             real.particles.params[rng.integers(0, n_real, n_noise)]])[order]
    params["position"] = np.arange(1, len(order) + 1)
    par = out / "mixed.par"
    write_par(par, params)
    junk = np.r_[np.zeros(n_real, bool), np.ones(n_off + n_noise, bool)][order]
    return stack, par, junk


@pytest.mark.slow
def test_junk_lands_in_the_classes_ranked_last(tmp_path):
    """30 % junk (noise-only and off-centre boxes): >= 90 % of it in the classes the ranking places last
    (those below the automatic selection)."""
    stack, par, junk = _junk_stack(tmp_path / "data", 210, 45, 45)
    root = project_from(tmp_path, stack, par, PS)
    r = run(["classify-2d", "-p", str(root), "--classes", "8", "--rounds", "15", "--all-particles-rounds", "3"]
            + SETTINGS, timeout=1500)
    assert r.returncode == 0, r.stderr
    number, cls, rows = final_classes(root)
    ranked = sorted(rows, key=lambda x: x["rank"])
    rejected = [x["class_number"] for x in ranked if not x["selected"]]
    assert rejected and all(not x["selected"] for x in ranked[len(ranked) - len(rejected):])  # the last ones
    in_rejected = np.isin(cls, rejected)
    assert in_rejected[junk].mean() >= 0.9, (in_rejected[junk].mean(), ranked)
    assert (~in_rejected[~junk]).mean() >= 0.8, ((~in_rejected[~junk]).mean(), ranked)


@pytest.mark.slow
def test_sigkill_during_a_round_then_resume_gives_the_same_classes(tmp_path):
    sim, true = view_particles(tmp_path / "data", 160, box=48, pixel_size=3.0, snr=0.2, n_views=4)
    root0 = project_from(tmp_path, sim.stack, sim.par, 3.0)
    args = ["--classes", "4", "--rounds", "4", "--all-particles-rounds", "1", "--start-resolution", "30",
            "--finish-resolution", "12", "--mask-radius", "55", "--search-range", "9"]
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(root0, a)
    shutil.copytree(root0, b)
    r = run(["classify-2d", "-p", str(a)] + args)
    assert r.returncode == 0, r.stderr
    proc = subprocess.Popen(CLI + ["classify-2d", "-p", str(b)] + args, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV)
    t_end = time.monotonic() + 600
    while time.monotonic() < t_end and proc.poll() is None:
        if list((b / "Scratch" / "Refine2DScratch").glob("job_*/checkpoints/iter_000002/manifest.json")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the job ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)  # during round 3
    proc.wait()
    with Project.open(b) as p:
        job = p.conn.execute("SELECT * FROM jobs WHERE type = 'classify_2d'").fetchone()
        assert p.conn.execute("SELECT count(*) FROM classifications_2d").fetchone()[0] == 0  # nothing registered
    r = run(["classify-2d", "-p", str(b), "--resume", str(job["id"])] + args)
    assert r.returncode == 0, r.stderr
    assert "resuming after round 2" in r.stderr
    na, ca, ra = final_classes(a)
    nb, cb, rb = final_classes(b)
    assert na == nb == 4
    assert np.array_equal(ca, cb)
    with Project.open(a, readonly=True) as pa, Project.open(b, readonly=True) as pb:
        for n in range(1, 5):
            x = mrcfile.read(pa.resolve(cdb.classification_by_number(pa.conn, n)["path"]))
            y = mrcfile.read(pb.resolve(cdb.classification_by_number(pb.conn, n)["path"]))
            assert np.array_equal(x, y)
            assert np.array_equal(read_params_column(pa.resolve(cdb.classification_by_number(pa.conn, n)["params_path"]),
                                                     "class_2d"),
                                  read_params_column(pb.resolve(cdb.classification_by_number(pb.conn, n)["params_path"]),
                                                     "class_2d"))

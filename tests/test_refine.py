"""Refinement and 3D classification against ground truth (simulated from PDB 8ZPM)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cistem_mpi.db.project import Project
from cistem_mpi.drivers.reconstruct import ReconstructionSettings, reconstruct_particles
from cistem_mpi.drivers.runtime import get_world
from cistem_mpi.drivers.simulate import simulate_conformations, simulate_particles
from cistem_mpi.io.model import builtin_atoms
from cistem_mpi.io.par import write_par
from cistem_mpi.io.param_store import read_params_h5
from cistem_mpi.kernels import alignment as al
from cistem_mpi.kernels import refinement as rf
from cistem_mpi.kernels.euler import angular_distance, rotation_matrix
from cistem_mpi.kernels.projection import prepare_volume_ft
from helpers_jobs import db_dump

CLI = [sys.executable, "-m", "cistem_mpi"]
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")


def _errors(params, truth, pixel_size):
    ang = angular_distance(rotation_matrix(params["phi"], params["theta"], params["psi"]),
                           rotation_matrix(truth["phi"], truth["theta"], truth["psi"]))
    shift = np.hypot(params["shx"] - truth["shx"], params["shy"] - truth["shy"]) / pixel_size
    return ang, shift


def _perturbed(truth, rng, pixel_size, angle=6.0, shift_px=3.0):
    """Angles moved by up to about 10° in total, shifts by up to 3 px in each direction."""
    p = truth.copy()
    n = len(p)
    for col in ("phi", "theta", "psi"):
        p[col] += rng.uniform(-angle, angle, n)
    p["shx"] += rng.uniform(-shift_px, shift_px, n) * pixel_size
    p["shy"] += rng.uniform(-shift_px, shift_px, n) * pixel_size
    return p


def _project_with(tmp: Path, sim, param_files: list[Path], pixel_size: float) -> Path:
    root = tmp / "proj"
    Project.create(root).close()
    cmd = CLI + ["import", "particles", "-p", str(root), str(sim.stack), "--pixel-size", str(pixel_size)]
    for f in param_files:
        cmd += ["--params", str(f)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return root


def _last_params(root: Path) -> list[np.ndarray]:
    with Project.open(root, readonly=True) as p:
        rows = p.conn.execute("SELECT params_path FROM refinement_classes WHERE refinement_id = "
                              "(SELECT max(id) FROM refinements) ORDER BY class_number").fetchall()
        return [read_params_h5(p.resolve(r[0])) for r in rows]


# ------------------------------------------------------------------ kernels
def test_local_refine_recovers_noise_free_orientation(tmp_path):
    sim = simulate_particles(tmp_path, n_particles=6, box=48, pixel_size=3.0, snr=1e6, seed=3)
    vol = mrcfile.read(sim.map)
    vft = prepare_volume_ft(vol, 2.0)
    band = al.make_band(48, 3.0, 6.0)
    rng = np.random.default_rng(0)
    settings = rf.AlignSettings(mask_radius=21, angle_step=3.0, max_shift=4.0)
    from cistem_mpi.io.mrc import open_stack

    with open_stack(sim.stack) as st:
        for i, row in enumerate(_perturbed(sim.particles.params, rng, 3.0, angle=4.0, shift_px=1.5)):
            o = sim.particles.optics[0]
            res = rf.align_particle(st[i], row, 3.0, (o.voltage, o.cs, o.amplitude_contrast), [vft], band, settings)
            a = res.alignments[0]
            t = sim.particles.params[i]
            err = angular_distance(rotation_matrix(a.phi, a.theta, a.psi), rotation_matrix(t["phi"], t["theta"], t["psi"]))
            assert err < 0.5
            assert np.hypot(a.shx * 3.0 - t["shx"], a.shy * 3.0 - t["shy"]) < 0.3 * 3.0
            assert res.scores[0] > 90.0


def test_defocus_refinement_recovers_an_offset(tmp_path):
    sim = simulate_particles(tmp_path, n_particles=4, box=64, pixel_size=2.5, snr=100.0, seed=3)
    vft = prepare_volume_ft(mrcfile.read(sim.map), 2.0)
    band = al.make_band(64, 2.5, 6.0)
    o = sim.particles.optics[0]
    settings = rf.AlignSettings(mask_radius=28, refine_defocus=True, refine_angles=False, refine_shifts=False)
    from cistem_mpi.io.mrc import open_stack

    with open_stack(sim.stack) as st:
        for i, row in enumerate(sim.particles.params):
            start = row.copy()
            start["df1"] += 300.0
            start["df2"] += 300.0
            res = rf.align_particle(st[i], start, 2.5, (o.voltage, o.cs, o.amplitude_contrast), [vft], band, settings)
            assert abs(res.defocus_offset + 300.0) < 40.0, res.defocus_offset


def test_shift_search_finds_subpixel_shift():
    rng = np.random.default_rng(1)
    n = 48
    from scipy.ndimage import gaussian_filter

    img = gaussian_filter(rng.normal(size=(n, n)), 2.0).astype(np.float32)  # particle-like: smooth
    from cistem_mpi.kernels.fft import ft2
    from cistem_mpi.kernels.shifts import phase_shift

    band = al.make_band(n, 1.0, 4.0)
    f = al.crop_ft(ft2(img), band.m)
    moved = al.crop_ft(phase_shift(ft2(img), 2.3, -1.6), band.m)
    score, dx, dy = al.shift_search(moved, f[None], band, max_shift=5.0)
    assert abs(dx[0] - 2.3) < 0.15 and abs(dy[0] + 1.6) < 0.15 and score[0] > 0.9


def test_cc_equals_full_plane_sum():
    """The half-layout correlation with multiplicities equals the sum over the full transform."""
    rng = np.random.default_rng(2)
    n = 32
    a, b = rng.normal(size=(2, n, n)).astype(np.float32)
    band = al.make_band(n, 1.0, high_resolution=32 / 6, low_resolution=32 / 1.5)  # 1.5 .. 6 Fourier pixels
    fa, fb = np.fft.fft2(np.fft.ifftshift(a)), np.fft.fft2(np.fft.ifftshift(b))
    k = np.fft.fftfreq(n) * n
    r = np.sqrt(k[:, None] ** 2 + k[None, :] ** 2)
    keep = (r <= 6.0) & (r >= 1.5)  # the band, over the full transform
    ref = np.real(np.sum(fa[keep] * np.conj(fb[keep]))) / np.sqrt(np.sum(np.abs(fa[keep]) ** 2) * np.sum(np.abs(fb[keep]) ** 2))
    from cistem_mpi.kernels.fft import ft2

    got = al.cc(al.crop_ft(ft2(a), band.m), al.crop_ft(ft2(b), band.m), band)
    assert abs(float(got) - ref) < 1e-5


def test_occupancies_are_posterior_percentages():
    logp = np.array([[-10.0, -12.0], [-5.0, -5.0]])
    occ = rf.occupancies(logp, np.array([0.5, 0.5]))
    assert np.allclose(occ[0], 100 * np.array([1, np.exp(-2)]) / (1 + np.exp(-2)))
    assert np.allclose(occ[1], [50, 50])
    assert np.allclose(rf.occupancies(logp, np.array([0.75, 0.25]))[1], [75, 25])


def test_focus_circle_lands_on_the_projected_sphere():
    """A single blob off centre: the focused score is high inside its projected circle, ~0 elsewhere."""
    n, ps = 48, 2.0
    z, y, x = np.mgrid[:n, :n, :n] - n // 2
    centre = np.array([8.0, -5.0, 6.0])  # x, y, z pixels from the centre
    vol = np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) / 6.0).astype(np.float32)
    vft = prepare_volume_ft(vol, 2.0)
    band = al.make_band(n, ps, 2 * ps)
    a = al.Alignment(30.0, 50.0, 70.0, 0.0, 0.0, 0.0)
    from cistem_mpi.kernels.fft import ift2
    from cistem_mpi.kernels.projection import extract_slices

    rot = rotation_matrix(a.phi, a.theta, a.psi).reshape(1, 3, 3)
    particle = ift2(extract_slices(vft, rot)[0], n)
    particle = particle + np.random.default_rng(0).normal(scale=0.01, size=particle.shape).astype(np.float32)
    ctf = np.ones((n, n // 2 + 1), np.float32)
    inside = al.focused_cc(particle, vft, ctf, a, centre, 5.0, band)
    elsewhere = al.focused_cc(particle, vft, ctf, a, -centre, 5.0, band)
    assert inside > 0.99 and abs(elsewhere) < 0.5


def test_global_search_finds_orientation_at_snr_01(tmp_path):
    """Global search from scratch: >= 90% of particles within 5° at SNR 0.1."""
    box, ps = 64, 2.5
    sim = simulate_particles(tmp_path, n_particles=30, box=box, pixel_size=ps, snr=0.1, seed=7)
    vft = prepare_volume_ft(mrcfile.read(sim.map), 2.0)
    band = al.make_band(box, ps, 2 * ps)
    search_band = al.make_band(box, ps, 8.0)
    settings = rf.AlignSettings(mask_radius=0.45 * box, global_search=True, global_step=15.0, max_shift=4.0)
    grid = al.orientation_grid(settings.global_step)
    o = sim.particles.optics[0]
    from cistem_mpi.io.mrc import open_stack

    errs = []
    with open_stack(sim.stack) as st:
        for i, t in enumerate(sim.particles.params):
            start = t.copy()
            start["phi"] = start["theta"] = start["psi"] = 0.0  # no prior knowledge
            res = rf.align_particle(st[i], start, ps, (o.voltage, o.cs, o.amplitude_contrast), [vft], band,
                                    settings, grid=grid, search_band=search_band)
            a = res.alignments[0]
            errs.append(float(angular_distance(rotation_matrix(a.phi, a.theta, a.psi),
                                               rotation_matrix(t["phi"], t["theta"], t["psi"]))))
    assert np.mean(np.array(errs) < 5.0) >= 0.9, np.round(errs, 1)


# ------------------------------------------------------------------ jobs
@pytest.fixture(scope="module")
def perturbed_project(tmp_path_factory):
    base = tmp_path_factory.mktemp("refine")
    box, ps = 64, 2.5
    sim = simulate_particles(base / "data", n_particles=120, box=box, pixel_size=ps, snr=0.5, seed=12)
    start = _perturbed(sim.particles.params, np.random.default_rng(4), ps)
    write_par(base / "start.par", start)
    root = _project_with(base, sim, [base / "start.par"], ps)
    return sim, root, ps


@pytest.mark.mpi
def test_same_parameters_from_1_and_3_ranks(perturbed_project, tmp_path):
    if MPIEXEC is None:
        pytest.skip("mpiexec not found")
    sim, root, ps = perturbed_project
    out = {}
    for n in (1, 3):
        proj = tmp_path / f"p{n}"
        shutil.copytree(root, proj)
        cmd = CLI + ["manual-refine", "-p", str(proj), "--reference", str(sim.map), "--high-resolution", "8"]
        if n > 1:
            cmd = [MPIEXEC, "-n", str(n)] + cmd
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        out[n] = (_last_params(proj)[0], mrcfile.read(proj / "Assets/Volumes/volume_2_1.mrc"))
    # Each particle is aligned by the same code whatever rank gets it: identical parameters.
    assert np.array_equal(out[1][0], out[3][0])
    # The volumes sum contributions in another order: float32 tolerance.
    assert np.abs(out[1][1] - out[3][1]).max() <= 1e-4 * np.abs(out[1][1]).max()


def test_manual_refine_registers_round_assets(perturbed_project, tmp_path):
    sim, root, ps = perturbed_project
    proj = tmp_path / "p"
    shutil.copytree(root, proj)
    r = subprocess.run(CLI + ["manual-refine", "-p", str(proj), "--high-resolution", "6", "--refine-defocus",
                              "--reference", str(sim.map)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    with Project.open(proj, readonly=True) as p:
        ref = p.conn.execute("SELECT * FROM refinements ORDER BY id DESC").fetchone()
        assert (ref["id"], ref["kind"], ref["round"], ref["parent_id"]) == (2, "local", 1, 1)
        vol = p.conn.execute("SELECT * FROM volumes WHERE refinement_id = 2").fetchone()
        assert vol["display_name"] == "Local #2 (Rnd. 1) - Class #1"
        assert vol["path"] == "Assets/Volumes/volume_2_1.mrc"
    for ext in ("h5", "par", "star"):
        assert (proj / f"Assets/Parameters/params_2_1.{ext}").is_file()
    params = _last_params(proj)[0]
    assert np.all(params["score"] > 0) and np.all(params["occ"] == 100.0)
    assert np.allclose(params["change"], params["score"] - 0.0)  # imported scores were 0
    # defocus was refined (a +/-500 Å search) against a good reference and stayed at the true value
    moved = np.abs(params["df1"] - sim.particles.params["df1"])
    assert moved.max() > 0 and np.median(moved) < 100.0


def _kill_after_first_round(cmd: list[str], checkpoints: Path, timeout: float = 300) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if list(checkpoints.glob("*/iter_000001/manifest.json")) or list(checkpoints.glob("**/iter_000001/*.json")):
            break
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_resume_after_kill_gives_the_uninterrupted_result(perturbed_project, tmp_path):
    sim, root, ps = perturbed_project
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(root, a)
    shutil.copytree(root, b)
    args = ["auto-refine", "--max-rounds", "2"]
    r = subprocess.run(CLI + args + ["-p", str(a)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    _kill_after_first_round(CLI + args + ["-p", str(b)], b / "Scratch" / "AutoRefine3D")
    with Project.open(b) as p:
        job = p.conn.execute("SELECT * FROM jobs WHERE type = 'auto_refine'").fetchone()
        assert p.conn.execute("SELECT count(*) FROM volumes").fetchone()[0] == 0  # nothing half registered
    r = subprocess.run(CLI + args + ["-p", str(b), "--resume", str(job["id"])], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert "resuming after round 1" in r.stderr
    pa, pb = _last_params(a)[0], _last_params(b)[0]
    assert np.array_equal(pa, pb)
    with Project.open(a, readonly=True) as p1, Project.open(b, readonly=True) as p2:
        names = lambda p: [r[0] for r in p.conn.execute("SELECT display_name FROM volumes ORDER BY id")]  # noqa: E731
        assert names(p1) == names(p2) == ["Local #2 (Rnd. 1) - Class #1", "Local #3 (Rnd. 2) - Class #1"]


# ------------------------------------------------------------------ acceptance (slow)
@pytest.mark.slow
def test_auto_refine_from_perturbed_parameters(tmp_path):
    """Angles off by up to 10° and shifts by 3 px: median error < 1° and < 0.5 px after auto refine,
    resolution within 10% of the true-parameter reconstruction's."""
    box, ps = 96, 2.5 * 64 / 96
    sim = simulate_particles(tmp_path / "data", n_particles=2000, box=box, pixel_size=ps, snr=0.5, seed=11)
    write_par(tmp_path / "start.par", _perturbed(sim.particles.params, np.random.default_rng(5), ps))
    root = _project_with(tmp_path, sim, [tmp_path / "start.par"], ps)
    cmd = CLI + ["auto-refine", "-p", str(root), "--max-rounds", "8"]
    if MPIEXEC:
        cmd = [MPIEXEC, "-n", "3"] + cmd
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    final = _last_params(root)[0]
    ang, shift = _errors(final, sim.particles.params, ps)
    assert np.median(ang) < 1.0 and np.median(shift) < 0.5, (np.median(ang), np.median(shift))
    true_rec = reconstruct_particles(get_world(), str(sim.stack), sim.particles, ReconstructionSettings(
        mask_radius=0.45 * box * ps))
    with Project.open(root, readonly=True) as p:
        res = p.conn.execute("SELECT resolution FROM volumes ORDER BY id DESC").fetchone()[0]
    assert res <= 1.10 * true_rec.resolution, (res, true_rec.resolution)


def _classify(tmp: Path, sim, ps: float, box: int, focus: bool) -> float:
    tmp.mkdir(parents=True, exist_ok=True)
    write_par(tmp / "start.par", sim.particles.params)
    root = _project_with(tmp, sim, [tmp / "start.par"], ps)
    cmd = CLI + ["auto-refine", "-p", str(root), "--classes", "2", "--max-rounds", "8"]
    if focus:
        atoms = builtin_atoms()
        chain = atoms.chains == list(dict.fromkeys(atoms.chains.tolist()))[-1]  # the region that differs
        centre = atoms.coords[chain].mean(0) - atoms.coords.mean(0) + (box // 2) * ps  # Å from the first voxel
        cmd += ["--focus-radius", "30", "--focus-centre"] + [f"{v:.2f}" for v in centre]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    occ = np.stack([p["occ"] for p in _last_params(root)], axis=1)
    assign = occ.argmax(axis=1)
    return float(max(np.mean(assign == sim.classes), np.mean(assign != sim.classes)))


@pytest.mark.slow
def test_two_conformations_classified_with_and_without_focus(tmp_path):
    """>= 90% of particles in the right class; a focused mask on the differing region does at least as well."""
    box, ps = 64, 2.5
    sim = simulate_conformations(tmp_path / "data", n_particles=400, box=box, pixel_size=ps, snr=0.2, seed=21,
                                 fraction_first=0.5)
    plain = _classify(tmp_path / "plain", sim, ps, box, focus=False)
    focused = _classify(tmp_path / "focus", sim, ps, box, focus=True)
    assert plain >= 0.9, plain
    # "at least as well": both are near 99.5% here; allow the noise of 4 of 400 particles
    assert focused >= plain - 0.01, (focused, plain)


@pytest.mark.parametrize("case", ["box", "pixel_size", "classes"])
def test_bad_refine_input_is_refused_and_changes_nothing(perturbed_project, tmp_path, case):
    from cistem_mpi.io.mrc import write_mrc

    sim, root, ps = perturbed_project
    proj = tmp_path / "p"
    shutil.copytree(root, proj)
    Project.open(proj).close()  # record the copy's location first
    ref = tmp_path / "ref.mrc"
    args = ["--reference", str(ref)]
    if case == "box":
        write_mrc(ref, np.zeros((32, 32, 32), np.float32), ps)
        expect = "box"
    elif case == "pixel_size":
        write_mrc(ref, np.zeros((64, 64, 64), np.float32), 3.1)
        expect = "pixel size"
    else:
        write_mrc(ref, np.zeros((64, 64, 64), np.float32), ps)
        args += ["--classes", "2"]
        expect = "one reference per class"
    before = db_dump(proj)
    r = subprocess.run(CLI + ["manual-refine", "-p", str(proj)] + args, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and expect in lines[0], r.stderr
    assert db_dump(proj) == before


def test_a_class_that_empties_is_reseeded_from_the_largest():
    """Classification never leaves a class dead: below 10 particles (or 10 % of an equal share) it takes half
    of the largest class's particles, with their orientations; classes with enough particles are untouched."""
    from cistem_mpi.drivers.refine_rounds import reseed_empty_classes
    from cistem_mpi.io.params import empty_params

    rng = np.random.default_rng(0)
    k, n = 3, 300
    params = [empty_params(n) for _ in range(k)]
    owner = np.r_[np.zeros(200, int), np.ones(97, int), np.full(3, 2)]  # class 3 has emptied to 3 particles
    for c, p in enumerate(params):
        p["occ"] = np.where(owner == c, 100.0, 0.0)
        p["phi"], p["theta"], p["psi"] = rng.uniform(0, 360, n), rng.uniform(0, 180, n), rng.uniform(0, 360, n)
    before = [p.copy() for p in params]
    done = reseed_empty_classes(params, np.random.default_rng(5))
    assert done == [(2, 0, 3)]
    best = np.argmax(np.stack([p["occ"] for p in params], axis=1), axis=1)
    moved = np.nonzero((owner == 0) & (best == 2))[0]
    assert len(moved) == 100 and np.sum(best == 0) == 100 and np.sum(best == 1) == 97 and np.sum(best == 2) == 103
    for col in ("phi", "theta", "psi"):  # the new members start from the donor's orientations
        assert np.array_equal(params[2][col][moved], before[0][col][moved])
    assert np.array_equal(params[1], before[1])  # a class with enough particles is left as it was
    again = [p.copy() for p in before]
    reseed_empty_classes(again, np.random.default_rng(5))
    assert all(np.array_equal(x, y) for x, y in zip(again, params))  # the same seed, the same re-seed


def test_global_rounds_bring_back_particles_that_local_rounds_leave(tmp_path):
    """``auto-refine --global-rounds 1``: a start with a fifth of the particles at random orientations (as
    ab-initio leaves some) and the rest up to 2° off in each Euler angle.  Local rounds leave the scrambled
    ones where they are; one global round first brings them to within 10°, and the other particles stay as
    good."""
    box, ps = 48, 3.0
    sim = simulate_particles(tmp_path / "data", n_particles=300, box=box, pixel_size=ps, snr=0.5, seed=21)
    rng = np.random.default_rng(8)
    start = _perturbed(sim.particles.params, rng, ps, angle=2.0, shift_px=1.0)
    bad = rng.random(len(start)) < 0.2
    start["phi"][bad] = rng.uniform(0, 360, bad.sum())
    start["theta"][bad] = np.degrees(np.arccos(rng.uniform(-1, 1, bad.sum())))
    start["psi"][bad] = rng.uniform(0, 360, bad.sum())
    write_par(tmp_path / "start.par", start)
    recovered = {}
    for n in (0, 1):
        root = _project_with(tmp_path / f"g{n}", sim, [tmp_path / "start.par"], ps)
        r = subprocess.run(CLI + ["auto-refine", "-p", str(root), "--max-rounds", "2", "--global-rounds", str(n),
                                  "--mask-radius", "60"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        ang, _ = _errors(_last_params(root)[0], sim.particles.params, ps)
        recovered[n] = (float(np.mean(ang[bad] < 10.0)), float(np.median(ang[~bad])))
    assert recovered[0][0] < 0.3, recovered  # local rounds: the scrambled particles stay lost
    assert recovered[1][0] > 0.8, recovered
    assert recovered[1][1] <= recovered[0][1] + 0.25, recovered  # the others as good as from local rounds

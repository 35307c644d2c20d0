"""The ground-truth simulator: files written, truth beside them, conventions end to end."""

from __future__ import annotations

import json

import numpy as np

from cistem_mpi.drivers.simulate import (
    builtin_map, conformation_maps, simulate_conformations, simulate_micrographs, simulate_movies,
    simulate_particles,
)
from cistem_mpi.io.mrc import read_mrc
from cistem_mpi.io.par import read_par
from cistem_mpi.io.star import read_star
from cistem_mpi.kernels.backprojection import reconstruct
from cistem_mpi.kernels.ctf import ctf_2d_stack
from cistem_mpi.kernels.euler import rotation_matrix
from cistem_mpi.kernels.filters import lowpass
from cistem_mpi.kernels.fsc import fsc


def test_builtin_map_is_the_8zpm_protein_centred():
    m = builtin_map(48, 3.5)
    assert m.shape == (48, 48, 48) and m.dtype == np.float32 and m.min() >= 0
    z, y, x = np.mgrid[0:48, 0:48, 0:48]
    com = [(c * m).sum() / m.sum() for c in (z, y, x)]
    assert np.allclose(com, 24, atol=0.6)
    # ~3140 atoms of ~25 kDa-per-chain protein: mass ~ sum of f(0) of C/N/O/S ~ 3140 * 2.5
    assert 0.9 < m.sum() * 3.5 ** 3 / (3140 * 2.5) < 1.2
    # the molecule is elongated: its longest extent > 90 A
    occ = m > 0.05 * m.max()
    ext = [np.ptp(np.nonzero(occ.any(axis=tuple(j for j in range(3) if j != i)))[0]) * 3.5 for i in range(3)]
    assert max(ext) > 90


def _reconstruct_from_files(stack_path, params, pixel_size, voltage, cs, ac, box):
    stack, _ = read_mrc(stack_path)
    r = rotation_matrix(params["phi"], params["theta"], params["psi"])
    c = ctf_2d_stack(box, pixel_size, voltage, cs, ac, params["df1"], params["df2"], params["angast"], params["pshift"])
    sh = np.stack([params["shx"], params["shy"]], 1) / pixel_size
    return reconstruct(stack, r, ctf=c, wiener=len(stack) / 50.0, shifts_px=sh)


def test_particles_written_with_truth_and_reconstructable_from_par_and_star(tmp_path):
    box, ps = 40, 4.0
    sim = simulate_particles(tmp_path, n_particles=800, box=box, pixel_size=ps, snr=2.0, seed=3,
                             max_shift=8.0, phase_shift=0.3)
    for p in (sim.stack, sim.par, sim.cistem_star, sim.relion_star, sim.map, sim.truth):
        assert p.is_file()
    stack, sps = read_mrc(sim.stack)
    assert stack.shape == (800, box, box) and abs(sps - ps) < 1e-4
    par = read_par(sim.par)
    assert np.allclose(par["shx"], sim.particles.params["shx"], atol=0.01)
    assert np.allclose(par["df1"], sim.particles.params["df1"], atol=0.1)
    truth = np.load(sim.truth)
    assert np.allclose(rotation_matrix(par["phi"], par["theta"], par["psi"]), truth["rotations"], atol=2e-4)
    truth_map, _ = read_mrc(sim.map)
    # .par -> reconstruction matches the true map: proves angles, shifts, CTF conventions end to end
    rec = _reconstruct_from_files(sim.stack, par, ps, 300.0, 2.7, 0.07, box)
    cc = np.corrcoef(lowpass(rec, 0.25, 0.05).ravel(), lowpass(truth_map, 0.25, 0.05).ravel())[0, 1]
    assert cc > 0.9
    # the RELION 3.1 star (origins in A, sign flipped) gives the same parameters back
    rs = read_star(sim.relion_star)
    assert np.allclose(rs.params["shx"], par["shx"], atol=0.01) and np.allclose(rs.params["psi"], par["psi"], atol=0.01)
    assert abs(rs.optics[0].pixel_size - ps) < 1e-6
    cst = read_star(sim.cistem_star)
    assert np.allclose(cst.params["pshift"], 0.3, atol=1e-3)
    meta = json.loads(sim.truth.with_name("particles_truth.json").read_text())
    assert meta["n_particles"] == 800 and meta["snr"] == 2.0


def test_snr_and_noise_normalisation(tmp_path):
    vol = builtin_map(32, 5.0)
    a = simulate_particles(tmp_path / "a", 200, 32, 5.0, snr=0.05, seed=1, volume=vol)
    b = simulate_particles(tmp_path / "b", 200, 32, 5.0, snr=1e6, seed=1, volume=vol)
    na, _ = read_mrc(a.stack)
    nb, _ = read_mrc(b.stack)
    clean = nb * np.sqrt(0.05 / 1e6)  # b is clean signal / sigma_b; rescale to a's units
    noise = na - clean
    assert abs(noise.var() - 1.0) < 0.02  # unit noise variance
    assert abs(clean.var() / noise.var() - 0.05) < 0.005


def test_same_seed_same_bytes(tmp_path):
    vol = builtin_map(24, 6.0)
    a = simulate_particles(tmp_path / "a", 10, 24, 6.0, 0.1, seed=7, volume=vol)
    b = simulate_particles(tmp_path / "b", 10, 24, 6.0, 0.1, seed=7, volume=vol)
    assert a.stack.read_bytes() == b.stack.read_bytes()
    assert a.par.read_text() == b.par.read_text()


def test_micrographs_have_dark_particles_at_the_written_positions(tmp_path):
    ps, exp = 2.5, 30.0
    sim = simulate_micrographs(tmp_path, n_micrographs=1, shape=(384, 384), n_per_micrograph=12, box=64,
                               pixel_size=ps, exposure=exp, seed=2, ice_sigma=0.0)
    img, _ = read_mrc(sim.micrographs[0])
    assert abs(img.mean() / (exp * ps * ps) - 1) < 0.02
    pos = np.loadtxt(sim.coordinates[0])[:, :2]
    assert np.allclose(pos, sim.positions[0], atol=1e-3)
    smooth = lowpass(sim.intensities[0], 0.03, 0.01)
    at = np.array([smooth[int(round(y)), int(round(x))] for x, y in pos])
    rng = np.random.default_rng(0)
    far = []
    for _ in range(200):
        x, y = rng.uniform(0, 384, 2)
        if np.min(np.hypot(pos[:, 0] - x, pos[:, 1] - y)) > 40:
            far.append(smooth[int(y), int(x)])
    assert at.mean() < np.mean(far) - 3 * np.std(far) / np.sqrt(len(at))
    truth = json.loads(sim.truth.read_text())
    assert truth["micrographs"][0]["df1"] >= truth["micrographs"][0]["df2"]


def test_movies_tiff_mrc_eer_with_gain_and_drift(tmp_path):
    from cistem_mpi.io.gain import read_gain
    from cistem_mpi.io.movies import open_movie

    sim = simulate_movies(tmp_path, n_movies=1, shape=(128, 128), n_frames=6, exposure_per_frame=20.0,
                          pixel_size=1.5, box=48, n_per_micrograph=3, seed=4, formats=("tiff", "mrc"),
                          drift_total_px=5.0, damage=False, ice_sigma=0.2)
    with open_movie(sim.movies["tiff"][0]) as t, open_movie(sim.movies["mrc"][0]) as m:
        ft = np.stack([t[i] for i in range(len(t))])
        fm = np.stack([m[i] for i in range(len(m))])
    assert ft.shape == (6, 128, 128) and np.array_equal(ft, fm)
    assert np.issubdtype(ft.dtype, np.integer)
    gain = read_gain(sim.gain)
    intensity = np.load(sim.movies["tiff"][0].with_name("movie_0001_truth.npz"))["intensity"]
    # gain-corrected counts average exposure * intensity
    assert abs((ft * gain).mean() / (20.0 * 1.5 ** 2 * intensity.mean()) - 1) < 0.01
    # the last frame is the first moved by the true drift (cross-correlation peak)
    f0 = (ft[0] * gain).astype(np.float64)
    f5 = (ft[5] * gain).astype(np.float64)
    cc = np.real(np.fft.ifft2(np.fft.fft2(f5 - f5.mean()) * np.conj(np.fft.fft2(f0 - f0.mean()))))
    dy, dx = np.unravel_index(np.argmax(cc), cc.shape)
    d = sim.drift_px[0][5]
    wrap = lambda v: v - 128 if v > 64 else v  # noqa: E731
    assert abs(wrap(dx) - d[0]) <= 1 and abs(wrap(dy) - d[1]) <= 1
    eer = simulate_movies(tmp_path / "eer", n_movies=1, shape=(128, 128), n_frames=6, exposure_per_frame=1.0,
                          pixel_size=1.5, box=48, n_per_micrograph=3, seed=4, formats=("eer",), damage=False)
    n_raw = json.loads(eer.truth.read_text())["eer_raw_frames_per_frame"]
    assert n_raw >= 100
    with open_movie(eer.movies["eer"][0], eer_fractions=6) as e:
        fe = np.stack([e[i] for i in range(len(e))])
    assert fe.shape == (6, 128, 128)
    egain = read_gain(eer.gain)
    ei = np.load(eer.movies["eer"][0].with_name("movie_0001_truth.npz"))["intensity"]
    assert abs((fe * egain).mean() / (1.0 * 1.5 ** 2 * ei.mean()) - 1) < 0.02


def test_conformations_mixed_in_the_given_ratio(tmp_path):
    a, b = conformation_maps(32, 5.0, "remove")
    assert b.sum() < 0.85 * a.sum()  # the nanobody is gone
    _, c_move = fsc(a, conformation_maps(32, 5.0, "move")[1])
    assert c_move[3] < 0.99
    sim = simulate_conformations(tmp_path, n_particles=400, box=32, pixel_size=5.0, snr=0.5, seed=5,
                                 fraction_first=0.7, maps=(a, b))
    assert abs((sim.classes == 0).mean() - 0.7) < 0.06
    assert sim.map.with_name("conformations_map_class2.mrc").is_file()
    assert np.array_equal(np.load(sim.truth)["classes"], sim.classes)


def test_command_line(tmp_path):
    from cistem_mpi.cli import main

    rc = main(["simulate", "particles", "--out", str(tmp_path / "p"), "-n", "5", "--box", "24",
               "--pixel-size", "6"])
    assert rc == 0 and (tmp_path / "p" / "particles.mrcs").is_file()
    assert main(["simulate", "particles", "--out", str(tmp_path / "q"), "--map", str(tmp_path / "none.mrc")]) == 2
    assert main(["simulate", "particles", "--out", str(tmp_path / "q"), "--snr", "-1", "--box", "24"]) == 2

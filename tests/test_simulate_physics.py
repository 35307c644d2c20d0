"""The realistic micrograph model: physical contrast, shot noise, detector, tilt, rejected areas."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cistem_mpi.drivers.simulate import assembly_map, builtin_assembly, simulate_micrographs
from cistem_mpi.io.mrc import read_mrc
from cistem_mpi.kernels import fft as _fft
from cistem_mpi.kernels.simulate import (
    CARBON_MEAN_POTENTIAL, ICE_MEAN_POTENTIAL, SCATTERING_TO_VOLTS, amorphous_potential_noise,
    apply_detector, atoms_to_map, atoms_to_map_separable, ctf_filter_by_height, detector_mtf,
    height_at, interaction_constant, paste_images, physical_micrograph, solvent_excluded_potential,
    specimen_height,
)

# physical constants (CODATA 2018), for references computed independently of the code
H, M0, E, C = 6.62607015e-34, 9.1093837015e-31, 1.602176634e-19, 299792458.0


def _sigma_reference(kv: float) -> float:
    """sigma = 2 pi m e lambda / h^2 with the relativistic mass and wavelength (rad / (V Å))."""
    v = kv * 1e3
    m = M0 * (1 + E * v / (M0 * C * C))
    lam = H / np.sqrt(2 * M0 * E * v * (1 + E * v / (2 * M0 * C * C)))
    return 2 * np.pi * m * E * lam / H ** 2 * 1e-10  # per V m -> per V Å


def test_interaction_constant_and_potential_scale_from_first_principles():
    for kv in (100.0, 200.0, 300.0):
        assert interaction_constant(kv) == pytest.approx(_sigma_reference(kv), rel=1e-3)
    assert interaction_constant(300.0) == pytest.approx(6.526e-4, rel=2e-3)  # Kirkland's table
    # h^2 / (2 pi m0 e) in V Å^2
    assert SCATTERING_TO_VOLTS == pytest.approx(H ** 2 / (2 * np.pi * M0 * E) * 1e20, rel=1e-4)
    assert 4.3 < ICE_MEAN_POTENTIAL < 4.8 and 10 < CARBON_MEAN_POTENTIAL < 13


def test_a_box_of_random_water_atoms_has_the_ice_mean_potential():
    """atoms_to_map times 47.878 V Å^2 is the potential in volts: water at 0.94 g/cm^3 -> ~4.58 V."""
    from cistem_mpi.io.model import scattering_coefficients

    rng = np.random.default_rng(0)
    side = 40.0
    n_mol = int(round(0.94 / 18.015 * 0.602214 * side ** 3))
    o = rng.uniform(0, side, (n_mol, 3))
    xyz = np.concatenate([o, o + rng.normal(0, 0.6, o.shape), o + rng.normal(0, 0.6, o.shape)])
    els = np.array(["O"] * n_mol + ["H"] * (2 * n_mol))
    a, b = scattering_coefficients(els)
    m = atoms_to_map_separable(xyz, a, b, 40, 1.0, center=np.full(3, side / 2))
    assert np.allclose(m[:8, :8, :8], atoms_to_map(xyz, a, b, 40, 1.0, center=np.full(3, side / 2))[:8, :8, :8],
                       atol=1e-5)
    inner = m[10:30, 10:30, 10:30] * SCATTERING_TO_VOLTS  # away from the faces (missing neighbours)
    assert float(inner.mean()) == pytest.approx(ICE_MEAN_POTENTIAL, rel=0.03)


def test_slab_contrast_is_two_sigma_times_projected_potential():
    """A flat slab of projected potential phi, seen with CTF = -1 (Q = 1, no defocus): I = 1 - 2 sigma phi."""
    n, ps, kv = 128, 2.0, 300.0
    phi0 = 50.0  # V Å (e.g. 10 Å of protein 5 V above ice)
    slab = np.zeros((1, n, n), np.float32)
    yy, xx = np.mgrid[0:n, 0:n]
    slab[0][(np.abs(xx - n // 2) < 40) & (np.abs(yy - n // 2) < 40)] = phi0
    ft = _fft.ft2(slab[0])[None]
    img = physical_micrograph(ft, np.array([[128.0, 128.0]]), np.zeros(1), (256, 256), ps, kv, 0.0, 1.0,
                              0.0, 0.0, 0.0, ice_thickness=0.0, rng=np.random.default_rng(0))
    inside, outside = float(img[118:138, 118:138].mean()), float(img[5:40, 5:40].mean())
    sigma = _sigma_reference(kv)
    assert inside - outside == pytest.approx(-2 * sigma * phi0, rel=0.01)
    # ice attenuates the zero-loss image by exp(-t / mfp) (~3500 Å at 300 kV)
    thick = physical_micrograph(ft[:0], np.zeros((0, 2)), np.zeros(0), (64, 64), ps, kv, 0.0, 1.0, 0.0, 0.0, 0.0,
                                ice_thickness=350.0, rng=np.random.default_rng(0))
    assert float(thick.mean()) == pytest.approx(np.exp(-0.1), rel=0.01)


def test_particle_displaces_ice():
    """A particle whose potential equals the ice's is invisible; protein (~8 V) shows ~3.4 V of contrast."""
    n = 32
    z, y, x = np.mgrid[0:n, 0:n, 0:n] - n // 2
    ball = (x * x + y * y + z * z <= 8 ** 2).astype(np.float32)
    same = solvent_excluded_potential(ball * ICE_MEAN_POTENTIAL, 2.0, smooth_angstrom=0.0)
    assert np.abs(same).max() < 1e-5
    prot = solvent_excluded_potential(ball * 8.0, 2.0, smooth_angstrom=0.0)
    assert prot[16, 16, 16] == pytest.approx(8.0 - ICE_MEAN_POTENTIAL, abs=1e-5)
    # the assembly: a mean potential of ~7-9 V inside its envelope (protein with riding hydrogens)
    v = assembly_map(1, 3.0) * SCATTERING_TO_VOLTS
    from scipy.ndimage import gaussian_filter

    env = gaussian_filter(v, 1.0) > ICE_MEAN_POTENTIAL
    assert 6.5 < float(v[env].mean()) < 10.0


def test_assembly_sizes():
    from cistem_mpi.io.model import builtin_atoms

    mass = {"C": 12.011, "N": 14.007, "O": 15.999, "S": 32.06}
    one = sum(mass[e] for e in builtin_atoms().elements) / 1000
    assert 38 < one < 45  # 8ZPM alone: ~41 kDa of heavy atoms (~45 kDa with H): too small to pick
    eight = builtin_assembly(8)
    assert len(eight) == 8 * len(builtin_atoms())
    assert 8 * one * 1.08 > 300  # >= 300 kDa complex
    c = eight.coords - eight.coords.mean(0)
    assert 150 < np.ptp(c[:, 0]) < 220 and np.ptp(c[:, 2]) < 120


def test_shot_noise_is_poisson_and_the_counting_mtf_is_the_pixel_sinc():
    rng = np.random.default_rng(3)
    flat = np.full((256, 256), 0.8, np.float32)
    for kind in ("ideal", "counting"):
        c = apply_detector(flat, 40.0, 1.0, rng, kind)
        assert np.array_equal(c, np.round(c))
        assert float(c.mean()) == pytest.approx(32.0, rel=0.01)
        assert float(c.var()) == pytest.approx(32.0, rel=0.03)  # Poisson: variance = mean
        # white noise: the power at high frequencies equals that at low ones
        p = np.abs(np.fft.rfft2(c - c.mean())) ** 2
        assert float(p[64:192, 96:].mean() / p[1:32, 1:32].mean()) == pytest.approx(1.0, rel=0.1)
    # a cosine at 0.25 and 0.4 cycles/pixel along x is attenuated by sinc(f)
    x = np.arange(256)
    for f in (0.25, 0.40625):
        img = (1.0 + 0.2 * np.cos(2 * np.pi * f * x))[None, :].repeat(64, 0).astype(np.float32)
        c = apply_detector(img, 1e6, 1.0, np.random.default_rng(1), "counting") / 1e6
        amp = 2 * np.abs(np.fft.rfft(c[32] - c[32].mean()))[int(f * 256)] / 256
        assert amp / 0.2 == pytest.approx(np.sinc(f), abs=0.01)
    assert float(detector_mtf(64)[0, 32]) == pytest.approx(2 / np.pi, rel=1e-5)


def test_amorphous_fluctuations_have_the_molecular_shot_noise_variance():
    # independent molecules (S = 1), no form-factor fall-off: var = (47.878 f0)^2 n t / p^2
    t, p = 400.0, 1.5
    a = amorphous_potential_noise((512, 512), p, t, np.random.default_rng(0), s0=1.0, bfactor=0.0)
    from cistem_mpi.kernels.simulate import F0_WATER, ICE_NUMBER_DENSITY

    expect = (SCATTERING_TO_VOLTS * F0_WATER) ** 2 * ICE_NUMBER_DENSITY * t / p ** 2
    assert float(a.var()) == pytest.approx(expect, rel=0.02)
    # thicker ice, more fluctuation (std ~ sqrt(t))
    b = amorphous_potential_noise((512, 512), p, 4 * t, np.random.default_rng(0), s0=1.0, bfactor=0.0)
    assert float(b.std() / a.std()) == pytest.approx(2.0, rel=0.01)


def test_height_dependent_ctf_matches_the_plain_ctf_at_each_level():
    from cistem_mpi.kernels.ctf import ctf_2d

    rng = np.random.default_rng(0)
    img = rng.standard_normal((128, 160)).astype(np.float32)
    args = (1.5, 300.0, 2.7, 0.07, 15000.0, 14000.0, 30.0)
    for dz in (0.0, 400.0):
        c = ctf_2d(128, 1.5, 300.0, 2.7, 0.07, 15000.0 + dz, 14000.0 + dz, 30.0, half=True, nx=160)
        ref = np.fft.irfft2(np.fft.rfft2(img) * c, s=img.shape)
        got = ctf_filter_by_height(img, *args, height=np.full(img.shape, dz, np.float32))
        assert np.allclose(got, ref, atol=1e-4)
    # a tilted plane: the defocus at each pixel is that of its height (loop reference)
    h = specimen_height((6, 8), 2.0, 30.0, 20.0)
    for yy in range(6):
        for xx in range(8):
            d = (-(xx - 4) * np.sin(np.deg2rad(30)) + (yy - 3) * np.cos(np.deg2rad(30))) * 2.0
            assert h[yy, xx] == pytest.approx(np.tan(np.deg2rad(20)) * d, abs=1e-4)
            assert height_at(xx, yy, (6, 8), 2.0, 30.0, 20.0) == pytest.approx(h[yy, xx], abs=1e-4)


def test_paste_images_matches_a_loop():
    rng = np.random.default_rng(2)
    boxes = rng.standard_normal((3, 16, 16)).astype(np.float32)
    pos = np.array([[20.0, 30.0], [5.0, 5.0], [60.0, 40.0]])  # one clipped at the corner
    got = paste_images(boxes, pos, (50, 64))
    ref = np.zeros((50, 64))
    for b, (x, y) in zip(boxes, pos):
        for j in range(16):
            for i in range(16):
                yy, xx = int(y) - 8 + j, int(x) - 8 + i
                if 0 <= yy < 50 and 0 <= xx < 64:
                    ref[yy, xx] += b[j, i]
    assert np.allclose(got, ref, atol=1e-5)


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    out = tmp_path_factory.mktemp("realistic")
    return simulate_micrographs(out, n_micrographs=1, shape=(384, 384), n_per_micrograph=12, pixel_size=3.0,
                                exposure=40.0, seed=5, physics="realistic", defocus_mean=17000,
                                defocus_spread=1000, astigmatism=200, contamination=1,
                                contamination_radius=(150, 200), carbon_fraction=0.15, tilt_angle=25.0,
                                tilt_axis=40.0, ice_gradient=100.0, two_sizes=True)


def test_realistic_micrograph_truth_masks_and_tilt(realistic):
    sim = realistic
    tr = np.load(sim.micrographs[0].with_name("micrograph_0001_truth.npz"))
    pos = tr["positions_px"]
    assert len(pos) >= 4 and np.allclose(pos, sim.positions[0])
    assert set(np.unique(tr["classes"])) <= {0, 1} and tr["radius_angstrom"][0] > tr["radius_angstrom"][1]
    # no particle within a radius of carbon or contamination
    from scipy.ndimage import distance_transform_edt

    d = distance_transform_edt(~tr["reject_mask"])
    r = tr["radius_angstrom"].max() / 3.0
    assert all(d[int(y), int(x)] > r for x, y in pos)
    assert tr["contamination_mask"].any() and tr["carbon_mask"].any()
    # per-particle defocus = micrograph defocus + its height on the tilted plane + its height in the ice
    info = json.loads(sim.truth.read_text())["micrographs"][0]
    h = height_at(pos[:, 0], pos[:, 1], (384, 384), 3.0, 40.0, 25.0)
    assert np.allclose(tr["height"], h)
    assert np.allclose(tr["df1"] - info["df1"], h + tr["z_in_ice"], atol=0.05)
    assert np.all(np.abs(tr["z_in_ice"]) <= 0.5 * tr["ice_thickness"].max())
    img, _ = read_mrc(sim.micrographs[0])
    clean = ~tr["reject_mask"]
    # contamination and carbon are darker than the ice; counts ~ exposure * p^2 * exp(-t/mfp) in the ice
    assert img[tr["contamination_mask"]].mean() < 0.9 * img[clean].mean()
    assert img[clean].mean() / (40.0 * 9.0) == pytest.approx(np.exp(-300 / 3500), rel=0.05)


def test_realistic_particles_are_dark_when_low_passed(realistic):
    """At 1.6-1.8 µm underfocus a >= 300 kDa particle is visible in the low-passed micrograph."""
    from scipy.ndimage import gaussian_filter

    sim = realistic
    tr = np.load(sim.micrographs[0].with_name("micrograph_0001_truth.npz"))
    img, _ = read_mrc(sim.micrographs[0])
    pos = sim.positions[0]
    r = tr["radius_angstrom"] / 3.0
    # band-passed (6-24 Å) contrast energy, smoothed over the particle
    bp = gaussian_filter(img, 2.0) - gaussian_filter(img, 8.0)
    energy = gaussian_filter(bp * bp, 0.4 * r.min())
    at = np.array([energy[int(y), int(x)] for x, y in pos])
    yy, xx = np.mgrid[0:384, 0:384]
    near = np.zeros((384, 384), bool)
    for (x, y) in pos:
        near |= np.hypot(xx - x, yy - y) < 1.2 * r.max()
    from scipy.ndimage import distance_transform_edt

    empty = (~near & (distance_transform_edt(~tr["reject_mask"]) > r.max())
             & (xx > 30) & (yy > 30) & (xx < 354) & (yy < 354))
    bg = energy[empty]
    assert np.mean(at > np.percentile(bg, 99)) >= 0.9
    assert np.median(at) > 3 * np.median(bg)
    # and in the low-passed image the particles are darker than their surroundings on average
    smooth = gaussian_filter(img, 4.0)
    dips = []
    for (x, y), c in zip(pos, tr["classes"]):
        d = np.hypot(xx - x, yy - y)
        ring = (d > 1.1 * r[c]) & (d < 1.6 * r[c]) & ~near & ~tr["reject_mask"]
        if ring.sum() > 50:
            dips.append(smooth[ring].mean() - smooth[d < 0.6 * r[c]].mean())
    assert np.mean(dips) > 0


def test_envelope_bfactor_sets_the_information_limit():
    rng = np.random.default_rng(0)
    white = rng.standard_normal((256, 256)).astype(np.float32)
    a = ctf_filter_by_height(white, 1.5, 300.0, 2.7, 0.07, 15000.0, 15000.0, 0.0, bfactor=0.0)
    b = ctf_filter_by_height(white, 1.5, 300.0, 2.7, 0.07, 15000.0, 15000.0, 0.0, bfactor=100.0)
    pa, pb = np.abs(np.fft.rfft2(a)) ** 2, np.abs(np.fft.rfft2(b)) ** 2
    fy = np.fft.fftfreq(256)[:, None] / 1.5
    fx = np.fft.rfftfreq(256)[None, :] / 1.5
    g = np.hypot(fx, fy)
    band = (g > 0.25) & (g < 0.3)
    # power ratio = exp(-B g^2 / 2)
    assert float(pb[band].sum() / pa[band].sum()) == pytest.approx(
        float((np.exp(-100 * g[band] ** 2 / 2) * pa[band]).sum() / pa[band].sum()), rel=1e-3)
    assert float(pb[band].sum() / pa[band].sum()) < 0.05


def test_cli_default_is_realistic(tmp_path):
    from cistem_mpi.cli import main

    assert main(["simulate", "micrographs", "--out", str(tmp_path), "-n", "1", "--size", "256", "256",
                 "--pixel-size", "4.0", "--particles-per-micrograph", "3", "--contamination", "1"]) == 0
    info = json.loads((tmp_path / "micrograph_truth.json").read_text())
    assert info["physics"] == "realistic" and info["detector"] == "counting"
    assert (tmp_path / "micrograph_0001_truth.npz").is_file()
    assert main(["simulate", "micrographs", "--out", str(tmp_path / "x"), "--carbon-fraction", "0.95"]) == 2

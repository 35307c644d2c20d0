"""Whitening by the noise spectrum outside the mask, the outer mask on the written maps (issue #16 item 3)."""

from __future__ import annotations

import json
import subprocess
import sys

import mrcfile
import numpy as np
import pytest

from cistem_mpi.db.project import Project
from cistem_mpi.drivers.simulate import builtin_map, simulate_particles
from cistem_mpi.io.params import empty_params
from cistem_mpi.kernels import backprojection as bp
from cistem_mpi.kernels import reconstruct3d as r3
from cistem_mpi.kernels import reconstruction as rec
from cistem_mpi.kernels import whitening as wh
from cistem_mpi.kernels.euler import rotation_matrix
from cistem_mpi.kernels.fft import ft2, ift2
from cistem_mpi.kernels.fsc import fsc
from cistem_mpi.kernels.masks import sphere_mask
from cistem_mpi.kernels.projection import prepare_volume_ft
from cistem_mpi.kernels.simulate import simulate_particle_images

CLI = [sys.executable, "-m", "cistem_mpi"]


# ------------------------------------------------------------------ the kernel against slow references
def _slow_noise_spectrum(images, radius, edge):
    """Pixel by pixel: unit variance outside the circle, particle masked away, |FFT|^2 per rounded shell."""
    n = images.shape[-1]
    total = np.zeros(int(np.ceil(np.sqrt(2) * (n // 2))) + 2)
    count = np.zeros_like(total)
    used = 0
    for img in images.astype(np.float64):
        outside = [img[y, x] for y in range(n) for x in range(n) if np.hypot(y - n // 2, x - n // 2) > radius]
        mean, sd = np.mean(outside), np.std(outside)
        if sd == 0:
            continue
        used += 1
        x = (img - mean) / sd
        for yy in range(n):
            for xx in range(n):
                r = np.hypot(yy - n // 2, xx - n // 2)
                t = min(max((r - (radius - edge / 2)) / edge, 0.0), 1.0)
                x[yy, xx] *= 1.0 - 0.5 * (1 + np.cos(np.pi * t))
        power = np.abs(np.fft.fft2(x)) ** 2  # the full transform: no half-grid bookkeeping
        for ky in range(n):
            for kx in range(n):
                fy = ky if ky < (n + 1) // 2 else ky - n
                fx = kx if kx < (n + 1) // 2 else kx - n
                s = int(np.floor(np.hypot(fy, fx) + 0.5))
                total[s] += power[ky, kx]
                count[s] += 1
    out = np.zeros(len(total))
    ok = count > 0
    out[ok] = total[ok] / count[ok]  # count runs over every image used: the mean per pixel and image
    return out


def test_noise_spectrum_filter_and_normalisation_match_slow_references():
    rng = np.random.default_rng(4)
    n = 20
    images = rng.normal(2.0, 3.0, size=(5, n, n)).astype(np.float32)
    images[1] = ift2(ft2(images[1]) * np.exp(-np.arange(n // 2 + 1) / 3.0)[None, :])  # one coloured image
    images[3] = 7.0  # no variance: left out, as cisTEM does
    ours = wh.noise_power_spectrum(images, 6.0, 3.0)
    slow = _slow_noise_spectrum(images, 6.0, 3.0)
    np.testing.assert_allclose(ours, slow[:len(ours)], rtol=2e-4, atol=1e-9)
    assert not slow[len(ours):].any()
    # the filter: 1/sqrt(power) at each pixel's radius, linear between shells
    filt = wh.whitening_filter(ours, n)
    for ky, kx in ((0, 0), (3, 4), (n - 5, 7), (n // 2, n // 2), (7, 0)):
        fy = ky if ky < n // 2 else ky - n
        r = np.hypot(fy, kx)
        i = int(r)
        t = r - i
        w = 1 / np.sqrt(ours)
        w[0] = w[1]  # DC: shell 1's value (the means were removed)
        want = (1 - t) * w[i] + t * w[min(i + 1, len(w) - 1)]  # held beyond the last shell
        assert filt[ky, kx] == pytest.approx(want, rel=1e-5), (ky, kx)
    # background normalisation: mean 0, sd 1 of the pixels beyond the radius, image by image
    x = wh.background_normalise(images, 8.0)
    for img, orig in zip(x, images):
        ring = [img[y, xx] for y in range(n) for xx in range(n) if np.hypot(y - n // 2, xx - n // 2) > 8.0]
        if np.ptp(orig) == 0:
            assert not img.any()
        else:
            assert abs(np.mean(ring)) < 1e-5 and np.std(ring) == pytest.approx(1.0, rel=1e-5)


def test_whitening_of_white_noise_changes_little():
    """White noise: the filter is flat, so whitened and plain preparation insert nearly the same data."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(400, 32, 32)).astype(np.float32)
    spec = wh.noise_power_spectrum(images, 10.0, 3.0)
    filt = wh.whitening_filter(spec, 32)
    inner = filt[np.hypot(np.fft.fftfreq(32)[:, None] * 32, np.arange(17)[None, :]) <= 16]
    assert inner.std() / inner.mean() < 0.05


# ------------------------------------------------------------------ coloured noise: whitening pays
def _coloured_noise(rng, n_img, n, psd):
    """Gaussian noise of the radial power spectrum ``psd(k)`` (k in cycles/pixel)."""
    k = np.hypot(np.fft.fftfreq(n)[:, None], np.fft.rfftfreq(n)[None, :])
    white = rng.standard_normal((n_img, n, n)).astype(np.float32)
    return ift2(ft2(white) * np.sqrt(psd(k)).astype(np.float32), nx=n).astype(np.float32)


def _bands(curve, n, bands):
    f = np.arange(len(curve)) / n
    return [float(curve[(f >= lo) & (f < hi)].mean()) for lo, hi in bands]


def test_whitening_raises_fsc_against_truth_with_noise_that_varies_between_particles():
    """Two groups of particles (two kinds of ice/detector): strong low-frequency noise, and noise rising to Nyquist.

    Measured (box 48, 3 Å, 1,600 particles, SNR 0.1, padding 1, mean of the masked half maps' FSC against the
    masked truth), plain -> whitened: band 0.02-0.15/px 0.992 -> 0.993, 0.15-0.30/px 0.977 -> 0.979,
    0.30-0.45/px 0.770 -> 0.839.  The gain comes from weighting each frequency by the inverse noise power;
    a data-set spectrum applied to the images only (cisTEM) gains < 0.01 here.
    """
    n, ps, n_img = 48, 3.0, 1600
    rng = np.random.default_rng(11)
    truth = builtin_map(n, ps)
    p = empty_params(n_img)
    p["phi"], p["psi"] = rng.uniform(0, 360, n_img), rng.uniform(0, 360, n_img)
    p["theta"] = np.degrees(np.arccos(rng.uniform(-1, 1, n_img)))
    p["shx"], p["shy"] = rng.uniform(-4, 4, n_img), rng.uniform(-4, 4, n_img)
    p["df1"] = p["df2"] = rng.uniform(10000, 20000, n_img)
    p["occ"] = 100.0
    rot = rotation_matrix(p["phi"], p["theta"], p["psi"]).reshape(-1, 3, 3)
    clean = simulate_particle_images(prepare_volume_ft(truth, pad=2, method="linear"), rot,
                                     np.stack([p["shx"], p["shy"]], 1) / ps, ps, 300.0, 2.7, 0.07,
                                     p["df1"], p["df2"], p["angast"])
    group = np.arange(n_img) % 2  # alternate, so both half sets hold both kinds
    noise = np.where(group[:, None, None] == 0,
                     _coloured_noise(rng, n_img, n, lambda k: 1.0 + 50.0 * np.exp(-(k / 0.08) ** 2)),
                     _coloured_noise(rng, n_img, n, lambda k: 0.2 + 30.0 * (k / 0.5) ** 3))
    images = clean + noise * np.float32(np.sqrt(clean.var() / noise.var() / 0.1))  # SNR 0.1 overall
    half = rec.half_sets(np.arange(1, n_img + 1))
    radius_a = 0.4 * n * ps
    spec = wh.noise_power_spectrum(images, wh.noise_mask_radius(radius_a, ps, n), wh.MASK_FALLOFF / ps)
    mask = sphere_mask(n, radius_a / ps, edge=wh.MASK_FALLOFF / ps)
    curves = {}
    for name, filt in (("plain", None), ("whitened", wh.whitening_filter(spec, n))):
        acc = bp.new_accumulators(n) + bp.new_accumulators(n)
        r3.insert_particles(acc, images, p, half, ps, (300.0, 2.7, 0.07), np.eye(3)[None], whitening=filt)
        m = r3.finish_maps(*r3.wiener_normalise(*acc, n)[:3], n, ps, mask_radius=radius_a, bfactor=0.0)
        curves[name] = 0.5 * (fsc(m.half1, truth, mask)[1] + fsc(m.half2, truth, mask)[1])
    bands = ((0.02, 0.15), (0.15, 0.30), (0.30, 0.45))
    plain, white = _bands(curves["plain"], n, bands), _bands(curves["whitened"], n, bands)
    gain = np.subtract(white, plain)
    assert gain[2] >= 0.04 and gain[1] >= -0.003 and gain[0] >= -0.003, (np.round(plain, 3), np.round(white, 3))


# ------------------------------------------------------------------ the job: masked maps, unmasked on request
@pytest.fixture(scope="module")
def project(tmp_path_factory):
    base = tmp_path_factory.mktemp("white")
    sim = simulate_particles(base / "data", n_particles=300, box=48, pixel_size=3.0, snr=0.5, seed=5)
    root = base / "proj"
    Project.create(root).close()
    r = subprocess.run(CLI + ["import", "particles", "-p", str(root), str(sim.stack), "--params", str(sim.par),
                              "--pixel-size", "3.0"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return sim, root


def test_written_maps_carry_the_outer_mask_and_unmasked_copies_only_on_request(project):
    _, root = project
    vol_dir = root / "Assets/Volumes"
    r = subprocess.run(CLI + ["reconstruct", "-p", str(root), "--mask-radius", "50"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not list(vol_dir.glob("*_unmasked.mrc"))
    r = subprocess.run(CLI + ["reconstruct", "-p", str(root), "--mask-radius", "50", "--keep-unmasked"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with Project.open(root, readonly=True) as p:
        first, second = p.conn.execute("SELECT * FROM volumes ORDER BY id").fetchall()[-2:]
        files = {c: p.resolve(second[c]) for c in ("path", "half_map_1", "half_map_2")}
        first_map = p.resolve(first["path"])
    outer = r3.outer_mask(48, 50.0, 3.0)
    assert outer[24, 24, 24 + 14] == 1.0 and outer[24, 24, 0] == 0.0  # soft sphere of 50 Å inside the box
    for f in files.values():
        masked = mrcfile.read(f)
        unmasked = mrcfile.read(f.with_name(f.stem + "_unmasked.mrc"))
        np.testing.assert_allclose(masked, unmasked * outer, rtol=1e-6, atol=1e-7 * np.abs(unmasked).max())
        assert np.abs(unmasked[outer == 0]).max() > 0  # there was something to mask
    stem = files["path"].stem
    sharp = mrcfile.read(vol_dir / f"{stem}_sharpened.mrc")
    assert not sharp[outer == 0].any()
    # the same maps as the run without copies, and the FSC is that of the unmasked half maps in the FSC's sphere
    np.testing.assert_array_equal(mrcfile.read(first_map), mrcfile.read(files["path"]))
    curve = json.loads(second["fsc"])
    assert curve == json.loads(first["fsc"])
    h1 = mrcfile.read(files["half_map_1"].with_name(files["half_map_1"].stem + "_unmasked.mrc"))
    h2 = mrcfile.read(files["half_map_2"].with_name(files["half_map_2"].stem + "_unmasked.mrc"))
    _, unmasked_fsc = fsc(h1, h2)
    _, masked_fsc = fsc(h1, h2, sphere_mask(48, 50.0 / 3.0, edge=2.0))
    np.testing.assert_allclose(curve["fsc_unmasked"], unmasked_fsc, atol=2e-5)
    np.testing.assert_allclose(curve["fsc"], masked_fsc, atol=2e-5)


def test_no_whiten_option_gives_the_plain_preparation(project):
    sim, root = project
    out = {}
    for opt in ("--whiten", "--no-whiten"):
        r = subprocess.run(CLI + ["reconstruct", "-p", str(root), "--stack", str(sim.stack), "--params", str(sim.par),
                                  "--pixel-size", "3.0", opt], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        with Project.open(root, readonly=True) as p:
            v = p.conn.execute("SELECT * FROM volumes ORDER BY id DESC").fetchone()
            out[opt] = mrcfile.read(p.resolve(v["path"]))
            job = p.conn.execute("SELECT * FROM jobs WHERE type='reconstruct' ORDER BY id DESC").fetchone()
    assert not np.array_equal(out["--whiten"], out["--no-whiten"])
    # white noise here: the two agree closely all the same
    assert np.corrcoef(out["--whiten"].ravel(), out["--no-whiten"].ravel())[0, 1] > 0.97
    assert job["status"] == "finished"


# ------------------------------------------------------------------ near Nyquist at padding 1: cisTEM's level
#: cisTEM 2.0 reconstruct3d on the same 4,000 particles (``simulate particles --box 128 --pixel-size 1.5
#: --snr 0.1 --seed 3``; true parameters, no score weighting, normalise particles, padding 1, outer mask 75 Å,
#: even/odd half sets): the mean of its two half maps' FSC against the truth, both in the 75 Å sphere
#: (10 Å edge), at shells 56..64 of 128.
CISTEM_HALF_FSC_TRUTH = {56: 0.6063, 57: 0.5755, 58: 0.5423, 59: 0.5111, 60: 0.4871, 61: 0.4704, 62: 0.4546,
                         63: 0.4155, 64: 0.2267}


@pytest.mark.slow
def test_half_maps_near_nyquist_at_padding_1_reach_cistem(tmp_path):
    """Our masked half maps' FSC against the truth at 0.44-0.5/px: cisTEM's level, shell by shell.

    Measured: ours - cisTEM = +0.0017 +0.0020 +0.0019 -0.0018 -0.0013 +0.0020 -0.0013 +0.0100 +0.0807 at
    shells 56..64 (before: -0.087 -0.088 -0.087 -0.092 -0.091 -0.075 -0.079 -0.060 +0.019).
    Shells 59, 60 and 62 stay up to 0.002 below cisTEM's (within the shell-to-shell noise of the
    comparison); the band 0.44-0.5/px as a whole is above it.
    """
    from cistem_mpi.io.mrc import open_stack

    sim = simulate_particles(tmp_path, n_particles=4000, box=128, pixel_size=1.5, snr=0.1, seed=3)
    truth = mrcfile.read(sim.map).astype(np.float32)
    params = sim.particles.params
    n, ps = 128, 1.5
    with open_stack(str(sim.stack)) as st:
        images = np.asarray(st[0:len(st)], dtype=np.float32)
    spec = wh.noise_power_spectrum(images[wh.sample_positions(len(images))], wh.noise_mask_radius(75.0, ps, n),
                                   wh.MASK_FALLOFF / ps)
    half = np.where(params["position"] % 2 == 0, 2, 1)  # cisTEM's even/odd split, for the same comparison
    acc = bp.new_accumulators(n) + bp.new_accumulators(n)
    for s in range(0, len(images), 250):
        r3.insert_particles(acc, images[s:s + 250], params[s:s + 250], half[s:s + 250], ps, (300.0, 2.7, 0.07),
                            np.eye(3)[None], whitening=wh.whitening_filter(spec, n))
    m = r3.finish_maps(*r3.wiener_normalise(*acc, n)[:3], n, ps, mask_radius=75.0, bfactor=0.0)
    mask = r3.outer_mask(n, 75.0, ps)
    ours = 0.5 * (fsc(m.half1, truth, mask)[1] + fsc(m.half2, truth, mask)[1])
    short = {s: round(float(ours[s]), 4) for s, c in CISTEM_HALF_FSC_TRUTH.items() if ours[s] < c - 0.0025}
    assert not short, (short, {s: round(float(ours[s]), 4) for s in CISTEM_HALF_FSC_TRUTH})
    band = list(CISTEM_HALF_FSC_TRUTH)
    assert ours[band].mean() > np.mean(list(CISTEM_HALF_FSC_TRUTH.values())) + 0.005

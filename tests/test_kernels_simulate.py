"""Pure simulator kernels: atoms -> map, noise at SNR, micrographs, movie frames."""

from __future__ import annotations

import numpy as np

from cistem_mpi.kernels.simulate import (
    add_noise_at_snr, atoms_to_map, compose_micrograph, drift_trajectory, exposure_filter,
    gain_reference, gaussian_random_field, random_defocus, random_positions, simulate_movie_frames,
)


def test_single_atom_integrates_to_its_scattering_factor_at_zero():
    # carbon's 5 electron-scattering Gaussians (International Tables C 4.3.2.2)
    a = np.array([[0.0893, 0.2563, 0.7570, 1.0487, 0.3575]])
    b = np.array([[0.2465, 1.7100, 6.4094, 18.6113, 50.2523]])
    ps = 1.0
    m = atoms_to_map(np.array([[10.3, -4.2, 7.7]]), a, b, 32, ps, bfactor=10.0,
                     center=np.array([10.3, -4.2, 7.7]), min_sigma_px=1.0)
    assert abs(m.sum() * ps ** 3 - a.sum()) < 1e-3 * a.sum()
    # the atom sits on the box centre voxel (z, y, x) = (16, 16, 16)
    assert np.unravel_index(np.argmax(m), m.shape) == (16, 16, 16)
    # and its profile along x is the sum of Gaussians (sigma^2 = B / (8 pi^2))
    x = np.arange(32) - 16.0
    bb = np.maximum(b + 10.0, 8 * np.pi ** 2 * 1.0 ** 2)
    prof = (a[0][:, None] * (4 * np.pi / bb[0][:, None]) ** 1.5 * np.exp(-4 * np.pi ** 2 * x ** 2 / bb[0][:, None])).sum(0)
    assert np.allclose(m[16, 16], prof, rtol=1e-4, atol=1e-6)


def test_noise_at_requested_snr_is_reproducible():
    rng = np.random.default_rng(0)
    sig = rng.standard_normal((20, 32, 32)).astype(np.float32) * 3
    noisy, sigma = add_noise_at_snr(sig, 0.1, np.random.default_rng(5))
    assert abs(sig.var() / (noisy - sig).var() - 0.1) < 0.005
    again, _ = add_noise_at_snr(sig, 0.1, np.random.default_rng(5))
    assert np.array_equal(noisy, again)


def test_random_defocus_conventions():
    df1, df2, ang = random_defocus(500, np.random.default_rng(1), 15000, 3000, 400)
    assert np.all(df1 >= df2) and np.all(np.abs(ang) <= 90)
    assert 12000 - 400 <= df2.min() and df1.max() <= 18000 + 400


def test_micrograph_places_particles_at_positions_with_dark_contrast():
    n = 32
    y, x = np.mgrid[0:n, 0:n] - n // 2
    blob = np.exp(-(x * x + y * y) / 8.0).astype(np.float32)
    pos = np.array([[50.0, 60.0], [150.25, 100.5]])
    # no CTF effect: zero defocus, amplitude contrast 1 -> CTF = -1 everywhere
    img = compose_micrograph(np.stack([blob, blob]), pos, (200, 256), 1.0, 300, 0.0, 1.0,
                             0.0, 0.0, 0.0, contrast=0.1)
    bg = np.full((200, 256), 0.25, np.float32)
    with_bg = compose_micrograph(np.stack([blob, blob]), pos, (200, 256), 1.0, 300, 0.0, 1.0,
                                 0.0, 0.0, 0.0, contrast=0.1, background=bg)
    assert np.allclose(with_bg - img, 0.25, atol=1e-5)  # background adds to the intensity
    assert img.shape == (200, 256)
    assert abs(img[60, 50] - (1 - 0.1)) < 1e-4  # particle dark, centred on (x=50, y=60)
    # sub-pixel position: centroid of the dip
    win = 1 - img[90:111, 140:161]
    cy = (win.sum(1) * np.arange(90, 111)).sum() / win.sum()
    cx = (win.sum(0) * np.arange(140, 161)).sum() / win.sum()
    assert abs(cx - 150.25) < 0.02 and abs(cy - 100.5) < 0.02


def test_positions_keep_distance_and_margin():
    p = random_positions(30, (400, 500), 64, np.random.default_rng(2))
    assert len(p) >= 15
    d = np.sqrt(((p[:, None] - p[None]) ** 2).sum(-1)) + np.eye(len(p)) * 1e9
    assert d.min() >= 0.8 * 64
    assert p[:, 0].min() >= 32 and p[:, 0].max() <= 500 - 32 and p[:, 1].max() <= 400 - 32


def test_drift_and_frames_poisson_with_gain():
    rng = np.random.default_rng(3)
    traj = drift_trajectory(10, rng, total_px=5.0)
    assert traj.shape == (10, 2) and np.all(traj[0] == 0)
    assert 3.5 < np.hypot(*traj[-1]) < 6.5
    shape = (64, 64)
    gain = gain_reference(shape, rng, 0.1)
    flat = np.ones(shape, np.float32)
    frames = simulate_movie_frames(flat, np.zeros((40, 2)), 1.0, 2.0, rng, gain=gain, damage=False)
    assert frames.dtype == np.uint16 and frames.shape == (40, 64, 64)
    # expected counts per frame = 1 e/A^2 * 4 A^2 / gain; gain-corrected mean is flat
    mean = frames.mean(0)
    assert abs((mean * gain).mean() - 4.0) < 0.05
    assert np.corrcoef(mean.ravel(), (4.0 / gain).ravel())[0, 1] > 0.8
    # Poisson: variance equals mean
    assert abs(frames.var(0).mean() / mean.mean() - 1) < 0.05


def test_frames_follow_the_drift():
    rng = np.random.default_rng(4)
    field = 1 + gaussian_random_field((96, 96), rng, 4.0, 0.3)
    traj = np.array([[0.0, 0.0], [3.0, -2.0]])
    fr = simulate_movie_frames(field, traj, 200.0, 1.0, rng, damage=False).astype(np.float32)
    cc = np.real(np.fft.ifft2(np.fft.fft2(fr[1] - fr[1].mean()) * np.conj(np.fft.fft2(fr[0] - fr[0].mean()))))
    dy, dx = np.unravel_index(np.argmax(cc), cc.shape)
    assert (dx, dy) == (3, 96 - 2)  # frame 1 content moved by (+3, -2)


def test_exposure_filter_is_grant_grigorieff():
    f = exposure_filter((64, 64), 1.0, 0.0, 20.0)
    k = 0.25  # 1/A, at index (0, 16)
    want = np.exp(-10.0 / (2 * (0.245 * k ** -1.665 + 2.81)))
    assert abs(f[0, 16] - want) < 1e-6 and f[0, 0] > 0.999

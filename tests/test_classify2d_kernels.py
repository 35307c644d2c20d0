"""2D classification kernels against slow, obvious reference implementations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from cistem_mpi.kernels import classify2d as c2
from cistem_mpi.kernels.ctf import ctf_2d, ctf_2d_stack
from cistem_mpi.kernels.fft import ft2, ift2
from cistem_mpi.kernels.shifts import shift_image


def _blob(n: int, seed: int = 0) -> np.ndarray:
    """A smooth, asymmetric particle-like image."""
    rng = np.random.default_rng(seed)
    img = np.zeros((n, n), np.float32)
    c = n // 2
    img[c - 6:c + 6, c - 2:c + 3] = 1.0
    img[c - 6:c - 2, c - 2:c + 8] = 1.0
    img += 0.3 * gaussian_filter(rng.normal(size=(n, n)), 2.0).astype(np.float32)
    return gaussian_filter(img, 1.0).astype(np.float32) * c2.circle_mask(n, n / 2 - 4, 3)


def test_sizes_angles_and_default_classes():
    assert c2.binned_size(64, 2.5, 8.0) == 40  # Nyquist of the binned image = the limit
    assert c2.binned_size(64, 2.5, 5.0) == 64
    assert c2.binned_size(64, 2.5, 40.0) == 8
    ang = c2.rotation_angles(4.0, 50.0)
    step = 360.0 / len(ang)
    assert abs(step - np.rad2deg(4.0 / 50.0)) < 0.1 * step  # refine2d: binned pixel / mask radius
    assert [c2.default_class_count(n) for n in (100, 3300, 6100, 6300, 9300, 12300, 15300, 10**6)] == [5, 10, 10, 20, 30, 40, 50, 50]


def test_rotated_ctfs_equal_ctf_with_turned_astigmatism():
    angles = np.array([0.0, 17.0, 200.0])
    got = c2.rotated_ctfs(24, 3.0, (300.0, 2.7, 0.07), 15000.0, 13000.0, 30.0, 0.4, angles)
    ref = ctf_2d_stack(24, 3.0, 300.0, 2.7, 0.07, np.full(3, 15000.0), np.full(3, 13000.0), 30.0 + angles,
                       np.full(3, 0.4))
    assert np.abs(got - ref).max() < 1e-4


def test_rotated_ctf_is_the_ctf_of_the_rotated_image():
    """CTF-filter then rotate == rotate then filter with the rotated CTF (the astigmatism turns with the image)."""
    n, ps = 48, 3.0
    img = _blob(n)
    c = ctf_2d(n, ps, 300.0, 2.7, 0.07, 20000.0, 12000.0, 20.0)
    a = c2.rotate_image(ift2(ft2(img) * c), 35.0)
    cr = c2.rotated_ctfs(n, ps, (300.0, 2.7, 0.07), 20000.0, 12000.0, 20.0, 0.0, np.array([35.0]))[0]
    b = ift2(ft2(c2.rotate_image(img, 35.0)) * cr)
    inner = c2.circle_mask(n, 16)
    assert np.corrcoef((a * inner).ravel(), (b * inner).ravel())[0, 1] > 0.97


def test_rotated_particles_match_the_reference_rotation():
    n = 48
    img = _blob(n, 1)
    x = c2.image_to_ft(img, n)
    angles = np.array([0.0, 23.0, 90.0, 251.0])
    got = c2.rotated_particles(x, angles)
    band = c2.band_mask(n, n, 1.0, 0.0)
    for j, a in enumerate(angles):
        ref = c2.image_to_ft(c2.rotate_image(img, a), n)
        num = np.sum(c2.multiplicity(n) * band * np.real(got[j] * np.conj(ref)))
        den = np.sqrt(np.sum(c2.multiplicity(n) * band * np.abs(got[j]) ** 2)
                      * np.sum(c2.multiplicity(n) * band * np.abs(ref) ** 2))
        assert num / den > 0.99, (a, num / den)
    # zero rotation returns the image itself
    assert np.allclose(got[0] * band, x * band, atol=1e-3 * np.abs(x).max())


def _brute_cc(xr, cr, refs, band, r):
    m = xr.shape[-2]
    fy = (np.fft.fftfreq(m) * m)[:, None]
    fx = np.arange(m // 2 + 1)[None, :]
    mult = c2.multiplicity(m) * band
    j_, k_ = xr.shape[0], refs.shape[0]
    win = np.zeros((j_, k_, 2 * r + 1, 2 * r + 1))
    norms = np.zeros((j_, k_))
    for j in range(j_):
        for k in range(k_):
            model = cr[j] * refs[k] * band
            norms[j, k] = np.sum(mult * np.abs(model) ** 2)
            for a, ty in enumerate(range(-r, r + 1)):
                for b, tx in enumerate(range(-r, r + 1)):
                    moved = model * np.exp(-2j * np.pi * (fy * ty + fx * tx) / m)  # content moved by +t
                    win[j, k, a, b] = np.sum(mult * np.real(xr[j] * np.conj(moved)))
    return win, norms


def test_correlation_windows_match_brute_force():
    rng = np.random.default_rng(3)
    m, r = 12, 3
    band = c2.band_mask(m, m, 1.0, 0.0)
    xr = c2.image_to_ft(rng.normal(size=(3, m, m)).astype(np.float32), m) * band
    refs = c2.image_to_ft(rng.normal(size=(2, m, m)).astype(np.float32), m)
    cr = rng.uniform(-1, 1, (3, m, m // 2 + 1)).astype(np.float32)
    win, norms = c2.correlation_windows(xr, cr, refs, band, r)
    bw, bn = _brute_cc(xr, cr, refs, band, r)
    assert np.allclose(win, bw, rtol=1e-3, atol=1e-3 * np.abs(bw).max())
    assert np.allclose(norms, bn, rtol=1e-4)


def test_ml_weights_match_numpy():
    rng = np.random.default_rng(4)
    win = rng.normal(size=(3, 4, 5, 5)).astype(np.float32) * 10
    norms = rng.uniform(0, 5, (3, 4))
    prior = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
    prior[2] = -np.inf  # empty class
    sp = -rng.uniform(0, 3, (5, 5))
    w, logp, best = c2.ml_weights(win, norms, prior, sp, 0.7, 20.0)
    L = prior[None, :, None, None] - 0.7 * norms[:, :, None, None] + 1.4 * win + sp[None, None]
    keep = L >= L.max() - 20.0
    e = np.where(keep, np.exp(L - L.max()), 0.0)
    assert np.allclose(w, e / e.sum(), atol=1e-6)
    assert np.isclose(logp, L.max() + np.log(e.sum()))
    assert tuple(best) == np.unravel_index(np.argmax(L), L.shape)
    assert np.all(w[:, 2] == 0)


def test_accumulate_matches_explicit_shift_back():
    rng = np.random.default_rng(5)
    m, r, k, j_ = 10, 2, 2, 3
    band = c2.band_mask(m, m, 1.0, 0.0)
    xr = c2.image_to_ft(rng.normal(size=(j_, m, m)).astype(np.float32), m) * band
    cr = rng.uniform(-1, 1, (j_, m, m // 2 + 1)).astype(np.float32)
    w = rng.uniform(0, 1, (j_, k, 2 * r + 1, 2 * r + 1)).astype(np.float32)
    w[1, 0] = 0.0
    w /= w.sum()
    num, den = c2.new_sums(k, m)
    per_class = c2.accumulate(num, den, 1, w, xr, cr, band, r)
    fy = (np.fft.fftfreq(m) * m)[:, None]
    fx = np.arange(m // 2 + 1)[None, :]
    ref_num = np.zeros((k, m, m // 2 + 1), complex)
    ref_den = np.zeros((k, m, m // 2 + 1))
    for j in range(j_):
        for c in range(k):
            for a, ty in enumerate(range(-r, r + 1)):
                for b, tx in enumerate(range(-r, r + 1)):
                    back = xr[j] * np.exp(2j * np.pi * (fy * ty + fx * tx) / m)  # undo a move by +t
                    ref_num[c] += w[j, c, a, b] * cr[j] * back * band
                    ref_den[c] += w[j, c, a, b] * cr[j] ** 2 * band
    assert np.allclose(num[1], ref_num, atol=1e-4 * np.abs(ref_num).max())
    assert np.allclose(den[1], ref_den, atol=1e-5)
    assert np.all(num[0] == 0) and np.all(den[0] == 0)
    assert np.allclose(per_class, w.sum(axis=(0, 2, 3)))


def test_classify_particle_recovers_class_rotation_and_shift():
    """Noise-free particle = shift(rotate(class 2, -PSI)) under a CTF: class, PSI and shifts come back."""
    n, ps = 64, 2.5
    a = _blob(n, 2)
    b = np.rot90(_blob(n, 7), 1).copy()
    psi, sx, sy = 37.0, 0.0, 0.0
    df = (15000.0, 14000.0, 30.0, 0.0)
    c = ctf_2d(n, ps, 300.0, 2.7, 0.07, *df)
    s = c2.ClassifySettings(n=n, m=64, pixel_size=ps, mask_radius=24, mask_edge=4, low_resolution=300,
                            search_range=6, shift_sigma=6, psi_step=1.0)
    ang = c2.rotation_angles(s.binned_pixel, 60.0, 1.0)
    refs = c2.image_to_ft(np.stack([b, a]), s.m)
    for psi, sx, sy in ((37.0, 0.0, 0.0), (300.0, 2.0, -3.0)):
        p = ift2(ft2(shift_image(c2.rotate_image(a, -psi), sx, sy)) * c)
        num, den = c2.new_sums(2, s.m)
        out = c2.classify_particle(p, df, (300.0, 2.7, 0.07), refs, np.log([0.5, 0.5]), s, ang, (num, den), 0)
        assert out.class_index == 1
        assert abs((out.psi - psi + 180) % 360 - 180) <= 1.5
        assert np.hypot(out.shx - sx, out.shy - sy) < 0.5
        assert out.score > 95 and out.occupancy > 99
        assert np.abs(den[0, 1]).sum() > 0 and np.abs(den[0, 0]).sum() == 0


def test_class_average_is_ctf_weighted_wiener_sum():
    """Many noise-free particles of one image under different CTFs: the average is the image."""
    n, ps = 48, 3.0
    img = _blob(n, 3)
    s = c2.ClassifySettings(n=n, m=32, pixel_size=ps, mask_radius=20, mask_edge=3, low_resolution=300,
                            search_range=0, shift_sigma=3, psi_step=90.0)
    ang = np.array([0.0])
    refs = c2.image_to_ft(img[None], s.m)
    num, den = c2.new_sums(1, s.m)
    rng = np.random.default_rng(0)
    for i in range(40):
        df = float(rng.uniform(8000, 30000))
        c = ctf_2d(n, ps, 300.0, 2.7, 0.07, df, df, 0.0)
        c2.classify_particle(ift2(ft2(img) * c), (df, df, 0.0, 0.0), (300.0, 2.7, 0.07), refs, np.zeros(1), s, ang,
                             (num, den), i % 2)
    full, halves = c2.class_averages_ft(num, den, np.ones(1))
    band = c2.band_mask(s.m, n, ps, 300)
    expect = (num[0] + num[1]) / (den[0] + den[1] + 1.0)
    assert np.allclose(full, expect)
    avg = c2.ft_to_image(full * band, n)
    truth = c2.ft_to_image(c2.image_to_ft(img * c2.circle_mask(n, 20, 3), s.m) * band, n)
    # (each noise-free particle is normalised by its own CTF ringing outside the mask: not exactly one scale)
    assert np.corrcoef(avg.ravel(), truth.ravel())[0, 1] > 0.95
    assert c2.frc(halves[0, 0], halves[1, 0])[1:10].min() > 0.99


def test_frc_resolution_and_centring():
    rng = np.random.default_rng(1)
    f = c2.image_to_ft(rng.normal(size=(32, 32)).astype(np.float32), 32)
    assert np.allclose(c2.frc(f, f)[1:], 1.0)
    g = c2.image_to_ft(rng.normal(size=(32, 32)).astype(np.float32), 32)
    assert np.abs(c2.frc(f, g)[3:]).mean() < 0.2
    assert c2.resolution_from_frc(np.array([1.0, 0.9, 0.8, 0.1, 0.0]), 10, 2.0) == pytest.approx(10 * 2.0 / 2.5)
    img = np.zeros((32, 32), np.float32)
    img[10:14, 20:24] = 1.0
    out, (dy, dx) = c2.centre_image(img, 15)
    yy, xx = np.nonzero(out)
    assert abs(yy.mean() - 16) <= 0.5 and abs(xx.mean() - 16) <= 0.5


def test_rank_classes_rule():
    pop = np.array([100, 90, 80, 30, 0])
    res = np.array([10.0, 11.0, 25.0, 30.0, 40.0])
    score = np.array([20.0, 19.0, 8.0, 5.0, 0.0])
    rank, sel = c2.rank_classes(pop, res, score)
    assert list(rank) == [1, 2, 3, 4, 5]
    assert list(sel) == [True, True, False, False, False]
    # a small class that is sharp and scores well ranks above a big fuzzy one
    rank, sel = c2.rank_classes(np.array([10, 200]), np.array([9.0, 30.0]), np.array([15.0, 5.0]))
    assert list(rank) == [1, 2] and list(sel) == [True, False]

"""kernels/ctffind.py against slow, obvious references (loops / plain numpy)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cistem_mpi.kernels import ctffind as K
from cistem_mpi.kernels.ctf import ctf_1d, ctf_2d, ctf_phase


def test_average_amplitude_spectrum_matches_loop_over_tiles():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(100, 90)).astype(np.float32)
    for tile, box, overlap in ((32, 32, 0.5), (48, 32, 0.0), (40, 40, 0.25)):
        got = K.average_amplitude_spectrum(img, tile, box, overlap)
        step = int(tile * (1 - overlap))
        ys = K._tile_starts(100, tile, step)
        xs = K._tile_starts(90, tile, step)
        assert ys[0] == 0 and ys[-1] == 100 - tile and xs[-1] == 90 - tile
        acc = np.zeros((tile, tile))
        for y in ys:
            for x in xs:
                acc += np.abs(np.fft.fft2(img[y:y + tile, x:x + tile].astype(np.float64)))
        acc /= len(ys) * len(xs) * tile
        acc[0, 0] = 0
        full = np.fft.fftshift(acc)
        c, h = tile // 2, box // 2
        ref = full[c - h:c - h + box, c - h:c - h + box]
        np.testing.assert_allclose(got, ref, rtol=2e-4, atol=1e-5 * ref.max())


def _box_convolve_loops(s, size, rmin):
    n = s.shape[0]
    c = n // 2
    h = (size - 1) // 2
    out = np.empty_like(s)
    for y in range(n):
        for x in range(n):
            if (y - c) ** 2 + (x - c) ** 2 <= rmin ** 2:
                out[y, x] = s[y, x]
                continue
            tot, cnt = 0.0, 0
            for dy in range(-h, h + 1):
                yy = (y + dy) % n
                if abs(yy - c) <= 1:
                    continue
                for dx in range(-h, h + 1):
                    xx = (x + dx) % n
                    if abs(xx - c) <= 1:
                        continue
                    tot += s[yy, xx]
                    cnt += 1
            out[y, x] = tot / cnt if cnt else s[y, x]
    return out


def test_box_convolution_skips_central_cross_and_wraps():
    s = np.random.default_rng(1).random((20, 20))
    for size, rmin in ((5, 3.0), (7, 0.0), (3, 6.5)):
        np.testing.assert_allclose(K.box_convolve_spectrum(s, size, rmin), _box_convolve_loops(s, size, rmin),
                                   rtol=1e-10)


@pytest.mark.parametrize("params", [(15000, 15000, 0, 0), (21000, 19500, 33, 0), (9000, 8000, -70, 1.2)])
def test_phase_basis_reproduces_ctf_phase(params):
    df1, df2, ang, ps = params
    rng = np.random.default_rng(2)
    g2 = rng.random(200) * 0.06
    az = rng.random(200) * 2 * np.pi - np.pi
    base, a, ac, as_ = K.phase_basis(g2, az, 300, 2.7, 0.07)
    m, dx, dy = K._params_to_linear(df1, df2, ang)
    np.testing.assert_allclose(base + m * a + dx * ac + dy * as_ + ps,
                               ctf_phase(g2, az, 300, 2.7, 0.07, df1, df2, ang, ps), rtol=1e-12, atol=1e-9)
    back = K._linear_to_params(m, dx, dy)
    assert back[0] == pytest.approx(max(df1, df2)) and back[1] == pytest.approx(min(df1, df2))
    if df1 != df2:
        assert (back[2] - ang + 90) % 180 - 90 == pytest.approx(0, abs=1e-9)


def _ncc_reference(spec, px, df1, df2, ang, ps, lo, hi, tol=0.0):
    n = spec.shape[0]
    fit = np.fft.fftshift(np.abs(ctf_2d(n, px, 300, 2.7, 0.07, df1, df2, ang, ps, half=False)))
    vals, cs = [], []
    for y in range(n):
        for x in range(n):
            gy, gx = (y - n // 2) / (n * px), (x - n // 2) / (n * px)
            g2 = gx * gx + gy * gy
            if (gx > 0 or (gx == 0 and gy > 0)) and lo ** 2 < g2 < hi ** 2:
                vals.append(spec[y, x])
                cs.append(fit[y, x])
    v, c = np.array(vals), np.array(cs)
    cc = float(np.corrcoef(v, c)[0, 1])
    return cc - (abs(df1 - df2) ** 2 * 0.5 / tol ** 2 / v.size if tol else 0.0)


def test_score_2d_is_the_normalised_cross_correlation_with_abs_ctf():
    rng = np.random.default_rng(3)
    spec = rng.random((64, 64))
    for args, tol in (((14000, 13000, 25, 0.0), 0.0), ((9000, 9000, 0, 0.7), 0.0), ((20000, 18000, -40, 0), 500.0)):
        got = K.score_2d(spec, 2.0, 300, 2.7, 0.07, *args, 1 / 40, 1 / 5, tol)
        ref = _ncc_reference(spec, 2.0, *args, 1 / 40, 1 / 5, tol)
        assert got == pytest.approx(ref, abs=2e-6)


def test_score_1d_matches_plain_numpy():
    rng = np.random.default_rng(4)
    f = np.arange(300) / (512 * 1.4)
    curve = rng.random(300)
    defoci = np.array([6000.0, 15000.0, 31000.0])
    phases = np.array([0.0, 0.9])
    got = K.score_1d(curve, f, 300, 2.7, 0.07, defoci, phases, 1 / 30, 1 / 5)
    sel = (f > 1 / 30) & (f < 1 / 5)
    for i, d in enumerate(defoci):
        for j, p in enumerate(phases):
            c = np.abs(ctf_1d(f, 300, 2.7, 0.07, d, p)).astype(np.float64)[sel]
            ref = (curve[sel] * c).sum() / math.sqrt((curve[sel] ** 2).sum() * (c ** 2).sum())
            assert got[i, j] == pytest.approx(ref, abs=1e-6)


def test_abs_sin_table_is_accurate():
    x = np.linspace(-20, 40, 10001)
    base = np.zeros(1)
    a = np.ones(1)
    for v in x[::97]:
        s = K._score_1d_grid(np.ones(1), base, a, np.array([v]), np.array([0.0]))[0, 0]
        assert s == pytest.approx(1.0)  # |sin| / sqrt(sin^2) = 1
    # direct accuracy through the 2D kernel: one pixel, value 1: cross = |sin|
    for v in x[::53]:
        t = np.array([v])
        got = K._ncc_2d(np.array([1.0, 0.0]), np.r_[t, 0.0], np.zeros(2), np.zeros(2), np.zeros(2),
                        0.0, 0.0, 0.0, 0.0, 0.5, 0.5)
        s = abs(math.sin(v))
        ref = (s - 0.5 * s) / math.sqrt(0.5 * (s * s - s * s / 2)) if s > 1e-3 else None
        if ref is not None:
            assert got == pytest.approx(ref, abs=1e-5)


def test_mirror_angle_of_noise_free_astigmatic_spectrum():
    for ang in (10.0, 47.0, 95.0, 160.0):
        spec = np.fft.fftshift(np.abs(ctf_2d(256, 1.5, 300, 2.7, 0.07, 16000, 14500, ang, half=False)))
        spec = K.filter_spectrum(spec, 1.5, 30.0)
        est = K.mirror_astigmatism_angle(spec, 1.5, 30.0, 6.0)
        d = (est - ang + 90) % 180 - 90
        assert abs(d) < 3.0 or abs(abs(d) - 90) < 3.0, (ang, est)


def test_equiphase_average_of_astigmatic_ctf_is_the_mean_defocus_ctf():
    spec = np.fft.fftshift(np.abs(ctf_2d(256, 1.5, 300, 2.7, 0.07, 16000, 14000, 30, half=False)))
    nb = 128
    epa = K.equiphase_average(spec, 1.5, 300, 2.7, 0.07, 16000, 14000, 30, 0.0, nb)
    rot = K.rotational_average(spec, nb)
    f = np.arange(nb) / (256 * 1.5)
    ref = np.abs(ctf_1d(f, 300, 2.7, 0.07, 15000.0))
    sel = slice(10, 100)
    assert np.abs(epa[sel] - ref[sel]).mean() < 0.05
    assert np.abs(rot[sel] - ref[sel]).mean() > 3 * np.abs(epa[sel] - ref[sel]).mean()  # astigmatism smears


def test_rotational_average_loops():
    s = np.random.default_rng(5).random((16, 16))
    got = K.rotational_average(s, 12)
    tot, cnt = np.zeros(14), np.zeros(14)
    for y in range(16):
        for x in range(16):
            r = math.hypot(y - 8, x - 8)
            k = int(math.floor(r))
            f = r - k
            tot[k] += (1 - f) * s[y, x]
            cnt[k] += 1 - f
            if k + 1 < 14:
                tot[k + 1] += f * s[y, x]
                cnt[k + 1] += f
    np.testing.assert_allclose(got, tot[:12] / cnt[:12], rtol=1e-12)


def test_fit_resolution_thresholds_as_ctffind():
    nb = 100
    assert K.fit_resolution_bin(np.ones(nb)) == nb - 1  # all above 0.5
    assert K.fit_resolution_bin(np.zeros(nb)) == 1  # none above 0.5
    frc = np.r_[np.full(60, 0.9), np.full(40, 0.4)]
    assert K.fit_resolution_bin(frc) == 60  # below 0.5 after > 3 above 0.66
    frc = np.r_[np.full(60, 0.55), np.full(5, 0.3), np.full(35, 0.05)]
    assert K.fit_resolution_bin(frc) == 65  # never above 0.66: the 0.1 rule
    frc = np.r_[np.full(30, 0.0), np.full(70, 0.9)]
    assert K.fit_resolution_bin(frc) == nb - 1  # scanning starts at 10 %; bins 10..29 below 0.1 but not yet 3 above


def test_fit_resolution_bin_stops_at_nyquist():
    """The profile's bins run to the corner (box / sqrt 2 of them); no bin past Nyquist (box / 2) is reported."""
    box = 128
    nb = int(np.ceil(box / np.sqrt(2.0)))
    nyq = box // 2
    assert K.fit_resolution_bin(np.ones(nb), last_bin=nyq) == nyq  # good to the corner: Nyquist
    frc = np.r_[np.full(80, 0.9), np.full(nb - 80, 0.2)]  # fails only past Nyquist
    assert K.fit_resolution_bin(frc) == 80 and K.fit_resolution_bin(frc, last_bin=nyq) == nyq
    frc = np.r_[np.full(40, 0.9), np.full(nb - 40, 0.2)]  # fails before Nyquist: as without the limit
    assert K.fit_resolution_bin(frc, last_bin=nyq) == K.fit_resolution_bin(frc) == 40
    # the obvious reference: ctffind's scan over bins 0.1 nb .. last_bin
    rng = np.random.default_rng(3)
    for _ in range(50):
        frc = np.clip(np.cumsum(rng.normal(0, 0.08, nb)) + 0.9, -1, 1)
        first, got = int(0.1 * nb), K.fit_resolution_bin(frc, last_bin=nyq)
        low = high = sig = 0
        ref = None
        for b in range(first, nyq + 1):
            if (low > 3 and frc[b] < 0.1) or (high > 3 and frc[b] < 0.5):
                ref = b
                break
            low, sig, high = low + (frc[b] > 0.1), sig + (frc[b] > 0.5), high + (frc[b] > 0.66)
        ref = 1 if sig == 0 else (nyq if ref is None else ref)
        assert got == ref


def test_frc_window_correlation_against_loops():
    rng = np.random.default_rng(6)
    nb = 120
    f = np.arange(nb) / 400.0
    fit = np.abs(ctf_1d(f, 300, 2.7, 0.07, 20000.0)).astype(np.float64)
    avg = fit + 0.3 * rng.normal(size=nb)
    chi = ctf_phase(f * f, 0 * f, 300, 2.7, 0.07, 20000.0, 20000.0, 0.0)
    ext = np.floor(chi / np.pi + 0.5)
    frc, sig = K.frc_with_fit(avg, fit, ext, 8)
    assert (frc[:8] == 1).all()
    # recompute one bin's window by hand
    b = 60
    minw = nb // 40
    prev, hw = 0, np.full(nb, minw)
    for k in range(1, nb):
        if ext[k] != ext[k - 1]:
            hw[prev:k] = min(max(minw, int((1 + 0.1 * ext[k]) * (k - prev + 1))), nb // 2 - 1)
            prev = k
    hw[prev:] = hw[prev - 1]
    h = hw[b]
    lo, hi = b - h, b + h
    if lo < 8:
        lo, hi = 8, 8 + 2 * h + 1
    if hi >= nb:
        hi, lo = nb - 1, nb - 2 - 2 * h
    ref = np.corrcoef(avg[lo:hi + 1], fit[lo:hi + 1])[0, 1]
    assert frc[b] == pytest.approx(ref, abs=1e-10)
    assert sig[b] == pytest.approx(2 / math.sqrt(2 * h + 1))


def test_aliasing_detected_when_extrema_closer_than_4_bins():
    n = np.floor((np.arange(300) / 10.0) ** 2 / 20)  # extremum spacing shrinks with frequency
    b = K.aliasing_bin(n)
    assert b > 0
    changes = np.flatnonzero(np.diff(n) >= 0.9) + 1
    k = int(np.flatnonzero(np.diff(changes) < 4)[0])
    assert b == changes[k]


def test_resampling_geometry_like_ctffind():
    assert K.fitting_geometry((4096, 4096), 1.5) == (512, 1.5)
    tile, pf = K.fitting_geometry((4096, 4096), 0.6666)
    assert tile == K.good_fft_size(math.floor(512 * 1.4 / 0.6666), below=True) and 1.3 < pf <= 1.4
    assert K.fitting_geometry((4096, 4096), 0.7, resample=False) == (512, 0.7)
    # a requested 2.6 Å fit cannot be done at 1.4 Å: the target moves to 2.6 / 2.2
    tile, pf = K.fitting_geometry((4096, 4096), 0.7, max_resolution=2.6)
    assert pf <= 2.6 / 2.2 + 0.01

"""Kernels of align-movies (cistem_mpi.kernels.motion, .dose) against slow references and truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cistem_mpi.kernels import fft as F
from cistem_mpi.kernels.dose import DoseWeighter, critical_exposure, dose_filter, voltage_scaling_factor
from cistem_mpi.kernels.motion import (
    AlignmentSettings, DeformationModel, MovieAligner, MovieSummer, align_stack, bfactor_filter, fill_defects,
    fit_deformation, fourier_crop_half, peak_parabola, phase_shift_half, prepare_frame, replace_outliers,
    savitzky_golay, trajectory_rms, warp_add, whittaker_smooth,
)


# ------------------------------------------------------------------ dose filter vs the published curve
def _published_filter_loop(ny, nx, pixel, exposure, voltage):
    """Grant & Grigorieff 2015 (eLife 4:e06980), N_e = 0.245 k^-1.665 + 2.81, one pixel at a time."""
    scale = {300: 1.0, 200: 0.8, 100: 0.532}[voltage]  # 200 kV: paper/cisTEM; 100 kV: cisTEM
    out = np.zeros((ny, nx // 2 + 1))
    for j in range(ny):
        ky = (j if j < (ny + 1) // 2 else j - ny) / (ny * pixel)
        for i in range(nx // 2 + 1):
            kx = i / (nx * pixel)
            k = math.hypot(kx, ky)
            if k == 0:
                out[j, i] = 1.0
                continue
            ne = (0.245 * k ** -1.665 + 2.81) * scale
            out[j, i] = math.exp(-exposure / (2.0 * ne))
    return out


@pytest.mark.parametrize("voltage", [300, 200, 100])
@pytest.mark.parametrize("pixel", [0.83, 1.3, 2.6])
@pytest.mark.parametrize("box", [(48, 48), (37, 51)])
def test_dose_filter_equals_published_curve(voltage, pixel, box):
    ny, nx = box
    got = dose_filter((ny, nx), pixel, 17.0, voltage)
    ref = _published_filter_loop(ny, nx, pixel, 17.0, voltage)
    assert got.shape == ref.shape
    # the paper's constants are rounded to 3 digits (cisTEM: 0.24499, -1.6649, 2.8141)
    assert np.max(np.abs(got - ref)) < 4e-3
    assert got[0, 0] == 1.0


def test_critical_exposure_constants_and_voltages():
    k = np.array([0.05, 0.1, 0.25, 0.4])
    ne = critical_exposure(k)
    assert np.allclose(ne, 0.24499 * k ** -1.6649 + 2.8141)
    assert np.allclose(critical_exposure(k, 200), 0.8 * ne)
    assert np.allclose(critical_exposure(k, 100), 0.532 * ne)
    for bad in (120, 250, 80, 400):
        with pytest.raises(ValueError, match="300, 200 and 100 kV"):
            voltage_scaling_factor(bad)


def test_dose_weighter_frames_and_restore_power():
    w = DoseWeighter((32, 30), 1.1, 1.5, pre_exposure=2.0, voltage=200)
    qs = [w.weights(i) for i in range(5)]
    for i, q in enumerate(qs):
        assert np.allclose(q, dose_filter((32, 30), 1.1, 2.0 + 1.5 * (i + 1), 200), atol=1e-6)
    assert np.allclose(w.restore_power_divisor(), np.sqrt(sum(q.astype(np.float64) ** 2 for q in qs)), rtol=1e-6)


# ------------------------------------------------------------------ small kernels vs slow references
def test_fourier_crop_half_matches_full_fft_crop():
    rng = np.random.default_rng(1)
    for (ny, nx, my, mx) in [(32, 32, 16, 16), (30, 34, 15, 17), (33, 31, 20, 18)]:
        a = rng.standard_normal((ny, nx)).astype(np.float32)
        full = np.fft.fftshift(np.fft.fft2(a))
        cy, cx = ny // 2, nx // 2
        sub = full[cy - my // 2:cy - my // 2 + my, cx - mx // 2:cx - mx // 2 + mx]
        ref = np.real(np.fft.ifft2(np.fft.ifftshift(sub))) * (my * mx) / (ny * nx)
        got = F.irfftn(fourier_crop_half(F.rfftn(a), ny, nx, my, mx), mx)
        if my % 2 == 0 or mx % 2 == 0:  # Nyquist lines are kept one-sided: compare below Nyquist
            g = np.fft.fft2(got)
            r = np.fft.fft2(ref)
            ky = np.abs(np.fft.fftfreq(my) * my) < my / 2 - 0.1
            kx = np.abs(np.fft.fftfreq(mx) * mx) < mx / 2 - 0.1
            sel = ky[:, None] & kx[None, :]
            assert np.allclose(g[sel], r[sel], atol=1e-3)
        else:
            assert np.allclose(got, ref, atol=1e-4)


def test_bfactor_filter_and_cross_mask_vs_loop():
    ny, nx, b = 12, 10, 7.0
    got = bfactor_filter(ny, nx, b, True, 2, 1)
    for j in range(ny):
        ky = j if j < (ny + 1) // 2 else j - ny
        for i in range(nx // 2 + 1):
            want = math.exp(-b * ((i / nx) ** 2 + (ky / ny) ** 2) / 4)
            if abs(i) < 2 or abs(ky) < 1:
                want = 0.0
            assert got[j, i] == pytest.approx(want, abs=1e-6)


def test_peak_parabola_subpixel_and_annulus():
    yy, xx = np.mgrid[-16:16, -16:16]
    for tx, ty in [(2.3, -1.2), (-5.45, 3.7), (0.1, 0.2)]:
        cc = np.exp(-((xx - tx) ** 2 + (yy - ty) ** 2) / 8.0).astype(np.float32)
        px, py = peak_parabola(np.fft.ifftshift(cc), 0.0, 12.0)
        assert abs(px - tx) < 0.06 and abs(py - ty) < 0.06
    # a stronger peak inside the minimum radius is ignored
    cc = np.exp(-(xx ** 2 + yy ** 2) / 2.0) + 0.5 * np.exp(-((xx - 6) ** 2 + yy ** 2) / 2.0)
    px, py = peak_parabola(np.fft.ifftshift(cc.astype(np.float32)), 3.0, 10.0)
    assert abs(px - 6) < 0.1 and abs(py) < 0.1
    # and a peak outside the maximum radius too
    px, py = peak_parabola(np.fft.ifftshift(cc.astype(np.float32)), 0.0, 4.0)
    assert abs(px) < 0.1


def test_savitzky_golay_vs_lstsq_loop():
    rng = np.random.default_rng(2)
    y = np.cumsum(rng.standard_normal(13))
    got = savitzky_golay(y, 5, 1)
    for i in range(13):
        lo = min(max(0, i - 2), 13 - 5)
        t = np.arange(lo, lo + 5)
        c = np.polyfit(t, y[lo:lo + 5], 1)
        assert got[i] == pytest.approx(np.polyval(c, i), abs=1e-9)


def test_whittaker_keeps_lines_and_smooths_noise():
    rng = np.random.default_rng(3)
    t = np.arange(30.0)
    clean = 0.2 * t + 3.0 * (1 - np.exp(-t / 4))
    noisy = clean + rng.normal(0, 0.8, 30)
    z, lam = whittaker_smooth(noisy, early_frames=4.0)
    assert np.sqrt(((z - clean) ** 2).mean()) < 0.6 * np.sqrt(((noisy - clean) ** 2).mean())
    line, _ = whittaker_smooth(2.0 * t + 1, 1e3)
    assert np.allclose(line, 2.0 * t + 1, atol=1e-6)


def test_outliers_and_defects():
    rng = np.random.default_rng(4)
    f = rng.poisson(5.0, (64, 64)).astype(np.float32)
    f[10, 10] = 1e5
    replace_outliers(f, 12.0)
    assert f[10, 10] < 50
    g = np.full((16, 16), 3.0, np.float32)
    g[:, 5] = 1000.0
    g[7, :] = -50.0
    m = np.zeros((16, 16), bool)
    m[:, 5] = True
    m[7, :] = True
    fill_defects(g, m)
    assert np.allclose(g, 3.0)


def test_gain_on_the_fly_equals_precorrected():
    rng = np.random.default_rng(5)
    raw = rng.poisson(3.0, (40, 48)).astype(np.uint16)
    gain = rng.uniform(0.8, 1.2, (40, 48)).astype(np.float32)
    dark = rng.uniform(0, 0.2, (40, 48)).astype(np.float32)
    got = prepare_frame(raw, gain, dark, outlier_sigma=0)
    assert np.array_equal(got, ((raw.astype(np.float32) - dark) * gain).astype(np.float32))


# ------------------------------------------------------------------ alignment vs truth
def _smooth_image(n, rng, sigma=3.0):
    white = rng.standard_normal((n, n)).astype(np.float32)
    fy = np.fft.fftfreq(n)[:, None]
    fx = np.fft.rfftfreq(n)[None, :]
    return F.irfftn(F.rfftn(white) * np.exp(-2 * (np.pi * sigma) ** 2 * (fx ** 2 + fy ** 2)).astype(np.float32), n)


def _frames(base, drift, counts, rng):
    n = base.shape[0]
    f0 = F.rfftn(base)
    out = []
    for dx, dy in drift:
        img = F.irfftn(phase_shift_half(f0, n, n, dx, dy), n)
        out.append(rng.poisson(np.clip(counts * (1 + img), 0, None)).astype(np.uint16))
    return out


def test_full_frame_alignment_recovers_drift_bit_reproducibly():
    rng = np.random.default_rng(6)
    n = 256
    base = _smooth_image(n, rng)
    base *= 0.3 / base.std()
    t = np.arange(12.0)
    drift = np.stack([6 * (1 - np.exp(-t / 3)), -3 * (1 - np.exp(-t / 3)) + 0.1 * t], axis=1)
    frames = _frames(base, drift, 20.0, rng)

    def run():
        al = MovieAligner((n, n), 12, 2.0, 5.0, AlignmentSettings())
        for i, f in enumerate(frames):
            al.add(i, prepare_frame(f))
        return al.align()

    a, b = run(), run()
    assert np.array_equal(a, b)
    assert trajectory_rms(a, -drift) < 0.2
    assert np.allclose(a[6], 0.0)  # re-centred on the middle frame


def test_align_stack_savitzky_golay_unblur_mode():
    rng = np.random.default_rng(7)
    n = 128
    base = _smooth_image(n, rng, 2.0)
    drift = np.array([[0, 0], [1.5, 0.5], [2.5, 1.0], [3.2, 1.3], [3.6, 1.5], [3.9, 1.7], [4.0, 1.8]])
    stack = np.stack([phase_shift_half(F.rfftn(base), n, n, dx, dy) for dx, dy in drift]).astype(np.complex64)
    sh = np.zeros((7, 2))
    align_stack(stack, n, n, sh, max_iterations=20, unitless_bfactor=4.0, min_radius=0.0, max_radius=20.0,
                threshold=0.01, window=3, order=2, smoothing="savitzky-golay")
    assert trajectory_rms(sh, -drift) < 0.05


def test_deformation_model_fit_recovers_polynomial_field():
    rng = np.random.default_rng(8)
    coeffs = rng.normal(0, 1.0, (2, 6, 3))
    model = DeformationModel(coeffs, 1000, 1200, 20)
    c = np.array([[x, y] for y in np.linspace(100, 900, 5) for x in np.linspace(100, 1100, 5)])
    sh = np.stack([model.shift_at(c[:, 0], c[:, 1], t) for t in range(20)], axis=1)
    noisy = sh + rng.normal(0, 0.01, sh.shape)
    fit = fit_deformation(c, noisy, 1000, 1200)
    assert np.allclose(fit.coeffs, coeffs, atol=0.3)
    pts = rng.uniform(0, 1000, (50, 2))
    for t in (0, 5, 19):
        assert np.abs(fit.shift_at(pts[:, 0], pts[:, 1], t) - model.shift_at(pts[:, 0], pts[:, 1], t)).max() < 0.05


def test_warp_add_vs_loop_and_identity():
    rng = np.random.default_rng(9)
    img = _smooth_image(32, rng, 2.0)
    out = np.zeros_like(img)
    warp_add(img, out, np.zeros((2, 6)), (32, 32))
    assert np.allclose(out, img, atol=1e-5)
    # a constant residual of (1, 0) px is an integer move
    c = np.zeros((2, 6))
    c[0, 0] = 1.0
    out = np.zeros_like(img)
    warp_add(img, out, c, (32, 32))
    assert np.allclose(out[:, 1:], img[:, :-1], atol=1e-5)


def test_summer_full_frame_equals_shift_and_sum_reference():
    rng = np.random.default_rng(10)
    frames = [rng.standard_normal((24, 20)).astype(np.float32) for _ in range(4)]
    shifts = rng.uniform(-2, 2, (4, 2))
    s = MovieSummer((24, 20), (24, 20), DoseWeighter((24, 20), 1.0, 2.0), None, restore_power=True)
    for i, f in enumerate(frames):
        s.add(i, f, *shifts[i])
    wtd, unw = s.finish()
    ref_u = np.zeros((24, 11), np.complex128)
    ref_w = np.zeros((24, 11), np.complex128)
    ss = np.zeros((24, 11))
    for i, f in enumerate(frames):
        ft = np.fft.rfft2(f)
        ft[0, 0] = 0
        ky = np.fft.fftfreq(24)[:, None]
        kx = np.fft.rfftfreq(20)[None, :]
        ft = ft * np.exp(-2j * np.pi * (kx * shifts[i, 0] + ky * shifts[i, 1]))
        q = dose_filter((24, 20), 1.0, 2.0 * (i + 1))
        ref_u += ft
        ref_w += ft * q
        ss += q.astype(np.float64) ** 2
    assert np.allclose(unw, np.fft.irfft2(ref_u, (24, 20)), atol=1e-4)
    assert np.allclose(wtd, np.fft.irfft2(ref_w / np.sqrt(ss), (24, 20)), atol=1e-4)


# ------------------------------------------------------------------ measured-SSNR filter of the last stage
def _ssnr_filter_slow(stack, ny, nx, smooth=5):
    """Ring by ring with explicit loops: FRC of even/odd sums -> per-frame SSNR -> reference Wiener factor."""
    n = stack.shape[0]
    even, odd = stack[0::2].sum(0), stack[1::2].sum(0)
    nb = min(ny, nx) // 2
    num, pe, po = np.zeros(nb + 1), np.zeros(nb + 1), np.zeros(nb + 1)
    ring = np.zeros((ny, nx // 2 + 1), int)
    for y in range(ny):
        fy = (y if y <= ny // 2 else y - ny) / ny
        for x in range(nx // 2 + 1):
            k = np.float32(np.sqrt(np.float32(fy) ** 2 + np.float32(x / nx) ** 2))
            r = min(int(k * 2 * nb), nb)
            ring[y, x] = r
            num[r] += (even[y, x] * np.conj(odd[y, x])).real
            pe[r] += abs(even[y, x]) ** 2
            po[r] += abs(odd[y, x]) ** 2
    frc = num / np.sqrt(pe * po)
    frc = np.convolve(frc, np.ones(smooth) / smooth, mode="same").clip(0, 0.999)
    s = frc / (1 - frc) / (n / 2)
    w = (n - 1) * s / (1 + (n - 1) * s)
    out = w[ring]
    out[0, :] = 0.0   # the central cross: ky = 0 row and kx = 0 column
    out[:, 0] = 0.0
    return out


def test_ssnr_filter_matches_the_ring_by_ring_reference_and_the_known_ssnr():
    from cistem_mpi.kernels.motion import ssnr_filter

    rng = np.random.default_rng(4)
    ny, nx, n = 128, 120, 10
    # signal with per-frame SSNR 3 below 0.25 cycles/px and none above, plus white noise
    k2 = np.fft.fftfreq(ny)[:, None] ** 2 + np.fft.rfftfreq(nx)[None, :] ** 2
    envelope = np.where(k2 < 0.25 ** 2, 3.0, 0.0)
    sig = np.fft.rfft2(rng.standard_normal((ny, nx))) * np.sqrt(envelope)
    stack = np.stack([sig + np.fft.rfft2(rng.standard_normal((ny, nx))) for _ in range(n)]).astype(np.complex64)
    got = ssnr_filter(stack, ny, nx)
    want = _ssnr_filter_slow(stack, ny, nx)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # per-frame SSNR 3 -> (9 x 3) / (1 + 27) = 0.96 where there is signal; ~0 where there is none
    ring = np.sqrt(k2)
    assert 0.9 < np.median(got[(ring > 0.05) & (ring < 0.2)]) < 0.99
    assert np.median(got[ring > 0.32]) < 0.2


def test_final_stage_on_and_off_both_find_the_shifts():
    from cistem_mpi.kernels.motion import AlignmentSettings, MovieAligner

    rng = np.random.default_rng(5)
    base = rng.standard_normal((64, 64)).astype(np.float32)
    frames = [np.roll(base, (k, 2 * k), axis=(0, 1)) + 0.5 * rng.standard_normal((64, 64)).astype(np.float32)
              for k in range(6)]
    out = {}
    for mode in ("none", "ssnr"):
        al = MovieAligner((64, 64), 6, 5.0, 1.0, AlignmentSettings(final_filter=mode))
        for i, f in enumerate(frames):
            al.add(i, f)
        out[mode] = al.align()
    truth = -np.array([[2 * k, k] for k in range(6)], float)
    truth -= truth[3]
    for mode in out:  # both find the shifts; the polish moves them by far less than a pixel
        assert np.abs(out[mode] - truth).max() < 0.3, (mode, out[mode])


def test_final_stage_finds_sub_pixel_shifts_of_a_band_limited_movie():
    """Signal only below 0.12 cycles/px, sub-pixel drift: the SSNR-filtered polish lands on the truth."""
    from cistem_mpi.kernels.motion import AlignmentSettings, MovieAligner

    rng = np.random.default_rng(8)
    ny = nx = 128
    k = np.sqrt(np.fft.fftfreq(ny)[:, None] ** 2 + np.fft.rfftfreq(nx)[None, :] ** 2)
    base = np.fft.rfft2(rng.standard_normal((ny, nx))) * (k < 0.12) * 3.0
    truth = np.array([[0.7 * i, -0.45 * i] for i in range(8)])  # (dx, dy) per frame, sub-pixel
    ky, kx = np.fft.fftfreq(ny)[:, None], np.fft.rfftfreq(nx)[None, :]
    frames = [np.fft.irfft2(base * np.exp(-2j * np.pi * (kx * dx + ky * dy)), s=(ny, nx)).astype(np.float32)
              + rng.standard_normal((ny, nx)).astype(np.float32) for dx, dy in truth]
    al = MovieAligner((ny, nx), 8, 5.0, 1.0, AlignmentSettings(final_filter="ssnr"))
    for i, f in enumerate(frames):
        al.add(i, f)
    got = al.align()
    assert al.final_filter_used == "ssnr" and len(al.iterations) >= 2  # the polish ran
    want = -(truth - truth[4])  # shifts that align each frame, relative to the middle one
    assert np.abs((got - got[4]) - want).max() < 0.05, got - got[4]

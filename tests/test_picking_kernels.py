"""Picking kernels against slow, obvious references (loops, plain numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from cistem_mpi.kernels import fft as _fft
from cistem_mpi.kernels.picking import (
    PickingParams, background_boxes, correlate, disc_template, find_particles, fourier_resample, greedy_peaks,
    local_mean_sigma, mode_and_fwhm, nice_size, prepare_micrograph, prepare_template, radial_power_spectrum,
    resampled_shape, rotate_image, threshold_report,
)


def test_local_mean_sigma_matches_a_loop_over_mirrored_boxes():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(23, 31)).astype(np.float32)
    side = 6
    m, s = local_mean_sigma(a, side)
    pad = np.pad(a.astype(np.float64), ((3, 3), (3, 3)), mode="reflect")
    for y in range(23):
        for x in range(31):
            w = pad[y:y + side, x:x + side]
            assert m[y, x] == pytest.approx(w.mean(), abs=1e-5)
            assert s[y, x] == pytest.approx(w.std(), abs=1e-4)


def test_correlation_matches_the_direct_sum():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(20, 24)).astype(np.float32)
    t = rng.normal(size=(6, 6)).astype(np.float32)
    s = correlate(_fft.rfftn(img), t, img.shape)
    c = 3
    for py, px in [(0, 0), (5, 7), (19, 23), (10, 2)]:
        ref = sum(t[j, i] * img[(py + j - c) % 20, (px + i - c) % 24] for j in range(6) for i in range(6))
        assert s[py, px] == pytest.approx(ref, abs=1e-4)


def test_greedy_peaks_equal_repeated_argmax_with_blanking():
    rng = np.random.default_rng(2)
    score = rng.random((40, 50)).astype(np.float32) * 10
    got = greedy_peaks(score, 7.0, 5.5, 3, 4)
    work = score.copy()
    work[:3] = work[-3:] = -np.inf
    work[:, :4] = work[:, -4:] = -np.inf
    yy, xx = np.mgrid[0:40, 0:50]
    ref = []
    while True:
        k = int(np.argmax(work))
        y, x = divmod(k, 50)
        if work[y, x] < 7.0:
            break
        ref.append([y, x])
        work[(yy - y) ** 2 + (xx - x) ** 2 <= 5.5 ** 2] = -np.inf
    assert got.tolist() == ref
    assert threshold_report(score[got[:, 0], got[:, 1]], np.array([7.0, 9.0])) == [
        (7.0, len(ref)), (9.0, int(sum(score[y, x] >= 9 for y, x in ref)))]


def test_mode_and_fwhm_of_a_gaussian_and_a_histogram_reference():
    rng = np.random.default_rng(3)
    v = rng.normal(2.0, 0.5, 400000)
    mode, fwhm = mode_and_fwhm(v)
    assert mode == pytest.approx(2.0, abs=0.05)
    assert fwhm == pytest.approx(2 * np.sqrt(2 * np.log(2)) * 0.5, rel=0.05)
    # an outlier population (contamination) does not move the mode of the ice
    w = np.concatenate([v, rng.normal(8.0, 0.2, 40000)])
    assert mode_and_fwhm(w)[0] == pytest.approx(2.0, abs=0.1)


def test_radial_power_spectrum_of_white_noise_is_its_variance():
    rng = np.random.default_rng(4)
    x, p = radial_power_spectrum(rng.normal(0, 3.0, (128, 128)), 32)
    assert np.all(np.abs(p[2:22] / 9.0 - 1) < 0.15)
    assert x[0] > 0 and x[-1] < np.sqrt(0.5)


def test_fourier_resample_keeps_pixel_zero_and_low_frequencies():
    n = 128
    y, x = np.mgrid[0:n, 0:n]
    img = np.cos(2 * np.pi * 3 * x / n) + np.sin(2 * np.pi * 5 * y / n)
    small = fourier_resample(img.astype(np.float32), (32, 32))
    ys, xs = np.mgrid[0:32, 0:32] * 4
    ref = np.cos(2 * np.pi * 3 * xs / n) + np.sin(2 * np.pi * 5 * ys / n)
    assert np.allclose(small, ref, atol=1e-4)
    assert resampled_shape((4096, 4096), 1.0, 30.0) == (288, 288)
    assert resampled_shape((1000, 1500), 2.0, 8.0) == (500, 750)
    assert resampled_shape((512, 512), 8.0, 10.0) == (512, 512)  # never enlarged
    assert all(nice_size(k) % 2 == 0 for k in range(3, 200))


def test_phase_flip_turns_dark_particles_bright():
    rng = np.random.default_rng(5)
    n = 256
    img = np.ones((n, n), np.float32) + rng.normal(0, 0.01, (n, n)).astype(np.float32)
    yy, xx = np.mgrid[0:n, 0:n]
    disc = np.hypot(xx - 128, yy - 128) < 12
    img[disc] -= 0.05  # dark (amplitude-like), CTF = -1 everywhere with Q = 1 and no defocus
    m, px, py = prepare_micrograph(img, 2.0, 4.0, 300, 0.0, 1.0, 0.0, 0.0, 0.0)
    assert px == py == 2.0 and m.shape == (n, n)
    # bright after the flip; cisTEM's high-pass (a cosine up to 20/N) keeps ~1/3 of a 24-pixel disc
    # in a 256 image (measured 0.016; the mean of the background is 0 +/- 0.0005)
    assert m[disc].mean() > m[~disc].mean() + 0.01


def test_matched_filter_template_is_unit_norm_and_zero_at_the_edge():
    t = disc_template(48, 10.0)
    assert t[24, 24] == 1.0 and t[24, 24 + 15] == 0.0 and t[24, 24 + 12] == pytest.approx(0.5 * (1 + np.cos(np.pi * 4.5 / 5)), abs=1e-5)
    assert t[24, 24 + 10] == pytest.approx(0.5, abs=1e-6)  # cisTEM's CosineMask: the edge is centred on the radius
    ones = np.ones((48, 25), np.float32)
    m = prepare_template(t, ones, ones)
    assert float((m.astype(np.float64) ** 2).sum()) == pytest.approx(1.0, rel=1e-5)
    edge = np.concatenate([m[0], m[-1], m[:, 0], m[:, -1]])
    assert abs(float(edge.mean())) < 1e-6


def test_rotation_is_counter_clockwise_in_x_y():
    a = np.zeros((17, 17), np.float32)
    a[8, 12] = 1.0  # x = 12, y = 8: right of the centre
    b = rotate_image(a, 90.0)
    assert np.unravel_index(np.argmax(b), b.shape) == (12, 8)  # now below the centre (y = 12)


def test_background_boxes_find_the_quietest_places():
    s = np.ones((60, 60), np.float32)
    s[40, 15] = 0.1
    s[10, 45] = 0.2
    s[12, 45] = 0.15  # inside the first box's blanked square: not a separate box
    got = background_boxes(s, 10, 3).tolist()
    assert got[0] == [40, 15] and got[1] == [12, 45] and len(got) == 3


def test_template_free_picks_discs_in_white_noise_and_nothing_in_pure_noise():
    rng = np.random.default_rng(6)
    n = 512
    img = rng.normal(size=(n, n)).astype(np.float32)
    yy, xx = np.mgrid[0:n, 0:n]
    truth = np.array([(100, 120), (300, 300), (400, 150), (200, 420), (420, 400)], float)
    for x, y in truth:
        img[np.hypot(xx - x, yy - y) < 20] -= 0.5  # CTF = -1: dark discs become bright after the flip
    # (these strong amplitude discs would themselves be 'abnormal mean' areas: no area rejection here)
    p = PickingParams(characteristic_radius=70, maximum_radius=100, edge=16, highest_resolution=16.0,
                      avoid_abnormal_mean=False)
    r = find_particles(img, 4.0, 300, 0.0, 1.0, 0.0, 0.0, 0.0, params=p)
    got = np.stack([r.x, r.y], 1) / 4.0
    assert len(got) == 5
    d = np.sqrt(((got[:, None] - truth[None]) ** 2).sum(-1))
    assert d.min(0).max() < 4.0  # every disc found within 4 px (of 8 Å resampled pixels)
    assert np.all(np.diff(r.score) <= 0) and r.score.min() >= 6.0
    none = find_particles(rng.normal(size=(n, n)).astype(np.float32), 4.0, 300, 0.0, 1.0, 0.0, 0.0, 0.0, params=p)
    assert len(none.x) == 0 and none.peak_scores.size < 20  # noise: scores ~ N(0, 1), nothing at 6 sigma
    assert np.all(none.peak_scores < 5.5)

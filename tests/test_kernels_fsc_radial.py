"""Shell averages, FSC, power spectra."""

from __future__ import annotations

import numpy as np

from cistem_mpi.kernels import fft
from cistem_mpi.kernels.fsc import fsc, part_fsc_to_ssnr, resolution_at
from cistem_mpi.kernels.radial import radial_average, shell_average, shell_index, shell_sum
from cistem_mpi.kernels.spectra import power_spectrum, radial_power, tiled_power_spectrum


def _fsc_full_reference(a, b):
    """FSC with full complex FFTs and explicit loops over shells."""
    n = a.shape[0]
    fa, fb = np.fft.fftn(a), np.fft.fftn(b)
    k = np.fft.fftfreq(n) * n
    r = np.sqrt(sum(np.meshgrid(*([k ** 2] * a.ndim), indexing="ij")))
    s = np.rint(r).astype(int)
    out = []
    for i in range(n // 2 + 1):
        m = s == i
        out.append(np.real((fa[m] * np.conj(fb[m])).sum()) /
                   np.sqrt((np.abs(fa[m]) ** 2).sum() * (np.abs(fb[m]) ** 2).sum()))
    return np.array(out)


def test_fsc_of_map_with_itself_is_one_and_with_noise_about_zero():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((32, 32, 32)).astype(np.float32)
    b = rng.standard_normal((32, 32, 32)).astype(np.float32)
    _, same = fsc(a, a)
    assert np.allclose(same[1:], 1.0, atol=1e-5)
    _, ind = fsc(a, b)
    # shell s has ~4 pi s^2 independent complex samples: |FSC| ~ 1/sqrt(2 pi s^2)
    s = np.arange(len(ind))
    assert np.all(np.abs(ind[4:]) < 4.0 / np.sqrt(2 * np.pi * s[4:] ** 2))


def test_fsc_half_layout_equals_full_transform_reference():
    rng = np.random.default_rng(1)
    for shape in [(24, 24, 24), (25, 25, 25), (40, 40)]:
        sig = rng.standard_normal(shape)
        a = (sig + 0.7 * rng.standard_normal(shape)).astype(np.float32)
        b = (sig + 0.7 * rng.standard_normal(shape)).astype(np.float32)
        _, ours = fsc(a, b)
        assert np.allclose(ours, _fsc_full_reference(np.fft.ifftshift(a), np.fft.ifftshift(b)), atol=1e-4)


def test_fsc_of_noisy_pairs_follows_snr():
    rng = np.random.default_rng(2)
    sig = rng.standard_normal((48, 48, 48))
    snr = 0.5
    a = sig + rng.standard_normal(sig.shape) / np.sqrt(snr)
    b = sig + rng.standard_normal(sig.shape) / np.sqrt(snr)
    _, c = fsc(a.astype(np.float32), b.astype(np.float32))
    assert abs(c[5:].mean() - snr / (1 + snr)) < 0.02
    assert abs(part_fsc_to_ssnr(np.array([1 / 3]))[0] - 1.0) < 1e-9


def test_resolution_at_interpolates_the_crossing():
    freq = np.array([0.0, 0.1, 0.2, 0.3])
    curve = np.array([1.0, 0.9, 0.5, 0.1])
    # 0.143 crossed between 0.2 (0.5) and 0.3 (0.1): f = 0.2 + 0.357/0.4*0.1
    f = 0.2 + (0.5 - 0.143) / 0.4 * 0.1
    assert abs(resolution_at(freq, curve, 0.143, pixel_size=2.0) - 2.0 / f) < 1e-9
    assert resolution_at(freq, np.ones(4), 0.143, 2.0) == 2.0 / 0.3


def test_shell_index_and_averages():
    s = shell_index((16, 16, 9))
    assert s[0, 0, 0] == 0 and s[0, 0, 5] == 5 and s[3, 4, 0] == 5 and s[8, 8, 8] == -1
    rng = np.random.default_rng(3)
    img = rng.standard_normal((32, 32)).astype(np.float32)
    f = fft.ft2(img)
    # half-layout shell average of |F|^2 equals the full-layout one
    full = np.abs(np.fft.fft2(np.fft.ifftshift(img))) ** 2
    assert np.allclose(shell_average(np.abs(f) ** 2), shell_average(full, half=False), rtol=1e-4)
    assert np.allclose(shell_sum(np.ones((32, 17))), shell_sum(np.ones((32, 32)), half=False))


def test_radial_average_of_radius_image():
    n = 41
    y, x = np.mgrid[0:n, 0:n] - n // 2
    r2 = (x * x + y * y).astype(np.float64)
    prof = radial_average(r2)
    # pixels with round(r) == i have r^2 close to i^2 (within i)
    for i in range(1, 20):
        assert abs(prof[i] - i * i) < i + 0.5


def test_power_spectra_of_white_noise_and_a_grating():
    rng = np.random.default_rng(4)
    noise = rng.normal(0, 2.0, (128, 128)).astype(np.float32)
    ps = power_spectrum(noise)
    assert abs(ps.mean() - 4.0) < 0.15
    assert abs(radial_power(noise)[5:].mean() - 4.0) < 0.3
    tiled = tiled_power_spectrum(noise, 32)
    assert tiled.shape == (32, 32) and abs(tiled.mean() - 4.0) < 0.3
    x = np.arange(64)
    grating = np.cos(2 * np.pi * 10 * x / 64)[None, :] * np.ones((64, 1))
    p = power_spectrum(grating.astype(np.float32))
    iy, ix = np.unravel_index(np.argmax(p), p.shape)
    assert iy == 32 and abs(ix - 32) == 10


def test_one_pass_shell_sums_equal_the_index_and_bincount_reference():
    """shell_sum's numba pass and half_fsc_sums against shell_index + bincount, 2D and 3D, even and odd."""
    from cistem_mpi.kernels import radial

    rng = np.random.default_rng(11)
    for shape in [(16, 9), (17, 9), (16, 16, 9), (15, 15, 8)]:
        n = shape[0]
        s = radial.shell_index((n,) * len(shape))
        w = radial.half_multiplicity((n,) * len(shape))
        ok = s >= 0

        def ref(v):
            return np.bincount(s[ok], weights=(v * w)[ok], minlength=n // 2 + 1)[: n // 2 + 1]

        v = rng.normal(size=shape)
        assert np.allclose(radial.shell_sum(v), ref(v), rtol=1e-12, atol=1e-12)
        a = rng.normal(size=shape) + 1j * rng.normal(size=shape)
        b = rng.normal(size=shape) + 1j * rng.normal(size=shape)
        num, d1, d2 = radial.half_fsc_sums(a, b)
        assert np.allclose(num, ref(np.real(a * np.conj(b))), rtol=1e-12, atol=1e-12)
        assert np.allclose(d1, ref(np.abs(a) ** 2)) and np.allclose(d2, ref(np.abs(b) ** 2))

"""CTF evaluated as cisTEM's ctf.cpp does, checked against the formula by hand."""

from __future__ import annotations

import math

import numpy as np

from cistem_mpi.kernels.ctf import CTFParams, ctf_1d, ctf_2d, ctf_2d_stack, electron_wavelength


def test_wavelength_known_values():
    # textbook relativistic wavelengths
    assert abs(electron_wavelength(300) - 0.019687) < 2e-6
    assert abs(electron_wavelength(200) - 0.025079) < 2e-6
    assert abs(electron_wavelength(100) - 0.037014) < 2e-6


def _by_hand(gx, gy, kv, cs_mm, q, df1, df2, ang_deg, pshift, b=0.0):
    v = kv * 1000.0
    lam = 12.2639 / math.sqrt(v + 0.97845e-6 * v * v)
    g2 = gx * gx + gy * gy
    az = math.atan2(gy, gx)
    df = 0.5 * (df1 + df2 + math.cos(2 * (az - math.radians(ang_deg))) * (df1 - df2))
    chi = math.pi * lam * g2 * (df - 0.5 * lam * lam * g2 * cs_mm * 1e7) + pshift + math.atan(q / math.sqrt(1 - q * q))
    return -math.sin(chi) * math.exp(-b * g2 / 4)


def test_2d_half_plane_against_formula_at_chosen_points():
    n, ps = 64, 1.3
    args = (300.0, 2.7, 0.07, 21000.0, 18000.0, 37.0, 0.4)
    c = ctf_2d(n, ps, *args, bfactor=60.0)
    assert c.shape == (n, n // 2 + 1) and c.dtype == np.float32
    for iy, ix in [(0, 1), (3, 5), (60, 7), (32, 32), (17, 0), (45, 20)]:
        ky = iy if iy < n // 2 else iy - n
        want = _by_hand(ix / (n * ps), ky / (n * ps), *args, b=60.0)
        assert abs(c[iy, ix] - want) < 2e-5, (iy, ix)


def test_full_layout_and_half_layout_agree():
    c_full = ctf_2d(48, 1.0, 300, 2.7, 0.1, 15000, 12000, -20, 0.0, half=False)
    c_half = ctf_2d(48, 1.0, 300, 2.7, 0.1, 15000, 12000, -20, 0.0, half=True)
    assert np.allclose(c_full[:, :24], c_half[:, :24])  # column 24 is -N/2 in the full layout
    # CTF is even: C(-k) = C(k) (away from the ambiguous Nyquist row/column)
    idx = np.r_[0:24, 25:48]
    neg = (-idx) % 48
    assert np.allclose(c_full[np.ix_(idx, idx)], c_full[np.ix_(neg, neg)], atol=1e-6)


def test_astigmatism_angle_points_df1_along_angast():
    # phase along the azimuth angast equals the isotropic phase for defocus df1
    ps, n = 1.0, 256
    p = CTFParams(df1=20000, df2=10000, angast=30.0, amplitude_contrast=0.07)
    f = 0.1
    gx, gy = f * math.cos(math.radians(30)), f * math.sin(math.radians(30))
    want = ctf_1d(np.array([f]), 300, 2.7, 0.07, 20000)[0]
    assert abs(_by_hand(gx, gy, 300, 2.7, 0.07, 20000, 10000, 30, 0) - want) < 1e-6
    assert abs(p.radial(np.array([f]), azimuth_deg=120.0)[0] - ctf_1d(np.array([f]), 300, 2.7, 0.07, 10000)[0]) < 1e-6


def test_low_frequency_limit_amplitude_contrast_and_phase_plate():
    # at g = 0 the CTF is -sin(w + pshift); Q = 0.07 -> -0.07, with a pi/2 plate -> -cos(w)
    assert abs(ctf_1d(np.array([0.0]), 300, 2.7, 0.07, 15000)[0] + 0.07) < 1e-6
    assert abs(ctf_1d(np.array([0.0]), 300, 2.7, 0.07, 15000, pshift=math.pi / 2)[0]
               + math.sqrt(1 - 0.07 ** 2)) < 1e-6
    assert abs(ctf_1d(np.array([0.0]), 300, 2.7, 1.0, 15000)[0] + 1.0) < 1e-6


def test_first_zero_where_theory_puts_it():
    # Cs-free first zero: pi*lam*df*g^2 + w = pi
    lam = electron_wavelength(300)
    df, q = 20000.0, 0.07
    w = math.atan(q / math.sqrt(1 - q * q))
    g0 = math.sqrt((math.pi - w) / (math.pi * lam * df))
    v = ctf_1d(np.array([g0 * 0.999, g0 * 1.001]), 300, 0.0, q, df)
    assert v[0] < 0 < v[1] or v[0] > 0 > v[1]


def test_stack_matches_single():
    df1 = np.array([15000, 22000], np.float32)
    df2 = np.array([14000, 21000], np.float32)
    ang = np.array([10, -70], np.float32)
    ps = np.array([0.0, 1.0])
    s = ctf_2d_stack(40, 1.5, 300, 2.7, 0.07, df1, df2, ang, ps, bfactor=20)
    for i in range(2):
        assert np.allclose(s[i], ctf_2d(40, 1.5, 300, 2.7, 0.07, df1[i], df2[i], ang[i], ps[i], bfactor=20), atol=1e-6)


def test_ctf_stack_equals_the_per_particle_formula():
    """The numba stack kernel (cos 2a identity, polynomial sine) against ctf_2d's numpy formula, per particle,
    over defoci to 10 um, astigmatism, phase plates, an envelope, both layouts and a non-square grid."""
    from cistem_mpi.kernels.ctf import ctf_2d, ctf_2d_stack

    rng = np.random.default_rng(4)
    k = 12
    df1 = rng.uniform(2e3, 1e5, k)
    df2 = df1 - rng.uniform(0, 3000, k)
    ang = rng.uniform(-180, 180, k)
    ps = rng.uniform(0, np.pi, k)
    for ny, nx, half, b in ((64, None, True, 0.0), (40, 56, False, 80.0), (33, None, True, 0.0)):
        got = ctf_2d_stack(ny, 1.1, 300.0, 2.7, 0.1, df1, df2, ang, ps, bfactor=b, half=half, nx=nx)
        ref = np.stack([ctf_2d(ny, 1.1, 300.0, 2.7, 0.1, df1[i], df2[i], ang[i], ps[i], b, half=half, nx=nx)
                        for i in range(k)])
        assert got.shape == ref.shape and got.dtype == np.float32
        assert np.abs(got - ref).max() < 2e-7


def test_polynomial_sine_matches_numpy():
    from cistem_mpi.kernels.ctf import _sin

    x = np.concatenate([np.linspace(-7.0, 7.0, 1001), np.linspace(-3e4, 3e4, 1001), [0.5 * np.pi, -np.pi, 1e5]])
    assert max(abs(_sin(v) - np.sin(v)) for v in x) < 1e-9

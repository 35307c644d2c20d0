"""Soft masks and cosine-edged Fourier filters."""

from __future__ import annotations

import math

import numpy as np

from cistem_mpi.kernels import fft
from cistem_mpi.kernels.filters import (
    apply_bfactor, bandpass, frequency_radius, highpass, lowpass, lowpass_profile,
)
from cistem_mpi.kernels.masks import apply_mask, circle_mask, cosine_edge, cylinder_mask, sphere_mask


def test_cosine_edge_values_like_cistem():
    # cisTEM: inner radius = radius - edge/2, cosine over `edge`
    r = np.array([0, 7.9, 8.0, 10.0, 12.0, 12.1, 30])
    m = cosine_edge(r, 10.0, 4.0)
    assert np.allclose(m[[0, 1, 2]], 1.0)
    assert abs(m[3] - 0.5) < 1e-6
    assert np.allclose(m[[5, 6]], 0.0)
    assert abs(cosine_edge(np.array([9.0]), 10.0, 4.0)[0] - 0.5 * (1 + math.cos(math.pi * 0.25))) < 1e-6


def test_sphere_volume_and_centre():
    m = sphere_mask(64, 20.0, 6.0)
    # a cosine edge centred on r keeps the volume close to 4/3 pi r^3
    assert abs(m.sum() / (4 / 3 * math.pi * 20 ** 3) - 1) < 0.02
    assert m[32, 32, 32] == 1.0 and m[0, 0, 0] == 0.0
    c = circle_mask(33, 10.0, 0.0)
    assert c[16, 16 + 10] == 1.0 and c[16, 16 + 11] == 0.0


def test_cylinder_along_each_axis():
    cz = cylinder_mask(40, 6, 20, 0.0, axis="z")
    assert cz[20 + 9, 20, 20 + 5] == 1.0 and cz[20 + 11, 20, 20] == 0.0 and cz[20, 20, 20 + 7] == 0.0
    cx = cylinder_mask(40, 6, 20, 0.0, axis="x")
    assert np.array_equal(cx, np.transpose(cz, (2, 1, 0)))


def test_apply_mask_fill_mean():
    rng = np.random.default_rng(0)
    img = rng.normal(5.0, 1.0, (32, 32)).astype(np.float32)
    m = circle_mask(32, 8, 3)
    out = apply_mask(img, m, fill="mean")
    assert abs(out[0, 0] - img[m < 1e-6].mean()) < 1e-4
    assert out[16, 16] == img[16, 16]


def _grating(n, f_cyc, axis=1):
    x = np.arange(n)
    g = np.cos(2 * np.pi * f_cyc * x).astype(np.float32)
    return np.broadcast_to(g[None, :] if axis == 1 else g[:, None], (n, n)).copy()


def test_lowpass_highpass_bandpass_on_gratings():
    n = 64
    low, high = _grating(n, 4 / 64), _grating(n, 24 / 64)
    img = low + high
    assert np.allclose(lowpass(img, 0.2, 0.05), low, atol=1e-4)
    assert np.allclose(highpass(img, 0.2, 0.05), high, atol=1e-4)
    mid = _grating(n, 12 / 64)
    bp = bandpass(low + mid + high, 0.12, 0.28, 0.04)
    assert np.allclose(bp, mid, atol=1e-4)


def test_lowpass_on_volume_and_stack_shapes():
    rng = np.random.default_rng(1)
    v = rng.standard_normal((16, 16, 16)).astype(np.float32)
    lv = lowpass(v, 0.25)
    f = fft.ftn(lv)
    assert np.abs(f[frequency_radius(v.shape) > 0.26]).max() < 1e-4
    s = rng.standard_normal((3, 20, 20)).astype(np.float32)
    ls = lowpass(s, 0.25)
    for i in range(3):
        assert np.allclose(ls[i], lowpass(s[i], 0.25), atol=1e-5)
    cube_stack = rng.standard_normal((20, 20, 20)).astype(np.float32)
    as_stack = lowpass(cube_stack, 0.25, is_volume=False)
    assert np.allclose(as_stack[7], lowpass(cube_stack[7], 0.25), atol=1e-5)
    assert not np.allclose(as_stack, lowpass(cube_stack, 0.25), atol=1e-3)


def test_bfactor_scales_a_grating_by_the_formula():
    n, ps, b = 64, 1.5, 100.0
    g = _grating(n, 8 / 64)
    out = apply_bfactor(g, b, ps)
    s = (8 / 64) / ps
    assert np.allclose(out, g * math.exp(-b * s * s / 4), atol=1e-5)
    assert lowpass_profile(np.array([0.0]), 0.1)[0] == 1.0

"""Fourier cropping/padding and the point-group operators."""

from __future__ import annotations

import numpy as np
import pytest

from cistem_mpi.kernels.resample import (
    bin_image, crop_center, fourier_crop, fourier_pad, pad_center,
)
from cistem_mpi.kernels.symmetry import (
    expand_rotations, group_order, parse_symmetry, symmetry_matrices, axis_rotation, close_group,
)


def _band_limited(n, freqs, x0=0.0):
    x = np.arange(n) - n // 2
    return sum(np.cos(2 * np.pi * f * (x - x0)) for f in freqs)


def test_fourier_crop_samples_a_band_limited_signal_at_the_coarse_grid():
    # a signal with cycles 3 and 5 per box is exactly representable at 32 and 64 pixels
    n, m = 64, 32
    big = np.outer(_band_limited(n, [3 / n, 5 / n]), np.ones(n)).astype(np.float32)
    small = fourier_crop(big, m)
    want = np.outer(_band_limited(m, [3 / m, 5 / m]), np.ones(m))
    assert np.allclose(small, want, atol=1e-4)
    assert np.allclose(fourier_pad(small, n), big, atol=1e-4)


def test_mean_and_centre_preserved():
    n = 60
    y, x = np.mgrid[0:n, 0:n] - n // 2
    g = np.exp(-(x * x + y * y) / 50.0).astype(np.float32) + 3.0
    b = bin_image(g, 2.0)
    assert b.shape == (30, 30)
    assert abs(b.mean() - g.mean()) < 1e-4
    assert np.unravel_index(np.argmax(b), b.shape) == (15, 15)
    v = np.zeros((33, 33, 33), np.float32)
    v[16, 16, 16] = 1.0
    assert np.array_equal(crop_center(pad_center(v, 50), 33), v)
    assert pad_center(v, 50)[25, 25, 25] == 1.0


def test_groups_have_the_right_order_and_are_closed():
    for sym in ["C1", "C2", "C7", "D2", "D5", "T", "O", "I"]:
        g = symmetry_matrices(sym)
        assert len(g) == group_order(sym)
        assert np.allclose(g[0], np.eye(3))
        assert np.allclose(g @ np.swapaxes(g, -1, -2), np.eye(3), atol=1e-10)
        assert np.allclose(np.linalg.det(g), 1.0)
        for a in g:
            for b in g:
                p = a @ b
                assert np.min(np.abs(g - p).max(axis=(1, 2))) < 1e-8, sym


def _member(g, m):
    return np.min(np.abs(g - np.asarray(m, dtype=float).reshape(3, 3)).max(axis=(1, 2))) < 1e-5


def test_standard_orientation_matches_cistem_matrices():
    # matrices as listed in cisTEM's src/core/symmetry_matrix.cpp (SetToValues, row by row)
    assert _member(symmetry_matrices("C4"), [0, 1, 0, -1, 0, 0, 0, 0, 1])
    assert _member(symmetry_matrices("D3"), [1, 0, 0, 0, -1, 0, 0, 0, -1])  # 2-fold along x
    assert _member(symmetry_matrices("T"), [0, 0, -1, -1, 0, 0, 0, 1, 0])
    assert _member(symmetry_matrices("O"), [0, 0, -1, 0, -1, 0, -1, 0, 0])
    i_mats = [[-0.5, -0.309017, -0.809017, -0.309017, -0.809017, 0.5, -0.809017, 0.5, 0.309017],
              [-0.309017, -0.809017, -0.5, 0.809017, -0.5, 0.309017, -0.5, -0.309017, 0.809017],
              [0.809017, -0.5, 0.309017, 0.5, 0.309017, -0.809017, 0.309017, 0.809017, 0.5]]
    g = symmetry_matrices("I")
    assert all(_member(g, m) for m in i_mats)
    # the other "222" setting of I (five-fold along (0, phi, 1)) does not contain them
    phi = (1 + 5 ** 0.5) / 2
    other = close_group([axis_rotation([1, 0, 0], np.pi), axis_rotation([0, 0, 1], np.pi),
                    axis_rotation([1, 1, 1], 2 * np.pi / 3), axis_rotation([0, phi, 1], 2 * np.pi / 5)])
    assert len(other) == 60 and not _member(other, i_mats[0])


def test_parse_and_expand():
    assert parse_symmetry("c7") == ("C", 7) and parse_symmetry("I") == ("I", 0)
    for bad in ["X2", "C", "D0", "I3", ""]:
        with pytest.raises(ValueError):
            parse_symmetry(bad)
    r = np.stack([np.eye(3), symmetry_matrices("C3")[1]])
    e = expand_rotations(r, "D2")
    s = symmetry_matrices("D2")
    assert e.shape == (8, 3, 3) and np.allclose(e[4 + 2], s[2] @ r[1])

"""Reconstruction finishing kernels against slow, obvious references."""

from __future__ import annotations

import numpy as np

from cistem_mpi.kernels import reconstruction as rec
from cistem_mpi.kernels.backprojection import slab_bounds
from cistem_mpi.kernels.filters import apply_bfactor


def _shell_ref(p: int, n: int) -> np.ndarray:
    """Shell of every padded half-layout voxel, by explicit loops."""
    out = np.full((p, p, p // 2 + 1), -1, dtype=np.int64)
    for iz in range(p):
        kz = iz if iz < (p + 1) // 2 else iz - p
        for iy in range(p):
            ky = iy if iy < (p + 1) // 2 else iy - p
            for ix in range(p // 2 + 1):
                s = int(np.floor(np.sqrt(kz * kz + ky * ky + ix * ix) * n / p + 0.5))
                out[iz, iy, ix] = s if s <= n // 2 else -1
    return out


def _random_acc(rng, p):
    shape = (p, p, p // 2 + 1)
    d = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    w = rng.uniform(0.1, 2.0, size=shape).astype(np.float32)
    return d, w


def test_shell_sums_match_loops_and_add_up_over_slabs():
    rng = np.random.default_rng(0)
    p, n = 16, 8
    d1, w1 = _random_acc(rng, p)
    d2, w2 = _random_acc(rng, p)
    r1 = rng.uniform(0, 1, n // 2 + 1)
    r2 = rng.uniform(0, 1, n // 2 + 1)
    shells = _shell_ref(p, n)
    mult = np.where((np.arange(p // 2 + 1) == 0) | (np.arange(p // 2 + 1) == p // 2), 1.0, 2.0)[None, None, :]
    ref = np.zeros((6, n // 2 + 1))
    for s in range(n // 2 + 1):
        m = shells == s
        a = d1 / (w1 + r1[s])
        b = d2 / (w2 + r2[s])
        mm = np.broadcast_to(mult, m.shape)[m]
        ref[0, s] = np.sum(mm * np.real(a[m] * np.conj(b[m])))
        ref[1, s] = np.sum(mm * np.abs(a[m]) ** 2)
        ref[2, s] = np.sum(mm * np.abs(b[m]) ** 2)
        ref[3, s] = np.sum(mm * w1[m])
        ref[4, s] = np.sum(mm * w2[m])
        ref[5, s] = np.sum(mm)
    full = rec.slab_shell_sums(d1, w1, d2, w2, 0, p, n, r1, r2)
    assert np.allclose(full, ref, rtol=1e-5)
    parts = sum(rec.slab_shell_sums(d1[a:b], w1[a:b], d2[a:b], w2[a:b], a, p, n, r1, r2)
                for a, b in slab_bounds(p, 3))
    assert np.allclose(parts, full, rtol=1e-10)


def test_normalise_slab_matches_reference():
    rng = np.random.default_rng(1)
    p, n = 16, 8
    d, w = _random_acc(rng, p)
    reg = rng.uniform(0.5, 1.5, n // 2 + 1)
    shells = _shell_ref(p, n)
    ref = np.where(shells >= 0, d / (w + reg[np.clip(shells, 0, None)]), 0)
    for a, b in slab_bounds(p, 4):
        got = rec.normalise_slab(d[a:b], w[a:b], a, p, n, reg)
        assert np.allclose(got, ref[a:b], rtol=1e-5)


def test_fsc_and_wiener_regularisers_follow_the_formulas():
    sums = np.zeros((6, 3))
    sums[0] = [1.0, 0.5, 0.0]
    sums[1] = [1.0, 1.0, 1.0]
    sums[2] = [1.0, 1.0, 1.0]
    sums[3] = sums[4] = [10.0, 20.0, 30.0]
    sums[5] = [10.0, 10.0, 10.0]
    f = rec.fsc_from_sums(sums)
    assert np.allclose(f, [1.0, 0.5, 0.0])
    r_half, r_full = rec.wiener_regularisers(sums, f)
    # <W_half> = 1, 2, 3; SSNR_half = G FSC/(1-FSC) (FSC clipped to [1e-3, 0.999])
    g = rec.HALF_MAP_SSNR_GAIN
    assert np.allclose(r_half, np.array([1 * 0.001 / 0.999, 2 * 1.0, 3 * 0.999 / 0.001]) / g)
    # <W_full> = 2, 4, 6; SSNR_full = 2 FSC/(1-FSC)
    assert np.allclose(r_full, [2 * 0.001 / (2 * 0.999), 4 * 0.5, 6 * 0.999 / 0.002])


def test_half_sets_fixed_balanced_and_order_free():
    pos = np.arange(1, 20001)
    h = rec.half_sets(pos)
    assert set(np.unique(h)) == {1, 2}
    assert 0.48 < np.mean(h == 1) < 0.52
    perm = np.random.default_rng(2).permutation(len(pos))
    assert np.array_equal(rec.half_sets(pos[perm]), h[perm])
    assert not np.array_equal(rec.half_sets(pos, seed=1), h)
    # neighbours are not simply alternating (cisTEM's even/odd split is not random)
    assert 0.4 < np.mean(h[1:] == h[:-1]) < 0.6


def test_guinier_bfactor_recovers_a_known_b():
    rng = np.random.default_rng(3)
    n, ps = 64, 1.5
    vol = rng.normal(size=(n, n, n)).astype(np.float32)  # flat spectrum
    blurred = apply_bfactor(vol, 120.0, ps)
    b = rec.guinier_bfactor(blurred, ps, low_resolution=10.0, high_resolution=3.5)
    assert abs(b - 120.0) < 8.0, b


def test_sharpen_undoes_a_bfactor_inside_the_band():
    rng = np.random.default_rng(4)
    n, ps = 48, 2.0
    vol = rng.normal(size=(n, n, n)).astype(np.float32)
    sharp = rec.sharpen(apply_bfactor(vol, 80.0, ps), ps, 80.0, resolution=2 * ps)
    from cistem_mpi.kernels.filters import lowpass

    ref = lowpass(vol, 0.5, 0.02)
    assert np.corrcoef(sharp.ravel(), ref.ravel())[0, 1] > 0.999


def test_score_bfactors():
    b = rec.score_bfactors(np.array([10.0, 20.0, 30.0]), 5.0)
    assert np.allclose(b, [50.0, 0.0, -50.0])
    assert np.all(rec.score_bfactors(np.array([1.0, 2.0]), 0.0) == 0)

"""Hot/dead pixel detection and replacement (cistem_mpi.kernels.defects)."""

from __future__ import annotations

import numpy as np
import pytest

from cistem_mpi.kernels.defects import defects_from_frames, defects_from_gain, replace_defects


def test_defects_from_gain():
    rng = np.random.default_rng(1)
    g = rng.normal(1.0, 0.02, size=(50, 60)).astype(np.float32)
    bad = {(3, 4): 0.0, (10, 11): np.nan, (20, 30): 9.0, (40, 50): 0.05, (5, 59): -1.0}
    for (y, x), v in bad.items():
        g[y, x] = v
    mask = defects_from_gain(g)
    assert set(map(tuple, np.argwhere(mask).tolist())) == set(bad)


def test_defects_from_frames_and_replacement():
    rng = np.random.default_rng(2)
    n = 40
    s = rng.poisson(2.0 * n, size=(64, 64)).astype(np.float64)  # sum of 40 frames at 2 e/px/frame
    s[10, 20] = 4000.0  # hot
    s[30, 31] = 0.0  # dead
    hot, dead = defects_from_frames(s, n)
    assert np.argwhere(hot).tolist() == [[10, 20]]
    assert np.argwhere(dead).tolist() == [[30, 31]]
    mask = hot | dead
    fixed = replace_defects(s, mask)
    assert fixed.dtype == np.float32
    for y, x in ((10, 20), (30, 31)):
        neigh = [s[y + dy, x + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
        assert fixed[y, x] == pytest.approx(np.mean(neigh), rel=1e-6)
    untouched = ~mask
    np.testing.assert_array_equal(fixed[untouched], s[untouched].astype(np.float32))
    # low dose: zeros are not "dead"
    _, dead_low = defects_from_frames(rng.poisson(0.5, (32, 32)).astype(float), 1)
    assert not dead_low.any()


def test_replace_defects_at_edges_and_clusters():
    img = np.arange(25, dtype=np.float32).reshape(5, 5)
    mask = np.zeros((5, 5), bool)
    mask[0, 0] = True  # corner: 3 neighbours
    mask[2, 1:4] = True  # a row of 3: centre one still has good neighbours above/below
    out = replace_defects(img, mask)
    assert out[0, 0] == pytest.approx(np.mean([img[0, 1], img[1, 0], img[1, 1]]))
    assert out[2, 2] == pytest.approx(np.mean([img[1, 1], img[1, 2], img[1, 3], img[3, 1], img[3, 2], img[3, 3]]))
    everything = np.ones((3, 3), bool)
    everything[1, 1] = False
    assert replace_defects(np.full((3, 3), 7.0), everything)[0, 0] == 7.0



def _replace_slow(img, mask):
    # obvious reference: pixel by pixel, 3x3 then 5x5 good neighbours, then the mean of all good pixels
    out = img.astype(np.float64).copy()
    ny, nx = img.shape
    for y in range(ny):
        for x in range(nx):
            if not mask[y, x]:
                continue
            for r in (1, 2):
                vals = [img[y + dy, x + dx] for dy in range(-r, r + 1) for dx in range(-r, r + 1)
                        if (dy, dx) != (0, 0) and 0 <= y + dy < ny and 0 <= x + dx < nx and not mask[y + dy, x + dx]]
                if vals:
                    out[y, x] = np.mean(vals)
                    break
            else:
                out[y, x] = img[~mask].mean()
    return out


def test_replace_defects_against_slow_reference():
    rng = np.random.default_rng(5)
    img = rng.normal(10.0, 2.0, (24, 20)).astype(np.float32)
    mask = rng.random((24, 20)) < 0.15
    mask[0:4, 0:4] = True  # a cluster: the corner needs the 5x5 neighbourhood
    mask[10:16, 10:16] = True  # the centre of this one has no good pixel within 5x5
    np.testing.assert_allclose(replace_defects(img, mask), _replace_slow(img, mask), rtol=1e-6)


def test_defects_from_gain_against_slow_reference():
    rng = np.random.default_rng(6)
    g = rng.normal(1.0, 0.05, (30, 30))
    g[rng.random((30, 30)) < 0.02] = 3.0
    g[2, 2], g[5, 7], g[8, 9] = 0.0, np.inf, 0.1
    good = [v for v in g.ravel() if np.isfinite(v) and v > 0]
    med = np.median(good)
    sigma = 1.4826 * np.median([abs(v - med) for v in good])
    ref = np.array([[not (np.isfinite(v) and v > 0) or abs(v - med) > 10 * sigma or v > 5 * med or v < med / 5
                     for v in row] for row in g])
    np.testing.assert_array_equal(defects_from_gain(g), ref)

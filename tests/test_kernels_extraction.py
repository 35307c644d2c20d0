"""Particle extraction kernels against slow, obvious references."""

from __future__ import annotations

import numpy as np
import pytest

from cistem_mpi.kernels.extraction import box_corners, cut_boxes, edge_mean, normalise_boxes, replace_outliers


def _slow_box(img, cx, cy, box, fill):
    """Pixel by pixel: box index (j, i) shows micrograph pixel (cy - box//2 + j, cx - box//2 + i)."""
    out = np.empty((box, box), np.float32)
    for j in range(box):
        for i in range(box):
            y, x = cy - box // 2 + j, cx - box // 2 + i
            out[j, i] = img[y, x] if 0 <= y < img.shape[0] and 0 <= x < img.shape[1] else fill
    return out


@pytest.mark.parametrize("box", [8, 9])
def test_cut_boxes_matches_pixel_by_pixel_reference_inside_and_at_edges(box):
    rng = np.random.default_rng(0)
    img = rng.normal(size=(40, 50)).astype(np.float32)
    # inside, touching each edge, partly outside, wholly outside
    x = np.array([20.2, 0.0, 49.4, 3.6, 25.0, -30.0, 48.51])
    y = np.array([17.7, 10.0, 5.0, 39.0, 0.49, 5.0, 38.5])
    x0, y0, dx, dy = box_corners(x, y, box)
    got = cut_boxes(img, x0, y0, box, fill=-7.0)
    for k in range(len(x)):
        cx, cy = int(np.floor(x[k] + 0.5)), int(np.floor(y[k] + 0.5))
        np.testing.assert_array_equal(got[k], _slow_box(img, cx, cy, box, -7.0))
    assert np.all(np.abs(dx) <= 0.5) and np.all(np.abs(dy) <= 0.5)
    np.testing.assert_allclose(x0 + box // 2 + dx, x)
    np.testing.assert_allclose(y0 + box // 2 + dy, y)
    assert np.all(got[5] == -7.0)  # wholly outside: fill only


def test_centre_pixel_of_box_is_the_particle_position():
    img = np.zeros((30, 30), np.float32)
    img[12, 17] = 1.0  # y, x
    x0, y0, _, _ = box_corners(np.array([17.3]), np.array([11.6]), 10)
    b = cut_boxes(img, x0, y0, 10, 0.0)[0]
    assert b[5, 5] == 1.0 and b.sum() == 1.0


def test_edge_mean_counts_each_edge_pixel_once():
    img = np.arange(5 * 6, dtype=np.float32).reshape(5, 6)
    mask = np.zeros_like(img, bool)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    assert edge_mean(img) == pytest.approx(float(img[mask].mean()))


def test_replace_outliers_by_the_formula():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(64, 64)).astype(np.float32)
    img[3, 4] = 100.0
    img[10, 10] = -80.0
    mean, sd = img.astype(np.float64).mean(), img.astype(np.float64).std()
    expected = img.copy()
    expected[np.abs(img - mean) > 6 * sd] = mean
    got = replace_outliers(img)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert got[3, 4] == pytest.approx(mean, abs=1e-6) and img[3, 4] == 100.0  # input untouched


def test_normalise_boxes_zero_mean_unit_sd_and_constant_box():
    rng = np.random.default_rng(2)
    boxes = (rng.normal(size=(3, 16, 16)) * 5 + 3).astype(np.float32)
    boxes[2] = 4.0
    normalise_boxes(boxes)
    np.testing.assert_allclose(boxes[:2].mean(axis=(1, 2)), 0, atol=1e-6)
    np.testing.assert_allclose(boxes[:2].std(axis=(1, 2)), 1, atol=1e-5)
    assert np.all(boxes[2] == 0)

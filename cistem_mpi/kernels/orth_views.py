"""Orthogonal views of a volume: central sections and projections (diagnostics)."""

from __future__ import annotations

import numpy as np


def _normalise(panel: np.ndarray) -> np.ndarray:
    """Zero mean, unit standard deviation (a flat panel stays zero)."""
    panel = panel.astype(np.float32, copy=True)
    panel -= panel.mean()
    sd = panel.std()
    if sd > 0:
        panel /= sd
    return panel


def orth_views(volume: np.ndarray) -> np.ndarray:
    """Montage of three central sections (top row) and three projections (bottom row).

    Panels left to right: the xy plane (looking down z), xz (down y), yz
    (down x); each panel normalised to zero mean and unit variance so the
    six share one grey scale.  The array layout is (z, y, x).

    Parameters
    ----------
    volume : numpy.ndarray
        Cubic volume (n, n, n).

    Returns
    -------
    numpy.ndarray
        float32 image of shape (2 n, 3 n).
    """
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise ValueError(f"orth views need a cubic volume, got {volume.shape}")
    n = volume.shape[0]
    c = n // 2
    sections = [volume[c, :, :], volume[:, c, :], volume[:, :, c]]
    projections = [volume.sum(axis=0), volume.sum(axis=1), volume.sum(axis=2)]
    out = np.zeros((2 * n, 3 * n), dtype=np.float32)
    for i, (s, p) in enumerate(zip(sections, projections)):
        out[:n, i * n:(i + 1) * n] = _normalise(s)
        out[n:, i * n:(i + 1) * n] = _normalise(p)
    return out

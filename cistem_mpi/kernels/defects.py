"""Detector defects: hot and dead pixels found on arrays, and their replacement.

:func:`defects_from_gain` marks pixels whose gain is non-finite, <= 0 or far
from the median; :func:`defects_from_frames` marks hot pixels (far too many
counts in the frame sum) and dead pixels (none where many are expected);
:func:`replace_defects` replaces them by the mean of good neighbours.
Reading gain references is :mod:`cistem_mpi.io.gain`'s.
"""

from __future__ import annotations

import numpy as np

__all__ = ["defects_from_gain", "defects_from_frames", "replace_defects"]


def _robust_sigma(values: np.ndarray) -> tuple[float, float]:
    med = float(np.median(values))
    mad = float(np.median(np.abs(values - med)))
    return med, 1.4826 * mad


def defects_from_gain(gain: np.ndarray, n_sigma: float = 10.0, max_ratio: float = 5.0) -> np.ndarray:
    """Mark defective pixels from a gain reference.

    A pixel is defective if its gain is non-finite or <= 0 (a dead pixel is
    usually written as 0), more than ``n_sigma`` robust standard deviations
    from the median, or more than ``max_ratio`` times away from the median
    (either side).

    Parameters
    ----------
    gain : numpy.ndarray
        2D gain reference.
    n_sigma : float
        Threshold in robust (MAD) standard deviations from the median.
    max_ratio : float
        Largest allowed factor between a pixel's gain and the median.

    Returns
    -------
    numpy.ndarray
        bool mask, True = defective.

    Examples
    --------
    >>> g = np.ones((8, 8), np.float32)
    >>> g[2, 3] = 0.0
    >>> np.argwhere(defects_from_gain(g)).tolist()
    [[2, 3]]
    """
    g = np.asarray(gain, dtype=np.float64)
    bad = ~np.isfinite(g) | (g <= 0)
    good = g[~bad]
    if good.size == 0:
        return np.ones(g.shape, dtype=bool)
    med, sigma = _robust_sigma(good)
    with np.errstate(invalid="ignore", divide="ignore"):
        far = np.abs(g - med) > n_sigma * sigma if sigma > 0 else np.zeros(g.shape, bool)
        ratio = (g > med * max_ratio) | (g < med / max_ratio)
    return bad | (far & ~bad) | (ratio & ~bad)


def defects_from_frames(
    frame_sum: np.ndarray,
    n_frames: int,
    hot_sigma: float = 6.0,
    dead_min_expected: float = 20.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Mark hot and dead pixels from the sum of (gain-corrected) frames.

    Counts are Poisson-like, so a pixel is *hot* when its sum exceeds the
    median by more than ``hot_sigma`` standard deviations, estimated both
    robustly (MAD) and as sqrt(median) for counting data; the larger is used.
    A pixel is *dead* when it recorded nothing although the median pixel
    recorded at least ``dead_min_expected`` counts (Poisson probability of
    zero is then below e^-20).

    Parameters
    ----------
    frame_sum : numpy.ndarray
        Sum of the frames (2D).
    n_frames : int
        Number of frames summed (must be >= 1; the thresholds are computed
        from the sum itself, which is what Poisson statistics apply to).
    hot_sigma : float
        Threshold in standard deviations.
    dead_min_expected : float
        Minimum median count for zero counts to mean "dead".

    Returns
    -------
    hot, dead : numpy.ndarray
        bool masks.

    Examples
    --------
    >>> s = np.full((16, 16), 100.0)
    >>> s[4, 5], s[9, 9] = 1000.0, 0.0
    >>> hot, dead = defects_from_frames(s, 10)
    >>> np.argwhere(hot).tolist(), np.argwhere(dead).tolist()
    ([[4, 5]], [[9, 9]])
    """
    s = np.asarray(frame_sum, dtype=np.float64)
    if n_frames < 1:
        raise ValueError("defects_from_frames: n_frames must be >= 1")
    med, sigma = _robust_sigma(s)
    sigma = max(sigma, float(np.sqrt(max(med, 0.0))), 1e-12)
    hot = s > med + hot_sigma * sigma
    dead = (s <= 0) if med >= dead_min_expected else np.zeros(s.shape, dtype=bool)
    return hot, dead


def replace_defects(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Replace masked pixels by the mean of their good neighbours.

    The 3x3 neighbourhood is used; a pixel with no good neighbour there takes
    the 5x5 mean, and failing that the mean of all good pixels.

    Parameters
    ----------
    frame : numpy.ndarray
        2D image (integer frames are converted to float32).
    mask : numpy.ndarray
        bool, True = defective.

    Returns
    -------
    numpy.ndarray
        float32 copy with the defects replaced.

    Examples
    --------
    >>> img = np.arange(9, dtype=np.float32).reshape(3, 3)
    >>> float(replace_defects(img, img == 4)[1, 1])
    4.0
    """
    out = np.array(frame, dtype=np.float32)
    m = np.asarray(mask, dtype=bool)
    if m.shape != out.shape:
        raise ValueError(f"replace_defects: mask {m.shape} and frame {out.shape} differ")
    ys, xs = np.nonzero(m)
    if ys.size == 0:
        return out
    ny, nx = out.shape
    remaining = np.ones(ys.size, dtype=bool)
    for r in (1, 2):
        offs = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if (dy, dx) != (0, 0)]
        total = np.zeros(ys.size, dtype=np.float64)
        count = np.zeros(ys.size, dtype=np.int64)
        for dy, dx in offs:
            yy, xx = ys + dy, xs + dx
            inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
            yy_c, xx_c = np.clip(yy, 0, ny - 1), np.clip(xx, 0, nx - 1)
            ok = inside & ~m[yy_c, xx_c]
            total += np.where(ok, out[yy_c, xx_c], 0.0)
            count += ok
        fill = remaining & (count > 0)
        out[ys[fill], xs[fill]] = (total[fill] / count[fill]).astype(np.float32)
        remaining &= ~fill
        if not remaining.any():
            return out
    good = ~m
    out[ys[remaining], xs[remaining]] = float(out[good].mean()) if good.any() else 0.0
    return out

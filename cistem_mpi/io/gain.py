"""Gain references and detector defects (hot/dead pixels).

Formats
-------
* MRC (``.mrc``; first image of a stack),
* TIFF (``.tif``/``.tiff`` and Thermo Fisher's EER ``.gain``, first page),
* Gatan DigitalMicrograph ``.dm4``/``.dm3`` (through ``ncempy``).

TIFF and DM images are stored top row first; like IMOD (``dm2mrc``,
``tif2mrc``), cisTEM (``tiff_file.cpp``, ``dm_file.cpp``) and RELION they are
flipped along y on reading so that they line up with MRC data and with TIFF
movies read by :mod:`cistem_mpi.io.movies`.

Orientation options follow RELION/MotionCor2 (``--gain_rot``,
``--gain_flip``): ``rotate`` = number of 90° turns *clockwise as displayed
with row 0 at the top* (relion_display, ``matplotlib.imshow``), applied
first; then ``flip_y`` (RELION ``--gain_flip 1``, upside down) and
``flip_x`` (``--gain_flip 2``, left to right).

Gain references are multiplicative: a corrected frame is ``frame * gain``.
EER ``.gain`` files from EPU hold the inverse (RELION takes ``1/gain``);
pass ``reciprocal=True`` for those.

Defects
-------
:func:`defects_from_gain` marks pixels whose gain is non-finite, <= 0 or far
from the median; :func:`defects_from_frames` marks hot pixels (far too many
counts in the frame sum) and dead pixels (none where many are expected);
:func:`replace_defects` replaces them by the mean of good neighbours.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from cistem_mpi.errors import InputError

__all__ = [
    "read_gain",
    "orient_gain",
    "apply_gain",
    "match_gain_to_frames",
    "defects_from_gain",
    "defects_from_frames",
    "replace_defects",
]

_MRC_EXT = {".mrc", ".mrcs", ".map", ".st"}
_TIFF_EXT = {".tif", ".tiff", ".gain"}
_DM_EXT = {".dm4", ".dm3"}


def orient_gain(gain: np.ndarray, rotate: int = 0, flip_x: bool = False, flip_y: bool = False) -> np.ndarray:
    """Rotate (in 90° steps, clockwise as displayed row 0 on top) then flip.

    Parameters
    ----------
    gain : numpy.ndarray
        2D image.
    rotate : int
        Number of 90° clockwise turns (RELION ``--gain_rot``); any integer,
        taken modulo 4.
    flip_x : bool
        Mirror left-right after rotating (RELION ``--gain_flip 2``).
    flip_y : bool
        Mirror upside-down after rotating (RELION ``--gain_flip 1``).

    Returns
    -------
    numpy.ndarray
        A new array.
    """
    out = np.rot90(gain, k=-(int(rotate) % 4))  # np.rot90 turns counter-clockwise for k > 0
    if flip_y:
        out = out[::-1, :]
    if flip_x:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def read_raw(p: Path) -> np.ndarray:
    """A gain-like image (MRC, TIFF, DM4) as stored, in our orientation (used for gain and defect maps)."""
    ext = p.suffix.lower()
    if ext == ".gz":
        ext = Path(p.stem).suffix.lower()
    if ext in _MRC_EXT:
        from cistem_mpi.io.mrc import open_stack

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the gain's pixel size is irrelevant
            with open_stack(p, pixel_size=1.0) as st:
                if len(st) > 1:
                    warnings.warn(f"{p}: gain reference has {len(st)} images; using the first", stacklevel=3)
                return st[0]
    if ext in _TIFF_EXT:
        import tifffile

        try:
            with tifffile.TiffFile(str(p)) as tf:
                page = tf.pages[0]
                img = page.asarray()
        except Exception as exc:  # noqa: BLE001 - any tifffile failure is bad input
            raise InputError(p, f"cannot read gain reference as TIFF: {exc}") from None
        if img.ndim != 2:
            raise InputError(p, f"gain reference must be a 2D image, got shape {img.shape}")
        return np.asarray(img, dtype=np.float32)[::-1, :]  # TIFF rows top-first -> MRC convention
    if ext in _DM_EXT:
        try:
            from ncempy.io import dm
        except ImportError as exc:  # pragma: no cover - ncempy is a dependency
            raise InputError(p, "reading DM files needs ncempy") from exc
        try:
            with dm.fileDM(str(p)) as f:
                dataset = f.getDataset(0)
            img = np.asarray(dataset["data"])
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise InputError(p, f"cannot read gain reference as DigitalMicrograph file: {exc}") from None
        if img.ndim != 2:
            raise InputError(p, f"gain reference must be a 2D image, got shape {img.shape}")
        return np.asarray(img, dtype=np.float32)[::-1, :]  # as IMOD's dm2mrc and cisTEM
    raise InputError(p, f"unknown gain reference format '{p.suffix}' (use .mrc, .tif/.tiff/.gain or .dm4/.dm3)")


def read_gain(
    path: str | os.PathLike,
    rotate: int = 0,
    flip_x: bool = False,
    flip_y: bool = False,
    *,
    reciprocal: bool = False,
) -> np.ndarray:
    """Read a gain reference as float32, oriented to match the movie frames.

    Parameters
    ----------
    path : path-like
        MRC, TIFF/EER ``.gain`` or DM4/DM3 file.
    rotate : int
        90° clockwise turns (RELION ``--gain_rot``).
    flip_x, flip_y : bool
        Mirror after rotation (RELION ``--gain_flip`` 2 and 1).
    reciprocal : bool
        Return ``1/gain`` (zeros stay 0): EPU's EER ``.gain`` files store
        the inverse of a multiplicative gain.

    Returns
    -------
    numpy.ndarray
        2D float32.

    Raises
    ------
    InputError
        Missing file, unknown format, not 2D, or no finite positive value.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(p, "gain reference not found")
    g = read_raw(p).astype(np.float32, copy=False)
    finite = np.isfinite(g)
    if not finite.all():
        bad = int(g.size - np.count_nonzero(finite))
        raise InputError(p, f"gain reference contains {bad} NaN or infinite pixel(s)")
    good = finite & (g > 0)
    if not good.any():
        raise InputError(p, "gain reference has no finite positive value")
    if reciprocal:
        inv = np.zeros_like(g)
        np.divide(1.0, g, out=inv, where=good)
        g = inv
    return orient_gain(g, rotate, flip_x, flip_y).astype(np.float32, copy=False)


def match_gain_to_frames(
    gain: np.ndarray,
    frame_shape: tuple[int, int],
    gain_path: str | os.PathLike | None = None,
    movie_path: str | os.PathLike | None = None,
) -> np.ndarray:
    """Return the gain at the frame size, or raise a clear error.

    A gain whose size divides the frame size by an integer factor (EER
    super-resolution rendering of a physical-pixel gain, as RELION does) is
    enlarged by repeating each pixel.

    Raises
    ------
    InputError
        The sizes do not match (naming both files; a hint is given when the
        gain only needs a 90° rotation).
    """
    gh, gw = gain.shape
    fh, fw = int(frame_shape[0]), int(frame_shape[1])
    if (gh, gw) == (fh, fw):
        return gain
    if fh % gh == 0 and fw % gw == 0 and fh // gh == fw // gw and fh // gh in (2, 4):
        f = fh // gh
        return np.repeat(np.repeat(gain, f, axis=0), f, axis=1)
    where = f" of {movie_path}" if movie_path else ""
    hint = " (a 90° rotation would match: try rotate=1 or 3)" if (gh, gw) == (fw, fh) else ""
    raise InputError(
        gain_path,
        f"gain reference is {gw} x {gh} (x by y) but the frames{where} are {fw} x {fh}{hint}",
    )


def apply_gain(
    frame: np.ndarray,
    gain: np.ndarray,
    gain_path: str | os.PathLike | None = None,
    movie_path: str | os.PathLike | None = None,
) -> np.ndarray:
    """Gain-correct one frame: ``frame * gain`` as float32.

    Integer frames are converted here, not before (the counts stay integer
    until this point).

    Parameters
    ----------
    frame : numpy.ndarray
        2D frame (any numeric dtype).
    gain : numpy.ndarray
        Gain reference of the same shape (or 2x/4x smaller for EER
        super-resolution, see :func:`match_gain_to_frames`).
    gain_path, movie_path : path-like, optional
        Named in the error if the sizes differ.

    Returns
    -------
    numpy.ndarray
        float32 frame.
    """
    if gain.shape != frame.shape:
        gain = match_gain_to_frames(gain, frame.shape, gain_path, movie_path)
    out = np.asarray(frame, dtype=np.float32)
    return np.multiply(out, gain, dtype=np.float32)


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

    Returns
    -------
    numpy.ndarray
        bool mask, True = defective.
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

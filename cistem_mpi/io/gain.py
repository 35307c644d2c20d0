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
Hot/dead pixel detection and replacement are numerics on arrays: see
:mod:`cistem_mpi.kernels.defects`.
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

"""Movies: MRC stacks, multi-page TIFF (incl. LZW) and EER, read lazily.

:func:`open_movie` returns a :class:`Movie` whatever the format:
``len(movie)`` frames (EER: fractions), ``movie.shape == (n, ny, nx)``,
``movie.dtype``, ``movie[i]`` reading one frame (one EER fraction) only,
iteration, ``movie.pixel_size`` (Å, or None when the file does not say) and
``close()`` / ``with``.  Frames keep the stored integer type (uint8, int16,
uint16 ...) until the gain is applied (:func:`cistem_mpi.io.gain.apply_gain`).

Orientation: TIFF pages are stored top row first; like IMOD, cisTEM
(``TiffFile::ReadSlicesFromDisk``) and RELION, frames are flipped along y on
reading so that row 0 is the bottom row, as in MRC.  :func:`write_tiff_movie`
flips on writing, so writing then reading returns the same arrays.  MRC and
EER frames are returned as stored.

Writers: :func:`write_tiff_movie` (LZW by default, through tifffile +
imagecodecs), :func:`write_mrc_movie` and, for EER, :func:`write_eer`
(re-exported from :mod:`cistem_mpi.io.eer`).
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import tifffile

from cistem_mpi.errors import InputError
from cistem_mpi.io.eer import EER_COMPRESSIONS, EerMovie, tifffile_problems, write_eer, write_eer_events
from cistem_mpi.io.mrc import DirectReads, MrcStackWriter, check_exists, map_stack, resolve_pixel_size
from cistem_mpi.io.tiff_tags import SAMPLE_FORMAT, add_sample_format

__all__ = [
    "Movie",
    "MrcMovie",
    "TiffMovie",
    "EerMovie",
    "open_movie",
    "write_tiff_movie",
    "write_mrc_movie",
    "write_eer",
    "write_eer_events",
]


class Movie:
    """Common interface of the movie readers (see module docstring)."""

    path: Path
    pixel_size: float | None

    @property
    def shape(self) -> tuple[int, int, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def dtype(self) -> np.dtype:  # pragma: no cover - abstract
        raise NotImplementedError

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, i: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index):
        n = len(self)
        if isinstance(index, slice):
            idx = range(*index.indices(n))
            if not idx:
                return np.zeros((0, *self.shape[1:]), self.dtype)
            return np.stack([self[i] for i in idx])
        i = int(index)
        if i < -n or i >= n:
            raise IndexError(f"{self.path}: frame {i} out of range (movie has {n})")
        return self._read(i % n)

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    def close(self) -> None:  # pragma: no cover - overridden
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MrcMovie(Movie):
    """MRC/MRCS movie, memory-mapped; frames in the stored dtype.

    A frame is read into its own array (:class:`~cistem_mpi.io.mrc.DirectReads`)
    rather than copied out of the map: pages touched through a map count in the
    process's resident memory until it is closed, which made every frame of a
    movie (252 MB at 2048² x 30 uint16, 1.3 GB at 4096² x 40) part of
    align-movies' peak.  Read this way they stay in the page cache, outside the
    process.
    """

    def __init__(self, path: str | os.PathLike, pixel_size: float | None = None):
        self.path, self._mrc, self.header, self._data = map_stack(path, "a movie")
        self._direct = DirectReads(self.path, self._data)
        hps = self.header.pixel_size
        if pixel_size is not None:
            self.pixel_size = resolve_pixel_size(hps, pixel_size, self.path)
        else:
            self.pixel_size = None if hps <= 0 or abs(hps - 1.0) < 1e-6 else hps

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self._data.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        return self._data.dtype

    def _read(self, i: int) -> np.ndarray:
        if self._direct.checked is not False:
            out = np.empty(self._data.shape[1:], dtype=self._data.dtype)
            if self._direct.read(i, out[None]):
                return out
        return np.array(self._data[i])  # copy out of the memory map

    def close(self) -> None:
        self._direct.close()
        if self._mrc is not None:
            self._data = None
            self._mrc.close()
            self._mrc = None


class TiffMovie(Movie):
    """Multi-page TIFF movie (uncompressed, LZW, deflate, ...); one page per frame.

    All pages must have the same size and type (checked when opening, from
    the page headers only).  Frames are flipped along y (see module notes).
    SerialEM's packed 4-bit K2/K3 TIFFs are not supported.
    """

    def __init__(self, path: str | os.PathLike, pixel_size: float | None = None):
        self.path = check_exists(path)
        try:
            self._tif = tifffile.TiffFile(str(self.path))
        except (tifffile.TiffFileError, ValueError, OSError, struct.error) as exc:
            raise InputError(self.path, f"cannot read as TIFF: {exc}") from None
        try:
            self._scan()
        except BaseException:
            self._tif.close()
            raise
        self.pixel_size = float(pixel_size) if pixel_size else None

    def _scan(self) -> None:
        size = self.path.stat().st_size
        pages = []
        try:
            with tifffile_problems() as problems:
                page_list = list(self._tif.pages)
            if problems:
                # tifffile stops at a broken IFD chain and only logs it: a truncated movie
                raise InputError(self.path, f"truncated or corrupt TIFF after {len(page_list)} frames: {problems[0]}")
            for k, page in enumerate(page_list):
                shape = tuple(int(s) for s in page.shape)
                if len(shape) != 2:
                    raise InputError(self.path, f"frame {k} is not a 2D grey-scale image (shape {shape})")
                offs, counts = page.dataoffsets, page.databytecounts
                if offs and offs[-1] + counts[-1] > size:
                    raise InputError(
                        self.path,
                        f"truncated TIFF: frame {k} data end at byte {offs[-1] + counts[-1]} but the "
                        f"file has {size} bytes",
                    )
                pages.append((shape, np.dtype(page.dtype)))
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - broken IFD chain etc.
            raise InputError(self.path, f"truncated or corrupt TIFF after {len(pages)} frames: {exc}") from None
        if not pages:
            first = _first_directory_offset(self.path)
            if first is not None and first >= size:
                # our writer (and many others) put the directories after the strips: a cut-off file loses them all
                raise InputError(self.path, f"truncated TIFF: its first directory at byte {first} lies past the end "
                                            f"of the file ({size} bytes)")
            raise InputError(self.path, "TIFF has no images")
        first_shape, first_dtype = pages[0]
        for k, (shape, dtype) in enumerate(pages):
            if shape != first_shape:
                raise InputError(
                    self.path,
                    f"TIFF pages differ in size: frame 0 is {first_shape[1]} x {first_shape[0]} but "
                    f"frame {k} is {shape[1]} x {shape[0]}",
                )
            if dtype != first_dtype:
                raise InputError(self.path, f"TIFF pages differ in type: frame 0 is {first_dtype}, frame {k} is {dtype}")
        self._shape = (len(pages), *first_shape)
        self._dtype = first_dtype

    @property
    def shape(self) -> tuple[int, int, int]:
        return self._shape  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def _read(self, i: int) -> np.ndarray:
        try:
            img = self._tif.pages[i].asarray()
        except Exception as exc:  # noqa: BLE001 - decoder failures are bad input
            raise InputError(self.path, f"frame {i} cannot be decoded: {exc}") from None
        return np.ascontiguousarray(img[::-1, :])

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()
            self._tif = None


def _is_eer(path: Path) -> bool:
    if path.suffix.lower() == ".eer":
        return True
    try:
        with tifffile_problems(), tifffile.TiffFile(str(path)) as tf:
            return any(int(p.compression) in EER_COMPRESSIONS for p in tf.pages[:2])
    except Exception:  # noqa: BLE001 - TiffMovie will report what is wrong
        return False


def open_movie(
    path: str | os.PathLike,
    eer_fractions: int | None = None,
    eer_upsampling: int = 1,
    *,
    eer_grouping: int | None = None,
    pixel_size: float | None = None,
) -> Movie:
    """Open a movie for lazy, frame-by-frame reading.

    Parameters
    ----------
    path : path-like
        ``.mrc``/``.mrcs`` (MRC stack), ``.tif``/``.tiff`` (multi-page TIFF,
        any compression tifffile reads, LZW included) or ``.eer``.
    eer_fractions : int, optional
        EER only: group the raw frames into this many fractions.
    eer_upsampling : int
        EER only: 1 (physical pixels), 2 or 4 (super-resolution).
    eer_grouping : int, optional
        EER only: raw frames per fraction (instead of ``eer_fractions``).
    pixel_size : float, optional
        Pixel size in Å (of the returned frames' physical pixels for EER);
        overrides the file.

    Returns
    -------
    Movie
        ``MrcMovie``, ``TiffMovie`` or ``EerMovie``.

    Raises
    ------
    InputError
        Missing, unknown-format, truncated or inconsistent file.
    """
    p = check_exists(path)
    ext = p.suffix.lower()
    if ext in (".mrc", ".mrcs", ".st"):
        return MrcMovie(p, pixel_size)
    if ext in (".tif", ".tiff", ".eer"):
        if _is_eer(p):
            return EerMovie(p, fractions=eer_fractions, grouping=eer_grouping, upsampling=eer_upsampling,
                            pixel_size=pixel_size)
        return TiffMovie(p, pixel_size)
    raise InputError(p, f"unknown movie format '{p.suffix}' (use .mrc/.mrcs, .tif/.tiff or .eer)")


def write_tiff_movie(
    path: str | os.PathLike,
    frames: Iterable[np.ndarray],
    compression: str | None = "lzw",
    *,
    bigtiff: bool | None = None,
    n_frames: int | None = None,
) -> int:
    """Write frames as a multi-page TIFF, one page per frame.

    Frames are flipped along y on writing (see module notes), so
    :func:`open_movie` returns them unchanged.

    Parameters
    ----------
    path : path-like
        Output ``.tif``.
    frames : iterable of 2D arrays
        Frames (any integer or float dtype; written as is). A generator is
        fine: frames are written one at a time.
    compression : str or None
        "lzw" (default, as SerialEM writes), "deflate", None ...
    bigtiff : bool, optional
        Force BigTIFF; default: when the uncompressed size exceeds 3.5 GB
        (known from an array or ``n_frames``).
    n_frames : int, optional
        Number of frames, when ``frames`` is a generator (for ``bigtiff``).

    Returns
    -------
    int
        Frames written.
    """
    p = Path(path)
    if isinstance(frames, np.ndarray):
        if frames.ndim != 3:
            raise ValueError("write_tiff_movie: frames must be a 3D array or an iterable of 2D arrays")
        n_frames = frames.shape[0]
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise ValueError("write_tiff_movie: no frames")
    first = np.asarray(first)
    if bigtiff is None:
        bigtiff = bool(n_frames) and first.nbytes * int(n_frames or 0) > 3.5e9
    tmp = p.with_name(f".{p.name}.tmp")
    n = 0
    try:
        with tifffile.TiffWriter(str(tmp), bigtiff=bigtiff) as tw:
            for frame in _chain(first, it):
                f = np.asarray(frame)
                if f.shape != first.shape or f.dtype != first.dtype:
                    raise ValueError(f"write_tiff_movie: frame {n} is {f.shape} {f.dtype}, expected {first.shape} {first.dtype}")
                tw.write(np.ascontiguousarray(f[::-1, :]), compression=compression, photometric="minisblack",
                         metadata=None, contiguous=False)
                n += 1
        if first.dtype.kind == "u":
            # tifffile leaves the default (unsigned) SampleFormat out; cisTEM refuses pages without it
            add_sample_format(tmp, SAMPLE_FORMAT["u"])
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def _first_directory_offset(path: Path) -> int | None:
    """Offset of a TIFF's first directory from its header, or None if the header is unreadable."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if len(head) < 8 or head[:2] not in (b"II", b"MM"):
        return None
    e = "<" if head[:2] == b"II" else ">"
    magic = struct.unpack(e + "H", head[2:4])[0]
    if magic == 42:
        return struct.unpack(e + "I", head[4:8])[0]
    if magic == 43 and len(head) >= 16:
        return struct.unpack(e + "Q", head[8:16])[0]
    return None


def _chain(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest


def write_mrc_movie(
    path: str | os.PathLike,
    frames: Iterable[np.ndarray] | np.ndarray,
    pixel_size: float,
    *,
    n_frames: int | None = None,
    dtype: np.dtype | type | None = None,
) -> int:
    """Write frames as an MRC stack without holding them all in memory.

    Parameters
    ----------
    path : path-like
        Output ``.mrc``/``.mrcs``.
    frames : 3D array or iterable of 2D arrays
        The frames; with a generator give ``n_frames``.
    pixel_size : float
        Pixel size in Å.
    n_frames : int, optional
        Number of frames (needed for a generator).
    dtype : numpy dtype, optional
        Stored type (int8, int16, uint16, float16, float32); default: the
        frames' type (MRC has no uint8 mode: uint8 frames are stored as
        uint16, mode 6, with a warning).

    Returns
    -------
    int
        Frames written.
    """
    if isinstance(frames, np.ndarray):
        n_frames = frames.shape[0]
    if not n_frames:
        frames = list(frames)
        n_frames = len(frames)
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise ValueError("write_mrc_movie: no frames")
    first = np.asarray(first)
    dt = np.dtype(dtype) if dtype is not None else first.dtype
    if dt == np.uint8:
        dt = np.dtype(np.uint16)  # MRC has no uint8 mode; uint16 (mode 6) holds every value
        warnings.warn("write_mrc_movie: uint8 frames stored as uint16 (MRC mode 6)", stacklevel=2)
    n = 0
    with MrcStackWriter(path, first.shape, int(n_frames), pixel_size, dtype=dt) as w:
        for frame in _chain(first, it):
            if n >= n_frames:
                raise ValueError(f"write_mrc_movie: more frames than n_frames={n_frames}")
            w.write(n, frame)
            n += 1
    if n != n_frames:
        raise ValueError(f"write_mrc_movie: got {n} frames, expected {n_frames}")
    return n

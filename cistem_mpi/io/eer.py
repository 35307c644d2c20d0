"""Thermo Fisher EER (Electron Event Representation) movies.

An EER file is a little-endian BigTIFF whose pages are detector frames, each
one strip compressed with code 65000 (8-bit run lengths), 65001 (7-bit) or
65002 (run-length and sub-pixel bit sizes in tags 65007/65008/65009).  The
strip is a bit stream read least-significant bit first: a run length of
``skip`` bits (the number of empty pixels in raster order), then - unless the
run is all ones, which means "run continues, no electron" and uses only the
run bits - ``horz + vert`` sub-pixel bits for the electron on the pixel the
run reached.  The next run starts on the pixel after the electron; the stream
ends when a run reaches the last pixel.  Sub-pixel values are stored XOR 2
(``0b10``) per axis, so the super-resolution position of an electron on
pixel ``px`` with stored value ``s`` is ``4 * px + (s ^ 2)``.

Reading uses ``imagecodecs.eer_decode`` (the maintained decoder tifffile
uses), one raw frame at a time, summing ``grouping`` raw frames into one
fraction (uint16 counts).  Rendering at 1x (physical pixels), 2x or 4x
super-resolution is ``imagecodecs``' ``superres`` level 0, 1 or 2.

Writing (for the simulator and tests) uses our own encoder of that bit
stream and a minimal BigTIFF writer (tifffile cannot write pre-encoded EER
strips).  Files written here decode identically with tifffile/imagecodecs.

Orientation: like cisTEM (``src/core/eer_file.cpp``) pixel row 0 of the
returned frame is the first row of the stream; EER frames are *not* flipped
(TIFF/DM images are; see :mod:`cistem_mpi.io.movies`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import warnings
from pathlib import Path
from typing import Iterable, Iterator
from xml.sax.saxutils import escape

import imagecodecs
import numba
import numpy as np
import tifffile

from cistem_mpi.errors import InputError

__all__ = [
    "EER_COMPRESSIONS",
    "EerMovie",
    "encode_eer_frame",
    "encode_eer_events",
    "write_eer",
    "write_eer_events",
    "tifffile_problems",
]

#: compression code -> (run-length bits, horizontal sub-pixel bits, vertical sub-pixel bits)
EER_COMPRESSIONS: dict[int, tuple[int, int, int]] = {65000: (8, 2, 2), 65001: (7, 2, 2), 65002: (7, 2, 2)}

_UPSAMPLING_LEVEL = {1: 0, 2: 1, 4: 2}


# --------------------------------------------------------------------------- tifffile's warnings


@contextlib.contextmanager
def tifffile_problems() -> Iterator[list[str]]:
    """Collect what tifffile logs (it logs, rather than raises, on broken files).

    Used by this module's EER reader and by :mod:`cistem_mpi.io.movies` (here, so that
    movies imports eer and not the other way round).

    Returns
    -------
    context manager yielding the list of messages (warnings and worse) logged inside it

    Examples
    --------
    >>> with tifffile_problems() as problems:
    ...     logging.getLogger("tifffile").warning("cut IFD")
    >>> problems
    ['cut IFD']
    """
    messages: list[str] = []

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                messages.append(record.getMessage())

    log = logging.getLogger("tifffile")
    handler = _Handler()
    log.addHandler(handler)
    old_propagate = log.propagate
    log.propagate = False  # we turn the problem into an InputError instead of printing it
    try:
        yield messages
    finally:
        log.removeHandler(handler)
        log.propagate = old_propagate


# --------------------------------------------------------------------------- encoding


def encode_eer_events(
    positions: np.ndarray,
    subpixels: np.ndarray,
    n_pixels: int,
    skip_bits: int = 7,
    horz_bits: int = 2,
    vert_bits: int = 2,
) -> bytes:
    """Encode one EER frame from electron positions.

    Parameters
    ----------
    positions : numpy.ndarray
        Linear pixel indices (``y * width + x``) of the electrons, each pixel
        at most once (EER cannot hold two events on one pixel in one frame).
    subpixels : numpy.ndarray
        Sub-pixel codes before the XOR, ``sx | (sy << horz_bits)`` with
        ``sx, sy`` in ``0 .. 2**bits - 1`` (super-resolution offsets).
    n_pixels : int
        Pixels in the frame (width * height).
    skip_bits, horz_bits, vert_bits : int
        Code layout (7, 2, 2 for compression 65001; 8, 2, 2 for 65000).

    Returns
    -------
    bytes
        The strip, padded with zeros to an even length (the decoder needs it).
    """
    pos = np.asarray(positions, dtype=np.int64).ravel()
    sub = np.asarray(subpixels, dtype=np.int64).ravel()
    if pos.shape != sub.shape:
        raise ValueError("encode_eer_events: positions and subpixels differ in length")
    order = np.argsort(pos, kind="stable")
    pos, sub = pos[order], sub[order]
    if pos.size and (pos[0] < 0 or pos[-1] >= n_pixels):
        raise ValueError("encode_eer_events: electron position outside the frame")
    if pos.size > 1 and np.any(np.diff(pos) == 0):
        raise ValueError("encode_eer_events: two electrons on one pixel in one frame (EER cannot store that)")
    maxrun = (1 << skip_bits) - 1
    sub_bits = horz_bits + vert_bits
    stored = (sub & ((1 << horz_bits) - 1)) ^ 2 | ((((sub >> horz_bits) & ((1 << vert_bits) - 1)) ^ 2) << horz_bits)

    # run of empty pixels before each electron, and the trailing run
    prev_end = np.concatenate(([0], pos[:-1] + 1)) if pos.size else np.zeros(0, np.int64)
    gaps = pos - prev_end
    trailing = n_pixels - (int(pos[-1]) + 1 if pos.size else 0)
    n_over = gaps // maxrun  # continuation codes before each electron
    rem = gaps - n_over * maxrun
    t_over, t_rem = divmod(trailing, maxrun)

    # one code per continuation, one per electron, then the tail
    counts = n_over + 1
    n_codes = int(counts.sum()) + t_over + 1
    values = np.full(n_codes, maxrun, dtype=np.int64)
    lengths = np.full(n_codes, skip_bits, dtype=np.int64)
    if pos.size:
        ends = np.cumsum(counts) - 1  # index of each electron's code
        values[ends] = rem | (stored << skip_bits)
        lengths[ends] = skip_bits + sub_bits
    # tail: t_over continuation codes (already maxrun) then the remainder run
    values[-1] = t_rem
    lengths[-1] = skip_bits + sub_bits

    # pad: a whole code of zeros after the end (never read) and even length
    total_bits = int(lengths.sum())
    n_bytes = (total_bits + 7) // 8
    n_bytes += 2 + (n_bytes % 2)
    return _pack_codes(values, lengths, n_bytes).tobytes()


@numba.njit(cache=True)
def _pack_codes(values: np.ndarray, lengths: np.ndarray, n_bytes: int) -> np.ndarray:
    """Concatenate variable-length codes into a little-endian bit stream."""
    out = np.zeros(n_bytes, dtype=np.uint8)
    acc = np.uint64(0)  # bits not yet flushed, least significant first
    n_acc = 0
    j = 0
    for k in range(values.shape[0]):
        acc |= np.uint64(values[k]) << np.uint64(n_acc)
        n_acc += lengths[k]
        while n_acc >= 8:
            out[j] = np.uint8(acc & np.uint64(0xFF))
            acc >>= np.uint64(8)
            n_acc -= 8
            j += 1
    if n_acc > 0:
        out[j] = np.uint8(acc & np.uint64(0xFF))
    return out


def encode_eer_frame(
    frame: np.ndarray,
    subpixels: np.ndarray | None = None,
    skip_bits: int = 7,
    horz_bits: int = 2,
    vert_bits: int = 2,
) -> bytes:
    """Encode a 0/1 count frame (one electron per marked pixel) as an EER strip.

    Parameters
    ----------
    frame : numpy.ndarray
        2D integer counts, each 0 or 1.
    subpixels : numpy.ndarray, optional
        Same shape, sub-pixel code ``sx | (sy << 2)`` of each electron;
        default 0 (the upper-left super-resolution cell).
    skip_bits, horz_bits, vert_bits : int
        Code layout.

    Returns
    -------
    bytes
    """
    f = np.asarray(frame)
    if f.ndim != 2:
        raise ValueError("encode_eer_frame: frame must be 2D")
    if f.size and (f.min() < 0 or f.max() > 1):
        raise ValueError(
            "encode_eer_frame: EER frames hold at most one electron per pixel; "
            "spread the dose over more raw frames"
        )
    pos = np.flatnonzero(f)
    sub = np.zeros(pos.size, np.int64) if subpixels is None else np.asarray(subpixels).ravel()[pos]
    return encode_eer_events(pos, sub, f.size, skip_bits, horz_bits, vert_bits)


# --------------------------------------------------------------------------- BigTIFF writer

_SHORT, _LONG, _UNDEFINED, _LONG8 = 3, 4, 7, 16
_TYPE_FMT = {_SHORT: "H", _LONG: "I", _UNDEFINED: "B", _LONG8: "Q"}


class _BigTiffWriter:
    """Minimal little-endian BigTIFF writer: one pre-encoded strip per page."""

    def __init__(self, path: Path):
        self._fh = open(path, "wb")
        self._fh.write(b"II" + struct.pack("<HHHQ", 43, 8, 0, 0))
        self._link_at = 8  # where the offset of the next IFD goes

    def add_page(self, strip: bytes, tags: list[tuple[int, int, object]]) -> None:
        fh = self._fh
        fh.seek(0, os.SEEK_END)
        data_off = fh.tell()
        fh.write(strip)
        if fh.tell() % 2:
            fh.write(b"\x00")
        entries = list(tags) + [(273, _LONG8, data_off), (279, _LONG8, len(strip))]
        entries.sort(key=lambda e: e[0])
        # payloads that do not fit the 8-byte value field go before the IFD
        packed = []
        for code, typ, value in entries:
            if typ == _UNDEFINED:
                raw = bytes(value)  # type: ignore[arg-type]
                count = len(raw)
            else:
                vals = value if isinstance(value, (list, tuple)) else [value]
                count = len(vals)
                raw = struct.pack("<" + _TYPE_FMT[typ] * count, *vals)
            if len(raw) > 8:
                off = fh.tell()
                fh.write(raw)
                if fh.tell() % 2:
                    fh.write(b"\x00")
                field = struct.pack("<Q", off)
            else:
                field = raw.ljust(8, b"\x00")
            packed.append(struct.pack("<HHQ", code, typ, count) + field)
        ifd_off = fh.tell()
        fh.write(struct.pack("<Q", len(packed)) + b"".join(packed))
        next_at = fh.tell()
        fh.write(struct.pack("<Q", 0))
        fh.seek(self._link_at)
        fh.write(struct.pack("<Q", ifd_off))
        self._link_at = next_at

    def close(self) -> None:
        self._fh.close()


def _metadata_xml(items: dict) -> bytes:
    lines = ["<metadata>"]
    for key, value in items.items():
        unit = None
        if isinstance(value, tuple):
            value, unit = value
        u = f' unit="{escape(str(unit))}"' if unit else ""
        lines.append(f'<item name="{escape(str(key))}"{u}>{escape(str(value))}</item>')
    lines.append("</metadata>")
    return "".join(lines).encode()


def write_eer_events(
    path: str | os.PathLike,
    shape: tuple[int, int],
    frames: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    compression: int = 65001,
    pixel_size: float | None = None,
    metadata: dict | None = None,
) -> int:
    """Write an EER movie from super-resolution electron positions.

    Parameters
    ----------
    path : path-like
        Output ``.eer`` file.
    shape : tuple[int, int]
        (height, width) of the sensor in physical pixels.
    frames : iterable of (x, y)
        Per raw frame, integer electron coordinates on the 4x
        super-resolution grid (0 .. 4*width-1, 0 .. 4*height-1).
    compression : int
        65001 (7-bit runs, default), 65000 (8-bit) or 65002 (7/2/2 with the
        bit sizes written as tags 65007-65009).
    pixel_size : float, optional
        Physical pixel size in Å, written as ``sensorPixelSize`` metadata.
    metadata : dict, optional
        Extra acquisition-metadata items (name -> value or (value, unit)).

    Returns
    -------
    int
        Number of frames written.
    """
    h, w = int(shape[0]), int(shape[1])
    skip, hb, vb = EER_COMPRESSIONS[compression]

    def encoded() -> Iterator[bytes]:
        for x, y in frames:
            x = np.asarray(x, dtype=np.int64)
            y = np.asarray(y, dtype=np.int64)
            if x.size and (x.min() < 0 or y.min() < 0 or x.max() >= 4 * w or y.max() >= 4 * h):
                raise ValueError("write_eer_events: electron outside the super-resolution grid")
            pos = (y >> 2) * w + (x >> 2)
            sub = (x & 3) | ((y & 3) << 2)
            yield encode_eer_events(pos, sub, w * h, skip, hb, vb)

    return _write_strips(Path(path), (h, w), encoded(), compression, pixel_size, metadata)


def write_eer(
    path: str | os.PathLike,
    frames: Iterable[np.ndarray],
    *,
    subpixels: Iterable[np.ndarray] | None = None,
    rng: np.random.Generator | int | None = None,
    compression: int = 65001,
    pixel_size: float | None = None,
    metadata: dict | None = None,
) -> int:
    """Write an EER movie from integer count frames (0/1 per pixel).

    Parameters
    ----------
    path : path-like
        Output ``.eer`` file.
    frames : iterable of 2D integer arrays
        Raw EER frames; each pixel holds 0 or 1 electrons (EER cannot store
        more; spread the dose over more raw frames).
    subpixels : iterable of 2D arrays, optional
        Per frame, the sub-pixel code ``sx | (sy << 2)`` (0..15) of each
        electron.  Default: drawn uniformly from ``rng`` (as real detectors
        spread electrons over the pixel).
    rng : numpy.random.Generator or int, optional
        Random generator or seed for the default sub-pixel positions.
    compression, pixel_size, metadata
        As for :func:`write_eer_events`.

    Returns
    -------
    int
        Number of frames written.
    """
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError("write_eer: no frames")
    shape = np.asarray(first).shape
    if len(shape) != 2:
        raise ValueError("write_eer: frames must be 2D")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    skip, hb, vb = EER_COMPRESSIONS[compression]
    sub_iter = iter(subpixels) if subpixels is not None else None

    def all_frames() -> Iterator[np.ndarray]:
        yield first
        yield from frames

    def encoded() -> Iterator[bytes]:
        for k, f in enumerate(all_frames()):
            f = np.asarray(f)
            if f.shape != shape:
                raise ValueError(f"write_eer: frame {k} has shape {f.shape}, expected {shape}")
            if sub_iter is not None:
                sub = next(sub_iter)
            else:
                sub = gen.integers(0, 16, size=shape, dtype=np.int64)
            yield encode_eer_frame(f, sub, skip, hb, vb)

    return _write_strips(Path(path), shape, encoded(), compression, pixel_size, metadata)


def _write_strips(
    path: Path,
    shape: tuple[int, int],
    strips: Iterator[bytes],
    compression: int,
    pixel_size: float | None,
    metadata: dict | None,
) -> int:
    if compression not in EER_COMPRESSIONS:
        raise ValueError(f"unknown EER compression {compression}")
    h, w = shape
    items: dict = {"sensorImageWidth": w, "sensorImageHeight": h}
    if pixel_size:
        items["sensorPixelSize.width"] = (float(pixel_size) * 1e-10, "m")
        items["sensorPixelSize.height"] = (float(pixel_size) * 1e-10, "m")
    items.update(metadata or {})
    skip, hb, vb = EER_COMPRESSIONS[compression]
    base = [(256, _LONG, w), (257, _LONG, h), (259, _SHORT, compression), (262, _SHORT, 1),
            (277, _SHORT, 1), (278, _LONG, h)]
    if compression == 65002:
        base += [(65007, _SHORT, skip), (65008, _SHORT, hb), (65009, _SHORT, vb)]
    tmp = path.with_name(f".{path.name}.tmp")
    writer = _BigTiffWriter(tmp)
    n = 0
    try:
        for strip in strips:
            tags = list(base)
            if n == 0:
                tags.append((65001, _UNDEFINED, _metadata_xml(items)))
            writer.add_page(strip, tags)
            n += 1
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return n


# --------------------------------------------------------------------------- reading


class EerMovie:
    """An EER movie read lazily: one fraction (group of raw frames) at a time.

    Parameters
    ----------
    path : path-like
        The ``.eer`` file.
    fractions : int, optional
        Number of fractions to group the raw frames into (raw frames per
        fraction = n_raw // fractions; left-over raw frames at the end are
        dropped with a warning, as RELION does).
    grouping : int, optional
        Raw frames per fraction (alternative to ``fractions``).  Default 1
        when neither is given.
    upsampling : int
        1 (physical pixels), 2 or 4 (super-resolution rendering).
    pixel_size : float, optional
        Physical pixel size in Å (overrides the metadata).

    Notes
    -----
    ``movie[i]`` is a uint16 array of electron counts.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fractions: int | None = None,
        grouping: int | None = None,
        upsampling: int = 1,
        pixel_size: float | None = None,
    ):
        self.path = Path(path)
        if upsampling not in _UPSAMPLING_LEVEL:
            raise InputError("--eer-upsampling", f"must be 1, 2 or 4, got {upsampling}")
        self.upsampling = int(upsampling)
        try:
            self._tif = tifffile.TiffFile(str(self.path))
        except (tifffile.TiffFileError, ValueError, OSError, struct.error) as exc:
            raise InputError(self.path, f"cannot read as EER/TIFF: {exc}") from None
        try:
            self._scan()
        except BaseException:
            self._tif.close()
            raise
        n_raw = len(self._frames)
        if fractions is not None and grouping is not None:
            raise ValueError("give eer fractions or grouping, not both")
        if fractions is not None:
            if not 1 <= fractions <= n_raw:
                raise InputError(self.path, f"cannot group {n_raw} raw EER frames into {fractions} fractions")
            grouping = n_raw // int(fractions)
            self._n = int(fractions)
        else:
            grouping = int(grouping or 1)
            if not 1 <= grouping <= n_raw:
                raise InputError(self.path, f"EER grouping {grouping} out of range for {n_raw} raw frames")
            self._n = n_raw // grouping
        self.grouping = grouping
        dropped = n_raw - self._n * grouping
        if dropped:
            warnings.warn(
                f"{self.path}: {n_raw} raw EER frames do not divide into groups of {grouping}; "
                f"the last {dropped} raw frames are not used",
                stacklevel=2,
            )
        meta = self.metadata
        ps = meta.get("sensorPixelSize.width")
        file_ps = float(ps) * 1e10 if isinstance(ps, (int, float)) and ps else None
        phys = float(pixel_size) if pixel_size else file_ps
        self.physical_pixel_size = phys
        self.pixel_size = phys / self.upsampling if phys else None

    def _scan(self) -> None:
        tif = self._tif
        size = self.path.stat().st_size
        frames = []
        with tifffile_problems() as problems:
            try:
                page_list = list(tif.pages)
            except Exception as exc:  # noqa: BLE001 - tifffile raises on a cut IFD
                raise InputError(self.path, f"truncated or corrupt EER: {exc}") from None
        if problems:
            raise InputError(self.path, f"truncated or corrupt EER after {len(page_list)} frames: {problems[0]}")
        for page in page_list:
            comp = int(page.compression)
            if comp not in EER_COMPRESSIONS:
                continue  # e.g. an integrated image page
            if comp == 65002:
                tags = page.tags
                bits = (int(tags.valueof(65007, 7)), int(tags.valueof(65008, 2)), int(tags.valueof(65009, 2)))
            else:
                bits = EER_COMPRESSIONS[comp]
            shape = (int(page.imagelength), int(page.imagewidth))
            offs, counts = tuple(page.dataoffsets), tuple(page.databytecounts)
            if offs and offs[-1] + counts[-1] > size:
                raise InputError(
                    self.path,
                    f"truncated EER: frame {len(frames)} data end at byte {offs[-1] + counts[-1]} "
                    f"but the file has {size} bytes",
                )
            frames.append((shape, bits, offs, counts, int(page.rowsperstrip or shape[0])))
        if not frames:
            raise InputError(self.path, "no EER-compressed frames (compression 65000/65001/65002) found")
        shapes = {f[0] for f in frames}
        if len(shapes) > 1:
            raise InputError(self.path, f"EER frames differ in size: {sorted(shapes)}")
        self._frames = frames
        self._raw_shape = frames[0][0]
        meta: dict = {}
        try:
            first = tif.pages.first
            raw = first.tags.valueof(65001)
            if raw is not None:
                text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
                start = text.find("<metadata")
                if start >= 0:
                    meta = tifffile.tifffile.eer_xml_metadata(text[start:])
        except Exception:  # noqa: BLE001 - metadata is optional
            meta = {}
        self.metadata = meta

    @property
    def n_raw_frames(self) -> int:
        """Raw EER frames in the file."""
        return len(self._frames)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(fractions, ny, nx) after upsampling."""
        h, w = self._raw_shape
        return (self._n, h * self.upsampling, w * self.upsampling)

    @property
    def dtype(self) -> np.dtype:
        """uint16 electron counts."""
        return np.dtype(np.uint16)

    def __len__(self) -> int:
        return self._n

    def _decode_into(self, k: int, out: np.ndarray) -> None:
        shape, (skip, hb, vb), offs, counts, rows = self._frames[k]
        level = _UPSAMPLING_LEVEL[self.upsampling]
        fh = self._tif.filehandle
        up = self.upsampling
        h, w = shape
        for s, (off, cnt) in enumerate(zip(offs, counts)):
            fh.seek(off)
            data = fh.read(cnt)
            if len(data) % 2:
                data += b"\x00"
            r0 = s * rows
            r1 = min(h, r0 + rows)
            target = out[r0 * up : r1 * up]
            try:
                imagecodecs.eer_decode(data, target.shape, skip, hb, vb, superres=level, out=target)
            except Exception as exc:  # noqa: BLE001 - codec errors become input errors
                raise InputError(self.path, f"EER frame {k} cannot be decoded: {exc}") from None

    def __getitem__(self, i: int) -> np.ndarray:
        n = self._n
        i = int(i)
        if i < -n or i >= n:
            raise IndexError(f"{self.path}: fraction {i} out of range ({n} fractions)")
        i %= n
        out = np.zeros(self.shape[1:], dtype=np.uint16)
        for k in range(i * self.grouping, (i + 1) * self.grouping):
            self._decode_into(k, out)  # the decoder adds into ``out``
        return out

    def raw_frame(self, k: int) -> np.ndarray:
        """One raw EER frame (uint16 counts, at the movie's upsampling)."""
        out = np.zeros(self.shape[1:], dtype=np.uint16)
        self._decode_into(int(k), out)
        return out

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    def close(self) -> None:
        """Close the file."""
        if self._tif is not None:
            self._tif.close()
            self._tif = None

    def __enter__(self) -> "EerMovie":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

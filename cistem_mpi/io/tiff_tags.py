"""Adding a tag to every page of a written TIFF without rewriting its image data.

Why this exists: tifffile leaves out ``SampleFormat`` (tag 339) for unsigned
integers, because the TIFF standard makes 1 (unsigned integer) the default,
and it refuses to write that tag itself.  cisTEM's TIFF reader does not apply
the default: it stops with "Unsupported sample format: 0" on such movies.  So
after tifffile has written a movie, :func:`add_sample_format` gives every page
an explicit ``SampleFormat``.

Each page's IFD (directory) is copied, with the new entry in tag order, to the
end of the file, and the pointer to it (the header's, or the previous
directory's "next" field) is moved to the copy.  Strip data and every tag
value stored by offset stay where they are, so the cost is a few hundred bytes
per page, whatever the movie's size.  Classic and BigTIFF, either byte order.
"""

from __future__ import annotations

import os
import struct

__all__ = ["add_sample_format", "SAMPLE_FORMAT"]

#: TIFF SampleFormat values by numpy dtype kind.
SAMPLE_FORMAT = {"u": 1, "i": 2, "f": 3}
_TAG = 339
_SHORT = 3


def _layout(head: bytes) -> tuple[str, bool]:
    """(struct byte-order character, is BigTIFF) from the first 8 bytes."""
    if head[:2] == b"II":
        e = "<"
    elif head[:2] == b"MM":
        e = ">"
    else:
        raise ValueError("not a TIFF file")
    magic = struct.unpack(e + "H", head[2:4])[0]
    if magic not in (42, 43):
        raise ValueError(f"not a TIFF file (magic {magic})")
    return e, magic == 43


def add_sample_format(path: str | os.PathLike, value: int = 1) -> int:
    """Give every page of a TIFF an explicit SampleFormat tag, in place.

    Pages that already have the tag are left as they are.

    Parameters
    ----------
    path : path-like
        The TIFF file (written and closed).
    value : int
        SampleFormat: 1 unsigned integer (default), 2 signed integer, 3 IEEE float.

    Returns
    -------
    int
        Pages that were given the tag.

    >>> import numpy as np, tifffile, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "m.tif")
    >>> tifffile.imwrite(p, np.zeros((2, 8, 8), np.uint8))
    >>> add_sample_format(p)
    2
    >>> with tifffile.TiffFile(p) as tf:
    ...     [page.tags["SampleFormat"].value for page in tf.pages]
    [<SAMPLEFORMAT.UINT: 1>, <SAMPLEFORMAT.UINT: 1>]
    """
    added = 0
    with open(path, "r+b") as fh:
        e, big = _layout(fh.read(8))
        count_fmt, off_fmt, entry_size = ("Q", "Q", 20) if big else ("H", "I", 12)
        off_size = struct.calcsize(off_fmt)
        count_size = struct.calcsize(count_fmt)
        pointer_at = 8 if big else 4  # where the pointer to the current IFD is stored
        fh.seek(pointer_at)
        ifd = struct.unpack(e + off_fmt, fh.read(off_size))[0]
        seen: set[int] = set()
        while ifd:
            if ifd in seen:
                raise ValueError(f"{path}: TIFF directory loop at offset {ifd}")
            seen.add(ifd)
            fh.seek(ifd)
            n = struct.unpack(e + count_fmt, fh.read(count_size))[0]
            raw = fh.read(n * entry_size)
            nxt_at = ifd + count_size + n * entry_size
            nxt = struct.unpack(e + off_fmt, fh.read(off_size))[0]
            entries = [raw[k * entry_size:(k + 1) * entry_size] for k in range(n)]
            tags = [struct.unpack(e + "H", x[:2])[0] for x in entries]
            if _TAG not in tags:
                value_field = struct.pack(e + "H", value).ljust(off_size, b"\x00")
                head = struct.pack(e + "HH" + ("Q" if big else "I"), _TAG, _SHORT, 1)
                entries.append(head + value_field)
                entries.sort(key=lambda x: struct.unpack(e + "H", x[:2])[0])
                fh.seek(0, os.SEEK_END)
                end = fh.tell()
                if end % 2:  # IFDs start on a word boundary
                    fh.write(b"\x00")
                    end += 1
                fh.write(struct.pack(e + count_fmt, len(entries)) + b"".join(entries) + struct.pack(e + off_fmt, nxt))
                fh.seek(pointer_at)
                fh.write(struct.pack(e + off_fmt, end))
                nxt_at = end + count_size + len(entries) * entry_size
                added += 1
            pointer_at, ifd = nxt_at, nxt
    return added

"""Particle pick coordinates written by other programs.

:func:`read_coordinates` reads one file and returns one
:class:`PickedParticles` per micrograph it describes.  Formats, told apart by
content first and extension second:

===========================  ================================================
format                       how it is read
===========================  ================================================
RELION coordinate STAR       a table with ``_rlnCoordinateX/Y`` (autopick,
(per micrograph)             manual pick; unnamed or named block); score from
                             ``_rlnAutopickFigureOfMerit``; micrograph "".
RELION particle STAR         a table with ``_rlnMicrographName`` +
(1.x/3.0, 3.1+ any order)    ``_rlnCoordinateX/Y``: one entry per micrograph
                             name, in order of first appearance.
RELION coordinate list       ``data_coordinate_files`` (``_rlnMicrographName``
(``autopick.star``)          + ``_rlnMicrographCoordinates``): every listed file
                             is read; a relative path is looked up in the
                             current directory (the RELION project) first,
                             then beside the list file.
EMAN / crYOLO ``.box``       whitespace columns x y w h, (x, y) the box's
                             lower-left corner: centre (x + w/2, y + h/2), no
                             y flip (as RELION's and cisTEM's importers do).
plain text (anything else)   ``#`` comments; whitespace- or comma-separated;
                             columns 1 and 2 are the centre x y in pixels,
                             further columns are ignored (cistem-mpi's
                             simulator writes ``# x_px y_px psi theta phi``).
===========================  ================================================

Coordinates are pixels of the micrograph with 0 = the first pixel, the
convention of RELION and cisTEM: RELION extracts a box whose centre index
``n//2`` is pixel ``int(rlnCoordinateX)`` of the 0-based micrograph.  A
particle STAR's coordinates are returned as written (``_rlnOrigin*`` shifts
are not applied).

A file with a header but no rows (a micrograph without picks) gives one
entry with no particles (a particle STAR without rows gives none: it names no
micrograph); an empty file, or one with no coordinates at all, is an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cistem_mpi.errors import InputError
from cistem_mpi.io.star.common import column, float_column, looks_like_star, read_text_file, star_tables

__all__ = ["PickedParticles", "read_coordinates"]

_FOM_LABEL = "rlnAutopickFigureOfMerit"
_CTFFIND_MARKERS = ("output from ctffind", "columns: #1 - micrograph number")


@dataclass
class PickedParticles:
    """Picks of one micrograph.

    Attributes
    ----------
    micrograph : str
        Micrograph name as the file gives it (RELION ``_rlnMicrographName``);
        "" when the file is per-micrograph and names none.
    x, y : numpy.ndarray
        float64 (n,), particle centre in pixels, 0 = the first pixel.
    score : numpy.ndarray
        float64 (n,), figure of merit (``_rlnAutopickFigureOfMerit``); NaN
        where the file has none.
    source : pathlib.Path
        The file the rows came from.
    """

    micrograph: str
    x: np.ndarray
    y: np.ndarray
    score: np.ndarray
    source: Path

    def __len__(self) -> int:
        return int(self.x.shape[0])


def read_coordinates(path: str | os.PathLike) -> list[PickedParticles]:
    """Read particle coordinates written by RELION, EMAN, crYOLO or as plain text.

    Parameters
    ----------
    path : path-like
        A RELION coordinate, particle or coordinate-list STAR file, an EMAN /
        crYOLO ``.box`` file, or a plain text file of centres (see the module
        docstring for each layout).

    Returns
    -------
    list of PickedParticles
        One per micrograph, in file order (a coordinate list: list order).

    Raises
    ------
    InputError
        The file is missing, empty, binary, not a coordinate file, lacks a
        coordinate column, has text in a number field, a ``.box`` row with
        fewer than 4 columns, or (coordinate list) a listed file is missing.
    """
    return _read_any(Path(path), allow_list=True)


# --------------------------------------------------------------------------- dispatch


def _read_any(p: Path, *, allow_list: bool) -> list[PickedParticles]:
    text = read_text_file(p)
    if looks_like_star(text) or p.suffix.lower() == ".star":
        return _read_star(p, allow_list=allow_list)
    if p.suffix.lower() == ".box":
        return [_read_box(p, text)]
    return [_read_plain(p, text)]


# --------------------------------------------------------------------------- STAR


def _block_list(tables: dict[str, pd.DataFrame]) -> str:
    return ", ".join(f"data_{k}" for k in tables) or "none"


def _read_star(p: Path, *, allow_list: bool) -> list[PickedParticles]:
    tables = star_tables(p)
    listing = [k for k, v in tables.items() if "rlnMicrographCoordinates" in v.columns]
    if listing:
        if not allow_list:
            raise InputError(p, "is itself a list of coordinate files (_rlnMicrographCoordinates); "
                                "lists inside lists are not supported")
        return _read_list(p, tables[listing[0]])
    with_xy = {k: v for k, v in tables.items()
               if k != "optics" and {"rlnCoordinateX", "rlnCoordinateY"} <= set(v.columns)}
    if not with_xy:
        for v in tables.values():
            for have, lack in (("rlnCoordinateX", "rlnCoordinateY"), ("rlnCoordinateY", "rlnCoordinateX")):
                if have in v.columns and lack not in v.columns:
                    raise InputError(p, f"column _{lack} missing (the file has _{have})")
        raise InputError(p, "not a coordinate file: no table with _rlnCoordinateX and _rlnCoordinateY "
                            f"(blocks: {_block_list(tables)})")
    name = "particles" if "particles" in with_xy else next(iter(with_xy))
    table = with_xy[name]
    x = column(table, "rlnCoordinateX", p)
    y = column(table, "rlnCoordinateY", p)
    score = float_column(table, _FOM_LABEL, p) if _FOM_LABEL in table.columns else np.full(len(x), np.nan)

    if "rlnMicrographName" not in table.columns:
        if "rlnImageName" in table.columns:
            # a particle file of unknown micrographs: lumping them together would be wrong
            raise InputError(p, "particle STAR has _rlnCoordinateX/Y but no _rlnMicrographName; "
                                "cannot tell which micrograph each particle is in")
        return [PickedParticles("", x, y, score, p)]

    names = table["rlnMicrographName"].astype(str).to_numpy()
    codes, uniques = pd.factorize(names, sort=False)  # codes number names by first appearance
    order = np.argsort(codes, kind="stable")
    bounds = np.cumsum(np.bincount(codes, minlength=len(uniques)))[:-1]
    return [PickedParticles(str(mic), x[idx], y[idx], score[idx], p)
            for mic, idx in zip(uniques, np.split(order, bounds))]


def _read_list(p: Path, table: pd.DataFrame) -> list[PickedParticles]:
    if "rlnMicrographName" not in table.columns:
        raise InputError(p, "coordinate list has _rlnMicrographCoordinates but no _rlnMicrographName")
    names = table["rlnMicrographName"].astype(str).tolist()
    files = table["rlnMicrographCoordinates"].astype(str).tolist()
    out: list[PickedParticles] = []
    for mic, f in zip(names, files):
        listed = Path(f)
        candidates = [listed] if listed.is_absolute() else [Path.cwd() / listed, p.parent / listed]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            where = "" if listed.is_absolute() else f" (looked in {Path.cwd()} and {p.parent})"
            raise InputError(p, f"listed coordinate file {f} not found{where}")
        source = found
        picks = _read_any(source, allow_list=False)
        if len(picks) != 1:
            raise InputError(source, f"holds picks of {len(picks)} micrographs; a file listed in {p} "
                                     f"must hold the picks of one micrograph ({mic})")
        pk = picks[0]
        out.append(PickedParticles(mic, pk.x, pk.y, pk.score, source))
    return out


# --------------------------------------------------------------------------- text formats


def _data_lines(text: str):
    """(line number, content without comment) of the lines that hold data."""
    for i, line in enumerate(text.splitlines(), start=1):
        s = line.split("#", 1)[0].strip()
        if s:
            yield i, s


def _number(tok: str, p: Path, line: int, what: str) -> float:
    try:
        return float(tok)
    except ValueError:
        raise InputError(p, f"line {line}: {what} '{tok}' is not a number") from None


def _finite(v: float, p: Path, line: int, what: str) -> float:
    if not np.isfinite(v):
        raise InputError(p, f"line {line}: {what} is {v}, not a finite number")
    return v


def _read_box(p: Path, text: str) -> PickedParticles:
    xs, ys = [], []
    for i, s in _data_lines(text):
        tok = s.split()
        if len(tok) < 4:
            raise InputError(p, f"line {i} has {len(tok)} column(s); a .box file has x y width height")
        x0, y0, w, h = (_finite(_number(t, p, i, n), p, i, n) for t, n in zip(tok[:4], ("x", "y", "width", "height")))
        # EMAN boxes give the lower-left corner; the centre is half a box further
        xs.append(x0 + w / 2.0)
        ys.append(y0 + h / 2.0)
    x = np.asarray(xs, dtype=np.float64)
    return PickedParticles("", x, np.asarray(ys, dtype=np.float64), np.full(len(x), np.nan), p)


def _read_plain(p: Path, text: str) -> PickedParticles:
    for line in text.splitlines():
        low = line.strip().lower()
        if low.startswith("#") and any(m in low for m in _CTFFIND_MARKERS):
            raise InputError(p, "is a CTFFIND output (CTF estimates), not particle coordinates")
    xs, ys = [], []
    for i, s in _data_lines(text):
        tok = [t.strip() for t in s.split(",")] if "," in s else s.split()
        if len(tok) < 2 or not tok[0] or not tok[1]:
            raise InputError(p, f"line {i} does not start with two coordinates (x y): '{s}'")
        xs.append(_finite(_number(tok[0], p, i, "x"), p, i, "x"))
        ys.append(_finite(_number(tok[1], p, i, "y"), p, i, "y"))
    x = np.asarray(xs, dtype=np.float64)
    return PickedParticles("", x, np.asarray(ys, dtype=np.float64), np.full(len(x), np.nan), p)

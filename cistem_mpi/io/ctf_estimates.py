"""Per-micrograph CTF estimates written by other programs.

:func:`read_ctf_estimates` reads RELION's ``micrographs_ctf.star`` and
CTFFIND4/5's text output, told apart by content (a STAR file opens a
``data_`` block).  Units are cisTEM's (the ``.par`` columns'):

==================  ======================  =================================
ours                RELION                  CTFFIND ``.txt`` column
==================  ======================  =================================
df1, df2 (Å)        rlnDefocusU, V          #2 defocus 1, #3 defocus 2
angast (deg)        rlnDefocusAngle (0 if   #4 azimuth of astigmatism
                    absent, as RELION)
pshift (rad)        rlnPhaseShift (deg)     #5 additional phase shift (rad)
                    * pi / 180; 0 if absent
fit_resolution (Å)  rlnCtfMaxResolution     #7 spacing up to which CTF rings
                                            were fit successfully
score               rlnCtfFigureOfMerit     #6 cross correlation
==================  ======================  =================================

``fit_resolution`` and ``score`` are NaN when the file has no such column;
values the file writes as ``inf``/``nan`` are kept.

RELION: the 3.0 single table or 3.1+ ``data_optics`` + ``data_micrographs``
(either order); one estimate per row, named by ``_rlnMicrographName``.

CTFFIND (``ctffind.cpp``: ``NumericTextFile`` with ``#`` comment lines)::

    # Output from CTFFind version 4.1.14, run on 2023-02-02 15:13:07
    # Input file: mic.mrc ; Number of micrographs: 1
    # Pixel size: ... ; acceleration voltage: ... ; ...
    # Box size: ... ; min. res.: ... ; ...
    # Columns: #1 - micrograph number; #2 - defocus 1 [Angstroms]; ... #7 - spacing ...
    1.000000 10295.926758 10012.275391 -38.856349 0.000000 0.030650 5.279412

CTFFIND5 appends columns (#8 tilt axis angle, #9 tilt angle, #10 sample
thickness ...); only the first 7 are read.  The micrograph name is the file
name of the ``Input file`` path ("" when the header has none).  An input
stack of several micrographs gives one row per micrograph; every estimate
then carries the same name, in row order (row ``k`` is micrograph ``k`` of
the stack).  The ``_avrot`` file (1D rotational averages) is not an
estimate file and is refused.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cistem_mpi.errors import InputError
from cistem_mpi.io.star.common import column, float_column, looks_like_star, read_text_file, star_tables

__all__ = ["CtfEstimate", "read_ctf_estimates", "write_relion_ctf_star"]

_INPUT_FILE_RE = re.compile(r"^#\s*Input file:\s*(.*?)\s*(?:;\s*Number of micrographs:\s*(\d+)\s*)?$", re.IGNORECASE)
_CTFFIND_COLUMNS = 7


@dataclass
class CtfEstimate:
    """The CTF fit of one micrograph.

    Attributes
    ----------
    micrograph : str
        Name as the file gives it ("" when a CTFFIND file names none).
    df1, df2 : float
        Defocus 1 and 2 in Å (RELION DefocusU/V).
    angast : float
        Astigmatism angle in degrees.
    pshift : float
        Additional phase shift in radians.
    fit_resolution : float
        Resolution (Å) up to which the CTF rings were fit; NaN if absent.
    score : float
        Fit figure of merit (CTFFIND cross correlation); NaN if absent.
    source : pathlib.Path
        The file the estimate came from.
    """

    micrograph: str
    df1: float
    df2: float
    angast: float
    pshift: float
    fit_resolution: float
    score: float
    source: Path


def read_ctf_estimates(path: str | os.PathLike) -> list[CtfEstimate]:
    """Read CTF estimates from a RELION ``micrographs_ctf.star`` or a CTFFIND ``.txt``.

    Parameters
    ----------
    path : path-like
        RELION micrographs STAR (3.0 or 3.1+) or CTFFIND4/5 text output.

    Returns
    -------
    list of CtfEstimate
        One per row of the file, in file order.

    Raises
    ------
    InputError
        Missing or empty file, missing defocus (or micrograph name) columns,
        text in a number field, no data rows, a particle STAR or a CTFFIND
        ``_avrot`` file given instead.
    """
    p = Path(path)
    text = read_text_file(p, "CTF estimate file", "CTF estimates")
    if looks_like_star(text) or p.suffix.lower() == ".star":
        return _read_star(p)
    return _read_ctffind(p, text)


# --------------------------------------------------------------------------- RELION


def _read_star(p: Path) -> list[CtfEstimate]:
    tables = {k: v for k, v in star_tables(p).items() if k != "optics"}
    with_ctf = {k: v for k, v in tables.items() if {"rlnDefocusU", "rlnDefocusV"} & set(v.columns)}
    if not with_ctf:
        blocks = ", ".join(f"data_{k}" for k in tables) or "none"
        raise InputError(p, f"not a CTF estimate file: no _rlnDefocusU/_rlnDefocusV columns (blocks: {blocks})")
    name = "micrographs" if "micrographs" in with_ctf else next(iter(with_ctf))
    table = with_ctf[name]
    if "rlnImageName" in table.columns:
        # per-particle CTF (possibly refined per particle) is not a per-micrograph estimate
        raise InputError(p, "is a particle STAR (_rlnImageName), not per-micrograph CTF estimates "
                            "(RELION micrographs_ctf.star)")
    for label in ("rlnMicrographName", "rlnDefocusU", "rlnDefocusV"):
        if label not in table.columns:
            raise InputError(p, f"column _{label} missing in data_{name}")
    n = len(table)
    if n == 0:
        raise InputError(p, f"no data rows in data_{name}")
    names = table["rlnMicrographName"].astype(str).tolist()
    df1 = column(table, "rlnDefocusU", p)
    df2 = column(table, "rlnDefocusV", p)
    ang = column(table, "rlnDefocusAngle", p)
    ang = np.zeros(n) if ang is None else ang
    ph = column(table, "rlnPhaseShift", p)
    pshift = np.zeros(n) if ph is None else np.deg2rad(ph)
    res = float_column(table, "rlnCtfMaxResolution", p) if "rlnCtfMaxResolution" in table.columns \
        else np.full(n, np.nan)
    fom = float_column(table, "rlnCtfFigureOfMerit", p) if "rlnCtfFigureOfMerit" in table.columns \
        else np.full(n, np.nan)
    return [CtfEstimate(names[i], float(df1[i]), float(df2[i]), float(ang[i]), float(pshift[i]),
                        float(res[i]), float(fom[i]), p) for i in range(n)]


# --------------------------------------------------------------------------- CTFFIND


def _read_ctffind(p: Path, text: str) -> list[CtfEstimate]:
    name = ""
    declared: int | None = None
    rows: list[tuple[int, list[str]]] = []
    for i, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s:
            continue
        if s.startswith("#"):
            if "lines per micrograph" in s.lower():
                raise InputError(p, "is a CTFFIND _avrot file (1D rotational averages); "
                                    "give the CTFFIND .txt output without _avrot")
            m = _INPUT_FILE_RE.match(s)
            if m:
                # the name only: the path is where CTFFIND ran, not where the project keeps it
                name = Path(m.group(1)).name
                declared = int(m.group(2)) if m.group(2) else None
            continue
        rows.append((i, s.split()))
    if not rows:
        raise InputError(p, "no data rows (CTFFIND output has one row of numbers per micrograph)")
    if declared is not None and declared != len(rows):
        raise InputError(p, f"header says {declared} micrograph(s) but the file has {len(rows)} data row(s) "
                            "(incomplete CTFFIND run?)")
    out = []
    labels = ("micrograph number", "defocus 1", "defocus 2", "azimuth of astigmatism",
              "additional phase shift", "cross correlation", "fit resolution")
    for i, tok in rows:
        if len(tok) < _CTFFIND_COLUMNS:
            raise InputError(p, f"line {i} has {len(tok)} column(s); CTFFIND rows have at least "
                                f"{_CTFFIND_COLUMNS} (number, defocus 1, defocus 2, azimuth, phase shift, "
                                "cross correlation, resolution)")
        v = []
        for t, what in zip(tok[:_CTFFIND_COLUMNS], labels):
            try:
                v.append(float(t))
            except ValueError:
                raise InputError(p, f"line {i}: {what} '{t}' is not a number") from None
        for k in range(1, 5):
            if not math.isfinite(v[k]):
                raise InputError(p, f"line {i}: {labels[k]} is {tok[k]}, not a finite number")
        out.append(CtfEstimate(name, v[1], v[2], v[3], v[4], v[6], v[5], p))
    return out


def write_relion_ctf_star(path: str | os.PathLike, micrographs: list[str], df1, df2, angast, pshift,
                          pixel_size: float, voltage: float, cs: float, amplitude_contrast: float) -> None:
    """Write per-micrograph CTF values as RELION 3.1+ ``micrographs_ctf.star`` (optics + micrographs).

    Parameters
    ----------
    path : output file
    micrographs : micrograph file names (``rlnMicrographName``)
    df1, df2 : defocus in Å; angast : astigmatism angle in degrees
    pshift : phase shift in radians (written in degrees, as RELION does)
    pixel_size, voltage, cs, amplitude_contrast : the one optics group
    """
    import pandas as pd
    import starfile

    optics = pd.DataFrame({
        "rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
        "rlnMicrographOriginalPixelSize": [float(pixel_size)], "rlnVoltage": [float(voltage)],
        "rlnSphericalAberration": [float(cs)], "rlnAmplitudeContrast": [float(amplitude_contrast)],
        "rlnMicrographPixelSize": [float(pixel_size)]})
    df1, df2 = np.asarray(df1, np.float64), np.asarray(df2, np.float64)
    table = pd.DataFrame({
        "rlnMicrographName": [str(m) for m in micrographs], "rlnOpticsGroup": 1,
        "rlnDefocusU": df1, "rlnDefocusV": df2, "rlnCtfAstigmatism": np.abs(df1 - df2),
        "rlnDefocusAngle": np.asarray(angast, np.float64),
        "rlnPhaseShift": np.degrees(np.asarray(pshift, np.float64))})
    starfile.write({"optics": optics, "micrographs": table}, path, overwrite=True)

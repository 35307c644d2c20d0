"""Frealign X ``.par`` parameter files (SPEC §4).

Layouts read (lines whose first non-blank character is ``C`` are comments):

* 17 columns, cisTEM / Frealign X: ``C PSI THETA PHI SHX SHY MAG FILM DF1
  DF2 ANGAST PSHIFT OCC LogP SIGMA SCORE CHANGE``;
* 16 columns, Frealign 9 (no PSHIFT): read with PSHIFT = 0, as cisTEM does;
* 13 columns, Frealign 8 ``... ANGAST PRESA DPRES``: PRESA -> SCORE,
  DPRES -> CHANGE; OCC 100, SIGMA 1, LogP 0;
* 12 columns, the older ``... ANGAST CCMax`` layout (e.g. FreeHand's
  files): CCMax -> SCORE; OCC 100, SIGMA 1, LogP 0.

Values are taken as written (SHX/SHY in Å for Frealign 9 and later; older
programs may have written pixels - the file does not say).

Writing uses cisTEM's C format (``FrealignParameterFile::WriteLine``) and its
header comment, so files are byte-compatible with cisTEM's.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from cistem_mpi.errors import InputError
from cistem_mpi.io.params import PAR_COLUMNS, PARAM_DTYPE, empty_params

__all__ = ["read_par", "write_par", "format_par_line", "PAR_HEADER", "PAR_FORMAT"]

#: cisTEM's header comment line (``refinement_package.cpp`` / classification export).
PAR_HEADER = (
    "C           PSI   THETA     PHI       SHX       SHY     MAG  FILM      DF1      DF2  ANGAST"
    "  PSHIFT     OCC      LogP      SIGMA   SCORE  CHANGE"
)
#: cisTEM's data line format.
PAR_FORMAT = (
    "%7i %7.2f %7.2f %7.2f %9.2f %9.2f %7.0f %5i %8.1f %8.1f %7.2f %7.2f %7.2f %9i %10.4f %7.2f %7.2f"
)

#: file column index -> our column, per layout
_LAYOUTS: dict[int, tuple[str, ...]] = {
    17: PAR_COLUMNS,
    16: tuple(c for c in PAR_COLUMNS if c != "pshift"),
    13: ("position", "psi", "theta", "phi", "shx", "shy", "mag", "film", "df1", "df2", "angast", "score", "change"),
    12: ("position", "psi", "theta", "phi", "shx", "shy", "mag", "film", "df1", "df2", "angast", "score"),
}
_HEADER_NAMES = {17: PAR_COLUMNS, 16: _LAYOUTS[16], 13: _LAYOUTS[12][:-1] + ("presa", "dpres"),
                 12: _LAYOUTS[12][:-1] + ("ccmax",)}


def _is_comment(line: str) -> bool:
    s = line.lstrip()
    return not s or s[0] in "Cc"


def read_par(path: str | os.PathLike, *, exclude_negative_film: bool = False) -> np.ndarray:
    """Read a Frealign ``.par`` file into a :data:`PARAM_DTYPE` array.

    Parameters
    ----------
    path : path-like
        The file.
    exclude_negative_film : bool
        Drop particles whose FILM is negative (excluded), as cisTEM does when
        asked; by default they are kept (FILM stays negative).

    Returns
    -------
    numpy.ndarray
        Structured array, one row per data line.

    Raises
    ------
    InputError
        Missing file, no data line, a column count other than 17/16/13/12 or
        differing between lines, text or NaN/inf in a number field, or a
        non-integer particle position / FILM.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(p, "file not found")
    try:
        text = p.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise InputError(p, f"cannot read: {exc}") from None
    lines: list[str] = []
    numbers: list[int] = []
    for k, line in enumerate(text.splitlines(), start=1):
        if _is_comment(line):
            continue
        lines.append(line)
        numbers.append(k)
    if not lines:
        raise InputError(p, "no data lines (only comments or empty)")
    ncols = len(lines[0].split())
    if ncols not in _LAYOUTS:
        raise InputError(
            p, f"line {numbers[0]} has {ncols} columns; a .par line has 17 (Frealign X/cisTEM), "
               f"16 (Frealign 9), 13 or 12 (Frealign 8)"
        )
    tokens = " ".join(lines).split()
    if len(tokens) != ncols * len(lines):
        for line, k in zip(lines, numbers):
            n = len(line.split())
            if n != ncols:
                raise InputError(p, f"line {k} has {n} columns; expected {ncols} like line {numbers[0]}")
    try:
        values = np.array(tokens, dtype=np.float64).reshape(len(lines), ncols)
    except ValueError:
        names = _HEADER_NAMES[ncols]
        for line, k in zip(lines, numbers):
            for j, tok in enumerate(line.split()):
                try:
                    float(tok)
                except ValueError:
                    raise InputError(p, f"line {k}, column {j + 1} ({names[j].upper()}): '{tok}' is not a number") from None
        raise  # pragma: no cover - unreachable
    bad = ~np.isfinite(values)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise InputError(p, f"line {numbers[r]}, column {c + 1} ({_HEADER_NAMES[ncols][c].upper()}) is {values[r, c]}")
    layout = _LAYOUTS[ncols]
    out = empty_params(len(lines))
    for j, name in enumerate(layout):
        col = values[:, j]
        if name in ("position", "film"):
            frac = col != np.round(col)
            if frac.any():
                r = int(np.argmax(frac))
                raise InputError(p, f"line {numbers[r]}: {name.upper()} must be an integer, got {col[r]:g}")
        out[name] = col
    if ncols == 12 or ncols == 13:
        out["occ"] = 100.0
        out["sigma"] = 1.0
        out["logp"] = 0.0
    if exclude_negative_film:
        out = out[out["film"] >= 0]
    return out


def _roundint(x: float) -> int:
    """cisTEM's ``myroundint``: round half away from zero."""
    return int(math.floor(x + 0.5)) if x >= 0 else -int(math.floor(-x + 0.5))


def format_par_line(row) -> str:
    """Format one parameter row exactly as cisTEM writes it (no newline)."""
    return PAR_FORMAT % (
        int(row["position"]), float(row["psi"]), float(row["theta"]), float(row["phi"]),
        float(row["shx"]), float(row["shy"]), float(row["mag"]), int(row["film"]),
        float(row["df1"]), float(row["df2"]), float(row["angast"]), float(row["pshift"]),
        float(row["occ"]), _roundint(float(row["logp"])), float(row["sigma"]),
        float(row["score"]), float(row["change"]),
    )


def write_par(path: str | os.PathLike, params: np.ndarray, *, header: bool = True) -> None:
    """Write a 17-column Frealign X ``.par`` file in cisTEM's exact format.

    The file is written beside its final name and renamed into place.

    Parameters
    ----------
    path : path-like
        Output file.
    params : numpy.ndarray
        Structured array of :data:`PARAM_DTYPE` (or with those fields).
    header : bool
        Write cisTEM's ``C  PSI THETA ...`` header line first.
    """
    p = Path(path)
    missing = [c for c in PAR_COLUMNS if c not in (params.dtype.names or ())]
    if missing:
        raise ValueError(f"write_par: parameters lack columns {missing}")
    # Python's %-formatting of a float32 promoted to double matches C's printf.
    cols = [params[c].tolist() for c in PAR_COLUMNS]
    logp_i = [_roundint(v) for v in cols[13]]
    tmp = p.with_name(f".{p.name}.tmp")
    try:
        with open(tmp, "w", encoding="ascii", newline="\n") as fh:
            if header:
                fh.write(PAR_HEADER + "\n")
            fmt = PAR_FORMAT + "\n"
            for r in range(len(params)):
                fh.write(fmt % (
                    int(cols[0][r]), cols[1][r], cols[2][r], cols[3][r], cols[4][r], cols[5][r], cols[6][r],
                    int(cols[7][r]), cols[8][r], cols[9][r], cols[10][r], cols[11][r], cols[12][r],
                    logp_i[r], cols[14][r], cols[15][r], cols[16][r],
                ))
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

"""Check parameter and image files and report every problem at once (as mrcfile's ``validate`` does).

The readers (:func:`~cistem_mpi.io.par.read_par`, :func:`~cistem_mpi.io.star.read_star`,
:func:`~cistem_mpi.io.mrc.open_stack`) stop at the first problem, which is
right for a job; before a long run, or when a file from elsewhere will not
import, :func:`validate` lists them all, each naming its line and column:

* ``.par``: column counts, text or NaN/inf in number fields, non-integer
  POSITION/FILM, positions below 1, occupancies outside 0..100;
* ``.star``: rows whose number of values differs from the loop's labels,
  labels outside a ``data_`` block, text or NaN/inf where a number belongs,
  ``rlnImageName`` not of the form ``N@stack``, optics values no CTF can use
  (pixel size <= 0, voltage <= 0, Cs < 0, amplitude contrast outside
  [0, 1)), particles in undefined optics groups, half of a column pair;
* MRC (``.mrc``, ``.mrcs``, ``.st``, ``.map``, ``.rec``, ``.gz``): everything
  ``mrcfile.validate`` finds (header fields, file size, mode), and sections
  holding NaN or infinite values.
"""

from __future__ import annotations

import io
import math
import os
import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

__all__ = ["validate", "validate_files", "MRC_SUFFIXES"]

#: File name endings read as MRC.
MRC_SUFFIXES = (".mrc", ".mrcs", ".st", ".map", ".rec", ".ali", ".mrc.gz", ".mrcs.gz", ".map.gz")

#: Problems listed per file at most (a file with a bad column would otherwise repeat it on every line).
MAX_PROBLEMS = 200

_PAR_NAMES = {
    17: ("POSITION", "PSI", "THETA", "PHI", "SHX", "SHY", "MAG", "FILM", "DF1", "DF2", "ANGAST", "PSHIFT", "OCC",
         "LogP", "SIGMA", "SCORE", "CHANGE"),
    16: ("POSITION", "PSI", "THETA", "PHI", "SHX", "SHY", "MAG", "FILM", "DF1", "DF2", "ANGAST", "OCC", "LogP",
         "SIGMA", "SCORE", "CHANGE"),
    13: ("POSITION", "PSI", "THETA", "PHI", "SHX", "SHY", "MAG", "FILM", "DF1", "DF2", "ANGAST", "PRESA", "DPRES"),
    12: ("POSITION", "PSI", "THETA", "PHI", "SHX", "SHY", "MAG", "FILM", "DF1", "DF2", "ANGAST", "CCMax"),
}

#: STAR labels whose values must be numbers (the ones the readers convert).
_NUMERIC_LABELS = {
    "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginX", "rlnOriginY", "rlnOriginXAngst",
    "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift", "rlnVoltage",
    "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnPixelSize", "rlnMagnification",
    "rlnDetectorPixelSize", "rlnOpticsGroup", "rlnImageSize", "rlnImageDimensionality", "rlnCoordinateX",
    "rlnCoordinateY", "rlnClassNumber", "rlnRandomSubset", "rlnMicrographPixelSize", "rlnCtfBfactor",
    "rlnCtfScalefactor",
}
#: Numeric labels whose values may be written ``nan``/``inf`` (scores a program could not compute).
_MAY_BE_NAN = {"rlnCtfMaxResolution", "rlnCtfFigureOfMerit", "rlnAutopickFigureOfMerit", "rlnMaxValueProbDistribution",
               "rlnLogLikeliContribution"}
#: cisTEM labels that hold text.
_CISTEM_TEXT = {"cisTEMStackFilename", "cisTEMOriginalImageFilename", "cisTEMReference3DFilename"}
#: (label, lowest, lowest allowed?, highest, highest allowed?): optics values a CTF can use.
_STAR_LIMITS = {
    "rlnVoltage": (0.0, False, math.inf, False), "cisTEMMicroscopeVoltagekV": (0.0, False, math.inf, False),
    "rlnSphericalAberration": (0.0, True, math.inf, False), "cisTEMMicroscopeCsMM": (0.0, True, math.inf, False),
    "rlnAmplitudeContrast": (0.0, True, 1.0, False), "cisTEMAmplitudeContrast": (0.0, True, 1.0, False),
    "rlnImagePixelSize": (0.0, False, math.inf, False), "rlnPixelSize": (0.0, False, math.inf, False),
    "cisTEMPixelSize": (0.0, False, math.inf, False), "rlnImageSize": (0.0, False, math.inf, False),
    "cisTEMOccupancy": (0.0, True, 100.0, True),
}
_PAIRS = (("rlnDefocusU", "rlnDefocusV"), ("rlnOriginX", "rlnOriginY"), ("rlnOriginXAngst", "rlnOriginYAngst"),
          ("rlnCoordinateX", "rlnCoordinateY"))


def validate(path: str | os.PathLike) -> list[str]:
    """Every problem of one ``.par``, ``.star`` or MRC file (empty list: none found).

    Parameters
    ----------
    path : path-like
        The file; its type is taken from its name.

    Returns
    -------
    list of str
        One sentence per problem, each naming its line and column (or MRC
        header field / section), in file order; at most :data:`MAX_PROBLEMS`
        (then a last line says how many more there were).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "p.star"
    >>> _ = f.write_text("data_particles\\nloop_\\n_rlnImageName\\n_rlnDefocusU\\n_rlnDefocusV\\n"
    ...                  "1@s.mrcs 15000 14000\\nx@s.mrcs abc 14000\\n2@s.mrcs 15000\\n")
    >>> for problem in validate(f): print(problem)
    line 7, column 1 (_rlnImageName): 'x@s.mrcs' is not of the form N@stack
    line 7, column 2 (_rlnDefocusU): 'abc' is not a number
    line 8: 2 values but the loop of data_particles (line 2) has 3 column labels (lines 3-5)
    """
    p = Path(path)
    if not p.exists():
        return ["file not found"]
    if p.is_dir():
        return ["is a directory"]
    name = p.name.lower()
    if name.endswith(".par"):
        out = _validate_par(p)
    elif name.endswith(".star"):
        out = _validate_star(p)
    elif name.endswith(MRC_SUFFIXES):
        out = _validate_mrc(p)
    else:
        return [f"unknown file type '{p.suffix}' (validate reads .par, .star and MRC files: "
                f"{', '.join(MRC_SUFFIXES)})"]
    if len(out) > MAX_PROBLEMS:
        out = out[:MAX_PROBLEMS] + [f"... and {len(out) - MAX_PROBLEMS} more problems"]
    return out


def validate_files(paths: Iterable[str | os.PathLike]) -> dict[str, list[str]]:
    """:func:`validate` for each file, by path (in the order given).

    >>> validate_files(["/nonexistent.par"])
    {'/nonexistent.par': ['file not found']}
    """
    return {os.fspath(p): validate(p) for p in paths}


# ------------------------------------------------------------------------- .par
def _number(tok: str) -> float | None:
    try:
        return float(tok)
    except ValueError:
        return None


def _validate_par(p: Path) -> list[str]:
    text = p.read_bytes().decode("ascii", "replace")
    out: list[str] = []
    ncols = None
    first_line = 0
    seen_data = False
    positions: dict[int, int] = {}
    for k, line in enumerate(text.splitlines(), start=1):
        s = line.lstrip()
        if not s or s[0] in "Cc":
            continue
        toks = line.split()
        seen_data = True
        if ncols is None:
            ncols, first_line = len(toks), k
            if ncols not in _PAR_NAMES:
                out.append(f"line {k} has {ncols} columns; a .par line has 17 (Frealign X/cisTEM), 16 (Frealign 9), "
                           f"13 or 12 (Frealign 8)")
                return out
        elif len(toks) != ncols:
            out.append(f"line {k} has {len(toks)} columns; expected {ncols} like line {first_line}")
            continue
        names = _PAR_NAMES[ncols]
        for j, tok in enumerate(toks):
            where = f"line {k}, column {j + 1} ({names[j]})"
            v = _number(tok)
            if v is None:
                out.append(f"{where}: '{tok}' is not a number")
            elif not math.isfinite(v):
                out.append(f"{where} is {tok}")
            elif names[j] in ("POSITION", "FILM") and v != round(v):
                out.append(f"{where} must be an integer, got {tok}")
            elif names[j] == "POSITION" and v < 1:
                out.append(f"{where}: particle positions count from 1, got {tok}")
            elif names[j] == "OCC" and not 0.0 <= v <= 100.0:
                out.append(f"{where}: occupancy must be within 0..100 %, got {tok}")
            elif names[j] == "POSITION":
                if int(v) in positions:
                    out.append(f"{where}: particle {int(v)} is listed again (first on line {positions[int(v)]})")
                else:
                    positions[int(v)] = k
    if not seen_data:
        out.append("no data lines (only comments or empty)")
    return out


# ------------------------------------------------------------------------ .star
@dataclass
class _Loop:
    block: str
    line: int
    labels: list[tuple[str, int]] = field(default_factory=list)  # (label without _, line)
    rows: list[tuple[int, list[str]]] = field(default_factory=list)  # (line, values)

    def column(self, label: str) -> list[tuple[int, str]]:
        names = [lb for lb, _ in self.labels]
        if label not in names:
            return []
        j = names.index(label)
        return [(ln, vals[j]) for ln, vals in self.rows if len(vals) == len(names)]


def _split(line: str) -> list[str]:
    if '"' not in line and "'" not in line:
        return line.split()
    try:
        return shlex.split(line, comments=False, posix=True)
    except ValueError:
        return line.split()


def _star_loops(text: str, out: list[str]) -> list[_Loop]:
    """Loops of STAR text with line numbers; structural problems appended to ``out`` (every one)."""
    loops: list[_Loop] = []
    block = None
    loop: _Loop | None = None
    reading_labels = False
    seen_block = False
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("data_"):
            block, loop, reading_labels, seen_block = line, None, False, True
            continue
        if line.startswith("loop_"):
            if block is None:
                out.append(f"line {n}: loop_ before any data_ block")
                continue
            loop, reading_labels = _Loop(block, n), True
            loops.append(loop)
            continue
        if line.startswith("_"):
            if block is None:
                out.append(f"line {n}: label {line.split()[0]} before any data_ block")
            elif loop is not None and reading_labels:
                loop.labels.append((line.split()[0][1:], n))
            else:
                loop = None  # a key-value pair ends a loop
            continue
        if loop is not None:
            reading_labels = False
            vals = _split(line)
            if len(vals) != len(loop.labels):
                labels = [ln for _, ln in loop.labels]
                span = (f"lines {labels[0]}-{labels[-1]}" if len(labels) > 1 else
                        f"line {labels[0]}" if labels else "none")
                out.append(f"line {n}: {len(vals)} values but the loop of {loop.block} (line {loop.line}) has "
                           f"{len(labels)} column label{'s' if len(labels) != 1 else ''} ({span})")
            loop.rows.append((n, vals))
        elif block is not None:
            out.append(f"line {n}: '{line[:40]}' is neither a label nor in a loop")
    if not seen_block:
        out.append("no data block found (no line starts with data_)")
    return loops


def _validate_star(p: Path) -> list[str]:
    raw = p.read_bytes()
    out: list[str] = []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        out.append(f"line {line}: byte 0x{raw[exc.start]:02x} is not UTF-8 text")
        text = raw.decode("utf-8", "replace")
    structural: list[str] = []
    loops = _star_loops(text, structural)
    cells: list[tuple[int, int, str]] = []  # (line, column, sentence): sorted into file order with the rest
    for loop in loops:
        names = [lb for lb, _ in loop.labels]
        for a, b in _PAIRS:
            if (a in names) != (b in names):
                have, lack = (a, b) if a in names else (b, a)
                cells.append((loop.line, 0, f"loop of {loop.block} (line {loop.line}): column _{lack} missing "
                                            f"(it has _{have})"))
        for j, label in enumerate(names):
            numeric = label in _NUMERIC_LABELS or label in _MAY_BE_NAN or (
                label.startswith("cisTEM") and label not in _CISTEM_TEXT)
            limits = _STAR_LIMITS.get(label)
            for ln, tok in loop.column(label):
                where = f"line {ln}, column {j + 1} (_{label})"
                if label == "rlnImageName":
                    num, at, stack = tok.partition("@")
                    if at and (not num.isdigit() or int(num) < 1 or not stack):
                        cells.append((ln, j, f"{where}: '{tok}' is not of the form N@stack"))
                    continue
                if not numeric:
                    continue
                v = _number(tok)
                if v is None:
                    cells.append((ln, j, f"{where}: '{tok}' is not a number"))
                elif not math.isfinite(v) and label not in _MAY_BE_NAN:
                    cells.append((ln, j, f"{where} is {tok}, not a finite number"))
                elif limits is not None and math.isfinite(v):
                    low, low_ok, high, high_ok = limits
                    if v < low or (v == low and not low_ok) or v > high or (v == high and not high_ok):
                        lo = "[" if low_ok else "("
                        hi = "]" if high_ok else ")"
                        cells.append((ln, j, f"{where}: {tok} is outside {lo}{low:g}, {high:g}{hi}"))
    _optics_groups(loops, cells)
    merged = [(int(s.split()[1].rstrip(":,")), -1, s) for s in structural if s.startswith("line ")]
    merged += [(10 ** 9, -1, s) for s in structural if not s.startswith("line ")]
    return out + [s for _, _, s in sorted(merged + cells, key=lambda t: (t[0], t[1]))]


def _optics_groups(loops: list[_Loop], cells: list) -> None:
    """Particles that refer to optics groups the optics table does not define."""
    optics = [lp for lp in loops if lp.block == "data_optics"]
    if not optics:
        return
    defined = {tok for _, tok in optics[0].column("rlnOpticsGroup")}
    if not defined:
        return
    for lp in loops:
        if lp is optics[0] or "rlnOpticsGroup" not in [lb for lb, _ in lp.labels]:
            continue
        j = [lb for lb, _ in lp.labels].index("rlnOpticsGroup")
        for ln, tok in lp.column("rlnOpticsGroup"):
            if tok not in defined and _number(tok) is not None:
                cells.append((ln, j + 1, f"line {ln}, column {j + 1} (_rlnOpticsGroup): optics group {tok} is not "
                                         f"in data_optics (groups {', '.join(sorted(defined))})"))


# -------------------------------------------------------------------------- MRC
def _validate_mrc(p: Path) -> list[str]:
    import mrcfile

    out: list[str] = []
    report = io.StringIO()
    try:
        with warnings.catch_warnings():  # mrcfile warns about what it also reports: report it once
            warnings.simplefilter("ignore")
            valid = mrcfile.validate(str(p), print_file=report)
    except Exception as exc:  # noqa: BLE001 - whatever stops mrcfile is the file's problem
        out.append(f"cannot read as MRC: {exc}")
        return out
    if not valid:
        for line in report.getvalue().splitlines():
            line = line.strip()
            if line and not line.startswith("Checking if ") and line != "File appears to be valid.":
                out.append(line)
    try:
        opener = mrcfile.open if p.name.lower().endswith(".gz") else mrcfile.mmap
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with opener(str(p), mode="r", permissive=True) as mrc:
                data = mrc.data
                if data is None:
                    return out
                if data.dtype.kind not in "fc":
                    return out
                sections = data.reshape((-1,) + data.shape[-2:]) if data.ndim >= 2 else data.reshape(1, 1, -1)
                for k in range(len(sections)):
                    bad = int(np.count_nonzero(~np.isfinite(sections[k])))
                    if bad:
                        out.append(f"section {k + 1}: {bad} NaN or infinite value{'s' if bad != 1 else ''}")
    except (ValueError, OSError) as exc:
        out.append(f"cannot read the data: {exc}")
    return out

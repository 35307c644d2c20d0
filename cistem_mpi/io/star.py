"""STAR parameter files: RELION (1.x/3.0, 3.1+, 5) and cisTEM.

Reading (:func:`read_star`) is done with the ``starfile`` package and detects
the flavour: a table with ``_cisTEM*`` columns only is a cisTEM file;
otherwise RELION, 3.1+ when a ``data_optics`` block exists (in either block
order), else 1.x/3.0 with per-particle optics.  RELION 5's array-valued
optics fields (``[a,b,c]``) become float arrays in ``Optics.extra``.

Conversions to our parameters (cisTEM's conventions, units of the ``.par``
columns) - every one of them is here and nowhere else:

================  ===========================================================
ours              RELION
================  ===========================================================
PHI, THETA, PSI   rlnAngleRot, rlnAngleTilt, rlnAnglePsi (degrees, as is)
SHX, SHY (Å)      -rlnOriginXAngst, -rlnOriginYAngst (3.1+), or
                  -rlnOriginX * pixel size, -rlnOriginY * pixel size (px,
                  1.x/3.0); the particle sits at -rlnOrigin (as cisTEM's
                  import does)
DF1, DF2 (Å)      rlnDefocusU, rlnDefocusV
ANGAST (deg)      rlnDefocusAngle
PSHIFT (rad)      rlnPhaseShift (degrees) * pi / 180
pixel size (Å)    rlnImagePixelSize (optics) or rlnPixelSize, else
                  rlnDetectorPixelSize (µm) * 10000 / rlnMagnification
MAG               rlnMagnification when present (1.x/3.0), else 0
FILM              1 (active), OCC 100, LogP 0, SIGMA 10, SCORE 0, CHANGE 0,
                  as cisTEM's RELION import sets them
POSITION          N of rlnImageName ``N@stack``, else the row number
================  ===========================================================

Values that RELION has no column for (FILM, OCC, LogP, SIGMA, SCORE,
CHANGE, MAG) are written to RELION files as cisTEM-named extra columns
(``_cisTEMImageActivity`` ..., ``_cisTEMMagnification``) unless
``keep_cistem_columns=False``; RELION ignores labels it does not know, and
reading them back restores every value.

cisTEM ``.star`` (``cistem_parameters.cpp``): columns ``_cisTEMPositionInStack
... _cisTEMTotalExposure`` in cisTEM's order and printf formats.  Its phase
shift is written in radians, as cisTEM's writer does (cisTEM's text reader
converts that column from degrees - a known inconsistency in cisTEM; we
follow the writer, i.e. the files cisTEM produces).
"""

from __future__ import annotations

import datetime
import os
import re
import shlex
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import starfile

from cistem_mpi import __version__
from cistem_mpi.errors import InputError
from cistem_mpi.io.params import Optics, ParticleSet, empty_params

__all__ = [
    "read_star",
    "write_relion_star",
    "write_cistem_star",
    "detect_star_flavour",
    "parse_image_name",
]

# cisTEM import defaults for values RELION does not carry (gui import of a RELION star)
_RELION_IMPORT_DEFAULTS = {"film": 1, "occ": 100.0, "logp": 0.0, "sigma": 10.0, "score": 0.0, "change": 0.0}
# par columns carried in RELION files under cisTEM-style names
_CISTEM_EXTRA_COLUMNS = {
    "cisTEMImageActivity": "film",
    "cisTEMOccupancy": "occ",
    "cisTEMLogP": "logp",
    "cisTEMSigma": "sigma",
    "cisTEMScore": "score",
    "cisTEMScoreChange": "change",
    "cisTEMMagnification": "mag",
}
# RELION labels consumed into params/optics (not kept in extra)
_RELION_CONSUMED = {
    "rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginX", "rlnOriginY",
    "rlnOriginXAngst", "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle",
    "rlnPhaseShift", "rlnOpticsGroup", "rlnMagnification", "rlnDetectorPixelSize", "rlnVoltage",
    "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnPixelSize",
}
_OPTICS_CORE = {"rlnOpticsGroupName", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
                "rlnImagePixelSize"}
_PARTICLE_HINTS = ("rlnAngleRot", "rlnAnglePsi", "rlnDefocusU", "rlnOriginX", "rlnOriginXAngst",
                   "rlnCoordinateX", "rlnImageName")

# cisTEM star: (label, our field or None, printf format)
_CISTEM_CORE: list[tuple[str, str]] = [
    ("cisTEMPositionInStack", "%8u"),
    ("cisTEMAnglePsi", "%7.2f"),
    ("cisTEMAngleTheta", "%7.2f"),
    ("cisTEMAnglePhi", "%7.2f"),
    ("cisTEMXShift", "%9.2f"),
    ("cisTEMYShift", "%9.2f"),
    ("cisTEMDefocus1", "%8.1f"),
    ("cisTEMDefocus2", "%8.1f"),
    ("cisTEMDefocusAngle", "%7.2f"),
    ("cisTEMPhaseShift", "%7.2f"),
    ("cisTEMImageActivity", "%5i"),
    ("cisTEMOccupancy", "%7.2f"),
    ("cisTEMLogP", "%9i"),
    ("cisTEMSigma", "%10.4f"),
    ("cisTEMScore", "%7.2f"),
    ("cisTEMScoreChange", "%7.2f"),
    ("cisTEMPixelSize", "%8.5f"),
    ("cisTEMMicroscopeVoltagekV", "%7.2f"),
    ("cisTEMMicroscopeCsMM", "%7.2f"),
    ("cisTEMAmplitudeContrast", "%7.4f"),
]
# optional cisTEM columns, written when present in ParticleSet.extra (cisTEM order)
_CISTEM_OPTIONAL: list[tuple[str, str]] = [
    ("cisTEMBeamTiltX", "%7.3f"),
    ("cisTEMBeamTiltY", "%7.3f"),
    ("cisTEMImageShiftX", "%7.3f"),
    ("cisTEMImageShiftY", "%7.3f"),
    ("cisTEMBest2DClass", "%5i"),
    ("cisTEMBeamTiltGroup", "%5i"),
    ("cisTEMStackFilename", "%50s"),
    ("cisTEMOriginalImageFilename", "%50s"),
    ("cisTEMReference3DFilename", "%50s"),
    ("cisTEMParticleGroup", "%8u"),
    ("cisTEMAssignedSubset", "%8i"),
    ("cisTEMPreExposure", "%7.2f"),
    ("cisTEMTotalExposure", "%7.2f"),
]
_CISTEM_HEADER_WORDS = {
    "cisTEMPositionInStack": "     POS ", "cisTEMAnglePsi": "    PSI ", "cisTEMAngleTheta": "  THETA ",
    "cisTEMAnglePhi": "    PHI ", "cisTEMXShift": "      SHX ", "cisTEMYShift": "      SHY ",
    "cisTEMDefocus1": "     DF1 ", "cisTEMDefocus2": "     DF2 ", "cisTEMDefocusAngle": " ANGAST ",
    "cisTEMPhaseShift": " PSHIFT ", "cisTEMImageActivity": " STAT ", "cisTEMOccupancy": "    OCC ",
    "cisTEMLogP": "     LogP ", "cisTEMSigma": "     SIGMA ", "cisTEMScore": "  SCORE ",
    "cisTEMScoreChange": " CHANGE ", "cisTEMPixelSize": "   PSIZE ", "cisTEMMicroscopeVoltagekV": "   VOLT ",
    "cisTEMMicroscopeCsMM": "     Cs ", "cisTEMAmplitudeContrast": "   AmpC ", "cisTEMBeamTiltX": " BTILTX ",
    "cisTEMBeamTiltY": " BTILTY ", "cisTEMImageShiftX": " ISHFTX ", "cisTEMImageShiftY": " ISHFTY ",
    "cisTEMBest2DClass": "2DCLS ", "cisTEMBeamTiltGroup": " TGRP ",
    "cisTEMStackFilename": "                                     STACK_FILENAME ",
    "cisTEMOriginalImageFilename": "                            ORIGINAL_IMAGE_FILENAME ",
    "cisTEMReference3DFilename": "                              REFERENCE_3D_FILENAME ",
    "cisTEMParticleGroup": "   PaGRP ", "cisTEMAssignedSubset": " SUBSET ", "cisTEMPreExposure": " PREEXP ",
    "cisTEMTotalExposure": " TOTEXP ", "cisTEMMagnification": "     MAG ",
}
# cisTEM reader defaults for absent columns (cistem_star_file_reader.cpp)
_CISTEM_DEFAULTS = {"film": 1, "occ": 100.0, "logp": 100.0, "sigma": 10.0, "score": 0.0, "change": 0.0,
                    "pshift": 0.0, "psi": 0.0, "theta": 0.0, "phi": 0.0, "shx": 0.0, "shy": 0.0, "mag": 0.0}
_CISTEM_PARAM_OF = {
    "cisTEMAnglePsi": "psi", "cisTEMAngleTheta": "theta", "cisTEMAnglePhi": "phi", "cisTEMXShift": "shx",
    "cisTEMYShift": "shy", "cisTEMDefocus1": "df1", "cisTEMDefocus2": "df2", "cisTEMDefocusAngle": "angast",
    "cisTEMPhaseShift": "pshift", "cisTEMImageActivity": "film", "cisTEMOccupancy": "occ",
    "cisTEMLogP": "logp", "cisTEMSigma": "sigma", "cisTEMScore": "score", "cisTEMScoreChange": "change",
    "cisTEMMagnification": "mag",
}

_ARRAY_RE = re.compile(r"^\[[^\]]*\]$")


# --------------------------------------------------------------------------- helpers


def parse_image_name(name: str) -> tuple[int, str]:
    """Split RELION's ``"000012@path/stack.mrcs"`` into (12, "path/stack.mrcs").

    A name without ``@`` is image 1 of that file.
    """
    s = str(name)
    if "@" in s:
        n, f = s.split("@", 1)
        return int(n), f
    return 1, s


def _read_blocks(path: Path) -> dict:
    if not path.exists():
        raise InputError(path, "file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise InputError(path, f"line {line}: byte 0x{raw[exc.start]:02x} is not UTF-8 text (STAR files are "
                               f"ASCII/UTF-8; re-save the file as UTF-8)") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blocks = starfile.read(str(path), always_dict=True)
    except Exception as exc:  # noqa: BLE001 - any parse failure is bad input
        problem = star_text_problem(text)
        raise InputError(path, problem or f"cannot parse as STAR: {exc}") from None
    if not blocks:
        raise InputError(path, star_text_problem(text) or "no data block found (no line starts with data_)")
    problem = star_text_problem(text) if _has_ragged_hint(blocks) else None
    if problem:
        raise InputError(path, problem)
    return blocks


def _has_ragged_hint(blocks: dict) -> bool:
    """A loop read with missing values (NaN in a column of strings/numbers) may be a short header."""
    for v in blocks.values():
        if isinstance(v, pd.DataFrame) and len(v) and v.isna().to_numpy().any():
            return True
    return False


def _tokens(line: str) -> int:
    """Number of values on a STAR data line (quoted values count once)."""
    if '"' not in line and "'" not in line:
        return len(line.split())
    try:
        return len(shlex.split(line, comments=False, posix=True))
    except ValueError:
        return len(line.split())


def star_text_problem(text: str) -> str | None:
    r"""The first structural problem of STAR text, naming its line (None: none found).

    Finds loops whose rows have another number of values than the loop has
    column labels (a header one column short, a truncated row), labels
    outside a loop or data block, and files without ``data_`` blocks.

    >>> star_text_problem("data_x\nloop_\n_a #1\n_b #2\n1 2 3\n")
    'line 5: 3 values but the loop of data_x (line 2) has 2 column labels (lines 3-4)'
    """
    block = None
    labels: list[int] = []
    in_loop = False
    reading_labels = False
    loop_line = 0
    seen_block = False
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("data_"):
            block, in_loop, reading_labels, labels = line, False, False, []
            seen_block = True
            continue
        if line.startswith("loop_"):
            if block is None:
                return f"line {n}: loop_ before any data_ block"
            in_loop, reading_labels, labels, loop_line = True, True, [], n
            continue
        if line.startswith("_"):
            if block is None:
                return f"line {n}: label {line.split()[0]} before any data_ block"
            if in_loop and reading_labels:
                labels.append(n)
            elif in_loop:
                in_loop = False  # a key-value pair after a loop ends the loop
            continue
        if in_loop:
            reading_labels = False
            k = _tokens(line)
            if k != len(labels):
                span = f"lines {labels[0]}-{labels[-1]}" if len(labels) > 1 else f"line {labels[0]}" if labels else "none"
                return (f"line {n}: {k} values but the loop of {block} (line {loop_line}) has {len(labels)} "
                        f"column label{'s' if len(labels) != 1 else ''} ({span})")
    if not seen_block:
        return "no data block found (no line starts with data_)"
    return None


def _table_blocks(blocks: dict) -> dict[str, pd.DataFrame]:
    return {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}


def detect_star_flavour(path: str | os.PathLike) -> str:
    """Return "cistem", "relion3.1" (optics block present) or "relion3.0"."""
    blocks = _read_blocks(Path(path))
    _, table = _particle_block(Path(path), blocks)
    return _flavour(blocks, table)


def _flavour(blocks: dict, table: pd.DataFrame) -> str:
    cols = list(table.columns)
    if any(c.startswith("cisTEM") for c in cols) and not any(c.startswith("rln") for c in cols):
        return "cistem"
    return "relion3.1" if _optics_block(blocks, table) is not None else "relion3.0"


def _optics_block(blocks: dict, particles: pd.DataFrame) -> pd.DataFrame | None:
    """``data_optics``, or a differently named table that is clearly an optics table."""
    tab = blocks.get("optics")
    if isinstance(tab, pd.DataFrame) and len(tab):
        return tab
    for v in _table_blocks(blocks).values():
        if v is particles or not len(v):
            continue
        cols = set(v.columns)
        if "rlnOpticsGroup" in cols and cols & {"rlnImagePixelSize", "rlnVoltage"} and not cols & set(_PARTICLE_HINTS):
            return v
    return None


def _particle_block(path: Path, blocks: dict) -> tuple[str, pd.DataFrame]:
    tables = {k: v for k, v in _table_blocks(blocks).items() if k != "optics"}
    if "particles" in tables:
        return "particles", tables["particles"]
    with_names = [k for k, v in tables.items() if "rlnImageName" in v.columns]
    if with_names:
        return with_names[0], tables[with_names[0]]
    for k, v in tables.items():
        cols = set(v.columns)
        if any(c.startswith("cisTEM") for c in cols):
            return k, v
        if k in ("", "images") and cols.intersection(_PARTICLE_HINTS):
            return k, v
    names = ", ".join(f"data_{k}" for k in blocks) or "none"
    raise InputError(path, f"no particle table found (blocks: {names})")


def _column(table: pd.DataFrame, label: str, path: Path, numeric: bool = True) -> np.ndarray | None:
    if label not in table.columns:
        return None
    col = table[label]
    if not numeric:
        return col.astype(str).to_numpy()
    vals = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(vals)
    if bad.any():
        r = int(np.argmax(bad))
        raise InputError(path, f"_{label} in row {r + 1} is '{col.iloc[r]}', not a finite number")
    return vals


def _parse_value(v):
    """RELION 5 array fields ``[a,b,c]`` -> float array; other values unchanged."""
    if isinstance(v, str) and _ARRAY_RE.match(v.strip()):
        inner = v.strip()[1:-1].strip()
        if not inner:
            return np.zeros(0, dtype=np.float64)
        try:
            return np.array([float(t) for t in inner.split(",")], dtype=np.float64)
        except ValueError:
            return v
    if isinstance(v, np.generic):
        return v.item()
    return v


def _pixel_size_from(table: pd.DataFrame, path: Path) -> np.ndarray | None:
    for label in ("rlnImagePixelSize", "rlnPixelSize"):
        v = _column(table, label, path)
        if v is not None:
            return v
    det = _column(table, "rlnDetectorPixelSize", path)
    mag = _column(table, "rlnMagnification", path)
    if det is not None and mag is not None:
        if np.any(mag <= 0):
            raise InputError(path, "_rlnMagnification must be positive to compute the pixel size")
        return det * 1e4 / mag
    return None


def _override_pixel_size(file_ps: float, user_ps: float | None, path: Path, what: str) -> float:
    if user_ps is None:
        return file_ps
    user_ps = float(user_ps)
    if not (np.isfinite(user_ps) and user_ps > 0):
        raise InputError("--pixel-size", f"pixel size must be a positive number, got {user_ps}")
    if file_ps > 0 and abs(file_ps - user_ps) > 1e-4 * user_ps:
        warnings.warn(f"{path}: {what} pixel size {file_ps:g} Å replaced by the given {user_ps:g} Å", stacklevel=4)
    return user_ps


# --------------------------------------------------------------------------- reading


def read_star(
    path: str | os.PathLike,
    pixel_size: float | None = None,
    *,
    required: Sequence[str] = (),
) -> ParticleSet:
    """Read particle parameters from a RELION (any version) or cisTEM STAR file.

    Parameters
    ----------
    path : path-like
        The ``.star`` file.
    pixel_size : float, optional
        Pixel size in Å; replaces the file's (with a warning when they
        differ) and supplies it when the file has none.
    required : sequence of str, optional
        Labels (without the leading underscore, e.g. ``"rlnDefocusU"``) that
        must be present.

    Returns
    -------
    ParticleSet
        Parameters in ``.par`` units, optics groups, image names and the
        remaining columns in ``extra`` (keyed by label without ``_``).

    Raises
    ------
    InputError
        Missing file, no particle table, a required column missing, half of
        a column pair (DefocusU/V, OriginX/Y), non-numeric values, or a
        pixel size needed but unknown.
    """
    p = Path(path)
    blocks = _read_blocks(p)
    name, table = _particle_block(p, blocks)
    missing = [r for r in required if r not in table.columns]
    if missing:
        block = f"data_{name}"
        raise InputError(p, f"required column{'s' if len(missing) > 1 else ''} "
                            f"{', '.join('_' + m for m in missing)} missing in {block}")
    if _flavour(blocks, table) == "cistem":
        return _read_cistem(p, table, pixel_size)
    return _read_relion(p, blocks, table, pixel_size)


def _require_pair(table: pd.DataFrame, a: str, b: str, path: Path) -> None:
    has_a, has_b = a in table.columns, b in table.columns
    if has_a != has_b:
        present, absent = (a, b) if has_a else (b, a)
        raise InputError(path, f"column _{absent} missing (the file has _{present})")


def _read_relion(path: Path, blocks: dict, table: pd.DataFrame, user_ps: float | None) -> ParticleSet:
    n = len(table)
    for a, b in (("rlnDefocusU", "rlnDefocusV"), ("rlnOriginX", "rlnOriginY"),
                 ("rlnOriginXAngst", "rlnOriginYAngst")):
        _require_pair(table, a, b, path)
    params = empty_params(n)
    for key, value in _RELION_IMPORT_DEFAULTS.items():
        params[key] = value

    # ---------------- optics
    optics_tab = _optics_block(blocks, table)
    consumed = set(_RELION_CONSUMED)
    if optics_tab is not None:
        optics, group = _optics_31(path, optics_tab, table, user_ps)
    else:
        optics, group = _optics_30(path, table, user_ps)
    ps_per_particle = np.array([o.pixel_size for o in optics], dtype=np.float64)[group]

    # ---------------- positions / image names
    image_names = None
    if "rlnImageName" in table.columns:
        image_names = table["rlnImageName"].astype(str).tolist()
        try:
            params["position"] = [parse_image_name(s)[0] for s in image_names]
        except ValueError:
            bad = next(s for s in image_names if not _valid_image_name(s))
            raise InputError(path, f"_rlnImageName '{bad}' is not of the form N@stack") from None

    # ---------------- angles, shifts, CTF
    for label, field in (("rlnAngleRot", "phi"), ("rlnAngleTilt", "theta"), ("rlnAnglePsi", "psi"),
                         ("rlnDefocusU", "df1"), ("rlnDefocusV", "df2"), ("rlnDefocusAngle", "angast")):
        v = _column(table, label, path)
        if v is not None:
            params[field] = v
    ox = _column(table, "rlnOriginXAngst", path)
    if ox is not None:
        # 0.0 - x: the particle sits at -origin, and no negative zeros in the output
        params["shx"] = 0.0 - ox
        params["shy"] = 0.0 - _column(table, "rlnOriginYAngst", path)
    else:
        ox_px = _column(table, "rlnOriginX", path)
        if ox_px is not None:
            oy_px = _column(table, "rlnOriginY", path)
            if np.any(ps_per_particle <= 0) and (np.any(ox_px != 0) or np.any(oy_px != 0)):
                raise InputError(path, "origins are in pixels (_rlnOriginX/Y) but the pixel size is unknown; "
                                       "give the pixel size")
            params["shx"] = 0.0 - ox_px * ps_per_particle
            params["shy"] = 0.0 - oy_px * ps_per_particle
    ph = _column(table, "rlnPhaseShift", path)
    if ph is not None:
        params["pshift"] = np.deg2rad(ph)
    mag = _column(table, "rlnMagnification", path)
    if mag is not None:
        params["mag"] = mag

    # ---------------- our own extra columns override the import defaults
    for label, field in _CISTEM_EXTRA_COLUMNS.items():
        v = _column(table, label, path)
        if v is not None:
            params[field] = v
            consumed.add(label)
    if "cisTEMPositionInStack" in table.columns and image_names is None:
        params["position"] = _column(table, "cisTEMPositionInStack", path)
        consumed.add("cisTEMPositionInStack")

    extra = {c: _extra_array(table[c]) for c in table.columns if c not in consumed}
    return ParticleSet(params=params, optics=optics, optics_group=group, image_names=image_names, extra=extra)


def _valid_image_name(s: str) -> bool:
    try:
        parse_image_name(s)
        return True
    except ValueError:
        return False


def _extra_array(col: pd.Series) -> np.ndarray:
    if pd.api.types.is_numeric_dtype(col):
        return col.to_numpy()
    vals = [_parse_value(v) for v in col.tolist()]
    out = np.empty(len(vals), dtype=object)
    out[:] = vals
    return out


def _optics_31(path: Path, optics_tab: pd.DataFrame, table: pd.DataFrame,
               user_ps: float | None) -> tuple[list[Optics], np.ndarray]:
    if "rlnOpticsGroup" in optics_tab.columns:
        numbers = pd.to_numeric(optics_tab["rlnOpticsGroup"], errors="coerce").to_numpy()
        if not np.all(np.isfinite(numbers)):
            raise InputError(path, "_rlnOpticsGroup in data_optics is not a number")
        numbers = numbers.astype(int)
    else:
        numbers = np.arange(1, len(optics_tab) + 1)
    optics: list[Optics] = []
    ps_col = _pixel_size_from(optics_tab, path)
    for i in range(len(optics_tab)):
        row = optics_tab.iloc[i]
        ps = float(ps_col[i]) if ps_col is not None else 0.0
        ps = _override_pixel_size(ps, user_ps, path, f"optics group {numbers[i]}")
        optics.append(Optics(
            pixel_size=ps,
            voltage=_optic_value(row, "rlnVoltage", 300.0, path),
            cs=_optic_value(row, "rlnSphericalAberration", 2.7, path),
            amplitude_contrast=_optic_value(row, "rlnAmplitudeContrast", 0.07, path),
            name=str(row["rlnOpticsGroupName"]) if "rlnOpticsGroupName" in optics_tab.columns
            else f"opticsGroup{numbers[i]}",
            # per column, not from ``row``: a row Series upcasts integers to float
            extra={c: _parse_value(optics_tab[c].iloc[i]) for c in optics_tab.columns if c not in _OPTICS_CORE},
        ))
        optics[-1].extra["rlnOpticsGroup"] = int(numbers[i])
    if ps_col is None and user_ps is None:
        warnings.warn(f"{path}: no pixel size in data_optics; give the pixel size", stacklevel=3)
    n = len(table)
    if "rlnOpticsGroup" in table.columns:
        g = _column(table, "rlnOpticsGroup", path).astype(int)
        index = {int(num): k for k, num in enumerate(numbers)}
        unknown = sorted(set(np.unique(g).tolist()) - set(index))
        if unknown:
            raise InputError(path, f"particles refer to optics group(s) {unknown} not in data_optics")
        group = np.array([index[v] for v in g.tolist()], dtype=np.int32)
    else:
        if len(optics) > 1:
            raise InputError(path, f"column _rlnOpticsGroup missing but data_optics has {len(optics)} groups")
        group = np.zeros(n, dtype=np.int32)
    return optics, group


def _optic_value(row: pd.Series, label: str, default: float, path: Path) -> float:
    if label in row.index:
        try:
            return float(row[label])
        except (TypeError, ValueError):
            raise InputError(path, f"_{label} '{row[label]}' in data_optics is not a number") from None
    warnings.warn(f"{path}: _{label} missing in data_optics; using {default:g}", stacklevel=4)
    return default


def _optics_30(path: Path, table: pd.DataFrame, user_ps: float | None) -> tuple[list[Optics], np.ndarray]:
    n = len(table)
    cols = {}
    for label, default in (("rlnVoltage", 300.0), ("rlnSphericalAberration", 2.7),
                           ("rlnAmplitudeContrast", 0.07)):
        v = _column(table, label, path)
        if v is None:
            if "rlnDefocusU" in table.columns:
                warnings.warn(f"{path}: _{label} missing; using {default:g}", stacklevel=3)
            v = np.full(n, default)
        cols[label] = v
    ps = _pixel_size_from(table, path)
    if ps is None:
        if user_ps is None:
            warnings.warn(f"{path}: no pixel size in the file; give the pixel size", stacklevel=3)
        ps = np.zeros(n)
    if user_ps is not None:
        file_ps = float(np.unique(ps)[0]) if len(np.unique(ps)) == 1 else 0.0
        _override_pixel_size(file_ps, user_ps, path, "file")
        ps = np.full(n, float(user_ps))
    # one optics group per distinct (kV, Cs, Q0, pixel size), numbered in order of first appearance
    optics: list[Optics] = []
    group = np.zeros(n, dtype=np.int32)
    seen: dict[tuple, int] = {}
    keys = zip(cols["rlnVoltage"].tolist(), cols["rlnSphericalAberration"].tolist(),
               cols["rlnAmplitudeContrast"].tolist(), np.round(ps, 6).tolist())
    for i, key in enumerate(keys):
        if key not in seen:
            seen[key] = len(optics)
            optics.append(Optics(pixel_size=float(ps[i]), voltage=float(key[0]), cs=float(key[1]),
                                 amplitude_contrast=float(key[2]), name=f"opticsGroup{len(optics) + 1}",
                                 extra={"rlnOpticsGroup": len(optics) + 1}))
        group[i] = seen[key]
    if not optics:
        optics = [Optics(pixel_size=float(user_ps or 0.0), extra={"rlnOpticsGroup": 1})]
    return optics, group


def _read_cistem(path: Path, table: pd.DataFrame, user_ps: float | None) -> ParticleSet:
    n = len(table)
    for label in ("cisTEMDefocus1", "cisTEMDefocus2", "cisTEMDefocusAngle"):
        if label not in table.columns:
            raise InputError(path, f"required column _{label} missing (cisTEM star)")
    params = empty_params(n)
    for field, value in _CISTEM_DEFAULTS.items():
        params[field] = value
    pos = _column(table, "cisTEMPositionInStack", path)
    if pos is not None:
        params["position"] = pos
    for label, field in _CISTEM_PARAM_OF.items():
        v = _column(table, label, path)
        if v is not None:
            params[field] = v
    # optics: one group per distinct (pixel size, kV, Cs, Q0)
    ps = _column(table, "cisTEMPixelSize", path)
    kv = _column(table, "cisTEMMicroscopeVoltagekV", path)
    cs = _column(table, "cisTEMMicroscopeCsMM", path)
    q0 = _column(table, "cisTEMAmplitudeContrast", path)
    ps = np.zeros(n) if ps is None else ps
    if user_ps is not None:
        file_ps = float(ps[0]) if n and np.all(ps == ps[0]) else 0.0
        ps = np.full(n, _override_pixel_size(file_ps, user_ps, path, "file"))
    elif n and np.all(ps <= 0):
        warnings.warn(f"{path}: no pixel size in the file; give the pixel size", stacklevel=3)
    kv = np.zeros(n) if kv is None else kv
    cs = np.full(n, 2.7) if cs is None else cs
    q0 = np.full(n, 0.07) if q0 is None else q0
    key = np.stack([np.round(ps, 6), kv, cs, q0], axis=1)
    optics: list[Optics] = []
    group = np.zeros(n, dtype=np.int32)
    seen: dict[tuple, int] = {}
    for i, k in enumerate(map(tuple, key.tolist())):
        if k not in seen:
            seen[k] = len(optics)
            optics.append(Optics(pixel_size=float(ps[i]), voltage=float(kv[i]), cs=float(cs[i]),
                                 amplitude_contrast=float(q0[i]), name=f"opticsGroup{len(optics) + 1}",
                                 extra={"rlnOpticsGroup": len(optics) + 1}))
        group[i] = seen[k]
    if not optics:
        optics = [Optics(pixel_size=float(user_ps or 0.0))]
    image_names = None
    if "cisTEMStackFilename" in table.columns:
        stacks = [_unquote(s) for s in table["cisTEMStackFilename"].astype(str).tolist()]
        image_names = [f"{int(p_):06d}@{s}" for p_, s in zip(params["position"].tolist(), stacks)]
    consumed = {"cisTEMPositionInStack", "cisTEMPixelSize", "cisTEMMicroscopeVoltagekV", "cisTEMMicroscopeCsMM",
                "cisTEMAmplitudeContrast", "cisTEMStackFilename", *_CISTEM_PARAM_OF}
    extra = {}
    for c in table.columns:
        if c in consumed:
            continue
        col = table[c]
        extra[c] = col.to_numpy() if pd.api.types.is_numeric_dtype(col) else np.array(
            [_unquote(str(v)) for v in col.tolist()], dtype=object)
    return ParticleSet(params=params, optics=optics, optics_group=group, image_names=image_names, extra=extra)


def _unquote(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    return s


# --------------------------------------------------------------------------- writing


def _fmt_float(values: np.ndarray) -> list[str]:
    """Fixed 6 decimals; scientific for very large/small magnitudes (no loss)."""
    v = np.asarray(values, dtype=np.float64)
    out = []
    for x in v.tolist():
        ax = abs(x)
        if ax != 0.0 and (ax >= 1e7 or ax < 1e-4):
            out.append(f"{x:.9e}")
        else:
            out.append(f"{x:.6f}")
    return out


def _fmt_float32(values) -> list[str]:
    """Shortest text that reads back as the same float32 (``78.6``, not ``78.599998``)."""
    v = np.asarray(values, dtype=np.float32)
    if v.size == 0:
        return []
    v = v + np.float32(0.0)  # no negative zeros
    short = np.char.mod("%.7g", v.astype(np.float64))
    back = short.astype(np.float64).astype(np.float32)
    bad = back != v
    if bad.any():
        short = short.astype(object)
        short[bad] = np.char.mod("%.9g", v[bad].astype(np.float64))
    return short.tolist()


def _fmt_value(x) -> str:
    if isinstance(x, np.ndarray):
        return "[" + ",".join(repr(float(v)) for v in x.tolist()) + "]"
    if isinstance(x, (bool, np.bool_)):
        return str(int(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        return _fmt_float(np.array([x]))[0]
    s = str(x)
    if s == "" or any(ch.isspace() for ch in s):
        return f'"{s}"'
    return s


def _fmt_column(values) -> list[str]:
    arr = np.asarray(values) if not isinstance(values, list) else None
    if arr is not None and arr.dtype.kind in "iub":
        return [str(int(v)) for v in arr.tolist()]
    if arr is not None and arr.dtype.kind == "f":
        return _fmt_float(arr)
    seq = values.tolist() if hasattr(values, "tolist") else list(values)
    return [_fmt_value(v) for v in seq]


def _loop_text(block: str, columns: list[tuple[str, list[str]]], version: str | None) -> str:
    lines = []
    if version:
        lines += ["", f"# version {version}", ""]
    lines += [f"data_{block}", "", "loop_"]
    lines += [f"_{label} #{k + 1}" for k, (label, _) in enumerate(columns)]
    if columns:
        widths = [max(len(s) for s in vals) if vals else 0 for _, vals in columns]
        nrows = len(columns[0][1])
        for r in range(nrows):
            lines.append(" ".join(vals[r].rjust(w) for (_, vals), w in zip(columns, widths)))
    lines.append("")
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _image_names_for(ps: ParticleSet, stack: str | os.PathLike | None) -> list[str] | None:
    if stack is not None:
        return [f"{int(p):06d}@{stack}" for p in ps.params["position"].tolist()]
    return ps.image_names


#: The comment our RELION exports carry to say which contrast their images have (RELION ignores comments).
CONTRAST_MARK = "# cistem-mpi contrast: protein "


def star_protein_is_white(path: str | os.PathLike) -> bool:
    r"""Whether the images of a particle STAR file are protein white, by convention.

    RELION extracts particles protein white (``relion_preprocess
    --invert_contrast``, its default workflow), so a RELION file is white
    unless it carries our contrast comment (:data:`CONTRAST_MARK`, written
    by :func:`write_relion_star`) saying otherwise; a cisTEM STAR file is
    dark (cisTEM's convention).

    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "p.star"
    >>> _ = f.write_text("# cistem-mpi contrast: protein dark\ndata_particles\nloop_\n_rlnImageName\n1@s.mrcs\n")
    >>> star_protein_is_white(f)
    False
    """
    p = Path(path)
    with open(p, "rb") as fh:
        head = fh.read(4096).decode("utf-8", "replace")
    for line in head.splitlines()[:40]:
        if line.startswith(CONTRAST_MARK):
            return line[len(CONTRAST_MARK):].strip().lower().startswith("white")
    return detect_star_flavour(p) != "cistem"


def write_relion_star(
    path: str | os.PathLike,
    particle_set: ParticleSet,
    style: str = "3.1",
    *,
    stack: str | os.PathLike | None = None,
    keep_cistem_columns: bool = True,
    image_size: int | None = None,
    protein_is_white: bool = False,
) -> None:
    """Write a RELION particle STAR file.

    Parameters
    ----------
    path : path-like
        Output ``.star``.
    particle_set : ParticleSet
        Parameters and optics.
    style : {"3.1", "3.0"}
        "3.1": ``data_optics`` + ``data_particles``, origins in Å
        (``rlnOriginXAngst``); RELION 3.1, 4 and 5 read it.  "3.0": one
        ``data_`` table with per-particle optics, origins in pixels and
        ``rlnMagnification`` 10000 / ``rlnDetectorPixelSize`` = pixel size.
    stack : path-like, optional
        Stack the images are in; writes ``rlnImageName`` as
        ``POSITION@stack`` (replacing the set's image names).
    keep_cistem_columns : bool
        Also write FILM, OCC, LogP, SIGMA, SCORE, CHANGE and MAG as
        ``_cisTEM*`` columns (RELION ignores them) so that nothing is lost.
    image_size : int, optional
        Box size in pixels, written as ``rlnImageSize`` (with
        ``rlnImageDimensionality`` 2) in every optics group; RELION 3.1+
        needs it (``ObservationModel``).  Default: the optics groups' own
        ``rlnImageSize``, else the size read from the ``stack`` file when it
        exists.
    protein_is_white : bool
        Contrast of the images the file points at, stated in a comment line
        (:data:`CONTRAST_MARK`) so that importing the file back applies the
        right convention (cisTEM's stacks: dark).
    """
    if style not in ("3.1", "3.0"):
        raise ValueError(f"write_relion_star: style must be '3.1' or '3.0', got {style!r}")
    p = Path(path)
    ps = particle_set
    prm = ps.params
    n = len(prm)
    group = np.asarray(ps.optics_group, dtype=np.int64)
    pix = np.array([o.pixel_size for o in ps.optics], dtype=np.float64)[group] if n else np.zeros(0)
    names = _image_names_for(ps, stack)
    cols: list[tuple[str, list[str]]] = []
    if names is not None:
        cols.append(("rlnImageName", [_fmt_value(s) for s in names]))
    elif n:
        warnings.warn(f"{p}: no image names (give the stack); positions kept only in _cisTEMPositionInStack",
                      stacklevel=2)
    rel_extra = [(k, v) for k, v in ps.extra.items() if k.startswith("rln") and k not in _RELION_CONSUMED]
    for k, v in rel_extra:
        cols.append((k, _fmt_column(v)))
    cols += [
        ("rlnAngleRot", _fmt_float32(prm["phi"])),
        ("rlnAngleTilt", _fmt_float32(prm["theta"])),
        ("rlnAnglePsi", _fmt_float32(prm["psi"])),
    ]
    if style == "3.1":
        cols += [("rlnOriginXAngst", _fmt_float32(0.0 - prm["shx"])),
                 ("rlnOriginYAngst", _fmt_float32(0.0 - prm["shy"]))]
    else:
        if n and np.any(pix <= 0):
            raise InputError(p, "cannot write RELION 3.0 origins in pixels: pixel size unknown")
        # full float64 precision: the pixel origins must give back the same Å shifts
        cols += [("rlnOriginX", [repr(v) for v in (0.0 - prm["shx"].astype(np.float64) / pix).tolist()]),
                 ("rlnOriginY", [repr(v) for v in (0.0 - prm["shy"].astype(np.float64) / pix).tolist()])]
    cols += [
        ("rlnDefocusU", _fmt_float32(prm["df1"])),
        ("rlnDefocusV", _fmt_float32(prm["df2"])),
        ("rlnDefocusAngle", _fmt_float32(prm["angast"])),
        ("rlnPhaseShift", _fmt_float(np.rad2deg(prm["pshift"].astype(np.float64)))),
    ]
    if style == "3.1":
        numbers = [int(o.extra.get("rlnOpticsGroup", k + 1)) for k, o in enumerate(ps.optics)]
        cols.append(("rlnOpticsGroup", [str(numbers[g]) for g in group.tolist()]))
    else:
        vol = np.array([o.voltage for o in ps.optics])[group] if n else np.zeros(0)
        csv = np.array([o.cs for o in ps.optics])[group] if n else np.zeros(0)
        q0 = np.array([o.amplitude_contrast for o in ps.optics])[group] if n else np.zeros(0)
        cols += [("rlnVoltage", _fmt_float(vol)), ("rlnSphericalAberration", _fmt_float(csv)),
                 ("rlnAmplitudeContrast", _fmt_float(q0)), ("rlnMagnification", _fmt_float(np.full(n, 10000.0))),
                 ("rlnDetectorPixelSize", _fmt_float(pix))]
    if keep_cistem_columns:
        if names is None:
            cols.append(("cisTEMPositionInStack", [str(int(v)) for v in prm["position"].tolist()]))
        for label, field in _CISTEM_EXTRA_COLUMNS.items():
            v = prm[field]
            if field == "film":
                cols.append((label, [str(int(x)) for x in v.tolist()]))
            elif field == "logp":  # float64 in PARAM_DTYPE
                cols.append((label, [repr(float(x)) for x in v.tolist()]))
            else:
                cols.append((label, _fmt_float32(v)))

    stamp = f"# Written by cistem-mpi {__version__} on {datetime.datetime.now().isoformat(' ', 'seconds')}\n"
    stamp += CONTRAST_MARK + ("white (RELION's convention)\n" if protein_is_white else
                              "dark (cisTEM's convention; RELION extracts protein white)\n")
    if style == "3.1":
        size = image_size if image_size is not None else _image_size_of(ps, stack, p)
        text = stamp + _optics_text(ps, size) + _loop_text("particles", cols, "30001")
    else:
        text = stamp + _loop_text("", cols, "30001")
    _atomic_write(p, text)


def _image_size_of(ps: ParticleSet, stack: str | os.PathLike | None, path: Path) -> int | None:
    """The box size for ``rlnImageSize``: the optics groups' own, else the stack file's."""
    for o in ps.optics:
        if "rlnImageSize" in o.extra:
            return None  # written from the groups' extra columns
    if stack is not None:
        f = Path(stack)
        f = f if f.is_absolute() else path.parent / f
        if f.is_file():
            from cistem_mpi.io.mrc import read_mrc_header

            try:
                return int(read_mrc_header(f).shape[2])
            except Exception:  # noqa: BLE001 - a stack we cannot read: no size (warned below)
                pass
    warnings.warn(f"{path}: box size unknown (give the stack or image_size); RELION 3.1+ needs rlnImageSize",
                  stacklevel=3)
    return None


#: What RELION 3.1+ requires of every optics group (ObservationModel: pixel size, box size, dimensionality,
#: voltage, Cs, amplitude contrast) besides the group number and name.
RELION_OPTICS_REQUIRED = ("rlnOpticsGroup", "rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality",
                          "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")


def _optics_text(ps: ParticleSet, image_size: int | None = None) -> str:
    optics = ps.optics
    core = [
        ("rlnOpticsGroupName", [_fmt_value(o.name) for o in optics]),
        ("rlnOpticsGroup", [str(int(o.extra.get("rlnOpticsGroup", k + 1))) for k, o in enumerate(optics)]),
        ("rlnVoltage", _fmt_float([o.voltage for o in optics])),
        ("rlnSphericalAberration", _fmt_float([o.cs for o in optics])),
        ("rlnAmplitudeContrast", _fmt_float([o.amplitude_contrast for o in optics])),
        ("rlnImagePixelSize", _fmt_float([o.pixel_size for o in optics])),
    ]
    if image_size is not None:
        core.append(("rlnImageSize", [str(int(image_size))] * len(optics)))
    if image_size is not None or any("rlnImageSize" in o.extra for o in optics):
        if not any("rlnImageDimensionality" in o.extra for o in optics):
            core.append(("rlnImageDimensionality", ["2"] * len(optics)))
    labels = []
    for o in optics:
        for k in o.extra:
            if k.startswith("rln") and k not in _OPTICS_CORE and k != "rlnOpticsGroup" and k not in labels:
                if image_size is not None and k in ("rlnImageSize", "rlnImageDimensionality"):
                    continue
                labels.append(k)
    for k in labels:
        vals = []
        for o in optics:
            if k not in o.extra:
                raise ValueError(f"optics column {k} present in some optics groups but not all")
            vals.append(_fmt_value(o.extra[k]))
        core.append((k, vals))
    return _loop_text("optics", core, "30001")


def write_cistem_star(path: str | os.PathLike, particle_set: ParticleSet, *, stack: str | os.PathLike | None = None) -> None:
    """Write a cisTEM ``.star`` parameter file (cisTEM's labels and formats).

    Parameters
    ----------
    path : path-like
        Output ``.star``.
    particle_set : ParticleSet
        Parameters and optics; ``extra`` columns named ``cisTEM*`` (beam
        tilt, 2D class, exposures ...) are written too.
    stack : path-like, optional
        Written as ``_cisTEMStackFilename`` for every particle.

    Notes
    -----
    Phase shift is written in radians as cisTEM's writer does.  A
    ``_cisTEMMagnification`` column carries the ``.par`` MAG value (cisTEM
    ignores unknown labels).
    """
    p = Path(path)
    ps = particle_set
    prm = ps.params
    n = len(prm)
    group = np.asarray(ps.optics_group, dtype=np.int64)

    def per(attr: str) -> np.ndarray:
        return np.array([getattr(o, attr) for o in ps.optics], dtype=np.float64)[group] if n else np.zeros(0)

    values: dict[str, np.ndarray | list] = {
        "cisTEMPositionInStack": prm["position"], "cisTEMAnglePsi": prm["psi"], "cisTEMAngleTheta": prm["theta"],
        "cisTEMAnglePhi": prm["phi"], "cisTEMXShift": prm["shx"], "cisTEMYShift": prm["shy"],
        "cisTEMDefocus1": prm["df1"], "cisTEMDefocus2": prm["df2"], "cisTEMDefocusAngle": prm["angast"],
        "cisTEMPhaseShift": prm["pshift"], "cisTEMImageActivity": prm["film"], "cisTEMOccupancy": prm["occ"],
        "cisTEMLogP": prm["logp"], "cisTEMSigma": prm["sigma"], "cisTEMScore": prm["score"],
        "cisTEMScoreChange": prm["change"], "cisTEMPixelSize": per("pixel_size"),
        "cisTEMMicroscopeVoltagekV": per("voltage"), "cisTEMMicroscopeCsMM": per("cs"),
        "cisTEMAmplitudeContrast": per("amplitude_contrast"),
    }
    columns: list[tuple[str, str]] = list(_CISTEM_CORE)
    stacks = None
    if stack is not None:
        stacks = [str(stack)] * n
    elif ps.image_names is not None:
        stacks = [parse_image_name(s)[1] for s in ps.image_names]
    for label, fmt in _CISTEM_OPTIONAL:
        if label == "cisTEMStackFilename" and stacks is not None:
            values[label] = stacks
            columns.append((label, fmt))
        elif label in ps.extra:
            values[label] = ps.extra[label]
            columns.append((label, fmt))
    values["cisTEMMagnification"] = prm["mag"]
    columns.append(("cisTEMMagnification", "%8.0f"))

    lines = [f"# Written by cistem-mpi {__version__} on {datetime.datetime.now().isoformat(' ', 'seconds')}",
             " ", "data_", " ", "loop_"]
    lines += [f"_{label} #{k + 1}" for k, (label, _) in enumerate(columns)]
    header = "".join(_CISTEM_HEADER_WORDS[label] for label, _ in columns)
    lines.append("#" + header[1:])
    formatted = []
    for label, fmt in columns:
        col = values[label]
        seq = col.tolist() if hasattr(col, "tolist") else list(col)
        if fmt.endswith("s"):
            formatted.append([fmt % f"'{v}'" for v in seq])
        elif fmt.endswith(("i", "u")):
            formatted.append([fmt % _roundint(float(v)) for v in seq])
        else:
            formatted.append([fmt % float(v) for v in seq])
    for r in range(n):
        lines.append("".join(col[r] + " " for col in formatted))
    _atomic_write(p, "\n".join(lines) + "\n")


def _roundint(x: float) -> int:
    return int(np.floor(x + 0.5)) if x >= 0 else -int(np.floor(-x + 0.5))


def relion_readability_problems(path: str | os.PathLike) -> list[str]:
    """What would stop RELION 3.1+ reading a particle STAR file (empty list: nothing).

    The rules are those of RELION's ``ObservationModel`` (``loadSafely`` and
    its constructor, ``getBoxSize``) and of ``relion_refine``: a
    ``data_optics`` table with a pixel size (``rlnImagePixelSize`` or a
    micrograph pixel size), ``rlnVoltage``, ``rlnSphericalAberration``, the
    box size ``rlnImageSize`` and ``rlnImageDimensionality``; optics groups
    numbered 1..N in order; a ``data_particles`` table with ``rlnImageName``
    whose ``rlnOpticsGroup`` values are all defined; origins in Å.
    """
    p = Path(path)
    blocks = _read_blocks(p)
    problems: list[str] = []
    optics = blocks.get("optics")
    particles = blocks.get("particles")
    if not isinstance(optics, pd.DataFrame) or not len(optics):
        return ["no data_optics table (RELION 3.0 style: RELION 3.1+ converts it only with the images at hand)"]
    if not isinstance(particles, pd.DataFrame) or not len(particles):
        return ["no data_particles table"]
    cols = set(optics.columns)
    if not cols & {"rlnImagePixelSize", "rlnMicrographPixelSize", "rlnMicrographOriginalPixelSize"}:
        problems.append("data_optics has no pixel size (rlnImagePixelSize)")
    for label in ("rlnOpticsGroup", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
                  "rlnImageSize", "rlnImageDimensionality"):
        if label not in cols:
            problems.append(f"data_optics lacks _{label}")
    if "rlnOpticsGroup" in cols:
        groups = [int(g) for g in optics["rlnOpticsGroup"]]
        if groups != list(range(1, len(groups) + 1)):
            problems.append(f"optics groups are not numbered 1..{len(groups)} in order: {groups}")
        if "rlnOpticsGroup" not in particles.columns:
            problems.append("data_particles lacks _rlnOpticsGroup")
        else:
            undefined = sorted(set(int(g) for g in particles["rlnOpticsGroup"]) - set(groups))
            if undefined:
                problems.append(f"particles use undefined optics group(s) {undefined}")
    if "rlnImageSize" in cols and any(int(v) <= 0 for v in optics["rlnImageSize"]):
        problems.append("rlnImageSize must be a positive box size")
    if "rlnImageDimensionality" in cols and any(int(v) not in (2, 3) for v in optics["rlnImageDimensionality"]):
        problems.append("rlnImageDimensionality must be 2 (or 3)")
    for label in ("rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                  "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"):
        if label not in particles.columns:
            problems.append(f"data_particles lacks _{label}")
    return problems

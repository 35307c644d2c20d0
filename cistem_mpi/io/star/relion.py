"""RELION particle STAR files (1.x/3.0, 3.1+, 5): reading into a ParticleSet, writing, RELION's checks.

The conversions between RELION's labels and our parameters are listed in
:mod:`cistem_mpi.io.star`; every one of them is written here and nowhere else.
"""

from __future__ import annotations

import datetime
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from cistem_mpi import __version__
from cistem_mpi.errors import InputError
from cistem_mpi.io.params import Optics, ParticleSet, empty_params
from cistem_mpi.io.star.common import (
    atomic_write, column, detect_star_flavour, optics_block, override_pixel_size, parse_image_name, parse_value,
    read_blocks,
)
from cistem_mpi.kernels.euler import relion_origin_to_shift, shift_to_relion_origin

__all__ = ["read_relion", "write_relion_star", "star_protein_is_white", "relion_readability_problems",
           "CONTRAST_MARK", "RELION_OPTICS_REQUIRED"]

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

def _pixel_size_from(table: pd.DataFrame, path: Path) -> np.ndarray | None:
    for label in ("rlnImagePixelSize", "rlnPixelSize"):
        v = column(table, label, path)
        if v is not None:
            return v
    det = column(table, "rlnDetectorPixelSize", path)
    mag = column(table, "rlnMagnification", path)
    if det is not None and mag is not None:
        if np.any(mag <= 0):
            raise InputError(path, "_rlnMagnification must be positive to compute the pixel size")
        return det * 1e4 / mag
    return None


def _require_pair(table: pd.DataFrame, a: str, b: str, path: Path) -> None:
    has_a, has_b = a in table.columns, b in table.columns
    if has_a != has_b:
        present, absent = (a, b) if has_a else (b, a)
        raise InputError(path, f"column _{absent} missing (the file has _{present})")


def read_relion(path: Path, blocks: dict, table: pd.DataFrame, user_ps: float | None) -> ParticleSet:
    n = len(table)
    for a, b in (("rlnDefocusU", "rlnDefocusV"), ("rlnOriginX", "rlnOriginY"),
                 ("rlnOriginXAngst", "rlnOriginYAngst")):
        _require_pair(table, a, b, path)
    params = empty_params(n)
    for key, value in _RELION_IMPORT_DEFAULTS.items():
        params[key] = value

    # ---------------- optics
    optics_tab = optics_block(blocks, table)
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

    # ---------------- angles (as is, see kernels.euler), shifts, CTF
    for label, field in (("rlnAngleRot", "phi"), ("rlnAngleTilt", "theta"), ("rlnAnglePsi", "psi"),
                         ("rlnDefocusU", "df1"), ("rlnDefocusV", "df2"), ("rlnDefocusAngle", "angast")):
        v = column(table, label, path)
        if v is not None:
            params[field] = v
    ox = column(table, "rlnOriginXAngst", path)
    if ox is not None:
        params["shx"] = relion_origin_to_shift(ox)
        params["shy"] = relion_origin_to_shift(column(table, "rlnOriginYAngst", path))
    else:
        ox_px = column(table, "rlnOriginX", path)
        if ox_px is not None:
            oy_px = column(table, "rlnOriginY", path)
            if np.any(ps_per_particle <= 0) and (np.any(ox_px != 0) or np.any(oy_px != 0)):
                raise InputError(path, "origins are in pixels (_rlnOriginX/Y) but the pixel size is unknown; "
                                       "give the pixel size")
            params["shx"] = relion_origin_to_shift(ox_px * ps_per_particle)
            params["shy"] = relion_origin_to_shift(oy_px * ps_per_particle)
    ph = column(table, "rlnPhaseShift", path)
    if ph is not None:
        params["pshift"] = np.deg2rad(ph)
    mag = column(table, "rlnMagnification", path)
    if mag is not None:
        params["mag"] = mag

    # ---------------- our own extra columns override the import defaults
    for label, field in _CISTEM_EXTRA_COLUMNS.items():
        v = column(table, label, path)
        if v is not None:
            params[field] = v
            consumed.add(label)
    if "cisTEMPositionInStack" in table.columns and image_names is None:
        params["position"] = column(table, "cisTEMPositionInStack", path)
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
    vals = [parse_value(v) for v in col.tolist()]
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
        ps = override_pixel_size(ps, user_ps, path, f"optics group {numbers[i]}")
        optics.append(Optics(
            pixel_size=ps,
            voltage=_optic_value(row, "rlnVoltage", 300.0, path),
            cs=_optic_value(row, "rlnSphericalAberration", 2.7, path),
            amplitude_contrast=_optic_value(row, "rlnAmplitudeContrast", 0.07, path),
            name=str(row["rlnOpticsGroupName"]) if "rlnOpticsGroupName" in optics_tab.columns
            else f"opticsGroup{numbers[i]}",
            # per column, not from ``row``: a row Series upcasts integers to float
            extra={c: parse_value(optics_tab[c].iloc[i]) for c in optics_tab.columns if c not in _OPTICS_CORE},
        ))
        optics[-1].extra["rlnOpticsGroup"] = int(numbers[i])
    if ps_col is None and user_ps is None:
        warnings.warn(f"{path}: no pixel size in data_optics; give the pixel size", stacklevel=3)
    n = len(table)
    if "rlnOpticsGroup" in table.columns:
        g = column(table, "rlnOpticsGroup", path).astype(int)
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
        v = column(table, label, path)
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
        override_pixel_size(file_ps, user_ps, path, "file")
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
        cols += [("rlnOriginXAngst", _fmt_float32(shift_to_relion_origin(prm["shx"]))),
                 ("rlnOriginYAngst", _fmt_float32(shift_to_relion_origin(prm["shy"])))]
    else:
        if n and np.any(pix <= 0):
            raise InputError(p, "cannot write RELION 3.0 origins in pixels: pixel size unknown")
        # full float64 precision: the pixel origins must give back the same Å shifts
        cols += [("rlnOriginX", [repr(v) for v in (shift_to_relion_origin(prm["shx"]) / pix).tolist()]),
                 ("rlnOriginY", [repr(v) for v in (shift_to_relion_origin(prm["shy"]) / pix).tolist()])]
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
    atomic_write(p, text)


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
    blocks = read_blocks(p)
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

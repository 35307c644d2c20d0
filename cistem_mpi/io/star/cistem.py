"""cisTEM ``.star`` parameter files (``cistem_parameters.cpp``): reading and writing.

Columns ``_cisTEMPositionInStack ... _cisTEMTotalExposure`` in cisTEM's order
and printf formats.  The phase shift is written in radians, as cisTEM's writer
does (see :mod:`cistem_mpi.io.star`).
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
from cistem_mpi.io.star.common import atomic_write, column, override_pixel_size, parse_image_name

__all__ = ["read_cistem", "write_cistem_star", "unquote"]

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

def read_cistem(path: Path, table: pd.DataFrame, user_ps: float | None) -> ParticleSet:
    n = len(table)
    for label in ("cisTEMDefocus1", "cisTEMDefocus2", "cisTEMDefocusAngle"):
        if label not in table.columns:
            raise InputError(path, f"required column _{label} missing (cisTEM star)")
    params = empty_params(n)
    for field, value in _CISTEM_DEFAULTS.items():
        params[field] = value
    pos = column(table, "cisTEMPositionInStack", path)
    if pos is not None:
        params["position"] = pos
    for label, field in _CISTEM_PARAM_OF.items():
        v = column(table, label, path)
        if v is not None:
            params[field] = v
    # optics: one group per distinct (pixel size, kV, Cs, Q0)
    ps = column(table, "cisTEMPixelSize", path)
    kv = column(table, "cisTEMMicroscopeVoltagekV", path)
    cs = column(table, "cisTEMMicroscopeCsMM", path)
    q0 = column(table, "cisTEMAmplitudeContrast", path)
    ps = np.zeros(n) if ps is None else ps
    if user_ps is not None:
        file_ps = float(ps[0]) if n and np.all(ps == ps[0]) else 0.0
        ps = np.full(n, override_pixel_size(file_ps, user_ps, path, "file"))
    elif n and np.all(ps <= 0):
        warnings.warn(f"{path}: no pixel size in the file; give the pixel size", stacklevel=3)
    if kv is None:  # cisTEM's reader leaves it 0, which no CTF can use: the microscope default, said aloud
        if n:
            warnings.warn(f"{path}: _cisTEMMicroscopeVoltagekV missing; using 300 kV", stacklevel=3)
        kv = np.full(n, 300.0)
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
        stacks = [unquote(s) for s in table["cisTEMStackFilename"].astype(str).tolist()]
        image_names = [f"{int(p_):06d}@{s}" for p_, s in zip(params["position"].tolist(), stacks)]
    consumed = {"cisTEMPositionInStack", "cisTEMPixelSize", "cisTEMMicroscopeVoltagekV", "cisTEMMicroscopeCsMM",
                "cisTEMAmplitudeContrast", "cisTEMStackFilename", *_CISTEM_PARAM_OF}
    extra = {}
    for c in table.columns:
        if c in consumed:
            continue
        col = table[c]
        extra[c] = col.to_numpy() if pd.api.types.is_numeric_dtype(col) else np.array(
            [unquote(str(v)) for v in col.tolist()], dtype=object)
    return ParticleSet(params=params, optics=optics, optics_group=group, image_names=image_names, extra=extra)


def unquote(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    return s


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
    atomic_write(p, "\n".join(lines) + "\n")


def _roundint(x: float) -> int:
    return int(np.floor(x + 0.5)) if x >= 0 else -int(np.floor(-x + 0.5))

"""cryoSPARC ``.cs`` particle files (numpy structured arrays) -> ParticleSet.

Conversions (the same as pyem's ``csparc2star.py`` and cryoDRGN's parsers,
then RELION -> ours as in :mod:`cistem_mpi.io.star`):

=====================================  ==========================================
cryoSPARC field                        ours
=====================================  ==========================================
blob/idx (0-based)                     POSITION = idx + 1; image name
                                       ``idx+1@blob/path`` (a leading ``>`` of
                                       exported paths removed)
blob/psize_A                           pixel size (Å)
ctf/df1_A, ctf/df2_A                   DF1, DF2 (Å)
ctf/df_angle_rad                       ANGAST = degrees(df_angle_rad)
ctf/phase_shift_rad                    PSHIFT (radians, as is)
ctf/accel_kv, cs_mm, amp_contrast      optics voltage, Cs, amplitude contrast
ctf/exp_group_id                       optics group (with the values above)
alignments3D/pose (axis-angle, rad)    R = Rodrigues(pose); R transposed is
                                       RELION's Euler matrix A(rot, tilt, psi);
                                       PHI, THETA, PSI = rot, tilt, psi (deg)
alignments2D/pose (rad)                PSI = degrees(pose)
alignments3D|2D/shift (pixels)         rlnOrigin = shift, so
                                       SHX, SHY = -shift * pixel size (Å)
alignments3D|2D/class                  extra ``rlnClassNumber`` = class + 1
alignments3D|2D/split                  extra ``rlnRandomSubset`` = split + 1
=====================================  ==========================================

FILM, OCC, LogP, SIGMA, SCORE, CHANGE take cisTEM's import values (1, 100,
0, 10, 0, 0).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from cistem_mpi.errors import InputError
from cistem_mpi.io.params import Optics, ParticleSet, empty_params
from cistem_mpi.kernels.euler import relion_origin_to_shift, rotvec_to_relion_euler

__all__ = ["read_cryosparc"]


def _field(cs: np.ndarray, name: str):
    return cs[name] if name in (cs.dtype.names or ()) else None


def read_cryosparc(path: str | os.PathLike, pixel_size: float | None = None) -> ParticleSet:
    """Read a cryoSPARC particle ``.cs`` file.

    Parameters
    ----------
    path : path-like
        The ``.cs`` file (a numpy ``.npy`` structured array).
    pixel_size : float, optional
        Pixel size in Å; replaces ``blob/psize_A`` (warning if different).

    Returns
    -------
    ParticleSet

    Raises
    ------
    InputError
        Missing or unreadable file, not a structured particle array, or no
        pixel size when shifts need one.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(p, "file not found")
    try:
        cs = np.load(str(p), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001
        raise InputError(p, f"cannot read as a cryoSPARC .cs (numpy) file: {exc}") from None
    if not isinstance(cs, np.ndarray) or cs.dtype.names is None or cs.ndim != 1:
        raise InputError(p, "not a cryoSPARC particle file (expected a 1-D numpy structured array)")
    names = set(cs.dtype.names)
    if not names & {"blob/idx", "ctf/df1_A", "alignments3D/pose", "alignments2D/pose"}:
        raise InputError(p, "no particle fields (blob/..., ctf/..., alignments.../) in this .cs file")
    n = len(cs)
    params = empty_params(n)
    params["film"] = 1
    params["occ"] = 100.0
    params["logp"] = 0.0
    params["sigma"] = 10.0

    # ---- pixel size per particle
    ps = _field(cs, "blob/psize_A")
    if ps is None:
        ps = _field(cs, "alignments3D/psize_A")
    if ps is None:
        ps = _field(cs, "alignments2D/psize_A")
    # .cs stores float32; 6 decimals give back the value that was typed (2.95, not 2.9500000477)
    ps = np.zeros(n) if ps is None else np.round(np.asarray(ps, dtype=np.float64), 6)
    if pixel_size is not None:
        if n and np.any(np.abs(ps - pixel_size) > 1e-4 * pixel_size) and np.any(ps > 0):
            warnings.warn(f"{p}: blob/psize_A {float(ps[0]):g} Å replaced by the given {pixel_size:g} Å", stacklevel=2)
        ps = np.full(n, float(pixel_size))

    # ---- positions and image names
    idx = _field(cs, "blob/idx")
    if idx is not None:
        params["position"] = np.asarray(idx, dtype=np.int64) + 1
    image_names = None
    bpath = _field(cs, "blob/path")
    if bpath is not None and idx is not None:
        paths = [b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b) for b in bpath.tolist()]
        paths = [s[1:] if s.startswith(">") else s for s in paths]  # exported files mark paths with '>'
        image_names = [f"{i + 1:06d}@{s}" for i, s in zip(np.asarray(idx).tolist(), paths)]

    # ---- CTF
    for fname, col in (("ctf/df1_A", "df1"), ("ctf/df2_A", "df2")):
        v = _field(cs, fname)
        if v is not None:
            params[col] = v
    v = _field(cs, "ctf/df_angle_rad")
    if v is not None:
        params["angast"] = np.rad2deg(np.asarray(v, dtype=np.float64))
    v = _field(cs, "ctf/phase_shift_rad")
    if v is not None:
        params["pshift"] = v

    # ---- alignments (3D preferred)
    extra: dict[str, np.ndarray] = {}
    kind = "alignments3D" if "alignments3D/pose" in names else ("alignments2D" if "alignments2D/pose" in names else None)
    if kind == "alignments3D":
        rot, tilt, psi = rotvec_to_relion_euler(cs["alignments3D/pose"])
        params["phi"], params["theta"], params["psi"] = rot, tilt, psi
    elif kind == "alignments2D":
        params["psi"] = np.rad2deg(np.asarray(cs["alignments2D/pose"], dtype=np.float64))
    if kind is not None:
        shift = _field(cs, f"{kind}/shift")
        if shift is not None:
            shift = np.asarray(shift, dtype=np.float64)
            if np.any(shift != 0) and np.any(ps <= 0):
                raise InputError(p, "shifts are in pixels but the pixel size is unknown; give the pixel size")
            # cryoSPARC shift = RELION origin (px); the particle sits at -origin
            params["shx"] = relion_origin_to_shift(shift[:, 0] * ps)
            params["shy"] = relion_origin_to_shift(shift[:, 1] * ps)
        cls = _field(cs, f"{kind}/class")
        if cls is not None:
            extra["rlnClassNumber"] = np.asarray(cls, dtype=np.int64) + 1
        split = _field(cs, f"{kind}/split")
        if split is not None and kind == "alignments3D":
            extra["rlnRandomSubset"] = np.asarray(split, dtype=np.int64) + 1
    if "uid" in names:
        extra["csUid"] = np.asarray(cs["uid"])

    # ---- optics groups: exposure group + optical values
    kv = _field(cs, "ctf/accel_kv")
    csmm = _field(cs, "ctf/cs_mm")
    q0 = _field(cs, "ctf/amp_contrast")
    gid = _field(cs, "ctf/exp_group_id")
    kv = np.full(n, 300.0) if kv is None else np.round(np.asarray(kv, np.float64), 6)
    csmm = np.full(n, 2.7) if csmm is None else np.round(np.asarray(csmm, np.float64), 6)
    q0 = np.full(n, 0.07) if q0 is None else np.round(np.asarray(q0, np.float64), 6)
    gid = np.zeros(n, np.int64) if gid is None else np.asarray(gid, np.int64)
    optics: list[Optics] = []
    group = np.zeros(n, dtype=np.int32)
    seen: dict[tuple, int] = {}
    for i, key in enumerate(zip(gid.tolist(), np.round(ps, 6).tolist(), kv.tolist(), csmm.tolist(), q0.tolist())):
        if key not in seen:
            seen[key] = len(optics)
            optics.append(Optics(pixel_size=float(ps[i]), voltage=float(kv[i]), cs=float(csmm[i]),
                                 amplitude_contrast=float(q0[i]), name=f"opticsGroup{len(optics) + 1}",
                                 extra={"rlnOpticsGroup": len(optics) + 1, "csExposureGroup": int(gid[i])}))
        group[i] = seen[key]
    if not optics:
        optics = [Optics(pixel_size=float(pixel_size or 0.0))]
    shape = _field(cs, "blob/shape")
    if shape is not None and len(optics):
        for k, o in enumerate(optics):
            rows = np.flatnonzero(group == k)
            if rows.size:
                o.extra["rlnImageSize"] = int(np.asarray(shape)[rows[0]][0])
                o.extra["rlnImageDimensionality"] = 2
    return ParticleSet(params=params, optics=optics, optics_group=group, image_names=image_names, extra=extra)

"""Files of a CTF fit in ctffind's own formats, RELION's ``micrographs_ctf.star``, and the diagnostic PNG.

ctffind's ``.txt`` (``NumericTextFile``, ``#`` comment lines, one row per
micrograph)::

    # Output from CTFFind version 4.1.14 (cistem-mpi find-ctf), run on 2026-12-01 20:00:00
    # Input file: /path/mic.mrc ; Number of micrographs: 1
    # Pixel size: 1.000 Angstroms ; acceleration voltage: 300.0 keV ; spherical aberration: 2.70 mm ; ...
    # Box size: 512 pixels ; min. res.: 30.0 Angstroms ; max. res.: 5.0 Angstroms ; min. def.: 5000.0 um; ...
    # Columns: #1 - micrograph number; #2 - defocus 1 [Angstroms]; ... #10 Estimated sample thickness (in Angstroms)
    1.000000 10295.926758 10012.275391 -38.856349 0.000000 0.030650 5.279412 0.000000 0.000000 0.000000

(ctffind writes the defocus range in Å under a "um" label; so do we, so
that scripts that parse its header keep working.)  The ``_avrot.txt`` file
has 6 rows per micrograph: spatial frequency (1/Å), rotational average,
equiphase (astigmatism-aware) average, CTF fit, FRC of fit and spectrum, and
2 sigma of the FRC of noise.  Both are read by
:func:`cistem_mpi.io.ctf_estimates.read_ctf_estimates` (the ``.txt``) and
:func:`read_ctffind_avrot`.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cistem_mpi.io.plots import pyplot

__all__ = ["write_ctffind_txt", "write_ctffind_avrot", "read_ctffind_avrot", "write_micrographs_ctf_star",
           "save_ctf_diagnostic_png", "save_ctf_summary_png"]

_VERSION = "4.1.14 (cistem-mpi find-ctf)"
_COLUMNS = ("# Columns: #1 - micrograph number; #2 - defocus 1 [Angstroms]; #3 - defocus 2; "
            "#4 - azimuth of astigmatism; #5 - additional phase shift [radians]; #6 - cross correlation; "
            "#7 - spacing (in Angstroms) up to which CTF rings were fit successfully; "
            "#8 - Estimated tilt axis angle; #9 - Estimated tilt angle ; "
            "#10 Estimated sample thickness (in Angstroms)")


def _header(input_file: str, pixel_size: float, voltage: float, cs: float, amplitude_contrast: float, box: int,
            min_res: float, max_res: float, min_def: float, max_def: float, extra: str = "") -> list[str]:
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    return [f"# Output from CTFFind version {_VERSION}, run on {now}",
            f"# Input file: {input_file} ; Number of micrographs: 1",
            f"# Pixel size: {pixel_size:0.3f} Angstroms ; acceleration voltage: {voltage:0.1f} keV ; "
            f"spherical aberration: {cs:0.2f} mm ; amplitude contrast: {amplitude_contrast:0.2f}",
            f"# Box size: {box} pixels ; min. res.: {min_res:0.1f} Angstroms ; max. res.: {max_res:0.1f} Angstroms ; "
            f"min. def.: {min_def:0.1f} um; max. def. {max_def:0.1f} um{extra}"]


def write_ctffind_txt(path: str | os.PathLike, input_file: str, values: Sequence[float], *, pixel_size: float,
                      voltage: float, cs: float, amplitude_contrast: float, box: int, min_res: float, max_res: float,
                      min_def: float, max_def: float) -> None:
    """Write one micrograph's fit as ctffind's ``.txt``.

    Parameters
    ----------
    path : output file (may be a staged name)
    input_file : the micrograph's path (its file name names the image on import)
    values : df1, df2, angast (deg), pshift (rad), score, fit resolution (Å), tilt axis, tilt angle,
        thickness (Å) (the last three 0 when not estimated)
    pixel_size, voltage, cs, amplitude_contrast, box, min_res, max_res, min_def, max_def : the header

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "a.txt"
    >>> write_ctffind_txt(p, "m.mrc", [1e4, 9e3, 10, 0, .2, 4, 0, 0, 0], pixel_size=1, voltage=300, cs=2.7,
    ...                   amplitude_contrast=.07, box=512, min_res=30, max_res=5, min_def=5e3, max_def=5e4)
    >>> p.read_text().splitlines()[-1]
    '1.000000 10000.000000 9000.000000 10.000000 0.000000 0.200000 4.000000 0.000000 0.000000 0.000000'
    """
    v = [float(x) for x in values]
    if len(v) != 9:
        raise ValueError("need 9 values: df1 df2 angast pshift score resolution tilt_axis tilt_angle thickness")
    lines = _header(input_file, pixel_size, voltage, cs, amplitude_contrast, box, min_res, max_res, min_def, max_def)
    lines.append(_COLUMNS)
    lines.append(" ".join(f"{x:f}" for x in [1.0] + v))
    Path(path).write_text("\n".join(lines) + "\n")


def write_ctffind_avrot(path: str | os.PathLike, input_file: str, rows: Sequence[np.ndarray], *, pixel_size: float,
                        voltage: float, cs: float, amplitude_contrast: float, box: int, min_res: float,
                        max_res: float, min_def: float, max_def: float, frames_averaged: int = 1) -> None:
    """Write ctffind's ``_avrot.txt``: six rows of numbers (see the module docstring).

    ``frames_averaged``: the header's "num. frames averaged" (frames per sum
    when the spectrum came from a movie's frames, else 1).

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "a_avrot.txt"
    >>> write_ctffind_avrot(p, "m.mrc", [np.arange(3.0)] * 6, pixel_size=1, voltage=300, cs=2.7,
    ...                     amplitude_contrast=.07, box=512, min_res=30, max_res=5, min_def=5e3, max_def=5e4)
    >>> read_ctffind_avrot(p).shape
    (6, 3)
    """
    if len(rows) != 6:
        raise ValueError("an _avrot file has 6 rows")
    lines = _header(input_file, pixel_size, voltage, cs, amplitude_contrast, box, min_res, max_res, min_def, max_def,
                    f"; num. frames averaged: {int(frames_averaged)}")
    lines.append("# 6 lines per micrograph: #1 - spatial frequency (1/Angstroms); #2 - 1D rotational average of "
                 "spectrum (assuming no astigmatism); #3 - 1D rotational average of spectrum; #4 - CTF fit; "
                 "#5 - cross-correlation between spectrum and CTF fit; #6 - 2sigma of expected cross correlation "
                 "of noise")
    for r in rows:
        lines.append(" ".join(f"{x:f}" for x in np.asarray(r, dtype=np.float64)))
    Path(path).write_text("\n".join(lines) + "\n")


def read_ctffind_avrot(path: str | os.PathLike) -> np.ndarray:
    """The numbers of a ctffind ``_avrot.txt`` as an array (6 * micrographs, bins)."""
    rows = [[float(t) for t in line.split()] for line in Path(path).read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    return np.array(rows, dtype=np.float64)


def write_micrographs_ctf_star(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """RELION 3.1+ ``micrographs_ctf.star``: one optics group per (pixel, kV, Cs, Q0) and one row per image.

    Each row: ``micrograph`` (path), ``pixel_size``, ``voltage``, ``cs``,
    ``amplitude_contrast``, ``df1``, ``df2``, ``angast`` (deg), ``pshift``
    (rad, written in degrees), ``fit_resolution`` (Å), ``score``.

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "micrographs_ctf.star"
    >>> write_micrographs_ctf_star(p, [dict(micrograph="a.mrc", pixel_size=1.0, voltage=300.0, cs=2.7,
    ...     amplitude_contrast=0.07, df1=1e4, df2=9e3, angast=10.0, pshift=0.0, fit_resolution=4.0, score=0.2)])
    >>> from cistem_mpi.io.ctf_estimates import read_ctf_estimates
    >>> read_ctf_estimates(p)[0].df2
    9000.0
    """
    import pandas as pd
    import starfile

    groups: dict[tuple, int] = {}
    for r in rows:
        key = (float(r["pixel_size"]), float(r["voltage"]), float(r["cs"]), float(r["amplitude_contrast"]))
        groups.setdefault(key, len(groups) + 1)
    optics = pd.DataFrame({
        "rlnOpticsGroupName": [f"opticsGroup{g}" for g in groups.values()],
        "rlnOpticsGroup": list(groups.values()),
        "rlnMicrographOriginalPixelSize": [k[0] for k in groups],
        "rlnVoltage": [k[1] for k in groups], "rlnSphericalAberration": [k[2] for k in groups],
        "rlnAmplitudeContrast": [k[3] for k in groups], "rlnMicrographPixelSize": [k[0] for k in groups]})
    df1 = np.array([float(r["df1"]) for r in rows])
    df2 = np.array([float(r["df2"]) for r in rows])
    table = pd.DataFrame({
        "rlnMicrographName": [str(r["micrograph"]) for r in rows],
        "rlnOpticsGroup": [groups[(float(r["pixel_size"]), float(r["voltage"]), float(r["cs"]),
                                   float(r["amplitude_contrast"]))] for r in rows],
        "rlnDefocusU": df1, "rlnDefocusV": df2, "rlnCtfAstigmatism": np.abs(df1 - df2),
        "rlnDefocusAngle": [float(r["angast"]) for r in rows],
        "rlnPhaseShift": [float(np.degrees(r["pshift"])) for r in rows],
        "rlnCtfMaxResolution": [float(r["fit_resolution"]) for r in rows],
        "rlnCtfFigureOfMerit": [float(r["score"]) for r in rows]})
    starfile.write({"optics": optics, "micrographs": table}, path, overwrite=True)



def save_ctf_diagnostic_png(path: str | os.PathLike, picture: np.ndarray, frequency: np.ndarray,
                            curves: dict[str, np.ndarray], fit_resolution: float, low_freq: float, high_freq: float,
                            title: str = "") -> None:
    """Spectrum-with-fit picture beside the 1D profile with the fit resolution marked.

    Parameters
    ----------
    picture : 2D, 0..1 (spectrum in the left half, fit in the right half)
    frequency : 1/Å of the 1D profiles
    curves : label -> values (e.g. equiphase average, |CTF| fit, FRC)
    fit_resolution : Å (vertical marker)
    low_freq, high_freq : the fitting range (1/Å), shaded
    """
    plt = pyplot()
    fig = plt.figure(figsize=(11, 4.6), dpi=90)
    ax = fig.add_axes([0.01, 0.02, 0.40, 0.88])
    ax.imshow(picture, cmap="gray", vmin=0, vmax=1, origin="lower", interpolation="nearest")
    ax.set_axis_off()
    ax.set_title("spectrum | fit", fontsize=9)
    bx = fig.add_axes([0.47, 0.12, 0.51, 0.76])
    f = np.asarray(frequency)
    for label, y in curves.items():
        bx.plot(f[1:], np.asarray(y)[1:], lw=0.9, label=label)
    bx.axvspan(low_freq, high_freq, color="0.92", zorder=0)
    if np.isfinite(fit_resolution) and fit_resolution > 0:
        bx.axvline(1.0 / fit_resolution, color="red", ls="--", lw=1, label=f"fit resolution {fit_resolution:.2f} Å")
    bx.set_xlim(0, f[-1] if f.size else 1)
    bx.set_ylim(-0.1, 1.3)
    bx.set_xlabel("spatial frequency (1/Å)")
    bx.legend(fontsize=7, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, format="png")
    plt.close(fig)


def save_ctf_summary_png(path: str | os.PathLike, defocus: np.ndarray, fit_resolution: np.ndarray,
                         title: str = "", thickness: np.ndarray | None = None) -> None:
    """Histograms of mean defocus (µm) and fit resolution (Å) of a job's images (and thickness, Å, when given)."""
    plt = pyplot()
    if thickness is not None:
        fig, (a, b, c) = plt.subplots(1, 3, figsize=(11.5, 3.2), dpi=90)
        c.hist(np.asarray(thickness, np.float64), bins=20, color="tab:green")
        c.set_xlabel("sample thickness (Å)")
    else:
        fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=90)
    a.hist(np.asarray(defocus) / 1e4, bins=20, color="tab:blue")
    a.set_xlabel("mean defocus (µm)")
    a.set_ylabel("images")
    r = np.asarray(fit_resolution)
    b.hist(r[np.isfinite(r)], bins=20, color="tab:orange")
    b.set_xlabel("fit resolution (Å)")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)

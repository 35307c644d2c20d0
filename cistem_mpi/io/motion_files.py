"""Files of movie alignment: shifts table, RELION motion STAR files, trajectory PNG, defect lists.

Shifts file (``<image>_shifts.txt``, registered as ``images.shifts_path``)
-------------------------------------------------------------------------
Plain text.  ``# key value`` header lines, then one line per frame::

    frame  x_shift_A  y_shift_A  x_shift_px  y_shift_px

the shift *applied* to each frame (cisTEM's unblur convention, middle frame
at 0; pixels of the movie).  With local motion, a ``# patch`` section gives
each patch centre and its per-frame residual shifts (px), and ``# model``
the 2 x 6 x 3 coefficients of :class:`cistem_mpi.kernels.motion.DeformationModel`.

RELION
------
:func:`write_motion_star` writes RELION's per-movie motion file
(``data_general`` and ``data_global_shift`` with ``rlnMicrographShiftX/Y``
in unbinned pixels; ``rlnMotionModelVersion 0``: the local model is in our
shifts file only), :func:`write_corrected_micrographs_star` the
``corrected_micrographs.star`` that RELION's CTF and polishing steps read.
RELION's own motion correction reports the shifts with the sign of the
frame's motion; we write ``-`` (applied shift) so that the numbers mean the
same thing in both programs.

Defect lists (``--defects``)
----------------------------
Text, one defect per line: ``x y`` (a pixel), ``row Y``, ``col X`` or
``column X`` (0-based, MRC orientation: row 0 is the first row of the
frame as read), ``#`` comments; or an image (MRC/TIFF) of the frame size,
non-zero = defective.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cistem_mpi.errors import InputError

__all__ = ["write_shifts", "read_shifts", "write_motion_star", "write_corrected_micrographs_star",
           "save_trajectory_png", "read_defects"]


def write_shifts(path: str | os.PathLike, shifts_px: np.ndarray, pixel_size: float, header: dict | None = None,
                 patch_centres: np.ndarray | None = None, patch_shifts: np.ndarray | None = None,
                 model_coeffs: np.ndarray | None = None) -> None:
    """Write the shifts file (see module notes)."""
    lines = ["# cistem-mpi align-movies shifts (applied to each frame; middle frame at 0)"]
    for k, v in (header or {}).items():
        lines.append(f"# {k} {v}")
    lines.append(f"# pixel_size {pixel_size:.6f}")
    lines.append("# frame x_shift_A y_shift_A x_shift_px y_shift_px")
    for i, (sx, sy) in enumerate(np.asarray(shifts_px, float)):
        lines.append(f"{i + 1:5d} {sx * pixel_size:12.5f} {sy * pixel_size:12.5f} {sx:12.5f} {sy:12.5f}")
    if patch_centres is not None and patch_shifts is not None:
        lines.append(f"# patches {len(patch_centres)}")
        for c, tr in zip(patch_centres, patch_shifts):
            vals = " ".join(f"{a:.4f} {b:.4f}" for a, b in tr)
            lines.append(f"# patch {c[0]:.2f} {c[1]:.2f} {vals}")
    if model_coeffs is not None:
        lines.append("# model " + " ".join(f"{v:.8g}" for v in np.asarray(model_coeffs).ravel()))
    Path(path).write_text("\n".join(lines) + "\n")


def read_shifts(path: str | os.PathLike) -> np.ndarray:
    """Per-frame shifts (n, 2) in pixels from a shifts file."""
    rows = [ln.split() for ln in Path(path).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return np.array([[float(r[3]), float(r[4])] for r in rows]).reshape(-1, 2)


def _loop(block: str, labels: list[str], rows: list[list[str]]) -> str:
    out = [f"\ndata_{block}\n", "loop_"]
    out += [f"_{lab} #{k + 1}" for k, lab in enumerate(labels)]
    out += ["  ".join(r) for r in rows]
    return "\n".join(out) + "\n"


def write_motion_star(path: str | os.PathLike, movie: str, shape: tuple[int, int, int], shifts_px: np.ndarray,
                      pixel_size: float, dose_per_frame: float, pre_exposure: float, voltage: float,
                      binning: float = 1.0, gain: str | None = None) -> None:
    """RELION 3.1/4 per-movie motion STAR file (global shifts, unbinned pixels)."""
    n, ny, nx = shape
    gen = ["", "data_general", "",
           f"_rlnImageSizeX {nx}", f"_rlnImageSizeY {ny}", f"_rlnImageSizeZ {n}",
           f"_rlnMicrographMovieName {movie}"]
    if gain:
        gen.append(f"_rlnMicrographGainName {gain}")
    gen += [f"_rlnMicrographBinning {binning:.6f}", f"_rlnMicrographOriginalPixelSize {pixel_size:.6f}",
            f"_rlnMicrographDoseRate {dose_per_frame:.6f}", f"_rlnMicrographPreExposure {pre_exposure:.6f}",
            f"_rlnVoltage {voltage:.6f}", "_rlnMicrographStartFrame 1", "_rlnMotionModelVersion 0", ""]
    rows = [[str(i + 1), f"{-sx:.6f}", f"{-sy:.6f}"] for i, (sx, sy) in enumerate(np.asarray(shifts_px, float))]
    text = "\n# version 30001\n" + "\n".join(gen) + "\n# version 30001\n" + _loop(
        "global_shift", ["rlnMicrographFrameNumber", "rlnMicrographShiftX", "rlnMicrographShiftY"], rows)
    Path(path).write_text(text)


def write_corrected_micrographs_star(path: str | os.PathLike, entries: list[dict], pixel_size: float,
                                     voltage: float, cs: float, amplitude_contrast: float,
                                     original_pixel_size: float) -> None:
    """RELION ``corrected_micrographs.star`` (one optics group).

    ``entries``: dicts with ``micrograph``, ``metadata`` (the motion STAR)
    and the accumulated motion in Å: ``total``, ``early`` (first 4 frames),
    ``late`` (the rest).
    """
    optics = _loop("optics", ["rlnOpticsGroupName", "rlnOpticsGroup", "rlnMicrographOriginalPixelSize",
                              "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
                              "rlnMicrographPixelSize"],
                   [["opticsGroup1", "1", f"{original_pixel_size:.6f}", f"{voltage:.6f}", f"{cs:.6f}",
                     f"{amplitude_contrast:.6f}", f"{pixel_size:.6f}"]])
    rows = [[e["micrograph"], e["metadata"], "1", f"{e['total']:.6f}", f"{e['early']:.6f}", f"{e['late']:.6f}"]
            for e in entries]
    mics = _loop("micrographs", ["rlnMicrographName", "rlnMicrographMetadata", "rlnOpticsGroup",
                                 "rlnAccumMotionTotal", "rlnAccumMotionEarly", "rlnAccumMotionLate"], rows)
    Path(path).write_text("\n# version 30001\n" + optics + "\n# version 30001\n" + mics)


def save_trajectory_png(path: str | os.PathLike, shifts_a: np.ndarray, title: str = "",
                        patch_centres: np.ndarray | None = None, patch_shifts_a: np.ndarray | None = None,
                        frame_size: tuple[int, int] | None = None, pixel_size: float = 1.0) -> None:
    """Trajectory plot (Å): the frame trajectory and, with patches, each patch's (magnified)."""
    from cistem_mpi.io.plots import pyplot

    plt = pyplot()
    n_axes = 2 if patch_centres is not None and patch_shifts_a is not None else 1
    fig, axes = plt.subplots(1, n_axes, figsize=(4.2 * n_axes, 4.0), dpi=100, squeeze=False)
    ax = axes[0, 0]
    s = np.asarray(shifts_a, float)
    ax.plot(s[:, 0], s[:, 1], "-o", ms=2.5, lw=1)
    ax.plot(s[:1, 0], s[:1, 1], "go", ms=5, label="first frame")
    ax.set_xlabel("x shift (Å)")
    ax.set_ylabel("y shift (Å)")
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title or "frame shifts", fontsize=8)
    if n_axes == 2:
        ax2 = axes[0, 1]
        p = np.asarray(patch_shifts_a, float)
        mag = 0.05 * (min(frame_size) * pixel_size if frame_size else 1.0) / max(1e-6, float(np.abs(p).max()))
        for c, tr in zip(np.asarray(patch_centres) * pixel_size, p):
            ax2.plot(c[0] + mag * tr[:, 0], c[1] + mag * tr[:, 1], "-", lw=0.8)
            ax2.plot([c[0]], [c[1]], "k.", ms=2)
        ax2.set_aspect("equal")
        ax2.set_title(f"local residuals (x{mag:.0f})", fontsize=8)
        ax2.set_xlabel("x (Å)")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def read_defects(path: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray:
    """Defect mask (bool, True = bad) of frames of ``shape`` from a list or an image (module notes)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "defect map not found")
    ny, nx = int(shape[0]), int(shape[1])
    if p.suffix.lower() in (".mrc", ".tif", ".tiff"):
        import warnings

        from cistem_mpi.io.gain import read_raw  # same readers and orientation as gain references

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = read_raw(p)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise InputError(p, f"cannot read defect map: {exc}") from None
        if img.shape != (ny, nx):
            raise InputError(p, f"defect map is {img.shape[1]} x {img.shape[0]} but the frames are {nx} x {ny}")
        return np.asarray(img) != 0
    mask = np.zeros((ny, nx), dtype=bool)
    for k, line in enumerate(p.read_text().splitlines(), start=1):
        t = line.split("#", 1)[0].split()
        if not t:
            continue
        try:
            if t[0].lower() == "row" and len(t) == 2:
                y = int(t[1])
                if not 0 <= y < ny:
                    raise ValueError(f"row {y} outside 0..{ny - 1}")
                mask[y, :] = True
            elif t[0].lower() in ("col", "column") and len(t) == 2:
                x = int(t[1])
                if not 0 <= x < nx:
                    raise ValueError(f"column {x} outside 0..{nx - 1}")
                mask[:, x] = True
            elif len(t) == 2:
                x, y = int(t[0]), int(t[1])
                if not (0 <= x < nx and 0 <= y < ny):
                    raise ValueError(f"pixel ({x}, {y}) outside the {nx} x {ny} frame")
                mask[y, x] = True
            else:
                raise ValueError("expected 'x y', 'row Y' or 'col X'")
        except ValueError as exc:
            raise InputError(p, f"line {k}: {exc}") from None
    return mask

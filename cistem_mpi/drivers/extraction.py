"""Particle stacks cut out of micrographs at particle positions (``package create --from-positions``).

cisTEM's "new refinement package from particle positions": every position
of the chosen images becomes a ``box`` x ``box`` image of a new stack.  Per
micrograph (as cisTEM does): values beyond 6 standard deviations are replaced
by the mean, pixels outside the micrograph take the mean of its edge pixels,
and each box is normalised to mean 0 and standard deviation 1 (inverted when
the protein is white, e.g. negative stain).  Particles are ordered by image
and then by position id, so each micrograph fills one contiguous block of
the stack.

Parallel: micrographs are the tasks of the dynamic queue; workers read and
cut, rank 0 writes each block at its place in the stack file (rank 0 is the
only writer).  The stack is the same for any number of ranks, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cistem_mpi.db import assets as assets_db
from cistem_mpi.drivers.runtime import World, map_chunks
from cistem_mpi.errors import InputError
from cistem_mpi.io.params import Optics

__all__ = ["Micrograph", "ExtractionPlan", "plan_extraction", "extract_stack", "cut_micrograph"]

#: Pixel sizes, voltages, Cs and amplitude contrasts closer than this are the same optics.
_SAME = 1e-3


@dataclass
class Micrograph:
    """One image's share of the new stack: stack indices ``start:stop`` (0-based)."""

    image_id: int
    name: str
    path: str
    start: int
    stop: int
    x0: np.ndarray  # first pixel of each box (int64)
    y0: np.ndarray


@dataclass
class ExtractionPlan:
    """Everything needed to cut the stack; built on rank 0 from the database."""

    box: int
    optics: Optics
    invert: bool
    micrographs: list[Micrograph]
    position_ids: np.ndarray  # particle_positions.id per stack image
    film: np.ndarray  # image id per stack image
    ctf: np.ndarray  # (n, 4): df1, df2, angast (deg), pshift (rad) per stack image
    shift_px: np.ndarray  # (n, 2): where each particle sits relative to its box centre (px)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.position_ids)


def plan_extraction(project, box: int, jobs: list[int] | None = None, images: list[str] | None = None,
                    invert: bool = False) -> ExtractionPlan:
    """Plan a stack from the project's particle positions.

    Parameters
    ----------
    project : Project (rank 0)
    box : int
        Box edge in pixels (even sizes are usual; any size >= 8 works).
    jobs : list of int, optional
        Only positions registered by these jobs (default: all positions).
    images : list of str, optional
        Only these images (names or ids).
    invert : bool
        Protein is white (negative stain, or inverted micrographs): invert the boxes.

    Raises
    ------
    InputError
        No positions, an image without a CTF estimate, images of different
        optics, a box larger than an image, a missing micrograph file.
    """
    from cistem_mpi.kernels.extraction import box_corners

    if box < 8:
        raise InputError("--box", f"the box must be at least 8 pixels, got {box}")
    conn = project.conn
    rows = np.array(assets_db.positions_to_extract(conn, jobs, images), dtype=np.float64).reshape(-1, 4)
    if len(rows) == 0:
        raise InputError("--from-positions", "no particle positions match (import positions first: "
                                             "`cistem-mpi import positions`)")
    image_ids = np.unique(rows[:, 1].astype(np.int64))
    # rows are sorted by image: each image's rows are one slice (no per-image scan of every row)
    bounds = np.searchsorted(rows[:, 1], image_ids, side="left").tolist() + [len(rows)]
    # every image (not an IN list: tens of thousands of micrographs exceed SQLite's variable limit)
    img_rows = assets_db.image_rows(conn)
    first = img_rows[int(image_ids[0])]
    optics = Optics(pixel_size=float(first["pixel_size"]), voltage=float(first["voltage"]), cs=float(first["cs"]),
                    amplitude_contrast=float(first["amplitude_contrast"]))
    micrographs: list[Micrograph] = []
    ctf = np.zeros((len(rows), 4), dtype=np.float64)
    shift = np.zeros((len(rows), 2), dtype=np.float64)
    for k, image_id in enumerate(image_ids):
        img = img_rows[int(image_id)]
        for key, value in (("pixel_size", optics.pixel_size), ("voltage", optics.voltage), ("cs", optics.cs),
                           ("amplitude_contrast", optics.amplitude_contrast)):
            if abs(float(img[key]) - value) > _SAME * max(1.0, abs(value)):
                raise InputError("--from-positions", f"image {img['name']} has {key} {img[key]}, but "
                                                     f"{first['name']} has {value}: one package needs one optics")
        if box > min(int(img["nx"]), int(img["ny"])):
            raise InputError("--box", f"{box} px is larger than image {img['name']} ({img['nx']}x{img['ny']})")
        path = project.resolve(img["path"])
        if not Path(path).is_file():
            raise InputError(path, f"micrograph file of image {img['name']} not found")
        est = assets_db.newest_ctf_estimate(conn, int(image_id))
        if est is None:
            raise InputError("--from-positions", f"image {img['name']} has no CTF estimate "
                                                 "(import one: `cistem-mpi import ctf`)")
        start, stop = bounds[k], bounds[k + 1]
        ps = optics.pixel_size
        x0, y0, dx, dy = box_corners(rows[start:stop, 2] / ps, rows[start:stop, 3] / ps, box)
        ctf[start:stop] = tuple(est)
        shift[start:stop, 0], shift[start:stop, 1] = dx, dy
        micrographs.append(Micrograph(int(image_id), str(img["name"]), str(path), start, stop, x0, y0))
    return ExtractionPlan(box=int(box), optics=optics, invert=bool(invert), micrographs=micrographs,
                          position_ids=rows[:, 0].astype(np.int64), film=rows[:, 1].astype(np.int32), ctf=ctf,
                          shift_px=shift,
                          summary={"images": len(micrographs), "positions": int(len(rows)), "box": int(box),
                                   "protein_is_white": bool(invert)})


def cut_micrograph(path: str, x0: np.ndarray, y0: np.ndarray, box: int, invert: bool,
                   pixel_size: float | None = None) -> np.ndarray:
    """Read one micrograph and return its normalised boxes, (n, box, box) float32.

    ``pixel_size`` is the image's (from the database), so a header without one does not warn.
    """
    from cistem_mpi.io.mrc import read_mrc
    from cistem_mpi.kernels.extraction import cut_boxes, edge_mean, normalise_boxes, replace_outliers

    data, _ = read_mrc(path, pixel_size=pixel_size)
    img = data[0] if data.ndim == 3 else data
    if not np.isfinite(img).all():
        raise InputError(path, "micrograph contains NaN or infinite values")
    img = replace_outliers(img, 6.0)
    boxes = normalise_boxes(cut_boxes(img, x0, y0, box, edge_mean(img)))
    if invert:
        np.negative(boxes, out=boxes)
    return boxes


def extract_stack(world: World, plan: ExtractionPlan | None, dst: Path | None,
                  progress: Callable[[int, int], Any] | None = None) -> None:
    """Cut the planned stack into ``dst`` (every rank calls this; rank 0 passes plan and dst).

    Workers each take micrographs from the queue; rank 0 writes the boxes of
    each micrograph at its place in ``dst`` as they arrive.
    """
    from cistem_mpi.io.mrc import MrcStackWriter

    items = None
    if world.is_controller:
        assert plan is not None and dst is not None
        items = [(m.path, m.x0, m.y0, plan.box, plan.invert, plan.optics.pixel_size) for m in plan.micrographs]

    def chunk(start: int, stop: int, data: Any) -> list[np.ndarray]:
        out = []
        for path, x0, y0, box, invert, pixel_size in data:
            out.append(cut_micrograph(path, x0, y0, box, invert, pixel_size))
            world.check()
        return out

    if not world.is_controller:
        map_chunks(world, 0, chunk)
        return
    assert plan is not None and dst is not None and items is not None
    with MrcStackWriter(dst, (plan.box, plan.box), plan.n, plan.optics.pixel_size) as out:
        def write(start: int, results: list[np.ndarray]) -> None:
            for k, boxes in enumerate(results):
                m = plan.micrographs[start + k]
                out.write_block(m.start, boxes)

        map_chunks(world, len(items), chunk, payload=lambda s, e: items[s:e], min_chunk=1, max_chunk=8,
                   progress=progress, on_result=write, keep=False)
        if not out.complete:
            raise RuntimeError(f"{dst}: only part of the stack was written")

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

Layout: :mod:`~cistem_mpi.io.star.common` (blocks, tables, columns, shared by
the coordinate and CTF readers), :mod:`~cistem_mpi.io.star.relion` and
:mod:`~cistem_mpi.io.star.cistem`; every name is importable from
``cistem_mpi.io.star`` as before.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from cistem_mpi.errors import InputError
from cistem_mpi.io.params import InvalidValue, ParticleSet, naming_source
from cistem_mpi.io.star.cistem import read_cistem, write_cistem_star
from cistem_mpi.io.star.common import (
    detect_star_flavour, flavour, parse_image_name, particle_block, read_blocks, star_text_problem,
)
from cistem_mpi.io.star.relion import (
    CONTRAST_MARK, RELION_OPTICS_REQUIRED, read_relion, relion_readability_problems, star_protein_is_white,
    write_relion_star,
)

__all__ = [
    "read_star",
    "write_relion_star",
    "write_cistem_star",
    "detect_star_flavour",
    "parse_image_name",
    "star_protein_is_white",
    "star_text_problem",
    "relion_readability_problems",
    "CONTRAST_MARK",
    "RELION_OPTICS_REQUIRED",
]


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
    blocks = read_blocks(p)
    name, table = particle_block(p, blocks)
    missing = [r for r in required if r not in table.columns]
    if missing:
        block = f"data_{name}"
        raise InputError(p, f"required column{'s' if len(missing) > 1 else ''} "
                            f"{', '.join('_' + m for m in missing)} missing in {block}")
    try:
        if flavour(blocks, table) == "cistem":
            return read_cistem(p, table, pixel_size)
        return read_relion(p, blocks, table, pixel_size)
    except InvalidValue as exc:  # an optics value the file holds (negative pixel size, ...): name the file
        raise naming_source(exc, p) from None

"""``cistem-mpi convert IN OUT``: parameter files between formats.

Reads Frealign X ``.par``, cisTEM ``.star``, RELION ``.star`` (1.x/3.0,
3.1+, 5; auto-detected) and cryoSPARC ``.cs``; writes ``.par``, cisTEM
``.star`` or RELION ``.star`` (3.1+ style by default, 3.0 with
``--relion-style 3.0``).  Pixel size and optics come from the input; flags
fill in what the input lacks (a ``.par`` has no optics) or replace it (with
a warning).  Unit and sign conversions are those of :mod:`cistem_mpi.io.star`
(e.g. SHX/SHY in Å = -rlnOriginX/Y x pixel size, as cisTEM's import does).

Runs on one process; no database, no MPI.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

from cistem_mpi.errors import InputError
from cistem_mpi.io.cryosparc import read_cryosparc
from cistem_mpi.io.par import read_par, write_par
from cistem_mpi.io.params import Optics, ParticleSet
from cistem_mpi.io.star import read_star, write_cistem_star, write_relion_star

FORMATS = ("par", "cistem-star", "relion-star")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``convert`` command."""
    p = sub.add_parser(
        "convert",
        help="convert parameter files: .par <-> cisTEM .star <-> RELION .star, and from cryoSPARC .cs",
        description="Convert particle parameter files. Input format from the extension (.par, .star with "
                    "auto-detected flavour, .cs); output format from the extension and --to.",
    )
    p.add_argument("input", help="input .par, .star or .cs")
    p.add_argument("output", help="output .par or .star")
    p.add_argument("--to", choices=FORMATS, help="output format (default: .par -> par, .star -> relion-star)")
    p.add_argument("--relion-style", choices=("3.1", "3.0"), default="3.1",
                   help="RELION output: 3.1 (optics group table, origins in Å) or 3.0 (default 3.1)")
    p.add_argument("--pixel-size", type=float, help="pixel size in Å (needed for a .par input)")
    p.add_argument("--voltage", type=float, help="kV (default from the input, else 300)")
    p.add_argument("--cs", type=float, help="spherical aberration in mm (default from the input, else 2.7)")
    p.add_argument("--amplitude-contrast", type=float, help="amplitude contrast (default from the input, else 0.07)")
    p.add_argument("--box-size", type=int, help="image size in pixels (written as rlnImageSize)")
    p.add_argument("--stack", help="particle stack the positions refer to (written into image names)")
    p.add_argument("--no-cistem-columns", action="store_true",
                   help="RELION output: do not add the _cisTEM* columns that keep FILM/OCC/LogP/SIGMA/SCORE/CHANGE/MAG")
    p.add_argument("--exclude-negative-film", action="store_true", help="drop particles whose FILM is negative")
    p.set_defaults(func=run)


def _input_kind(path: Path) -> str:
    ext = path.suffix.lower()
    if ext == ".par":
        return "par"
    if ext == ".star":
        return "star"
    if ext == ".cs":
        return "cs"
    raise InputError(path, f"unknown parameter file type '{path.suffix}' (use .par, .star or .cs)")


def _output_kind(path: Path, to: str | None) -> str:
    ext = path.suffix.lower()
    if to is not None:
        if to == "par" and ext not in (".par", ""):
            raise InputError(path, "--to par needs a .par output file")
        if to != "par" and ext not in (".star", ""):
            raise InputError(path, f"--to {to} needs a .star output file")
        return to
    if ext == ".par":
        return "par"
    if ext == ".star":
        return "relion-star"
    raise InputError(path, f"unknown output type '{path.suffix}' (use .par or .star, or --to)")


def _read(path: Path, args: argparse.Namespace) -> ParticleSet:
    kind = _input_kind(path)
    if kind == "par":
        params = read_par(path)
        ps = args.pixel_size if args.pixel_size is not None else 0.0
        return ParticleSet(params=params, optics=[Optics(pixel_size=float(ps))])
    if kind == "cs":
        return read_cryosparc(path, pixel_size=args.pixel_size)
    return read_star(path, pixel_size=args.pixel_size)


def _apply_optics_flags(ps: ParticleSet, args: argparse.Namespace, source: Path) -> None:
    for flag, attr in (("voltage", "voltage"), ("cs", "cs"), ("amplitude_contrast", "amplitude_contrast")):
        value = getattr(args, flag)
        if value is None:
            continue
        for o in ps.optics:
            old = getattr(o, attr)
            if source.suffix.lower() != ".par" and abs(old - value) > 1e-6 * max(abs(value), 1.0):
                warnings.warn(f"{source}: {attr.replace('_', ' ')} {old:g} replaced by the given {value:g}",
                              stacklevel=2)
            setattr(o, attr, float(value))
    if args.box_size is not None:
        if args.box_size < 1:
            raise InputError("--box-size", f"must be positive, got {args.box_size}")
        for o in ps.optics:
            o.extra["rlnImageSize"] = int(args.box_size)
            o.extra.setdefault("rlnImageDimensionality", 2)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(f"warning: {message}\n")


def run(args: argparse.Namespace) -> int:
    """Convert ``args.input`` to ``args.output``; return 0."""
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning  # "warning: file: problem", no source lines
        return _convert(args)


def _convert(args: argparse.Namespace) -> int:
    src, dst = Path(args.input), Path(args.output)
    if not src.exists():
        raise InputError(src, "file not found")
    if src.resolve() == dst.resolve():
        raise InputError(dst, "output is the same file as the input")
    out_kind = _output_kind(dst, args.to)
    ps = _read(src, args)
    _apply_optics_flags(ps, args, src)
    if args.exclude_negative_film:
        keep = ps.params["film"] >= 0
        ps = ParticleSet(
            params=ps.params[keep], optics=ps.optics, optics_group=ps.optics_group[keep],
            image_names=[n for n, k in zip(ps.image_names, keep.tolist()) if k] if ps.image_names else None,
            extra={k: np.asarray(v)[keep] for k, v in ps.extra.items()},
        )
    if out_kind != "par":
        unknown = [o.name for o in ps.optics if not o.pixel_size > 0]
        if unknown:
            raise InputError("--pixel-size", f"{src} has no pixel size; give --pixel-size to write a .star file")
    if out_kind == "par":
        write_par(dst, ps.params)
    elif out_kind == "cistem-star":
        write_cistem_star(dst, ps, stack=args.stack)
    else:
        write_relion_star(dst, ps, style=args.relion_style, stack=args.stack,
                          keep_cistem_columns=not args.no_cistem_columns)
    sys.stdout.write(f"converted {len(ps)} particles ({len(ps.optics)} optics group"
                     f"{'s' if len(ps.optics) != 1 else ''}): {src} -> {dst} ({out_kind})\n")
    return 0

"""Particle parameter files of any supported format (.par, .star, .cs), read and checked against a stack.

Shared by ``import particles``, ``reconstruct --stack`` and ``package create
--from-stack``: one reader picks the format by suffix, one rule decides the
stack's contrast, one check compares a header's pixel size with the one in use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from cistem_mpi.errors import InputError
from cistem_mpi.io.params import InvalidValue, Optics, ParticleSet, naming_source

__all__ = ["PIXEL_SIZE_TOLERANCE", "read_particle_params", "check_header_pixel_size", "stack_protein_is_white"]

#: Tolerance when comparing pixel sizes from two sources (Å).
PIXEL_SIZE_TOLERANCE = 1e-3


def check_header_pixel_size(path: Path, header_ps: float, pixel_size: float) -> None:
    """A header with a real pixel size (not 0 or 1) must agree with the one in use.

    Raises
    ------
    InputError
        The header's pixel size differs from ``pixel_size`` by more than :data:`PIXEL_SIZE_TOLERANCE`.

    >>> check_header_pixel_size(Path("p.mrcs"), 1.0, 1.3)  # 1 means "unset"
    >>> check_header_pixel_size(Path("p.mrcs"), 1.3, 1.3)
    """
    if header_ps and abs(header_ps - 1.0) > 1e-6 and abs(header_ps - pixel_size) > PIXEL_SIZE_TOLERANCE:
        raise InputError(path, f"header pixel size {header_ps:.4f} Å does not match {pixel_size:.4f} Å")


def read_particle_params(path: Path, pixel_size: float | None, n_in_stack: int,
                         optics: tuple[float, float, float] = (300.0, 2.7, 0.07)) -> ParticleSet:
    """Read one parameter file (.par/.star/.cs) and check it against the stack.

    Parameters
    ----------
    path : Path
        Frealign X ``.par``, cisTEM or RELION ``.star`` or cryoSPARC ``.cs``.
    pixel_size : float or None
        Å per pixel (needed for a ``.par``, which carries none; overrides a file's own).
    n_in_stack : int
        Particles in the stack: every position must be in ``1..n_in_stack``.
    optics : (float, float, float)
        Voltage (kV), Cs (mm) and amplitude contrast for a ``.par``.

    Returns
    -------
    ParticleSet

    Raises
    ------
    InputError
        Unknown suffix, no particles, a position outside the stack, no pixel size for a ``.par``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".par":
        from cistem_mpi.io.par import read_par

        params = read_par(path)
        if pixel_size is None:
            raise InputError(path, ".par files carry no pixel size; give --pixel-size")
        voltage, cs, ac = optics
        try:
            ps = ParticleSet(params=params, optics=[Optics(pixel_size=pixel_size, voltage=voltage, cs=cs,
                                                           amplitude_contrast=ac)])
        except InvalidValue as exc:  # the optics of a .par come from the command line
            raise naming_source(exc, path, options=True) from None
    elif suffix == ".star":
        from cistem_mpi.io.star import read_star

        ps = read_star(path, pixel_size=pixel_size)
    elif suffix == ".cs":
        from cistem_mpi.io.cryosparc import read_cryosparc

        ps = read_cryosparc(path, pixel_size=pixel_size)
    else:
        raise InputError(path, "unknown parameter file type (expected .par, .star or .cs)")
    if len(ps) == 0:
        raise InputError(path, "no particles in parameter file")
    pos = ps.params["position"]
    if pos.min() < 1 or pos.max() > n_in_stack:
        bad = int(pos[(pos < 1) | (pos > n_in_stack)][0])
        raise InputError(path, f"refers to particle {bad}, but the stack has {n_in_stack} particles")
    return ps


def stack_protein_is_white(given: bool | None, params: Iterable[Path]) -> bool:
    """The contrast of a stack that comes with parameter files ``params``.

    ``given`` (``--protein-is-white``/``--protein-is-dark``) decides when not
    None; else a RELION ``.star`` means protein white (RELION extracts so),
    unless the file states its contrast (our exports do), and anything else
    means protein dark (cisTEM).

    Raises
    ------
    InputError
        The files imply different contrasts.

    >>> stack_protein_is_white(None, [Path("run_it025.par")])
    False
    >>> stack_protein_is_white(True, [Path("run_it025.par")])
    True
    """
    if given is not None:
        return bool(given)
    from cistem_mpi.io.star import star_protein_is_white

    votes = {}
    for path in params:
        votes[path] = star_protein_is_white(path) if Path(path).suffix.lower() == ".star" else False
    if len(set(votes.values())) > 1:
        raise InputError("--protein-is-white", "the parameter files imply different contrasts (RELION .star: "
                                               "protein white; others: dark); say which with --protein-is-white "
                                               "or --protein-is-dark")
    return bool(next(iter(votes.values()), False))

"""``cistem-mpi package create``: refinement packages (cisTEM's "New Refinement Package" wizard).

A refinement package is a particle stack, a number of classes, a symmetry
and a set of starting parameters (a ``'start'`` refinement, "Start Params
#<run>", with one parameter file per class).  Sources:

``--from-refinement RUN``
    A refinement of an existing package is the template (cisTEM: "use another
    refinement package as a template").  Each particle belongs to the old class
    where its occupancy is highest (ties: the lowest class number).
    ``--keep`` chooses the old classes whose particles are carried over
    (default all: "Carry over all particles? Yes"); the particles of the other
    classes leave the package *and its stack*: a new stack
    ``Assets/ParticleStacks/particle_stack_<package>.mrcs`` is written with only
    the kept particles, renumbered 1..n.  When every particle is kept the
    template's stack is used as it is (cisTEM does the same: no copy).
    ``--map OLD:NEW`` assigns old classes to new ones; several old classes may
    go into one new class, and one old class may be split over several new
    ones (its particles then share their occupancy equally between them).
    Without ``--map``: the i-th kept class becomes new class i when the
    numbers agree, everything goes into class 1 when ``--classes 1``, and one
    kept class (e.g. a 1-class template) is split over all new classes.

    Parameters of new class c for a particle: its row in the old class it came
    from when that class maps to c; otherwise (occupancy 0 in c) its row in the
    old class mapped to c where it has the highest occupancy -- cisTEM's
    wizard does this, so each new class starts from the alignment that fits
    the map it descends from.  Occupancy: 100 in the particle's new class and 0
    in the others; 100/m in each of m classes for a split class.

``--from-stack ID``
    An imported or extracted particle stack (``particle_stacks`` row).  All
    particles are kept, the stack is used as it is.  Its parameters are the
    stack's ``params_path`` file (.h5/.par/.star) when it has one; otherwise
    neutral ones with orientations uniform on SO(3) (as cisTEM's wizard for a
    new package) -- refine them with ab initio or a global search.

``--from-positions --box B``
    Particle positions of imported or picked images, cut out of the
    micrographs into a new stack ``particle_stack_<package>.mrcs`` (see
    :mod:`cistem_mpi.drivers.extraction`; in parallel over micrographs).
    ``--positions-job`` / ``--images`` narrow the positions taken.  Each
    particle gets its image's newest CTF estimate, FILM = the image id, a
    random orientation (as cisTEM's wizard) and as its shift the sub-pixel
    part of its position that the box cannot hold (cisTEM drops it).  From
    500 particles on, the half sets are stored by micrograph (see
    :func:`cistem_mpi.kernels.packages.split_by_micrograph`), so duplicate picks cannot correlate the
    half maps; every package and refinement made from this one keeps that
    split (the ``half_set`` column of the parameter files).
    ``refinement_package_members.parent_position`` holds the
    ``particle_positions`` id for these packages.

``--from-classification N --select C[,C...]``
    Particles of the selected classes of 2D classification #N (cisTEM: "create
    from 2D class average selection").  The classification's ``params_path``
    is an HDF5 parameter file (:mod:`cistem_mpi.io.param_store`) whose
    per-particle 2D class (1-based, one per ``params`` row) is the column
    ``class_2d``, read with ``read_params_column(path, "class_2d")``; the rows'
    ``position`` is the position in the classified package's stack.  The
    selected particles are copied into a new stack; each keeps its CTF
    (defocus, astigmatism, phase shift) and FILM, and gets a random 3D
    orientation and zero shifts (2D in-plane alignments say nothing about the
    3D orientation).

Occupancy with several classes
------------------------------
A particle without a class of its own (``--from-stack`` or
``--from-classification`` with ``--classes K > 1``, a split template class)
gets 100/K (100/m) in each class; ``--randomise-occupancies`` instead draws
every particle's occupancy in every class uniformly from [0, 200/K) as
cisTEM's wizard does.  Auto refine always starts its references from
randomised occupancies (seed FAQ); for manual refine of an equal-share
package use its ``--randomise-occupancies``.

Every check is done before anything is written; a bad option or file gives
one ``InputError`` (exit 2) and the project is exactly as before.  The stack
is streamed image by image through :class:`~cistem_mpi.io.mrc.MrcStackWriter`
(never held in memory) to a ``.part`` file renamed when complete.

``refinement_package_members`` rows: ``position`` = position in the new
package's stack (the parameter files' ``position``), ``parent_position`` =
position in the source stack, ``class_number`` = the class where the particle's
starting occupancy is highest.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cistem_mpi.db import naming
from cistem_mpi.db import packages as packages_db
from cistem_mpi.db.classification import classification_by_number
from cistem_mpi.drivers.jobrun import JobContext, add_job_arguments, check_options, run_job
from cistem_mpi.errors import InputError, check_free_space
from cistem_mpi.io.params import Optics, ParticleSet, empty_params
from cistem_mpi.kernels.packages import (
    SPLIT_MIN_MICROGRAPHS, SPLIT_MIN_PARTICLES, best_class, plan_from_template, share_occupancies,
    split_by_micrograph,
)
#: Bytes of images read from the source stack at a time while copying.
COPY_BATCH_BYTES = 32 * 1024 * 1024
#: Stored types a copied stack keeps (what MrcStackWriter writes); others become float32.
_COPY_DTYPES = tuple(np.dtype(t) for t in (np.float32, np.float16, np.int16, np.uint16, np.int8))

__all__ = ["register", "parse_class_list", "parse_mapping", "copy_particles"]


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------

def register(sub: argparse._SubParsersAction) -> None:
    """Add ``package create``."""
    p = sub.add_parser("package", help="refinement packages (from a stack, particle positions, a refinement or 2D classes)")
    psub = p.add_subparsers(dest="package_command", metavar="<action>", required=True)
    c = psub.add_parser(
        "create", help="create a refinement package",
        description="Create a refinement package from a particle stack, from particle positions (cut out of the "
                    "images), from a refinement of another package "
                    "(template: keep, drop and merge its classes) or from selected 2D classes.")
    add_job_arguments(c)
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-refinement", type=int, metavar="RUN",
                     help="template: refinement run RUN of an existing package (its per-class parameters)")
    src.add_argument("--from-stack", type=int, metavar="ID", help="particle stack ID (all particles)")
    src.add_argument("--from-classification", type=int, metavar="N", help="2D classification #N (with --select)")
    src.add_argument("--from-positions", action="store_true",
                     help="cut particles out of the images at their particle positions (with --box)")
    c.add_argument("--box", type=int, metavar="PX", help="box size in pixels (--from-positions)")
    c.add_argument("--positions-job", type=int, action="append", metavar="JOB",
                   help="only positions registered by this job (repeat; --from-positions)")
    c.add_argument("--images", metavar="NAME[,NAME...]", help="only positions on these images (names or ids)")
    c.add_argument("--protein-is-white", action="store_true",
                   help="invert the cut particles (negative stain, inverted micrographs; --from-positions)")
    c.add_argument("--classes", type=int, metavar="K",
                   help="number of classes for 3D refinement (default: 1; with a template: the number of kept "
                        "classes, or the highest NEW in --map)")
    c.add_argument("--keep", metavar="OLD[,OLD...]",
                   help="template classes whose particles are carried over (default: all); "
                        "the particles of the others are left out of the new stack")
    c.add_argument("--map", action="append", metavar="OLD:NEW",
                   help="assign template class OLD to new class NEW (repeat, or comma-separate; several OLD may "
                        "share one NEW)")
    c.add_argument("--select", metavar="C[,C...]", help="2D classes whose particles to take (--from-classification; "
                                                      "'auto': the classes classify-2d selected automatically)")
    c.add_argument("--randomise-occupancies", action="store_true",
                   help="start occupancies uniform random in [0, 200/K) (cisTEM's wizard option)")
    c.add_argument("--seed", type=int, default=1, help="random seed (orientations, occupancies)")
    c.add_argument("--symmetry", help="point group, e.g. C1, D7, O (default: the template's, else C1)")
    c.add_argument("--name", help="package name (default: 'Refinement Package #<id>')")
    c.add_argument("--molecular-weight", type=float, help="kDa (default: the template's)")
    c.add_argument("--largest-dimension", type=float, help="Å (default: the template's)")
    c.set_defaults(func=lambda a: run_job(_checked(a), "create_package", _create))


def _checked(a: argparse.Namespace) -> argparse.Namespace:
    """Every option checked before the job record exists (exit 2, nothing recorded)."""
    check_options(a, symmetry=("symmetry",), at_least_one=("classes",),
                  positive=("molecular_weight", "largest_dimension"))
    if a.box is not None and a.box < 8:
        raise InputError("--box", f"the box must be at least 8 pixels, got {a.box}")
    return a


# --------------------------------------------------------------------------
# class options (the class arithmetic is kernels.packages')
# --------------------------------------------------------------------------

def parse_class_list(text: str, option: str) -> list[int]:
    """``"1,3, 4"`` -> ``[1, 3, 4]`` (sorted, unique); InputError naming ``option`` if malformed."""
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.add(int(part))
        except ValueError:
            raise InputError(option, f"expected class numbers like 1,3 but got {text!r}") from None
    if not out:
        raise InputError(option, "no class given")
    return sorted(out)


def parse_mapping(items: list[str]) -> dict[int, list[int]]:
    """``["1:1", "2:1,3:2"]`` -> ``{1: [1], 2: [1], 3: [2]}`` (old class -> sorted new classes)."""
    out: dict[int, set[int]] = {}
    for item in items:
        for pair in item.split(","):
            pair = pair.strip()
            if not pair:
                continue
            try:
                old, new = (int(v) for v in pair.split(":"))
            except ValueError:
                raise InputError("--map", f"expected OLD:NEW (e.g. 2:1) but got {pair!r}") from None
            out.setdefault(old, set()).add(new)
    if not out:
        raise InputError("--map", "no OLD:NEW pair given")
    return {k: sorted(v) for k, v in sorted(out.items())}


# --------------------------------------------------------------------------
# stack copy
# --------------------------------------------------------------------------

def copy_particles(src: Path, positions: np.ndarray, dst: Path, pixel_size: float, progress=None) -> None:
    """Copy images ``positions`` (1-based, in this order) of ``src`` into a new stack ``dst``.

    Images are read in batches of about :data:`COPY_BATCH_BYTES` and written
    one by one with :class:`MrcStackWriter`, so the stack is never held in
    memory.  The stored data type of ``src`` is kept when the writer supports
    it (float32, float16, int16, uint16, int8), so copied images are
    bit-identical.
    """
    from cistem_mpi.io.mrc import MrcStackWriter, check_finite, open_stack

    n = len(positions)
    with open_stack(src, pixel_size=pixel_size) as stack:
        dtype = np.dtype(stack.dtype) if np.dtype(stack.dtype) in _COPY_DTYPES else np.dtype(np.float32)
        ny, nx = stack.shape[-2:]
        batch = max(1, COPY_BATCH_BYTES // max(1, ny * nx * 4))
        with MrcStackWriter(dst, (ny, nx), n, pixel_size, dtype=dtype) as out:
            for s0 in range(0, n, batch):
                idx = np.asarray(positions[s0:s0 + batch], dtype=np.int64) - 1
                imgs = stack[idx]
                check_finite(imgs, src, idx + 1)  # never copy a NaN pixel into a new asset
                for img in imgs:
                    out.append(img)
                if progress is not None:
                    progress(min(s0 + batch, n), n)
            if not out.complete:  # pragma: no cover - guarded by the loop above
                raise RuntimeError(f"{dst}: only part of the stack was written")


# --------------------------------------------------------------------------
# the job
# --------------------------------------------------------------------------

@dataclass
class _Source:
    """A resolved source: particle rows, their classes' parameters, the stack they live in."""

    stack_row: Any  # sqlite3.Row of particle_stacks (None: the stack is cut from micrographs)
    stack_path: Path | None
    optics: Optics
    params: list[np.ndarray]  # per new class, positions = positions in the source stack
    new_class: np.ndarray
    subset: bool  # True: write a new stack with only these particles
    parent_package: int | None = None
    parent_refinement: int | None = None
    defaults: dict[str, Any] = field(default_factory=dict)  # symmetry, weight, dimension of a template
    summary: dict[str, Any] = field(default_factory=dict)
    extraction: Any = None  # ExtractionPlan when the stack is cut from micrographs
    half_set: np.ndarray | None = None  # a stored half-set split per row (1/2), carried into the package

    @property
    def box(self) -> int:
        return int(self.extraction.box) if self.extraction is not None else int(self.stack_row["box"])


def _carried_halves(path: Path, rows: np.ndarray) -> np.ndarray | None:
    """The half-set split stored in parameter file ``path``, for its stack positions ``rows``
    (None when the file stores none, so the package uses the default split)."""
    from cistem_mpi.io.param_store import read_params_column, read_params_h5
    from cistem_mpi.kernels.reconstruction import half_lookup

    if Path(path).suffix.lower() != ".h5":
        return None
    half = read_params_column(path, "half_set")
    if half is None:
        return None
    table = half_lookup(read_params_h5(path)["position"], half)
    return table[np.asarray(rows, dtype=np.int64)]


def _stack_is_white(stack_row) -> bool:
    """The stored contrast of a particle stack row (protein white: RELION's convention)."""
    return bool(stack_row is not None and "protein_is_white" in stack_row.keys() and stack_row["protein_is_white"])


def _reject_options(a: dict[str, Any], source: str, *names: str) -> None:
    for name in names:
        if a.get(name.strip("-").replace("-", "_")) not in (None, False):
            raise InputError(name, f"cannot be used with {source}")


def _stack_row(conn, stack_id: int, option: str):
    row = packages_db.stack_by_id(conn, stack_id)
    if row is None:
        raise InputError(option, f"no particle stack #{stack_id} in this project")
    return row


def _optics_of(stack_row) -> Optics:
    return Optics(pixel_size=float(stack_row["pixel_size"]), voltage=float(stack_row["voltage"]),
                  cs=float(stack_row["cs"]), amplitude_contrast=float(stack_row["amplitude_contrast"]))


def _check_positions(positions: np.ndarray, n_stack: int, what: str | Path, stack: Path) -> None:
    if positions.size and (positions.min() < 1 or positions.max() > n_stack):
        bad = int(positions[(positions < 1) | (positions > n_stack)][0])
        raise InputError(what, f"refers to particle {bad}, but the stack {stack} has {n_stack} particles")
    if np.unique(positions).size != positions.size:
        raise InputError(what, "lists the same stack position more than once")


def _stack_length(path: Path, pixel_size: float) -> int:
    from cistem_mpi.io.mrc import open_stack

    with open_stack(path, pixel_size=pixel_size) as st:
        return len(st)


def _from_refinement(ctx: JobContext, a: dict[str, Any], rng: np.random.Generator | None) -> _Source:
    from cistem_mpi.io.param_store import read_params_h5

    _reject_options(a, "--from-refinement", "--select")
    assert ctx.project is not None
    conn = ctx.project.conn
    run = int(a["from_refinement"])
    ref = packages_db.refinement_by_id(conn, run)
    if ref is None:
        raise InputError("--from-refinement", f"no refinement #{run} in this project")
    pkg = packages_db.package_by_id(conn, ref["package_id"])
    stack_row = _stack_row(conn, int(pkg["stack_id"]), "--from-refinement")
    rows = packages_db.refinement_class_rows(conn, run)
    if not rows:
        raise InputError("--from-refinement", f"refinement #{run} has no class parameter files")
    old_classes = [int(r["class_number"]) for r in rows]
    old_params = []
    first_path = None
    for r in rows:
        path = ctx.project.resolve(r["params_path"])
        p = read_params_h5(path)
        order = np.argsort(p["position"], kind="stable")
        p = p[order]
        if first_path is None:
            first_path, first = path, p
        elif len(p) != len(first) or not np.array_equal(p["position"], first["position"]):
            raise InputError(path, f"lists other particles than {first_path} (class {old_classes[0]})")
        old_params.append(p)
    optics = _optics_of(stack_row)
    stack_path = ctx.project.resolve(stack_row["path"])
    _check_positions(old_params[0]["position"], _stack_length(stack_path, optics.pixel_size),
                     first_path or "--from-refinement", stack_path)
    keep = parse_class_list(a["keep"], "--keep") if a.get("keep") else None
    mapping = parse_mapping(a["map"]) if a.get("map") else None
    plan = plan_from_template(old_classes, old_params, a.get("classes"), keep, mapping, rng, run)
    subset = plan.take.size < len(old_params[0])
    counts = {c: int(np.count_nonzero(plan.old_class == c)) for c in plan.mapping}
    return _Source(
        stack_row=stack_row, stack_path=stack_path, optics=optics, params=plan.params, new_class=plan.new_class,
        subset=subset, parent_package=int(pkg["id"]), parent_refinement=run,
        half_set=_carried_halves(first_path, plan.params[0]["position"]) if first_path is not None else None,
        defaults={"symmetry": pkg["symmetry"], "molecular_weight": pkg["molecular_weight"],
                  "largest_dimension": pkg["largest_dimension"]},
        summary={"template_run": run, "template_package": int(pkg["id"]),
                 "mapping": {str(k): v for k, v in plan.mapping.items()},
                 "kept_per_old_class": {str(k): v for k, v in counts.items()},
                 "dropped_per_old_class": {str(k): v for k, v in plan.dropped.items()}},
    )


def _fresh_params(base: np.ndarray, n_new: int, rng_angles: np.random.Generator,
                  rng_occ: np.random.Generator | None) -> list[np.ndarray]:
    """Per-class parameters for particles without 3D alignment: random orientations, no shifts."""
    from cistem_mpi.kernels.euler import matrix_to_euler, random_rotations

    p = empty_params(len(base))
    p["position"] = base["position"]
    for col in ("film", "df1", "df2", "angast", "pshift"):
        p[col] = base[col]
    phi, theta, psi = matrix_to_euler(random_rotations(len(base), rng_angles))
    p["psi"], p["theta"], p["phi"] = psi, theta, phi
    everyone = np.ones(len(base), dtype=bool)
    occ = share_occupancies([everyone] * n_new, n_new, rng_occ)
    out = []
    for k in range(n_new):
        q = p.copy()
        q["occ"] = occ[k]
        out.append(q)
    return out


def _with_occupancies(base: np.ndarray, n_new: int, rng_occ: np.random.Generator | None) -> list[np.ndarray]:
    """Per-class copies of known parameters, occupancies shared between the classes."""
    everyone = np.ones(len(base), dtype=bool)
    occ = share_occupancies([everyone] * n_new, n_new, rng_occ)
    out = []
    for k in range(n_new):
        q = base.copy()
        q["occ"] = occ[k]
        out.append(q)
    return out


def _n_classes(a: dict[str, Any]) -> int:
    k = a.get("classes")
    if k is None:
        return 1
    if k < 1:
        raise InputError("--classes", f"the number of classes must be at least 1, got {k}")
    return int(k)


def _from_stack(ctx: JobContext, a: dict[str, Any], rng: np.random.Generator | None) -> _Source:
    from cistem_mpi.io.param_store import read_params_h5

    _reject_options(a, "--from-stack", "--keep", "--map", "--select")
    assert ctx.project is not None
    stack_row = _stack_row(ctx.project.conn, int(a["from_stack"]), "--from-stack")
    optics = _optics_of(stack_row)
    stack_path = ctx.project.resolve(stack_row["path"])
    n_stack = _stack_length(stack_path, optics.pixel_size)
    n_new = _n_classes(a)
    stored = stack_row["params_path"]
    if stored:
        path = ctx.project.resolve(stored)
        if path.suffix.lower() == ".h5":
            base = read_params_h5(path)
        else:
            from cistem_mpi.io.parameter_files import read_particle_params

            if not path.is_file():
                raise InputError(path, "file not found")
            base = read_particle_params(path, optics.pixel_size, n_stack).params
        _check_positions(base["position"], n_stack, path, stack_path)
        params = _with_occupancies(base, n_new, rng)
        origin = str(path)
        halves = _carried_halves(path, base["position"])
    else:
        base = empty_params(n_stack)
        halves = None
        params = _fresh_params(base, n_new, np.random.default_rng(a.get("seed", 1)), rng)
        origin = "random orientations (the stack has no parameters)"
        ctx.log.warning("particle stack #%d has no parameter file: random orientations, no CTF values",
                        int(stack_row["id"]))
    return _Source(stack_row=stack_row, stack_path=stack_path, optics=optics, params=params,
                   new_class=best_class(np.stack([p["occ"] for p in params])) + 1, subset=False,
                   summary={"stack": int(stack_row["id"]), "parameters": origin}, half_set=halves)


def _from_classification(ctx: JobContext, a: dict[str, Any], rng: np.random.Generator | None) -> _Source:
    from cistem_mpi.io.param_store import read_params_column, read_params_h5

    _reject_options(a, "--from-classification", "--keep", "--map")
    if not a.get("select"):
        raise InputError("--select", "give the 2D classes to take (e.g. --select 1,4,7)")
    assert ctx.project is not None
    conn = ctx.project.conn
    number = int(a["from_classification"])
    cls = classification_by_number(conn, number)
    if cls is None:
        raise InputError("--from-classification", f"no 2D classification #{number} in this project")
    if cls["package_id"] is None:
        raise InputError("--from-classification", f"2D classification #{number} has no refinement package")
    if not cls["params_path"]:
        raise InputError("--from-classification", f"2D classification #{number} has no per-particle parameters")
    pkg = packages_db.package_by_id(conn, cls["package_id"])
    stack_row = _stack_row(conn, int(pkg["stack_id"]), "--from-classification")
    path = ctx.project.resolve(cls["params_path"])
    params = read_params_h5(path)
    try:
        classes = read_params_column(path, "class_2d")
    except (OSError, KeyError) as exc:
        raise InputError(path, f"cannot read the 2D classes ({exc})") from exc
    if classes is None:
        raise InputError(path, "has no 'class_2d' column (the per-particle 2D class)")
    classes = np.asarray(classes).astype(np.int64).ravel()
    if len(classes) != len(params):
        raise InputError(path, f"'class_2d' has {len(classes)} rows but the parameters have {len(params)}")
    n2d = int(cls["n_classes"])
    if a["select"].strip().lower() == "auto":  # the classify-2d job's automatic selection
        from cistem_mpi.db.classification import auto_selected_classes

        select = auto_selected_classes(conn, number)
        if not select:
            raise InputError("--select", f"2D classification #{number} has no automatically selected class")
    else:
        select = parse_class_list(a["select"], "--select")
    bad = [c for c in select if not 1 <= c <= n2d]
    if bad:
        raise InputError("--select", f"class {bad[0]} is not a class of 2D classification #{number} (1..{n2d})")
    take = np.nonzero(np.isin(classes, select))[0]
    if take.size == 0:
        raise InputError("--select", f"no particle is in 2D class(es) {', '.join(map(str, select))} "
                                     f"of classification #{number}; nothing to put in the package")
    optics = _optics_of(stack_row)
    stack_path = ctx.project.resolve(stack_row["path"])
    base = params[take]
    _check_positions(base["position"], _stack_length(stack_path, optics.pixel_size), path, stack_path)
    out = _fresh_params(base, _n_classes(a), np.random.default_rng(a.get("seed", 1)), rng)
    per_class = {str(c): int(np.count_nonzero(classes[take] == c)) for c in select}
    return _Source(stack_row=stack_row, stack_path=stack_path, optics=optics, params=out,
                   new_class=best_class(np.stack([p["occ"] for p in out])) + 1, subset=True,
                   parent_package=int(pkg["id"]),
                   defaults={"symmetry": pkg["symmetry"], "molecular_weight": pkg["molecular_weight"],
                             "largest_dimension": pkg["largest_dimension"]},
                   summary={"classification": number, "selected": select, "per_2d_class": per_class},
                   half_set=_carried_halves(path, base["position"]))


def _from_positions(ctx: JobContext, a: dict[str, Any], rng: np.random.Generator | None) -> _Source:
    from cistem_mpi.drivers.extraction import plan_extraction

    _reject_options(a, "--from-positions", "--keep", "--map", "--select")
    if not a.get("box"):
        raise InputError("--box", "give the box size in pixels for --from-positions")
    assert ctx.project is not None
    images = [s.strip() for s in a["images"].split(",") if s.strip()] if a.get("images") else None
    plan = plan_extraction(ctx.project, int(a["box"]), a.get("positions_job"), images, a.get("protein_is_white"))
    base = empty_params(plan.n)
    base["position"] = np.arange(1, plan.n + 1)
    base["film"] = plan.film
    base["df1"], base["df2"], base["angast"], base["pshift"] = plan.ctf.T
    params = _fresh_params(base, _n_classes(a), np.random.default_rng(a.get("seed", 1)), rng)
    for p in params:
        # the particle sits at +d px from its box centre: a cisTEM shift of +d * pixel size
        p["shx"] = plan.shift_px[:, 0] * plan.optics.pixel_size
        p["shy"] = plan.shift_px[:, 1] * plan.optics.pixel_size
    return _Source(stack_row=None, stack_path=None, optics=plan.optics, params=params,
                   new_class=best_class(np.stack([p["occ"] for p in params])) + 1, subset=True,
                   summary=plan.summary, extraction=plan, half_set=split_by_micrograph(plan.film, SPLIT_MIN_PARTICLES,
                                                                                   SPLIT_MIN_MICROGRAPHS))


def _metadata(a: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    from cistem_mpi.kernels.symmetry import parse_symmetry

    symmetry = (a.get("symmetry") or defaults.get("symmetry") or "C1").strip().upper()
    try:
        parse_symmetry(symmetry)
    except ValueError as exc:
        raise InputError("--symmetry", str(exc)) from None
    out = {"symmetry": symmetry}
    for key, option in (("molecular_weight", "--molecular-weight"), ("largest_dimension", "--largest-dimension")):
        v = a.get(key)
        if v is not None and not (np.isfinite(v) and v > 0):
            raise InputError(option, f"must be a positive number, got {v}")
        out[key] = v if v is not None else defaults.get(key)
    return out


def _free_stack_name(conn, directory: Path, number: int) -> Path:
    """``particle_stack_<number>.mrcs``, the next number no registered stack uses.

    The database claims names: a stray unregistered file (a killed job's) is
    overwritten by the rename after the commit.
    """
    from cistem_mpi.db.naming import stack_path_taken

    while True:
        path = directory / f"particle_stack_{number}.mrcs"
        if not stack_path_taken(conn, path, directory):
            return path
        number += 1


def _create(ctx: JobContext) -> dict:
    if not ctx.is_controller:
        if ctx.args.get("from_positions"):  # workers cut micrographs; everything else is rank 0's
            from cistem_mpi.drivers.extraction import extract_stack

            extract_stack(ctx.world, None, None)
        return {}
    from cistem_mpi.io.par import write_par
    from cistem_mpi.io.param_store import write_params_h5
    from cistem_mpi.io.star import write_cistem_star

    assert ctx.project is not None
    a = ctx.args
    conn = ctx.project.conn
    rng = np.random.default_rng(a.get("seed", 1) + 7919) if a.get("randomise_occupancies") else None
    if a.get("from_refinement") is not None:
        src = _from_refinement(ctx, a, rng)
    elif a.get("from_stack") is not None:
        src = _from_stack(ctx, a, rng)
    elif a.get("from_positions"):
        src = _from_positions(ctx, a, rng)
    else:
        src = _from_classification(ctx, a, rng)
    meta = _metadata(a, src.defaults)
    n = len(src.params[0])
    n_new = len(src.params)
    parent_positions = (src.extraction.position_ids if src.extraction is not None
                        else src.params[0]["position"].astype(np.int64))
    package_number = packages_db.next_package_number(conn)
    run = naming.next_refinement_run(conn)
    name = a.get("name") or f"Refinement Package #{package_number}"
    box = src.box

    # ---- everything is checked: write files (removed again if anything fails)
    written: list[Path] = []
    try:
        if src.subset:
            stack_dir = ctx.project.root / naming.ASSET_DIRS["particle_stacks"]
            stack_dir.mkdir(parents=True, exist_ok=True)
            stack_path = _free_stack_name(ctx.project.conn, stack_dir, package_number)
            check_free_space(stack_dir, 1024 + n * box * box * 4 + n_new * 400 * n, "the new particle stack")
            part = ctx.stage(stack_path)  # renamed to stack_path after the commit
            written.append(part)
            if src.extraction is not None:
                from cistem_mpi.drivers.extraction import extract_stack

                extract_stack(ctx.world, src.extraction, part,
                              progress=lambda d, t: ctx.progress(d, t + 1, "cutting particles"))
            else:
                copy_particles(src.stack_path, parent_positions, part, src.optics.pixel_size,
                               progress=lambda d, t: ctx.progress(d, t + 1, "copying particles"))
            new_positions = np.arange(1, n + 1, dtype=np.int32)
            stack_ref: Any = ctx.register(
                "particle_stacks", path=stack_path, name=stack_path.stem, n_particles=n, box=box,
                pixel_size=src.optics.pixel_size, voltage=src.optics.voltage, cs=src.optics.cs,
                amplitude_contrast=src.optics.amplitude_contrast,
                # copied images keep their stored contrast; cut ones are protein dark (inverted if white)
                protein_is_white=int(src.extraction is None and _stack_is_white(src.stack_row)))
        else:
            stack_path = src.stack_path
            new_positions = parent_positions.astype(np.int32)
            stack_ref = int(src.stack_row["id"])
        param_dir = ctx.project.root / naming.ASSET_DIRS["parameters"]
        param_dir.mkdir(parents=True, exist_ok=True)
        package = ctx.register(
            "refinement_packages", name=name, stack_id=stack_ref, n_classes=n_new, symmetry=meta["symmetry"],
            molecular_weight=meta["molecular_weight"], largest_dimension=meta["largest_dimension"],
            n_particles=n, parent_id=src.parent_package)
        refinement = ctx.register("refinements", package_id=package, kind="start", round=0, n_classes=n_new,
                                  parent_id=src.parent_refinement)
        class_sizes = {}
        for k, params in enumerate(src.params, 1):
            params = params.copy()
            params["position"] = new_positions
            base = param_dir / f"params_{run}_{k}"
            staged = {suffix: ctx.stage(base.with_suffix(suffix)) for suffix in (".h5", ".par", ".star")}
            written += list(staged.values())
            write_params_h5(staged[".h5"], params,
                            {"pixel_size": src.optics.pixel_size, "symmetry": meta["symmetry"]},
                            {"half_set": src.half_set} if src.half_set is not None else None)
            write_par(staged[".par"], params)
            write_cistem_star(staged[".star"], ParticleSet(params=params, optics=[src.optics]))
            ctx.register("refinement_classes", refinement_id=refinement, class_number=k,
                         params_path=base.with_suffix(".h5"), occupancy=float(params["occ"].mean()))
            class_sizes[str(k)] = int(np.count_nonzero(src.new_class == k))
        rows = list(zip(new_positions.tolist(), parent_positions.tolist(), src.new_class.tolist()))
        ctx.register_many("refinement_package_members", ("position", "parent_position", "class_number"), rows,
                          package_id=package)
    except BaseException:
        for path in written:
            Path(path).unlink(missing_ok=True)
        raise
    ctx.progress(1, 1, "done")
    for k in range(1, n_new + 1):
        if class_sizes[str(k)] == 0:
            ctx.log.warning("class %d starts with no particle of its own (occupancy below the others everywhere)", k)
    ctx.log.info("%s: %d particles in %d class(es) (%s); stack %s; %s", name, n, n_new,
                 ", ".join(f"class {k}: {v}" for k, v in class_sizes.items()), ctx.project.store_path(stack_path),
                 naming.volume_display_name("start", run, 1).rsplit(" - ", 1)[0])
    return {"package_name": name, "particles": n, "classes": n_new, "refinement_run": run,
            "start_params": f"Start Params #{run}", "stack": ctx.project.store_path(stack_path),
            "new_stack": bool(src.subset), "particles_per_class": class_sizes, **src.summary}

"""Refinement package planning: the class arithmetic of ``package create`` on arrays.

Which template particles are carried over (the best class: highest
occupancy, ties to the lowest class), how old classes map to new ones, the
starting occupancies, and cisTEM's half-set rule for packages cut from
micrographs.  The command line, database and stack copy are
:mod:`cistem_mpi.drivers.package`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cistem_mpi.errors import InputError

#: Packages cut from positions get a split by micrograph from this many particles on (cisTEM: 500) ...
SPLIT_MIN_PARTICLES = 500
#: ... by whole micrographs from this many micrographs on, by 10 stack blocks below (cisTEM: 20).
SPLIT_MIN_MICROGRAPHS = 20

__all__ = [
    "SPLIT_MIN_PARTICLES", "SPLIT_MIN_MICROGRAPHS", "best_class", "default_mapping", "share_occupancies",
    "TemplatePlan", "plan_from_template", "split_by_micrograph",
]


def best_class(occupancies: np.ndarray) -> np.ndarray:
    """Index of the class where each particle's occupancy is highest.

    Parameters
    ----------
    occupancies : ndarray (n_classes, n_particles)

    Returns
    -------
    ndarray (n_particles,) int
        0-based class index; ties go to the lowest index (cisTEM keeps the
        first class with a strictly higher occupancy).

    Examples
    --------
    >>> best_class(np.array([[50.0, 10.0, 30.0], [50.0, 90.0, 30.0]])).tolist()
    [0, 1, 0]
    """
    return np.argmax(np.asarray(occupancies), axis=0)


def default_mapping(kept: list[int], n_new: int) -> dict[int, list[int]] | None:
    """The mapping a user means when giving none (None: ambiguous).

    The i-th kept class becomes new class i when there are as many new as
    kept classes; everything goes into class 1 when there is one new class;
    a single kept class (e.g. a 1-class template) is split over all new
    classes.

    Parameters
    ----------
    kept : list of int
        Old classes carried over, in order.
    n_new : int
        Number of new classes.

    Returns
    -------
    dict or None
        Old class -> sorted new classes; None when no mapping is obvious.

    Examples
    --------
    >>> default_mapping([2, 3], 2), default_mapping([1], 3), default_mapping([1, 2], 3)
    ({2: [1], 3: [2]}, {1: [1, 2, 3]}, None)
    """
    if n_new == len(kept):
        return {old: [i] for i, old in enumerate(kept, 1)}
    if n_new == 1:
        return {old: [1] for old in kept}
    if len(kept) == 1:
        return {kept[0]: list(range(1, n_new + 1))}
    return None


def share_occupancies(targets: list[np.ndarray], n_new: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Starting occupancies (n_new, n) in percent.

    Parameters
    ----------
    targets : list of ndarray
        ``targets[k]`` is the boolean mask (n,) of particles assigned to new
        class k + 1; a particle assigned to m classes gets 100/m in each.
    n_new : int
        Number of new classes.
    rng : numpy Generator, optional
        When given (``--randomise-occupancies``, K > 1), occupancies are drawn
        uniformly from [0, 200/K) instead, as cisTEM's wizard does.

    Returns
    -------
    ndarray (n_new, n), float32

    Raises
    ------
    ValueError
        A particle is in no new class.

    Examples
    --------
    >>> share_occupancies([np.array([True, True]), np.array([False, True])], 2).tolist()
    [[100.0, 50.0], [0.0, 50.0]]
    """
    member = np.stack(targets).astype(np.float64)  # (K, n)
    if rng is not None and n_new > 1:
        return rng.uniform(0.0, 200.0 / n_new, member.shape).astype(np.float32)
    m = member.sum(axis=0)
    if np.any(m == 0):
        raise ValueError("every particle needs at least one new class")
    return (100.0 * member / m).astype(np.float32)


@dataclass
class TemplatePlan:
    """What a template refinement becomes (rows refer to the template's parameter rows).

    Attributes
    ----------
    take : ndarray (n,) int
        Template rows carried over, in template order.
    old_class : ndarray (n,) int
        Old class number of each carried particle (its highest occupancy).
    params : list of ndarray
        One parameter table per new class (positions still the template's).
    new_class : ndarray (n,) int
        New class number of each particle (its highest starting occupancy).
    mapping : dict
        Old class -> new classes actually used.
    dropped : dict
        Old class -> number of particles left out.
    """

    take: np.ndarray
    old_class: np.ndarray
    params: list[np.ndarray]
    new_class: np.ndarray
    mapping: dict[int, list[int]]
    dropped: dict[int, int] = field(default_factory=dict)


def plan_from_template(old_classes: list[int], old_params: list[np.ndarray], n_new: int | None,
                       keep: list[int] | None, mapping: dict[int, list[int]] | None,
                       rng: np.random.Generator | None = None, run: int | None = None) -> TemplatePlan:
    """Decide which particles go where (see the module docstring); all checks raise InputError.

    Parameters
    ----------
    old_classes : list of int
        Class numbers of the template refinement.
    old_params : list of ndarray
        Their parameter tables, rows in the same particle order.
    n_new : int or None
        Number of new classes (None: the number of kept classes, or the
        highest new class in ``mapping``).
    keep : list of int or None
        Old classes whose particles are carried over (None: all).
    mapping : dict or None
        Old class -> new classes (None: :func:`default_mapping`).
    rng : numpy Generator, optional
        Randomise occupancies (see :func:`share_occupancies`).
    run : int, optional
        Template run number, for messages.

    Returns
    -------
    TemplatePlan

    Raises
    ------
    InputError
        A kept or mapped class that is not a template class, a new class
        outside 1..n_new or without a source, or nothing left to keep.

    Examples
    --------
    >>> from numpy.lib import recfunctions as rf
    >>> rows = lambda occ: rf.unstructured_to_structured(np.array(occ, np.float32)[:, None], names=["occ"])
    >>> plan = plan_from_template([1, 2], [rows([90, 20, 60]), rows([10, 80, 40])], None, [2], None)
    >>> plan.take.tolist(), plan.mapping, plan.dropped
    ([1], {2: [1]}, {1: 2})
    """
    what = f"refinement #{run}" if run is not None else "the template"
    names = ", ".join(map(str, old_classes))
    kept = list(old_classes) if keep is None else keep
    for c in kept:
        if c not in old_classes:
            raise InputError("--keep", f"class {c} is not a class of {what} (classes {names})")
    if n_new is None:
        n_new = max(max(v) for v in mapping.values()) if mapping else len(kept)
    if n_new < 1:
        raise InputError("--classes", f"the number of classes must be at least 1, got {n_new}")
    if mapping is None:
        mapping = default_mapping(kept, n_new)
        if mapping is None:
            raise InputError("--map", f"cannot guess how the {len(kept)} kept classes ({', '.join(map(str, kept))}) "
                                      f"go into {n_new} new classes; give --map OLD:NEW for each kept class")
    for old, news in mapping.items():
        if old not in old_classes:
            raise InputError("--map", f"class {old} is not a class of {what} (classes {names})")
        if old not in kept:
            raise InputError("--map", f"class {old} is mapped but not carried over (--keep {','.join(map(str, kept))})")
        bad = [n for n in news if not 1 <= n <= n_new]
        if bad:
            raise InputError("--map", f"new class {bad[0]} (from old class {old}) is outside 1..{n_new} "
                                      f"(the package has {n_new} classes)")
    unmapped = [c for c in kept if c not in mapping]
    if unmapped:
        raise InputError("--map", f"class {unmapped[0]} is carried over but not mapped to a new class; "
                                  f"add --map {unmapped[0]}:NEW or leave it out of --keep")
    sources = {k: [old for old in kept if k in mapping[old]] for k in range(1, n_new + 1)}
    empty = [k for k, v in sources.items() if not v]
    if empty:
        raise InputError("--map", f"new class {empty[0]} gets no old class; map at least one kept class to it")

    occ = np.stack([p["occ"].astype(np.float64) for p in old_params])  # (n_old, N)
    best = np.asarray(old_classes)[best_class(occ)]
    take = np.nonzero(np.isin(best, kept))[0]
    dropped = {c: int(np.count_nonzero(best == c)) for c in old_classes if c not in kept}
    if take.size == 0:
        raise InputError("--keep", f"no particle has its highest occupancy in class(es) {', '.join(map(str, kept))} "
                                   f"of {what}; nothing to put in the package")
    old_of = best[take]
    index_of = {c: i for i, c in enumerate(old_classes)}
    targets = [np.isin(old_of, [old for old in sources[k]]) for k in range(1, n_new + 1)]
    occ_new = share_occupancies(targets, n_new, rng)
    params: list[np.ndarray] = []
    for k in range(1, n_new + 1):
        # rows from the class the particle came from when it maps here, else from
        # the mapped old class where the particle's occupancy is highest (cisTEM)
        src_list = sources[k]
        src_occ = occ[[index_of[o] for o in src_list]][:, take]  # (len(src), n)
        fallback = np.asarray(src_list)[best_class(src_occ)]
        src_class = np.where(targets[k - 1], old_of, fallback)
        rows = np.empty(take.size, dtype=old_params[0].dtype)
        for o in np.unique(src_class):
            sel = src_class == o
            rows[sel] = old_params[index_of[int(o)]][take[sel]]
        rows["occ"] = occ_new[k - 1]
        params.append(rows)
    new_class = best_class(occ_new) + 1
    return TemplatePlan(take=take, old_class=old_of, params=params, new_class=new_class.astype(np.int64),
                        mapping={o: mapping[o] for o in kept}, dropped=dropped)


def split_by_micrograph(film: np.ndarray, min_particles: int = SPLIT_MIN_PARTICLES,
                        min_micrographs: int = SPLIT_MIN_MICROGRAPHS) -> np.ndarray | None:
    """cisTEM's half sets for a package cut from positions: whole micrographs go to one half.

    Duplicate picks of one particle then land in the same half and cannot
    raise the FSC.  With 500 particles or more on 20 micrographs or more the
    half is the image id's parity (as cisTEM's wizard); with fewer than 20
    micrographs the stack is cut into 10 blocks that alternate (cisTEM too);
    below 500 particles None: the default per-particle split.

    Parameters
    ----------
    film : ndarray (n,) int
        Image (micrograph) id of each particle, in stack order.
    min_particles, min_micrographs : int
        The two thresholds above (cisTEM's 500 and 20).

    Returns
    -------
    ndarray (n,) int8 of 1/2, or None

    Examples
    --------
    >>> split_by_micrograph(np.repeat(np.arange(1, 25), 25))[::25].tolist()[:4]
    [1, 2, 1, 2]
    >>> split_by_micrograph(np.arange(100)) is None
    True
    """
    n = len(film)
    n_images = np.unique(film).size
    if n < min_particles:
        return None
    if n_images >= min_micrographs:
        return np.where(np.asarray(film) % 2 == 1, 1, 2).astype(np.int8)
    block = np.arange(n) // max(1, n // 10)
    return np.where(block % 2 == 1, 1, 2).astype(np.int8)

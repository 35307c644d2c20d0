"""RELION-style export of a 2D classification: ``_data.star`` (particles) and ``_model.star`` (classes).

``_data.star`` is a RELION 3.1 particle file (:func:`cistem_mpi.io.star.write_relion_star`)
with ``rlnClassNumber`` (0 = not classified yet), in-plane ``rlnAnglePsi``
and origins (rot and tilt are 0, as in RELION's 2D classification).
``_model.star`` follows RELION's ``run_itNNN_model.star``: a
``data_model_general`` block and a ``data_model_classes`` loop with
``rlnReferenceImage`` (``k@class_averages_NNNN.mrc``), ``rlnClassDistribution``
and ``rlnEstimatedResolution``, plus the cisTEM-mpi ranking as extra columns.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from cistem_mpi.io.params import Optics, ParticleSet

__all__ = ["write_data_star", "write_model_star"]


def write_data_star(path: str | os.PathLike, params: np.ndarray, class_2d: np.ndarray, optics: Optics,
                    stack: str | os.PathLike, box: int, protein_is_white: bool = False) -> None:
    """Write the particles' 2D assignments as a RELION 3.1 ``_data.star``.

    Parameters
    ----------
    path : output file.
    params : PARAM_DTYPE rows (psi, shifts in Å, CTF).
    class_2d : int (n,) 1-based classes (0 = unassigned).
    optics : the stack's optics.
    stack : the particle stack (``rlnImageName`` = ``position@stack``).
    box : image size in pixels.
    protein_is_white : contrast of the stack.
    """
    p = params.copy()
    p["phi"] = 0.0
    p["theta"] = 0.0
    from cistem_mpi.io.star import write_relion_star

    ps = ParticleSet(params=p, optics=[optics], extra={"rlnClassNumber": np.asarray(class_2d, dtype=np.int64)})
    write_relion_star(path, ps, "3.1", stack=stack, image_size=int(box), protein_is_white=protein_is_white)


def write_model_star(path: str | os.PathLike, averages: str | os.PathLike, stats: Mapping[str, np.ndarray],
                     pixel_size: float, resolution_limit: float) -> None:
    """Write the classes of one classification as a RELION-style ``_model.star``.

    Parameters
    ----------
    path : output file (written via a temporary name, then renamed).
    averages : the class-average stack the references point at (its file name is used).
    stats : ``population``, ``resolution``, ``score``, ``rank``, ``selected`` per class.
    pixel_size : Å per pixel of the averages.
    resolution_limit : the round's high-resolution limit (Å).

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp(); f = os.path.join(d, "m.star")
    >>> st = {"population": np.array([3., 1.]), "resolution": np.array([10., 20.]), "score": np.array([5., 2.]),
    ...       "rank": np.array([1, 2]), "selected": np.array([1, 0])}
    >>> write_model_star(f, "class_averages_0001.mrc", st, 2.5, 8.0)
    >>> "000002@class_averages_0001.mrc" in open(f).read()
    True
    """
    pop = np.asarray(stats["population"], dtype=np.float64)
    k = len(pop)
    frac = pop / pop.sum() if pop.sum() > 0 else np.zeros(k)
    name = Path(averages).name
    lines = ["", "# version 30001", "", "data_model_general", "",
             f"_rlnReferenceDimensionality {2:>12d}", f"_rlnDataDimensionality {2:>12d}",
             f"_rlnNrClasses {k:>12d}", f"_rlnPixelSize {pixel_size:>12.6f}",
             f"_rlnCurrentResolution {resolution_limit:>12.6f}", "", "", "# version 30001", "",
             "data_model_classes", "", "loop_", "_rlnReferenceImage #1", "_rlnClassDistribution #2",
             "_rlnEstimatedResolution #3", "_cisTEMClassPopulation #4", "_cisTEMClassScore #5",
             "_cisTEMClassRank #6", "_cisTEMAutoSelected #7"]
    for c in range(k):
        lines.append(f"{c + 1:06d}@{name} {frac[c]:12.6f} {float(stats['resolution'][c]):12.6f} "
                     f"{pop[c]:12.1f} {float(stats['score'][c]):12.4f} {int(stats['rank'][c]):6d} "
                     f"{int(stats['selected'][c]):3d}")
    text = "\n".join(lines) + "\n\n"
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, p)

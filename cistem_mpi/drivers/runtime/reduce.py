"""Small arrays summed over ranks onto rank 0 (per-iteration partial sums, e.g. 2D class sums).

:meth:`World.allreduce_sum` gives every rank the sum; an iterative job whose
workers only need the next references (broadcast anyway) wants the sum on
rank 0 alone.  :func:`reduce_sum` is a non-blocking ``MPI_Ireduce`` waited
for with the world's failure-aware polling, so a failed rank cannot hang the
others.  Summation order depends on the number of ranks: results agree to
floating-point rounding between rank counts (sum in float64 to keep that small).
"""

from __future__ import annotations

import numpy as np

from cistem_mpi.drivers.runtime.world import World, mpi_sum, real_view


def reduce_sum(world: World, arr: np.ndarray) -> np.ndarray | None:
    """Element-wise sum of ``arr`` over all ranks, on rank 0 (None elsewhere).

    Parameters
    ----------
    world : World
    arr : ndarray
        Same shape and dtype on every rank (float32/64, int32/64, complex64/128;
        complex values are summed as their real and imaginary parts).

    Returns
    -------
    ndarray or None
        The sum on rank 0 (with one rank: a copy of ``arr``); None on workers.

    >>> from cistem_mpi.drivers.runtime import World
    >>> reduce_sum(World(), np.ones(3))
    array([1., 1., 1.])
    """
    a = np.ascontiguousarray(arr)
    if world.size == 1:
        return a.copy()
    send = real_view(a).reshape(-1)
    if world.is_controller:
        out = np.empty_like(a)
        world.wait(world.comm.Ireduce(send, real_view(out).reshape(-1), op=mpi_sum(), root=0))
        return out
    world.wait(world.comm.Ireduce(send, None, op=mpi_sum(), root=0))
    return None

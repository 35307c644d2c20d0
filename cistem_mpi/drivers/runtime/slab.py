"""Volumes across ranks: sum accumulators by reduce-scatter along z.

A reconstruction accumulates, on every rank, a padded Fourier-space
numerator (complex) and a weight volume (CTF² sums, real) over the particles
that rank inserted.  Instead of summing whole volumes on rank 0, the ranks
reduce-scatter along z (axis 0 of a C-ordered array): rank r receives the
sum over ranks of planes ``z0..z1`` only, normalises that slab (numerator /
weights, or whatever the reconstruction does) and rank 0 gathers the slabs.

Memory per rank: its own accumulator plus one slab of the sum (about
accumulator / N).  Rank 0 additionally holds the gathered result.

Summation order: MPI sums the ranks' contributions in an order that depends
on the number of ranks, so sums of floating-point values agree to float32
rounding (not bitwise) between different rank counts; integer-valued data
(and float64 holding integers below 2**53) sum exactly.  On the same number
of ranks the reduction is repeatable (the MPI standard asks that the same
operands in the same order give the same result, and MPICH and Open MPI
choose their algorithm from the message size and the number of ranks only);
together with a static chunk hand-out (``map_chunks(..., static=True)``,
which reconstruction uses) each rank's own sum is the same in every run, so
the reduced volumes are bit-identical run to run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cistem_mpi.drivers.runtime.world import World, real_view
from cistem_mpi.kernels.backprojection import slab_bounds  # one split for insertion and reduction


@dataclass
class Slab:
    """This rank's part of a summed volume: planes ``z0:z1`` of the full array."""

    data: np.ndarray
    z0: int
    z1: int
    full_shape: tuple[int, ...]


def reduce_scatter_z(world: World, acc: np.ndarray) -> Slab:
    """Sum ``acc`` over all ranks; return only this rank's z-slab of the sum.

    Parameters
    ----------
    world : World
    acc : ndarray, C-contiguous, same shape and dtype on every rank
        float32/float64/int32/int64 or complex64/complex128 (complex values are
        summed as their real and imaginary parts, which is the same sum).

    Returns
    -------
    Slab
        ``data`` has shape ``(z1 - z0,) + acc.shape[1:]`` and acc's dtype.  With
        one rank ``data`` *is* ``acc`` (no copy).
    """
    acc = np.ascontiguousarray(acc)
    shape = tuple(acc.shape)
    bounds = slab_bounds(shape[0], world.size)
    z0, z1 = bounds[world.rank]
    if world.size == 1:  # the sum is the accumulator itself: no copy, no extra memory
        return Slab(acc, z0, z1, shape)
    per_plane = int(np.prod(shape[1:], dtype=np.int64)) * (2 if np.iscomplexobj(acc) else 1)
    counts = [(b - a) * per_plane for a, b in bounds]
    out = np.empty((z1 - z0,) + shape[1:], dtype=acc.dtype)
    send = real_view(acc).reshape(-1)
    recv = real_view(out).reshape(-1)
    from mpi4py import MPI

    world.wait(world.comm.Ireduce_scatter(send, recv, counts, op=MPI.SUM))
    return Slab(out, z0, z1, shape)


def gather_z(world: World, slab: np.ndarray, full_shape: tuple[int, ...]) -> np.ndarray | None:
    """Gather every rank's slab (split by :func:`slab_bounds`) into the full array on rank 0.

    The slabs may have another dtype than the accumulator (e.g. a normalised
    real-space slab); all ranks must use the same dtype and ``full_shape``.
    With one rank the slab itself is returned.
    """
    full_shape = tuple(full_shape)
    bounds = slab_bounds(full_shape[0], world.size)
    z0, z1 = bounds[world.rank]
    slab = np.ascontiguousarray(slab)
    if slab.shape != (z1 - z0,) + full_shape[1:]:
        raise ValueError(f"rank {world.rank}: slab shape {slab.shape} does not match planes {z0}:{z1} of {full_shape}")
    if world.size == 1:  # the slab is the whole array: no copy (a copy doubled a 1-rank job's peak)
        return slab
    per_plane = int(np.prod(full_shape[1:], dtype=np.int64)) * (2 if np.iscomplexobj(slab) else 1)
    counts = [(b - a) * per_plane for a, b in bounds]
    displs = [a * per_plane for a, _ in bounds]
    send = real_view(slab).reshape(-1)
    if world.is_controller:
        full = np.empty(full_shape, dtype=slab.dtype)
        recv = real_view(full).reshape(-1)
        world.wait(world.comm.Igatherv(send, [recv, counts, displs, _mpi_type(recv)], root=0))
        return full
    world.wait(world.comm.Igatherv(send, None, root=0))
    return None


def _mpi_type(a: np.ndarray):
    from mpi4py import MPI

    return MPI._typedict[a.dtype.char]


def accumulator_bytes(box: int, padding: int = 2, n_ranks: int = 1) -> dict[str, int]:
    """Bytes per rank of a padded Fourier reconstruction split over ``n_ranks``.

    cisTEM's layout: numerator complex64 and weights float32, each on the
    half-volume ``P x P x (P/2 + 1)`` with ``P = box * padding``.

    Returns
    -------
    dict
        ``accumulator`` (numerator + weights), ``slab`` (the largest z-slab
        of the sum held by one rank; 0 with one rank, where the accumulator
        is the sum) and ``per_rank`` (their sum).
    """
    p = box * padding
    voxels = p * p * (p // 2 + 1)
    acc = voxels * (8 + 4)
    z0, z1 = slab_bounds(p, n_ranks)[0]
    slab = (z1 - z0) * p * (p // 2 + 1) * (8 + 4) if n_ranks > 1 else 0  # 1 rank: no copy
    return {"accumulator": acc, "slab": slab, "per_rank": acc + slab}

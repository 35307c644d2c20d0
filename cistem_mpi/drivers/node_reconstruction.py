"""Reconstruction with one set of accumulators per node (MPI-3 shared memory), not one per rank.

The accumulation step of :func:`cistem_mpi.drivers.volumejob.reconstruct_particles`
in its ``"shared"`` mode (:func:`~cistem_mpi.drivers.runtime.shared.memory_mode`).

Layout on a node of R ranks, in lock step, one batch of B particles per rank at a time:

1. every rank reads, normalises, centres and CTF-weights its next B particles
   (:func:`~cistem_mpi.kernels.reconstruct3d.prepare_slices`) into its slot of a
   shared slice buffer;
2. node barrier; every rank inserts *all* R x B slices of the buffer, but only
   into its own band of kz rows of the shared accumulators
   (:func:`~cistem_mpi.kernels.backprojection.balanced_bands`: equal insertion
   work, so no two ranks ever write the same voxel, and the kernel skips the
   image rows that cannot reach the band);
3. node barrier; the buffer is free for the next batch.

Then the node leaders sum the accumulators over nodes in place, and node 0's
ranks run the FSC -> Wiener iterations on row slabs of the shared arrays,
writing the normalised half-map and full-map transforms back into the same
window (the two float32 weight arrays, side by side, are exactly one complex64
array: the full map's transform).  Rank 0 inverse-transforms from the window.

Memory per node: the window (accumulators + slice buffer) once, plus one
batch and one slab per rank; per-rank mode holds the accumulators once per
rank.  Particles go to ranks in static contiguous blocks, so a run is
bit-identical to a rerun on the same ranks; against per-rank accumulation
it agrees to float32 rounding (the sums run in another order).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from cistem_mpi.drivers.runtime import World
from cistem_mpi.drivers.runtime.shared import (
    Node, SharedArrays, leaders_allreduce_inplace, node_allreduce_sum, node_barrier,
)
from cistem_mpi.io.params import Optics
from cistem_mpi.kernels import backprojection as bp
from cistem_mpi.kernels import reconstruct3d as r3
from cistem_mpi.kernels import reconstruction as rec
from cistem_mpi.kernels.symmetry import symmetry_matrices

__all__ = ["batch_size", "window_bytes", "open_plan_stack", "prepared_batch", "accumulate_and_normalise"]

#: Bytes of one rank's slot of the slice buffer (about; B is clamped to 4..64 particles).  The buffer
#: holds a slot per rank of the node: 44 ranks x 8 MB = 350 MB at any box.
SLOT_BYTES = 8 << 20


def batch_size(box: int, chunk_size: int | None = None) -> int:
    """Particles per rank per lock step: an 8 MB slot (4 to 64), or ``chunk_size`` when given.

    >>> batch_size(128), batch_size(512), batch_size(128, 10)
    (64, 5, 10)
    """
    if chunk_size:
        return max(1, int(chunk_size))
    per_particle = box * (box // 2 + 1) * (8 + 4)
    return int(min(64, max(4, SLOT_BYTES // per_particle)))


def _specs(n: int, p: int, ranks: int, batch: int) -> list[tuple[tuple[int, ...], Any]]:
    shape = (p, p, p // 2 + 1)
    return [(shape, np.complex64), (shape, np.complex64), ((2,) + shape, np.float32),
            ((ranks, batch, n, n // 2 + 1), np.complex64), ((ranks, batch, n, n // 2 + 1), np.float32),
            ((ranks, batch, 3, 3), np.float64), ((ranks, batch), np.float32), ((ranks, batch), np.int8),
            ((ranks,), np.int64)]


def window_bytes(box: int, padded: int, ranks: int, batch: int) -> int:
    """Bytes of a node's window: four accumulators and the slice buffer.

    >>> window_bytes(64, 128, 1, 8) // 2 ** 20
    24
    """
    total = 0
    for shape, dtype in _specs(box, padded, ranks, batch):
        total += -(-int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize // 64) * 64
    return total


def open_plan_stack(plan: dict[str, Any]):
    """The plan's particle stack, opened as the plan says (pixel size, protein white or dark)."""
    from cistem_mpi.io.mrc import open_stack

    return open_stack(plan["stack"], pixel_size=plan["pixel_size"], invert=plan.get("invert", False))


def prepared_batch(stack: Any, plan: dict[str, Any], index: np.ndarray) -> r3.PreparedSlices:
    """Read the plan's particles ``index`` (rows of ``plan["params"]``) and prepare them for insertion.

    The one reading step of both accumulation modes: images checked finite (one NaN pixel would make
    the whole map NaN), then normalised, whitened, centred and CTF-weighted
    (:func:`~cistem_mpi.kernels.reconstruct3d.prepare_slices`).
    """
    from cistem_mpi.io.mrc import check_finite

    rows = plan["params"][index]
    imgs = stack[rows["position"] - 1]
    check_finite(imgs, plan["stack"], rows["position"])
    o: Optics = plan["optics"]
    return r3.prepare_slices(imgs, rows, plan["half"][index], plan["pixel_size"],
                             (o.voltage, o.cs, o.amplitude_contrast), score_b=plan["score_b"][index],
                             whitening=plan.get("whitening"))


def accumulate_and_normalise(world: World, node: Node, plan: dict[str, Any], settings: Any,
                             progress: Callable[[int, int], None] | None, max_radius: float,
                             finish: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], Any]) -> Any:
    """Insert every particle of ``plan`` into the node's shared accumulators and normalise (all ranks).

    Parameters
    ----------
    world : World
    node : Node
    plan : dict
        The reconstruction plan (``box``, ``padded``, ``params``, ``half``, ``score_b``, ``stack``,
        ``pixel_size``, ``optics``, ``invert``), the same on every rank.
    settings : ReconstructionSettings
    progress : callable, optional
        ``progress(done, total)`` on rank 0.
    max_radius : float
        Insertion radius in Fourier pixels of the box.
    finish : callable
        ``finish(g1, g2, gf, fsc)`` run on rank 0 with the normalised transforms
        (views of the window, valid only during the call); its value is returned.

    Returns
    -------
    What ``finish`` returned on rank 0; None elsewhere.
    """
    n, p = plan["box"], plan["padded"]
    params = plan["params"]
    total = len(params)
    batch = batch_size(n, settings.chunk_size)
    shm = SharedArrays(world, node, _specs(n, p, node.size, batch))
    d1, d2, wblk, s_f, s_c, s_r, s_g, s_h, s_n = shm.arrays
    w1, w2 = wblk[0], wblk[1]
    bands = bp.balanced_bands(p, node.size, max_radius * p / n)[node.rank]
    for z0, z1 in bands:  # each rank zeroes (and first touches) its own rows
        for a in (d1, d2, w1, w2):
            a[z0:z1] = 0
    sym = symmetry_matrices(settings.symmetry)
    # static contiguous blocks in stack order (sequential reads; the same sums in every run)
    edges = np.linspace(0, total, world.size + 1).round().astype(int)
    lo, hi = int(edges[world.rank]), int(edges[world.rank + 1])
    n_batches = -(-int(np.diff(edges).max()) // batch)
    stack = None
    try:
        node_barrier(world, node)
        for t in range(n_batches):
            a, b = lo + t * batch, min(hi, lo + (t + 1) * batch)
            k = max(0, b - a)
            s_n[node.rank] = k
            if k:
                if stack is None:
                    stack = open_plan_stack(plan)
                # half set 1 first, then 2: each half of a slot is then a view, never a copy
                s = prepared_batch(stack, plan, np.argsort(plan["half"][a:b], kind="stable") + a)
                s_f[node.rank, :k] = s.fts
                s_c[node.rank, :k] = s.ctf
                s_r[node.rank, :k] = s.rot
                s_g[node.rank, :k] = s.weights
                s_h[node.rank, :k] = s.half
            node_barrier(world, node)
            for r in range(node.size):
                kr = int(s_n[r])
                if kr == 0 or not bands:
                    continue
                slices = r3.PreparedSlices(fts=s_f[r, :kr], ctf=s_c[r, :kr], rot=s_r[r, :kr], weights=s_g[r, :kr],
                                           half=s_h[r, :kr])
                for z0, z1 in bands:
                    r3.insert_prepared((d1[z0:z1], w1[z0:z1], d2[z0:z1], w2[z0:z1]), slices, sym,
                                       method=settings.interpolation, max_radius=max_radius, z_range=(z0, z1))
            node_barrier(world, node)
            if progress is not None and world.is_controller:
                progress(min(total, (t + 1) * batch * world.size), total)
    finally:
        if stack is not None:
            stack.close()
    leaders_allreduce_inplace(world, node, [d1, d2, wblk])
    node_barrier(world, node)
    result = None
    if node.index == 0:
        result = _normalise_on_node(world, node, d1, d2, w1, w2, wblk, n, p, settings, finish)
    node_barrier(world, node)
    shm.close()
    return result


def _normalise_on_node(world: World, node: Node, d1: np.ndarray, d2: np.ndarray, w1: np.ndarray, w2: np.ndarray,
                       wblk: np.ndarray, n: int, p: int, settings: Any, finish: Callable) -> Any:
    """FSC -> Wiener iterations and normalisation on node 0, each rank on its rows; rank 0 finishes."""
    z0, z1 = bp.slab_bounds(p, node.size)[node.rank]
    sd1, sw1, sd2, sw2 = d1[z0:z1], w1[z0:z1], d2[z0:z1], w2[z0:z1]
    shells = n // 2 + 1
    reg_half = np.zeros(shells)
    reg_full = np.zeros(shells)
    fsc = np.zeros(shells)
    for it in range(r3.WIENER_ITERATIONS + 1):
        sums = node_allreduce_sum(world, node, rec.slab_shell_sums(sd1, sw1, sd2, sw2, z0, p, n, reg_half, reg_half))
        if it == 0:  # flat start: SSNR 1 in every shell
            reg_half = 0.5 * (sums[3] + sums[4]) / np.maximum(sums[5], 1.0)
            continue
        fsc = rec.fsc_from_sums(sums)
        reg_half, reg_full = rec.wiener_regularisers(sums, fsc)
    reg_full = reg_full * float(settings.wiener_nominator)
    # the half maps' transforms replace their numerators in place, a few rows at a time; the full map's
    # waits in one slab until every rank of the node has read its weights, then takes the weight block
    gf = np.empty(sd1.shape, dtype=np.complex64)
    step = 4
    for a in range(0, z1 - z0, step):
        b = min(z1 - z0, a + step)
        gf[a:b] = rec.normalise_slab(sd1[a:b] + sd2[a:b], sw1[a:b] + sw2[a:b], z0 + a, p, n, reg_full)
        sd1[a:b] = rec.normalise_slab(sd1[a:b], sw1[a:b], z0 + a, p, n, reg_half)
        sd2[a:b] = rec.normalise_slab(sd2[a:b], sw2[a:b], z0 + a, p, n, reg_half)
    node_barrier(world, node)  # every rank has read its weights: the weight block can now hold gf
    gview = wblk.reshape(-1).view(np.complex64).reshape(d1.shape)
    gview[z0:z1] = gf
    del gf
    node_barrier(world, node)
    return finish(d1, d2, gview, fsc) if world.is_controller else None

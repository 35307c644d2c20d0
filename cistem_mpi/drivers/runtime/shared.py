"""Arrays shared by the ranks of one node (MPI-3 shared-memory windows), and the node's ranks.

A reconstruction's accumulators are the largest arrays of a job (1.6 GB at
box 256 with padding 2).  Held once per rank, 44 ranks on a node need 70 GB;
held once per node, they fit any node.  :class:`Node` describes the ranks
that share this rank's memory (``MPI.Comm.Split_type(COMM_TYPE_SHARED)``) and
the communicator of the nodes' first ranks (the leaders); :class:`SharedArrays`
places numpy arrays in one window allocated by the node's leader
(``MPI.Win.Allocate_shared``) that every rank of the node maps.

Nothing here decides who writes what: the caller partitions the arrays so
that no two ranks write the same element between two :func:`node_barrier`
calls (reconstruction gives each rank its own kz rows).

:func:`memory_mode` picks ``"shared"`` when some node runs more than
one rank and every node can hold the window in ``/dev/shm``, else
``"per-rank"`` (each rank its own arrays, the MPI-2 way, for MPIs or nodes
without shared memory).  ``CISTEM_MPI_NODE_MEMORY=shared|per-rank`` forces
a mode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from cistem_mpi.drivers.runtime.world import World, mpi_sum, real_view

__all__ = ["Node", "node_of", "node_barrier", "node_allreduce_sum", "leaders_allreduce_inplace",
           "SharedArrays", "memory_mode", "NODE_MEMORY_ENV"]

#: Environment variable forcing the accumulation mode (``shared`` or ``per-rank``; default ``auto``).
NODE_MEMORY_ENV = "CISTEM_MPI_NODE_MEMORY"

#: Largest piece of an in-place all-reduce between nodes (bytes): MPI counts are 32-bit, and an
#: in-place reduction may allocate a temporary of the message's size.
_ALLREDUCE_PIECE = 64 << 20


@dataclass
class Node:
    """The ranks of ``world`` on this rank's node.

    ``comm`` spans the node (None without MPI); ``rank``/``size`` are this
    rank's place in it; ``index``/``count`` number the nodes; ``leaders`` is
    the communicator of every node's rank 0 (None on the other ranks).
    """

    comm: Any
    rank: int
    size: int
    index: int
    count: int
    leaders: Any

    @property
    def is_leader(self) -> bool:
        """True on the node's first rank."""
        return self.rank == 0


def node_of(world: World) -> Node:
    """This rank's node (computed once per world; collective the first time).

    Parameters
    ----------
    world : World

    Returns
    -------
    Node

    Examples
    --------
    >>> n = node_of(World(None))
    >>> (n.rank, n.size, n.index, n.count)
    (0, 1, 0, 1)
    """
    cached = getattr(world, "_node", None)
    if cached is not None:
        return cached
    if world.comm is None:
        node = Node(None, 0, 1, 0, 1, None)
    else:
        from mpi4py import MPI

        comm = world.comm.Split_type(MPI.COMM_TYPE_SHARED, key=world.rank)
        leaders = world.comm.Split(0 if comm.Get_rank() == 0 else MPI.UNDEFINED, key=world.rank)
        if leaders == MPI.COMM_NULL:
            leaders = None
        ids = np.zeros(2, dtype=np.int64)
        if leaders is not None:
            ids[:] = (leaders.Get_rank(), leaders.Get_size())
        world.wait(comm.Ibcast(ids, root=0))
        node = Node(comm, comm.Get_rank(), comm.Get_size(), int(ids[0]), int(ids[1]), leaders)
    world._node = node  # type: ignore[attr-defined]
    return node


def node_barrier(world: World, node: Node) -> None:
    """Barrier over the node's ranks that still notices a failure anywhere in the job."""
    if node.size > 1:
        world.wait(node.comm.Ibarrier())


def node_allreduce_sum(world: World, node: Node, arr: np.ndarray) -> np.ndarray:
    """Element-wise sum over the node's ranks of a small numeric array (complex summed as pairs)."""
    a = np.ascontiguousarray(arr)
    if node.size == 1:
        return a.copy()
    out = np.empty_like(a)
    world.wait(node.comm.Iallreduce(real_view(a), real_view(out), op=mpi_sum()))
    return out


def leaders_allreduce_inplace(world: World, node: Node, arrays: list[np.ndarray]) -> None:
    """Sum shared arrays over the nodes, in place, on the node leaders (in pieces of 64 MB).

    Call on every rank; only leaders communicate, and afterwards every node's
    arrays hold the sum over all nodes.  Follow with :func:`node_barrier`
    before the node's other ranks read them.
    """
    if node.count == 1 or not node.is_leader:
        return
    from mpi4py import MPI

    for a in arrays:
        flat = real_view(a).reshape(-1)
        step = max(1, _ALLREDUCE_PIECE // flat.itemsize)
        for i in range(0, flat.size, step):
            world.wait(node.leaders.Iallreduce(MPI.IN_PLACE, flat[i:i + step], op=mpi_sum()))


class SharedArrays:
    """Arrays in one shared-memory window of the node (the leader allocates; every rank maps it).

    Parameters
    ----------
    world : World
    node : Node
        From :func:`node_of`; the constructor is collective over the node.
    specs : list of (shape, dtype)
        The arrays, in order; each starts on a 64-byte boundary.  Their
        contents are undefined: the caller fills them.

    Attributes
    ----------
    arrays : list of numpy.ndarray
        Views of the window, the same memory on every rank of the node.

    Examples
    --------
    >>> w = World(None)
    >>> s = SharedArrays(w, node_of(w), [((2, 3), np.float32), ((4,), np.complex64)])
    >>> [a.shape for a in s.arrays], s.nbytes
    ([(2, 3), (4,)], 128)
    >>> s.close()
    """

    def __init__(self, world: World, node: Node, specs: list[tuple[tuple[int, ...], Any]]):
        offsets, total = [], 0
        for shape, dtype in specs:
            offsets.append(total)
            size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            total += -(-size // 64) * 64
        self.nbytes = total
        self._win = None
        if node.comm is None:  # no MPI: plain memory
            buf: Any = np.empty(max(total, 1), dtype=np.uint8)
        else:
            from mpi4py import MPI

            self._win = MPI.Win.Allocate_shared(total if node.is_leader else 0, 1, comm=node.comm)
            buf, _ = self._win.Shared_query(0)
        self.arrays = [np.ndarray(shape, dtype=dtype, buffer=buf, offset=off)
                       for (shape, dtype), off in zip(specs, offsets)]

    def close(self) -> None:
        """Drop the views and free the window (collective over the node: every rank calls it)."""
        self.arrays = []
        if self._win is not None:
            self._win.Free()
            self._win = None


def _shm_free_bytes() -> int | None:
    """Free bytes in /dev/shm (where MPI places shared windows), None when there is no /dev/shm."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def memory_mode(world: World, node: Node, window_bytes: int) -> tuple[str, str]:
    """``("shared" | "per-rank", why)``, the same on every rank (collective).

    Parameters
    ----------
    world : World
    node : Node
    window_bytes : int
        Size of the node window the shared mode would allocate.

    Returns
    -------
    (str, str)
        The mode, and a phrase for the log saying why.

    Examples
    --------
    >>> w = World(None)
    >>> memory_mode(w, node_of(w), 1000)[0]
    'per-rank'
    """
    forced = os.environ.get(NODE_MEMORY_ENV, "auto").strip().lower() or "auto"
    if forced not in ("auto", "shared", "per-rank"):
        from cistem_mpi.errors import InputError

        raise InputError(NODE_MEMORY_ENV, f"expected auto, shared or per-rank, got {forced!r}")
    # every node leader checks its own /dev/shm; the smallest margin decides for all
    ok = 1
    if node.is_leader:
        free = _shm_free_bytes()
        ok = 1 if free is None or free > 1.1 * window_bytes else 0
    if world.size > 1:
        leader = 1 if node.is_leader else 0
        counts = world.allreduce_sum(np.array([ok * leader, leader, node.size], dtype=np.int64))
        all_ok = int(counts[0]) == int(counts[1])
        # the node sizes summed over ranks exceed the rank count exactly when some node has several ranks
        widest = int(counts[2]) > world.size
    else:
        all_ok, widest = bool(ok), False
    if forced == "per-rank":
        return "per-rank", f"{NODE_MEMORY_ENV}=per-rank"
    if forced == "shared":
        if not all_ok:
            from cistem_mpi.errors import InputError

            raise InputError("/dev/shm", f"{NODE_MEMORY_ENV}=shared, but a node has less than "
                             f"{window_bytes / 2 ** 30:.1f} GiB free in /dev/shm")
        return "shared", f"{NODE_MEMORY_ENV}=shared"
    if not widest:
        return "per-rank", "one rank per node"
    if not all_ok:
        return "per-rank", f"a node has less than {window_bytes / 2 ** 30:.1f} GiB free in /dev/shm"
    return "shared", f"{node.size} ranks share this node's accumulators"

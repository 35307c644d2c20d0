"""Reference transforms held once per node (MPI-3 shared memory) for the alignment step of refinement.

Each class's padded 3D transform (:func:`~cistem_mpi.kernels.projection.prepare_volume_ft`,
539 MB at box 256) is read-only while particles are aligned, so the ranks of a
node can share one copy: the node's ranks compute the classes in turn (class k
on node rank k mod R) into one window, and every rank projects from it.
The mode follows :func:`~cistem_mpi.drivers.runtime.shared.memory_mode`, as
the reconstruction's accumulators do.
"""

from __future__ import annotations

import numpy as np

from cistem_mpi.drivers.runtime import World
from cistem_mpi.drivers.runtime.shared import Node, SharedArrays, memory_mode, node_barrier
from cistem_mpi.kernels.projection import VolumeFT, padded_size, prepare_volume_ft

__all__ = ["NodeReferences"]


class NodeReferences:
    """The padded transforms of the references, shared by the node's ranks when that pays (collective).

    Parameters
    ----------
    world : World
    node : Node
    references : list of numpy.ndarray
        The class maps (the same on every rank).
    pad : float
        Padding factor of the transforms.

    Attributes
    ----------
    vfts : list of VolumeFT
        One per class; views of the node's window in ``"shared"`` mode.
    mode : str
        ``"shared"`` or ``"per-rank"``.

    Examples
    --------
    >>> from cistem_mpi.drivers.runtime.shared import node_of
    >>> w = World(None)
    >>> refs = NodeReferences(w, node_of(w), [np.zeros((8, 8, 8), np.float32)], 2.0)
    >>> refs.vfts[0].data.shape, refs.mode
    ((16, 16, 9), 'per-rank')
    >>> refs.close()
    """

    def __init__(self, world: World, node: Node, references: list[np.ndarray], pad: float = 2.0):
        self._world, self._node, self._shm = world, node, None
        n = int(references[0].shape[0])
        p = padded_size(n, pad)
        shape = (p, p, p // 2 + 1)
        self.mode, self.why = memory_mode(world, node, len(references) * int(np.prod(shape)) * 8)
        if self.mode != "shared":
            self.vfts = [prepare_volume_ft(r.astype(np.float32), pad) for r in references]
            return
        self._shm = SharedArrays(world, node, [(shape, np.complex64)] * len(references))
        for k, r in enumerate(references):
            if k % node.size == node.rank:
                self._shm.arrays[k][...] = prepare_volume_ft(r.astype(np.float32), pad).data
        node_barrier(world, node)  # every class written before any rank projects from it
        self.vfts = [VolumeFT(data=a, n=n, size=p, method="linear") for a in self._shm.arrays]

    def close(self) -> None:
        """Free the window once every rank of the node is done with it (collective in shared mode)."""
        self.vfts = []
        if self._shm is not None:
            node_barrier(self._world, self._node)
            self._shm.close()
            self._shm = None

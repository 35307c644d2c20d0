"""Reconstruct a simulated stack on every rank (run under mpiexec by tests/test_shared_accumulation.py).

    mpiexec -n N python tests/reconstruct_prog.py STACK PARAMS.star OUT.npz SYMMETRY PADDING

The accumulation mode comes from ``CISTEM_MPI_NODE_MEMORY``; rank 0 writes
the maps, the FSC and the mode used to OUT.npz.  (benchmarks/bench_node_memory.py
runs it too, and measures the ranks' memory from outside.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from cistem_mpi.drivers.runtime import get_world, guarded
from cistem_mpi.drivers.volumejob import ReconstructionSettings, reconstruct_particles
from cistem_mpi.io.mrc import read_mrc_header
from cistem_mpi.io.parameter_files import read_particle_params


def main() -> None:
    stack, params, out, symmetry, padding = sys.argv[1:6]
    world = get_world()
    with guarded(world):
        particles = None
        if world.is_controller:
            n = int(read_mrc_header(stack).shape[0])
            particles = read_particle_params(Path(params), None, n)
        r = reconstruct_particles(world, stack, particles,
                                  ReconstructionSettings(symmetry=symmetry, padding=float(padding), bfactor=0.0))
        if world.is_controller:
            assert r is not None
            np.savez(out, volume=r.volume, half1=r.half1, half2=r.half2, fsc=r.fsc, mode=r.extra["accumulation"])


if __name__ == "__main__":
    main()

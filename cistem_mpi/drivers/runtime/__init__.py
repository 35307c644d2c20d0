"""The MPI runtime every driver uses (the only MPI code in cistem-mpi).

Rank 0 is the controller: it alone touches the database, hands out work and
gathers results.  Ranks 1..N-1 are workers.  With one rank, rank 0 does the
work itself through the same code path.

* :mod:`.world`      ranks, host names, failure-aware waits, the stop protocol
* :mod:`.guard`      ``guarded(world, on_failure)``: run a job body on every rank
* :mod:`.taskqueue`  dynamic queue: ``map_tasks``, ``map_items``, ``map_chunks``
* :mod:`.slab`       reduce-scatter of volume accumulators along z, gather of slabs
* :mod:`.reduce`     ``reduce_sum``: small arrays (2D class sums) summed onto rank 0
* :mod:`.progress`   done/total, rate and ETA: terminal bar, log lines, job record
* :mod:`.checkpoint` per-iteration checkpoints for ``--resume``
* :mod:`.array`      Slurm job-array mode (prepare / tasks / merge)

Drivers must use these functions, not raw blocking MPI calls: a blocking call
cannot notice that another rank failed, and would hang.
"""

from cistem_mpi.drivers.runtime.guard import exit_code_for, guarded
from cistem_mpi.drivers.runtime.progress import Progress, format_duration, format_rate
from cistem_mpi.drivers.runtime.slab import Slab, gather_z, reduce_scatter_z, slab_bounds
from cistem_mpi.drivers.runtime.taskqueue import map_chunks, map_items, map_tasks
from cistem_mpi.drivers.runtime.world import (
    FailureInfo,
    LaunchError,
    Stopped,
    Terminated,
    World,
    WorkerFailed,
    check_launch,
    get_world,
)
from cistem_mpi.drivers.runtime.checkpoint import Checkpoint, CheckpointStore, rng_from_state, rng_state
from cistem_mpi.drivers.runtime.reduce import reduce_sum

__all__ = [
    "Checkpoint",
    "CheckpointStore",
    "FailureInfo",
    "LaunchError",
    "Progress",
    "Slab",
    "Stopped",
    "Terminated",
    "World",
    "WorkerFailed",
    "check_launch",
    "exit_code_for",
    "format_duration",
    "format_rate",
    "gather_z",
    "get_world",
    "guarded",
    "map_chunks",
    "map_items",
    "map_tasks",
    "reduce_scatter_z",
    "reduce_sum",
    "rng_from_state",
    "rng_state",
    "slab_bounds",
]

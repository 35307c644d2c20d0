"""The guard every job body runs in: a failure anywhere stops every rank.

Usage (this is what :func:`cistem_mpi.drivers.jobrun.run_job` does)::

    world = get_world()
    with guarded(world, on_failure=record_failure_in_db):
        result = body(ctx)
    # here: every rank finished without error

On an exception on any rank, :meth:`World.fail` runs the stop protocol,
``on_failure(info)`` runs on rank 0 (record the job as failed: rank, host,
message), then ranks that never acknowledged the stop are killed with
``MPI_Abort``, and the exception propagates (rank 0 re-raises
:class:`~.world.WorkerFailed` when a worker failed, a worker re-raises its own
exception or :class:`~.world.Stopped`).
"""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from cistem_mpi.drivers.runtime.world import FailureInfo, World, install_sigterm_handler


def exit_code_for(exc: BaseException) -> int:
    """The process exit code an exception stands for (non-zero)."""
    code = getattr(exc, "exit_code", None)
    if isinstance(code, int) and code:
        return code
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, SystemExit) and isinstance(exc.code, int) and exc.code:
        return exc.code
    return 1


@contextmanager
def guarded(
    world: World,
    on_failure: Callable[[FailureInfo], None] | None = None,
    *,
    sigterm: bool = True,
) -> Iterator[World]:
    """Run the enclosed block on every rank with coordinated failure handling.

    Parameters
    ----------
    world : World
    on_failure : callable, optional
        Rank 0 only: called with the :class:`FailureInfo` after every worker
        was stopped and before any ``MPI_Abort`` (write the failure to the
        database here).  Its own exceptions are printed, not raised.
    sigterm : bool
        Turn SIGTERM (``scancel``, Slurm time limit) into an exception so the
        job is recorded as failed instead of vanishing.
    """
    handler = install_sigterm_handler() if sigterm else None
    try:
        yield world
        world.finish()
    except BaseException as exc:
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        info = world.fail(exc)
        if world.is_controller and on_failure is not None and info is not None:
            try:
                on_failure(info)
            except Exception as rec_exc:  # the original failure matters more
                sys.stderr.write(f"error: could not record the failure: {rec_exc}\n")
        world.abort_if_unresponsive(exit_code_for(exc))
        raise
    finally:
        if handler is not None and handler.previous is not None:
            signal.signal(signal.SIGTERM, handler.previous)

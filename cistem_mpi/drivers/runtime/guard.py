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
exception as :class:`~cistem_mpi.errors.JobFailed` (``rank R on HOST: ...``) or
:class:`~.world.Stopped`).
"""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from cistem_mpi.drivers.runtime.world import FailureInfo, World, install_sigterm_handler, one_line
from cistem_mpi.errors import CistemError, JobFailed


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


def _mark_handled(exc: BaseException) -> BaseException:
    """Flag an exception whose stop protocol ran (nested guards must not run it twice)."""
    try:
        exc._cistem_stop_done = True  # type: ignore[attr-defined]
    except AttributeError:
        pass
    return exc


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
        database here).  Its own exceptions are printed, not raised.  Without
        it, the caller records the failure after the exception propagates,
        and the ``MPI_Abort`` of workers that never stopped is deferred to the
        exit of the process (``atexit``).
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
        if getattr(exc, "_cistem_stop_done", False):  # an inner guard already stopped everyone
            raise
        info = world.fail(exc)
        if world.is_controller and on_failure is not None and info is not None:
            try:
                on_failure(info)
            except Exception as rec_exc:  # the original failure matters more
                sys.stderr.write(f"error: could not record the failure: {rec_exc}\n")
        if on_failure is not None:
            world.abort_if_unresponsive(exit_code_for(exc))
        else:  # the caller records the failure after this: abort only when the process exits
            world.abort_at_exit_if_unresponsive(exit_code_for(exc))
        _mark_handled(exc)
        if world.size > 1:
            # After the stop protocol the failure is fully handled: re-raise it as
            # JobFailed (flagged as handled) so no caller starts another stop or an
            # MPI_Abort.  Bad input (InputError) and cancellation keep their type
            # on rank 0: they mean something else to the job record.
            if world.is_controller:
                if isinstance(exc, Exception) and not isinstance(exc, CistemError):
                    assert info is not None
                    raise _mark_handled(JobFailed(info.line())) from exc
            elif not isinstance(exc, JobFailed):
                raise _mark_handled(JobFailed(f"rank {world.rank} on {world.host}: {one_line(exc)}")) from exc
        raise
    finally:
        if handler is not None and handler.previous is not None:
            signal.signal(signal.SIGTERM, handler.previous)

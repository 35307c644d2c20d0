"""The MPI world of a job: who am I, failure-aware waiting, and the stop protocol.

Rank 0 is the controller, ranks 1..N-1 are workers.  With one rank (plain
``cistem-mpi <job>``, or no MPI at all) rank 0 does all the work itself and
no MPI call is made.

Why every wait here is *polled*: a blocking ``MPI_Recv`` or ``MPI_Allreduce``
cannot be interrupted, so a rank blocked in one would hang forever when a
peer fails.  Every wait in the runtime therefore tests its request in a loop
and, between tests, looks for the two control messages:

* on the controller, ``TAG_ERROR`` from any worker (a worker raised): the
  wait raises :class:`WorkerFailed` (a :class:`~cistem_mpi.errors.JobFailed`);
* on a worker, ``TAG_STOP`` from rank 0 (the job is being stopped): the wait
  raises :class:`Stopped`.

The protocol that follows a failure (see :meth:`World.fail`):

1. a worker that raises sends ``(rank, host, type, message, traceback)`` to
   rank 0 and waits (bounded) for ``TAG_STOP``;
2. rank 0, on any exception of its own or on a worker's report, sends
   ``TAG_STOP`` to every worker that has not already finished, and waits up
   to a grace period for each to acknowledge (``TAG_ACK``);
3. the job driver records the failure (rank 0 only) and then calls
   :meth:`World.abort_if_unresponsive`, which calls ``MPI_Abort`` if a worker
   never acknowledged (it is stuck in a long computation): nothing hangs.

A worker that finishes normally sends ``TAG_BYE``; rank 0 waits for every
worker's BYE in :meth:`World.finish`, so a job is only marked finished when
every rank finished.  Workers must exit through ``MPI_Finalize`` (a normal
interpreter exit), never ``os._exit``: MPICH's launcher kills the whole job,
rank 0 included, when a rank exits without finalising.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from cistem_mpi.errors import CistemError, InputError, JobFailed

# Control tags (fixed) and the base of per-operation tags (see World.next_tag).
TAG_ERROR = 11
TAG_STOP = 12
#: Payload of ``TAG_STOP`` when rank 0 stops the job because of bad input.
STOP_BAD_INPUT = "bad-input"
TAG_ACK = 13
TAG_BYE = 14
_TAG_OP_BASE = 1000
_TAG_OP_SPAN = 8  # tags reserved per runtime operation
_TAG_OP_CYCLE = 2048  # operations before tags repeat (needs TAG_UB >= 1000 + 8*2048)


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


#: Seconds rank 0 waits for workers to acknowledge a stop before MPI_Abort.
STOP_GRACE = _env_float("CISTEM_MPI_STOP_GRACE", 10.0)
#: Seconds a failed worker waits for rank 0's stop before MPI_Abort.
WORKER_WAIT = _env_float("CISTEM_MPI_WORKER_WAIT", 60.0)


class Stopped(JobFailed):
    """Raised on a worker told by rank 0 to stop (a failure happened elsewhere).

    When rank 0 stopped the job for bad input (an :class:`InputError`, which
    rank 0 reports in one line), the worker exits with the same code 2 and
    says nothing: the user should see one error, not one per rank.
    """

    exit_code = 3

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason
        if reason == STOP_BAD_INPUT:
            self.exit_code = InputError.exit_code
            self.quiet = True


class Terminated(CistemError):
    """Raised when the process receives SIGTERM (scancel, Slurm time limit, kill)."""

    exit_code = 143


class LaunchError(InputError):
    """The launch is wrong (e.g. ``srun`` without the right ``--mpi=``)."""


class WorkerFailed(JobFailed):
    """A worker raised; raised on rank 0 as ``rank R on HOST: message``.

    Attributes
    ----------
    rank, host : the failing rank and its host name.
    message : the worker's one-line error message.
    exc_type : class name of the worker's exception.
    tb : the worker's formatted traceback (for the job log).
    """

    def __init__(self, rank: int, host: str, message: str, exc_type: str = "", tb: str = ""):
        self.rank = rank
        self.host = host
        self.message = message
        self.exc_type = exc_type
        self.tb = tb
        super().__init__(f"rank {rank} on {host}: {message}")


@dataclass
class FailureInfo:
    """What rank 0 knows about a failure once the workers were stopped."""

    rank: int
    host: str
    message: str
    exc_type: str = ""
    tb: str = ""
    #: workers that did not acknowledge the stop within the grace period
    unresponsive: list[int] = field(default_factory=list)

    def line(self) -> str:
        """``rank R on HOST: message`` (what the job record and the log show)."""
        return f"rank {self.rank} on {self.host}: {self.message}"


def one_line(exc: BaseException) -> str:
    """The user-facing one-line message of an exception (job records, logs, the failure report).

    Parameters
    ----------
    exc : BaseException

    Returns
    -------
    str
        A CistemError's own text; otherwise ``Type: first line``.

    >>> one_line(ValueError("bad value\\nmore detail"))
    'ValueError: bad value'
    """
    if isinstance(exc, CistemError):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


class Backoff:
    """Poll pacing: spin briefly (low latency), then sleep longer and longer (shared by every polling loop).

    Create one per wait and call :meth:`pause` between polls.

    Sleeping matters on oversubscribed nodes (8 ranks on 2 cores): a rank
    that spins while waiting steals the CPU its peers need.  The sleep grows
    with the time already waited (10 %), so latency stays within 10 % of the
    wait itself, capped at ``max_sleep``.
    """

    __slots__ = ("t0", "spin", "max_sleep")

    def __init__(self, spin: float = 2e-4, max_sleep: float = 5e-3):
        self.t0 = time.perf_counter()
        self.spin = spin
        self.max_sleep = max_sleep

    def pause(self) -> None:
        waited = time.perf_counter() - self.t0
        if waited < self.spin:
            os.sched_yield()
        else:
            time.sleep(min(self.max_sleep, 0.1 * waited))


def expected_world_size(environ: dict[str, str] | None = None) -> int | None:
    """Number of tasks the launcher started, from its environment (None if unknown).

    ``srun`` sets ``SLURM_STEP_NUM_TASKS`` in every task of a step (the batch
    script of ``sbatch`` itself is not a step with several tasks); MPICH's
    ``mpiexec`` sets ``PMI_SIZE``; Open MPI's ``mpirun`` sets
    ``OMPI_COMM_WORLD_SIZE``.
    """
    env = os.environ if environ is None else environ
    for key in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"):
        if env.get(key, "").isdigit():
            return int(env[key])
    if env.get("SLURM_STEP_NUM_TASKS", "").isdigit() and "SLURM_STEP_ID" in env:
        # The batch step (SLURM_STEP_ID=batch) runs the script once, not N tasks.
        if env.get("SLURM_STEP_ID", "").isdigit():
            return int(env["SLURM_STEP_NUM_TASKS"])
    return None


def check_launch(size: int, environ: dict[str, str] | None = None) -> None:
    """Refuse a launch where the launcher started N tasks but MPI sees N worlds of 1.

    That happens with ``srun --mpi=none`` (or a wrong ``--mpi=``): every task
    would believe it is rank 0, and N controllers would write one database.

    Raises
    ------
    LaunchError
        When the launcher started more tasks than the MPI world has ranks.
    """
    expected = expected_world_size(environ)
    if expected is not None and expected > 1 and size == 1:
        env = os.environ if environ is None else environ
        how = "srun" if "SLURM_STEP_NUM_TASKS" in env else "the MPI launcher"
        raise LaunchError(
            "launch",
            f"{how} started {expected} tasks but MPI sees a world of 1 rank: the launcher and the "
            "MPI library do not match (pip MPICH needs `srun --mpi=pmi2`, Open MPI `srun --mpi=pmix`; "
            "see jobscripts/)",
        )


class World:
    """The ranks of one job and the runtime's failure-aware communication.

    Parameters
    ----------
    comm : mpi4py communicator or None
        ``None`` for a process without MPI (size 1).  The runtime duplicates
        nothing: pass a communicator reserved for the runtime (``get_world``
        passes a duplicate of ``COMM_WORLD``) so drivers' own messages cannot
        be mistaken for control messages.
    """

    def __init__(self, comm: Any = None, host: str | None = None):
        self.comm = comm
        if comm is None:
            self.rank, self.size = 0, 1
        else:
            self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.host = host or socket.gethostname()
        self._seq = 0
        self._finished: set[int] = set()  # rank 0: workers that said BYE
        self._acked: set[int] = set()  # rank 0: workers that acknowledged STOP
        self._errors: list[WorkerFailed] = []  # rank 0: every worker report received
        self._stop_sent = False
        self.unresponsive: list[int] = []
        self.failure: FailureInfo | None = None

    # ------------------------------------------------------------------ identity
    @property
    def is_controller(self) -> bool:
        """True on rank 0."""
        return self.rank == 0

    @property
    def n_workers(self) -> int:
        """Ranks that do the work: N-1 with N>1 ranks, else 1 (rank 0 itself)."""
        return max(1, self.size - 1)

    @property
    def parallel(self) -> bool:
        """True when there are workers besides rank 0."""
        return self.size > 1

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size}, host={self.host!r})"

    def next_tag(self) -> int:
        """A tag block for the next runtime operation (same on every rank: SPMD order).

        Separate tags per operation keep a fast worker's messages for the next
        queue from being taken as answers in the current one.
        """
        self._seq += 1
        return _TAG_OP_BASE + _TAG_OP_SPAN * (self._seq % _TAG_OP_CYCLE)

    # ------------------------------------------------------------------ polling
    def check(self) -> None:
        """Raise if a failure was signalled (cheap; call between long tasks).

        Raises
        ------
        WorkerFailed
            On rank 0, when a worker reported an exception.
        Stopped
            On a worker, when rank 0 sent the stop message.
        """
        if self.size == 1:
            return
        from mpi4py import MPI

        if self.rank == 0:
            st = MPI.Status()
            msg = self.comm.improbe(MPI.ANY_SOURCE, TAG_ERROR, st)
            if msg is not None:
                rank, host, message, exc_type, tb = msg.recv()
                err = WorkerFailed(rank, host, message, exc_type, tb)
                self._errors.append(err)
                raise err
        else:
            msg = self.comm.improbe(0, TAG_STOP)
            if msg is not None:
                reason = msg.recv()
                raise Stopped(f"rank {self.rank}: stopped by rank 0 after a failure", reason)

    def wait(self, req: Any) -> Any:
        """Wait for an MPI request, checking for failures meanwhile.

        Works for buffer requests (``Isend``/``Irecv``/``Ibcast``...) and for
        mpi4py object requests (``isend``); returns what ``req.test()`` gives
        for object requests, else None.
        """
        backoff = Backoff()
        while True:
            done, value = req.test()
            if done:
                return value
            self.check()
            backoff.pause()

    def waitall(self, reqs: Iterable[Any]) -> None:
        """Wait for several requests (see :meth:`wait`)."""
        for r in list(reqs):
            self.wait(r)

    def recv_from(self, source: int, tag: int) -> tuple[Any, int]:
        """Receive a pickled object (any size) from ``source``; returns (obj, source)."""
        from mpi4py import MPI

        backoff = Backoff()
        st = MPI.Status()
        while True:
            msg = self.comm.improbe(source, tag, st)
            if msg is not None:
                return msg.recv(), st.Get_source()
            self.check()
            backoff.pause()

    # ------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        """Barrier that still notices failures."""
        if self.size > 1:
            self.wait(self.comm.Ibarrier())

    def bcast(self, obj: Any = None, root: int = 0) -> Any:
        """Broadcast a picklable object from ``root`` (failure-aware)."""
        if self.size == 1:
            return obj
        n = np.zeros(1, dtype=np.int64)
        data = b""
        if self.rank == root:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            n[0] = len(data)
        self.wait(self.comm.Ibcast(n, root=root))
        buf = bytearray(data) if self.rank == root else bytearray(int(n[0]))
        if n[0]:
            self.wait(self.comm.Ibcast(buf, root=root))
        return obj if self.rank == root else pickle.loads(bytes(buf))

    def gather(self, obj: Any) -> list[Any] | None:
        """Gather one picklable object per rank on rank 0 (list in rank order)."""
        if self.size == 1:
            return [obj]
        tag = self.next_tag()
        if self.rank != 0:
            self.wait(self.comm.isend(obj, dest=0, tag=tag))
            return None
        out: list[Any] = [None] * self.size
        out[0] = obj
        for src in range(1, self.size):
            out[src], _ = self.recv_from(src, tag)
        return out

    def allreduce_sum(self, arr: np.ndarray) -> np.ndarray:
        """Element-wise sum over ranks of a numeric array (complex summed as pairs)."""
        a = np.ascontiguousarray(arr)
        if self.size == 1:
            return a.copy()
        send = real_view(a)
        out = np.empty_like(a)
        self.wait(self.comm.Iallreduce(send, real_view(out), op=mpi_sum()))
        return out

    # ------------------------------------------------------------------ ending
    def finish(self) -> None:
        """Normal end of the parallel part.

        A worker tells rank 0 it finished; rank 0 waits until every worker
        did (raising :class:`WorkerFailed` if one reports an error instead).
        """
        if self.size == 1:
            return
        from mpi4py import MPI

        if self.rank != 0:
            self.wait(self.comm.isend(None, dest=0, tag=TAG_BYE))
            return
        st = MPI.Status()
        backoff = Backoff()
        while len(self._finished) < self.size - 1:
            msg = self.comm.improbe(MPI.ANY_SOURCE, TAG_BYE, st)
            if msg is not None:
                msg.recv()
                self._finished.add(st.Get_source())
                backoff = Backoff()
                continue
            self.check()
            backoff.pause()

    def fail(self, exc: BaseException) -> FailureInfo | None:
        """Coordinate the stop after ``exc`` was raised on this rank.

        On a worker: report to rank 0 (unless it was itself told to stop),
        wait for the stop, acknowledge it.  On rank 0: stop every worker and
        wait for their acknowledgements.  Never raises (except on a worker
        whose controller never answers: then ``MPI_Abort``).

        Returns
        -------
        FailureInfo or None
            On rank 0, what failed where (also kept in ``self.failure``).
        """
        if self.size == 1:
            rank, host = 0, self.host
            info = FailureInfo(rank, host, one_line(exc), type(exc).__name__, _format_tb(exc))
            self.failure = info
            return info
        if self.rank == 0:
            return self._controller_fail(exc)
        self._worker_fail(exc)
        return None

    def _worker_fail(self, exc: BaseException) -> None:
        comm = self.comm
        if not isinstance(exc, Stopped):
            report = (self.rank, self.host, one_line(exc), type(exc).__name__, _format_tb(exc))
            req = comm.isend(report, dest=0, tag=TAG_ERROR)
            # SIGTERM means the launcher is ending the whole job anyway: do not linger.
            terminated = isinstance(exc, Terminated)
            deadline = time.monotonic() + (min(WORKER_WAIT, 3.0) if terminated else WORKER_WAIT)
            backoff = Backoff()
            while True:
                msg = comm.improbe(0, TAG_STOP)
                if msg is not None:
                    msg.recv()
                    break
                if time.monotonic() > deadline:
                    if terminated:
                        return
                    sys.stderr.write(
                        f"error: rank {self.rank} on {self.host}: rank 0 did not answer within "
                        f"{WORKER_WAIT:.0f} s after this rank failed; aborting the MPI job\n"
                    )
                    sys.stderr.flush()
                    comm.Abort(3)
                backoff.pause()
            req.test()
        # The stop is acknowledged with a blocking-free send; rank 0 is listening.
        ack = comm.isend(self.rank, dest=0, tag=TAG_ACK)
        deadline = time.monotonic() + STOP_GRACE
        while not ack.test()[0] and time.monotonic() < deadline:
            time.sleep(1e-3)

    def _controller_fail(self, exc: BaseException) -> FailureInfo:
        from mpi4py import MPI

        comm = self.comm
        if isinstance(exc, WorkerFailed):
            info = FailureInfo(exc.rank, exc.host, exc.message, exc.exc_type, exc.tb)
        else:
            info = FailureInfo(0, self.host, one_line(exc), type(exc).__name__, _format_tb(exc))
        pending = set(range(1, self.size)) - self._finished
        sends = []
        if not self._stop_sent:
            reason = STOP_BAD_INPUT if isinstance(exc, InputError) else None
            sends = [comm.isend(reason, dest=r, tag=TAG_STOP) for r in sorted(pending)]
            self._stop_sent = True
        st = MPI.Status()
        # After SIGTERM (scancel, time limit) the launcher kills every rank soon: record quickly.
        grace = min(STOP_GRACE, 2.0) if isinstance(exc, Terminated) else STOP_GRACE
        deadline = time.monotonic() + grace
        backoff = Backoff()
        # A worker is accounted for once it acknowledged the stop or said BYE
        # (it finished before the stop reached it).  Error reports of other
        # workers are drained so that they do not linger.
        while pending - self._acked - self._finished and time.monotonic() < deadline:
            got = False
            for tag in (TAG_ACK, TAG_BYE, TAG_ERROR):
                msg = comm.improbe(MPI.ANY_SOURCE, tag, st)
                if msg is None:
                    continue
                payload = msg.recv()
                src = st.Get_source()
                got = True
                if tag == TAG_ACK:
                    self._acked.add(src)
                elif tag == TAG_BYE:
                    self._finished.add(src)
                else:
                    self._errors.append(WorkerFailed(*payload))
            if got:
                backoff = Backoff()
            else:
                backoff.pause()
        for s in sends:
            s.test()
        self.unresponsive = sorted(pending - self._acked - self._finished)
        info.unresponsive = list(self.unresponsive)
        self.failure = info
        return info

    def abort_if_unresponsive(self, exit_code: int = 3) -> None:
        """After the failure was recorded: ``MPI_Abort`` if a worker never stopped.

        Call on rank 0 as the very last step of a failed job (after the
        database write): the abort kills every rank, rank 0 included.
        """
        if self.size > 1 and self.rank == 0 and self.unresponsive:
            sys.stderr.write(
                f"error: ranks {self.unresponsive} did not stop within {STOP_GRACE:.0f} s; "
                "aborting the MPI job\n"
            )
            sys.stderr.flush()
            self.comm.Abort(exit_code or 3)


    def abort_at_exit_if_unresponsive(self, exit_code: int = 3) -> None:
        """Like :meth:`abort_if_unresponsive`, but when the process exits.

        For callers that record the failure after the exception propagated
        (the abort must come after that database write).
        """
        if self.size > 1 and self.rank == 0 and self.unresponsive:
            import atexit

            atexit.register(self.abort_if_unresponsive, exit_code)


def _format_tb(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def real_view(a: np.ndarray) -> np.ndarray:
    """A complex array as its float parts (MPI SUM is element-wise, so identical)."""
    if np.iscomplexobj(a):
        return a.view(a.real.dtype)
    return a


def mpi_sum() -> Any:
    """MPI.SUM (mpi4py imported only when a reduction runs)."""
    from mpi4py import MPI

    return MPI.SUM


_WORLD: World | None = None


def get_world(check: bool = True) -> World:
    """The process's world (created once).

    Imports mpi4py (a singleton world of size 1 without a launcher); without
    mpi4py installed, a world of size 1 without MPI.

    Parameters
    ----------
    check : bool
        Refuse mismatched launches (see :func:`check_launch`).
    """
    global _WORLD
    if _WORLD is None:
        try:
            from mpi4py import MPI
        except ImportError:  # no MPI library at all: still a working 1-rank job
            world = World(None)
        else:
            base = MPI.COMM_WORLD
            comm = base.Dup() if base.Get_size() > 1 else base
            world = World(comm, host=MPI.Get_processor_name())
        _WORLD = world
    if check:
        check_launch(_WORLD.size)
    return _WORLD


class _SigtermRaiser:
    """Turn the first SIGTERM into :class:`Terminated` (Slurm's scancel / time limit)."""

    def __init__(self) -> None:
        self.previous: Any = None
        self.fired = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.fired:  # the stop is already under way: let it finish
            return
        self.fired = True
        raise Terminated(f"terminated by signal {signum} (SIGTERM)")


def install_sigterm_handler() -> _SigtermRaiser | None:
    """Make SIGTERM raise :class:`Terminated` in the main thread (None if not possible)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    handler = _SigtermRaiser()
    handler.previous = signal.signal(signal.SIGTERM, handler)
    return handler

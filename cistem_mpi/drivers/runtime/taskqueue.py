"""Dynamic task queue: rank 0 hands out chunks of tasks on request.

Work (particles, movies, micrographs) is a range of task indices ``0..n-1``.
Each worker asks rank 0 for a chunk, computes it, and sends the results back
with its next request, so a slow node simply asks less often.  Chunks follow
guided self-scheduling: large while much is left (few messages), shrinking
towards the end (no rank is left with a big chunk while the others idle).

Results are stored on rank 0 *by task index*, so they are identical for any
number of ranks as long as the task function depends only on its index (and
not on which rank or chunk computes it).  With one rank, rank 0 runs the
same chunks itself.

Message protocol (tags from :meth:`World.next_tag`, so consecutive queues do
not mix): worker -> 0 ``(kind, start, results)`` where kind asks for a chunk
(WANT: answered with exactly one reply), only delivers results (KEEP), or
leaves the queue (LEAVE: no request in flight); 0 -> worker
``(start, stop, payload)`` or ``None`` (no more work).  A worker keeps one
chunk requested ahead of the one it computes, so it never waits for rank 0
while rank 0 has work (prefetch; see :data:`PREFETCH`).
"""

from __future__ import annotations

import collections
import math
import time
from typing import Any, Callable, Sequence

from cistem_mpi.drivers.runtime.world import Backoff, World

ProgressFn = Callable[[int, int], Any]

#: Chunks a worker requests ahead of the one it computes (0: classic request/reply).
#: One is enough to hide the round trip to rank 0 behind the computation.
PREFETCH = 1


def next_chunk_size(
    remaining: int,
    n_workers: int,
    n_tasks: int,
    chunk_size: int | None = None,
    min_chunk: int = 1,
    max_chunk: int | None = None,
) -> int:
    """Size of the next chunk (guided self-scheduling).

    Parameters
    ----------
    remaining : tasks not yet handed out.
    n_workers : ranks that compute.
    n_tasks : total tasks (caps a chunk at 1 % of the job so progress moves).
    chunk_size : fixed size if given.
    min_chunk, max_chunk : bounds on the guided size.

    Returns
    -------
    int
        Between 1 and ``remaining``.
    """
    if remaining <= 0:
        return 0
    if chunk_size:
        return max(1, min(int(chunk_size), remaining))
    size = math.ceil(remaining / (4 * max(1, n_workers)))
    cap = max_chunk if max_chunk else max(min_chunk, math.ceil(n_tasks / 100))
    size = max(min_chunk, min(size, cap))
    return max(1, min(size, remaining))


def map_chunks(
    world: World,
    n_tasks: int,
    fn_chunk: Callable[[int, int, Any], Sequence[Any]],
    *,
    payload: Callable[[int, int], Any] | None = None,
    chunk_size: int | None = None,
    min_chunk: int = 1,
    max_chunk: int | None = None,
    progress: ProgressFn | None = None,
    on_result: Callable[[int, Sequence[Any]], Any] | None = None,
    keep: bool = True,
    static: bool = False,
) -> list[Any] | None:
    """Compute ``n_tasks`` tasks in chunks over the world; gather results on rank 0.

    Parameters
    ----------
    world : World
        Every rank calls this (SPMD).
    n_tasks : int
        Number of tasks (needed on rank 0; ignored on workers).
    fn_chunk : callable ``(start, stop, data) -> sequence of stop-start results``
        Runs on workers (on rank 0 with one rank).  Must not depend on the
        chunk boundaries for results to be independent of the rank count.
    payload : callable ``(start, stop) -> data``, optional
        Rank 0 only: data sent with the chunk (e.g. file names); else None.
    chunk_size, min_chunk, max_chunk : see :func:`next_chunk_size`.
    progress : callable ``(done, total)``, optional
        Rank 0: called after each finished chunk (and once with 0 at start).
    on_result : callable ``(start, results)``, optional
        Rank 0: called for each finished chunk in arrival order.
    keep : bool
        Keep all results and return them (set False to stream via on_result).
    static : bool
        Fixed assignment instead of first-come-first-served: the chunk
        boundaries depend only on ``n_tasks`` and the number of workers, and
        worker ``w`` (rank ``w``) computes chunks ``w-1, w-1+W, w-1+2W, ...``
        in that order.  For work that *accumulates* into per-rank sums
        (reconstruction): every rank then adds the same contributions in the
        same order in every run, so the sums are bit-identical run to run on
        the same number of ranks (dynamic hand-out makes them depend on which
        worker asked first).  Costs the load balancing of the dynamic queue.

    Returns
    -------
    list or None
        On rank 0 (``keep``): results in task order.  On workers: None.

    Raises
    ------
    WorkerFailed
        On rank 0 when a worker raised (see :mod:`.world`).
    Stopped
        On a worker when rank 0 stops the job.
    """
    if world.size == 1:
        return _run_local(n_tasks, fn_chunk, payload, chunk_size, min_chunk, max_chunk, progress, on_result, keep)
    tag = world.next_tag()
    if world.is_controller:
        return _run_controller(
            world, tag, n_tasks, payload, chunk_size, min_chunk, max_chunk, progress, on_result, keep, static
        )
    _run_worker(world, tag, fn_chunk)
    return None


def map_tasks(world: World, n_tasks: int, fn: Callable[[int], Any], **kw: Any) -> list[Any] | None:
    """Like :func:`map_chunks` with a per-task function ``fn(index) -> result``.

    Between tasks a worker checks for a stop, so a long chunk of short tasks
    still stops within one task's time.
    """

    def chunk(start: int, stop: int, _data: Any) -> list[Any]:
        out = []
        last = time.monotonic()
        for i in range(start, stop):
            out.append(fn(i))
            now = time.monotonic()
            if now - last > 0.05:
                world.check()
                last = now
        return out

    return map_chunks(world, n_tasks, chunk, **kw)


def map_items(world: World, items: Sequence[Any] | None, fn: Callable[[Any], Any], **kw: Any) -> list[Any] | None:
    """Map ``fn`` over ``items`` known on rank 0 only (items travel with the chunks)."""
    n = len(items) if world.is_controller and items is not None else 0

    def payload(start: int, stop: int) -> Any:
        return list(items[start:stop])  # type: ignore[index]

    def chunk(start: int, stop: int, data: Any) -> list[Any]:
        out = []
        last = time.monotonic()
        for item in data:
            out.append(fn(item))
            now = time.monotonic()
            if now - last > 0.05:
                world.check()
                last = now
        return out

    return map_chunks(world, n, chunk, payload=payload, **kw)


# ---------------------------------------------------------------------- one rank
def _run_local(n, fn_chunk, payload, chunk_size, min_chunk, max_chunk, progress, on_result, keep):
    results: list[Any] | None = [None] * n if keep else None
    if progress:
        progress(0, n)
    start = 0
    while start < n:
        stop = start + next_chunk_size(n - start, 1, n, chunk_size, min_chunk, max_chunk)
        data = payload(start, stop) if payload else None
        res = fn_chunk(start, stop, data)
        _store(results, start, stop, res, on_result)
        start = stop
        if progress:
            progress(start, n)
    return results


def _store(results, start, stop, res, on_result):
    res = list(res)
    if len(res) != stop - start:
        raise ValueError(f"task chunk {start}..{stop} returned {len(res)} results, expected {stop - start}")
    if results is not None:
        results[start:stop] = res
    if on_result:
        on_result(start, res)


# ---------------------------------------------------------------------- rank 0
def static_chunks(n: int, n_workers: int, chunk_size: int | None = None, min_chunk: int = 1,
                  max_chunk: int | None = None) -> list[list[tuple[int, int]]]:
    """The fixed plan of a static queue: ``plan[w]`` lists worker ``w + 1``'s chunks ``(start, stop)`` in order.

    Guided sizes as the dynamic queue's, cut once from ``n`` alone; chunk k goes to worker k mod W.

    >>> static_chunks(10, 2, chunk_size=3)
    [[(0, 3), (6, 9)], [(3, 6), (9, 10)]]
    """
    plan: list[list[tuple[int, int]]] = [[] for _ in range(max(1, n_workers))]
    start, k = 0, 0
    while start < n:
        stop = start + next_chunk_size(n - start, n_workers, n, chunk_size, min_chunk, max_chunk)
        plan[k % len(plan)].append((start, stop))
        start, k = stop, k + 1
    return plan


def _run_controller(world, tag, n, payload, chunk_size, min_chunk, max_chunk, progress, on_result, keep,
                    static=False):
    from mpi4py import MPI

    comm = world.comm
    req_tag, rep_tag = tag, tag + 1
    results: list[Any] | None = [None] * n if keep else None
    active = set(range(1, world.size))  # workers that have not left the queue
    next_start = 0
    fixed = ({w + 1: collections.deque(c) for w, c in
              enumerate(static_chunks(n, world.size - 1, chunk_size, min_chunk, max_chunk))} if static else None)
    done = 0
    sends: list[Any] = []
    st = MPI.Status()
    if progress:
        progress(0, n)
    backoff = Backoff()
    while active:
        msg = comm.improbe(MPI.ANY_SOURCE, req_tag, st)
        if msg is None:
            world.check()
            backoff.pause()
            continue
        backoff = Backoff()
        src = st.Get_source()
        kind, start, res = msg.recv()
        if res is not None:
            stop = start + len(res)
            _store(results, start, stop, res, on_result)
            done += len(res)
            if progress:
                progress(done, n)
        if kind == _LEAVE:
            active.discard(src)
            continue
        if kind != _WANT:
            continue
        if fixed is not None:
            if fixed[src]:
                a, b = fixed[src].popleft()
                reply = (a, b, payload(a, b) if payload else None)
            else:
                reply = None
        elif next_start < n:
            size = next_chunk_size(n - next_start, world.size - 1, n, chunk_size, min_chunk, max_chunk)
            stop = next_start + size
            reply = (next_start, stop, payload(next_start, stop) if payload else None)
            next_start = stop
        else:
            reply = None
        sends.append(comm.isend(reply, dest=src, tag=rep_tag))
        if len(sends) > 64:  # let finished send requests go
            sends = [s for s in sends if not s.test()[0]]
    world.waitall(sends)
    if done != n:
        raise RuntimeError(f"task queue ended with {done} of {n} tasks done")
    return results


# ---------------------------------------------------------------------- workers
# Worker -> rank 0 messages: (kind, start, results).  _WANT asks for a chunk (every
# _WANT gets exactly one reply: a chunk or None); _KEEP only delivers results;
# _LEAVE says this worker has no request in flight and is done with this queue.
_WANT, _KEEP, _LEAVE = 0, 1, 2


def _run_worker(world, tag, fn_chunk, prefetch=PREFETCH):
    """Compute chunks, keeping ``prefetch`` more chunks requested ahead (hides the round trip)."""
    comm = world.comm
    req_tag, rep_tag = tag, tag + 1
    sends: list[Any] = []
    in_flight = 0  # _WANT requests not yet answered
    reserve: collections.deque = collections.deque()
    exhausted = False  # rank 0 answered None: no more chunks
    for _ in range(1 + max(0, prefetch)):
        sends.append(comm.isend((_WANT, 0, None), dest=0, tag=req_tag))
        in_flight += 1
    while True:
        # take every reply that has arrived; block only when there is nothing to compute
        while in_flight and (not reserve or comm.iprobe(source=0, tag=rep_tag)):
            reply, _ = world.recv_from(0, rep_tag)
            in_flight -= 1
            if reply is None:
                exhausted = True
            else:
                reserve.append(reply)
        if not reserve:
            break
        start, stop, data = reserve.popleft()
        res = list(fn_chunk(start, stop, data))
        if len(res) != stop - start:
            raise ValueError(f"task chunk {start}..{stop} returned {len(res)} results, expected {stop - start}")
        if exhausted:
            sends.append(comm.isend((_KEEP, start, res), dest=0, tag=req_tag))
        else:
            sends.append(comm.isend((_WANT, start, res), dest=0, tag=req_tag))
            in_flight += 1
        if len(sends) > 8:
            sends = [s for s in sends if not s.test()[0]]
    sends.append(comm.isend((_LEAVE, 0, None), dest=0, tag=req_tag))
    world.waitall(sends)

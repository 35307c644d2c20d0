"""``cistem-mpi mpi-check``: verify a launch (workstation, srun, salloc, sbatch, job array).

Facility staff run it with the same launcher and options as a real job.  It
records in the job's result: the world size, the host of every rank, the MPI
library, how many tasks each rank computed (the dynamic queue at work), and
whether a deterministic distributed computation gives exactly the serial
answer:

* every task ``i`` draws integer-valued data from ``(seed, iteration, i)``,
  returns its CRC32 and adds it into a small Fourier-like accumulator pair
  (numerator, weights) on the rank that computed it;
* the per-task checksums are gathered on rank 0 through the task queue, the
  accumulators are summed by reduce-scatter along z, each rank normalises
  its slab, and rank 0 gathers the slabs;
* rank 0 recomputes everything serially and compares bit for bit (the data
  are integers, so the parallel sums are exact whatever their order).

The job fails (exit 3) if the parallel answer differs.  With ``--iterations``
it checkpoints after every iteration and can be resumed (``--resume JOB``).
The ``--fail-*``/``--kill-*``/``--hang-*`` options inject faults to verify that
failures are reported and stop every rank.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import time
import zlib
from typing import Any

import numpy as np

from cistem_mpi.drivers.jobrun import JobContext, add_job_arguments, per_run_options, run_job
from cistem_mpi.drivers.runtime import array as array_mode
from cistem_mpi.drivers.runtime.checkpoint import CheckpointStore, rng_from_state, rng_state
from cistem_mpi.drivers.runtime.slab import gather_z, reduce_scatter_z
from cistem_mpi.drivers.runtime.taskqueue import map_tasks
from cistem_mpi.drivers.runtime.world import World, get_world
from cistem_mpi.errors import InputError, JobFailed

JOB_TYPE = "mpi_check"
#: values per task (small: this checks the plumbing, not the FLOPs)
VALUES_PER_TASK = 64


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``mpi-check`` command."""
    p = sub.add_parser(
        "mpi-check",
        help="verify an MPI launch: world size, hosts, MPI library, a distributed computation vs serial",
    )
    add_job_arguments(p)
    p.add_argument("--tasks", type=int, default=1000, help="number of tasks (default 1000)")
    p.add_argument("--iterations", type=int, default=1, help="iterations, checkpointed (default 1)")
    p.add_argument("--box", type=int, default=16, help="accumulator box size (default 16)")
    p.add_argument("--seed", type=int, default=1, help="seed of the deterministic data (default 1)")
    p.add_argument("--task-ms", type=float, default=0.0, help="extra time per task in ms (load test)")
    p.add_argument("--chunk-size", type=int, default=None, help="fixed chunk size (default: guided)")
    fault = p.add_argument_group("fault injection (to verify failure handling)")
    per_run_options("fail_rank", "fail_task", "kill_rank", "kill_iteration", "hang_rank")
    fault.add_argument("--fail-rank", type=int, help="this rank raises an error ...")
    fault.add_argument("--fail-task", type=int, default=0, help="... at its first task >= this index (default 0)")
    fault.add_argument("--kill-rank", type=int, help="this rank kills itself with SIGKILL ...")
    fault.add_argument("--kill-iteration", type=int, default=0, help="... when this iteration starts (default 0)")
    fault.add_argument("--hang-rank", type=int, help="this rank blocks in its first task (never checks for stop)")
    arr = p.add_argument_group("Slurm job-array mode (see jobscripts/slurm_array.sh)")
    mode = arr.add_mutually_exclusive_group()
    mode.add_argument("--array-prepare", metavar="DIR", help="write the plan of an array step into DIR")
    mode.add_argument("--array-run", metavar="DIR", help="run this array task's share (SLURM_ARRAY_TASK_ID)")
    mode.add_argument("--array-merge", metavar="DIR", help="merge the tasks' results into the database")
    arr.add_argument("--array-task", type=int, help="task index (default: $SLURM_ARRAY_TASK_ID)")
    arr.add_argument("--array-count", type=int, help="number of tasks (default: $SLURM_ARRAY_TASK_COUNT)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``cistem-mpi mpi-check``."""
    if args.tasks < 1:
        raise InputError("--tasks", f"must be >= 1, got {args.tasks}")
    if args.iterations < 1:
        raise InputError("--iterations", f"must be >= 1, got {args.iterations}")
    if args.box < 2:
        raise InputError("--box", f"must be >= 2, got {args.box}")
    if args.array_prepare:
        array_mode.write_plan(args.array_prepare, JOB_TYPE, args.tasks, {"seed": args.seed, "box": args.box})
        print(f"mpi-check: array plan for {args.tasks} tasks written to {args.array_prepare}")
        return 0
    if args.array_run:
        return _array_run(args)
    if args.array_merge:
        return run_job(args, JOB_TYPE, _array_merge_body)
    return run_job(args, JOB_TYPE, _body)


# ---------------------------------------------------------------------- the computation
def task_data(seed: int, iteration: int, salt: int, index: int) -> np.ndarray:
    """Integer-valued data of one task (deterministic in its arguments)."""
    rng = np.random.default_rng([seed, iteration, salt, index])
    return rng.integers(0, 1 << 16, size=VALUES_PER_TASK).astype(np.float64)


def task_checksum(data: np.ndarray) -> int:
    """CRC32 of a task's data."""
    return zlib.crc32(np.ascontiguousarray(data).tobytes())


def accumulate(num: np.ndarray, wgt: np.ndarray, data: np.ndarray) -> None:
    """Add one task's data into the accumulator pair (integer values: exact sums)."""
    box = num.shape[0]
    flat = num.reshape(-1)
    idx = (data.astype(np.int64) * 2654435761) % flat.size  # scattered positions
    np.add.at(flat, idx, data)
    np.add.at(wgt.reshape(-1), idx, 1.0)
    del box


def normalise(num: np.ndarray, wgt: np.ndarray) -> np.ndarray:
    """What a reconstruction does per slab: numerator over (weights + 1)."""
    return num / (wgt + 1.0)


def serial_answer(seed: int, iteration: int, salt: int, n_tasks: int, box: int) -> tuple[list[int], np.ndarray]:
    """Checksums and normalised volume computed on one process."""
    num = np.zeros((box, box, box), np.float64)
    wgt = np.zeros_like(num)
    sums = []
    for i in range(n_tasks):
        d = task_data(seed, iteration, salt, i)
        sums.append(task_checksum(d))
        accumulate(num, wgt, d)
    return sums, normalise(num, wgt)


def digest(previous: str, checksums: list[int], volume: np.ndarray) -> str:
    """Chain an iteration's answer into the running digest (the job's final answer)."""
    h = hashlib.sha256(previous.encode())
    h.update(np.asarray(checksums, dtype=np.uint64).tobytes())
    h.update(np.ascontiguousarray(volume).tobytes())
    return h.hexdigest()


def mpi_library() -> str:
    """First line of the MPI library's version string ('' without MPI)."""
    try:
        from mpi4py import MPI
    except ImportError:
        return "none (mpi4py not installed)"
    return " ".join(MPI.Get_library_version().strip().splitlines()[0].split())


# ---------------------------------------------------------------------- the job
def _body(ctx: JobContext) -> dict[str, Any] | None:
    # run_job runs the body inside the runtime's guard on every rank
    return _check(ctx, get_world(), argparse.Namespace(**ctx.args))


def _check(ctx: JobContext, world: World, args: argparse.Namespace) -> dict[str, Any] | None:
    t_start = time.monotonic()
    hosts = world.gather(world.host)
    store = CheckpointStore(ctx.checkpoint_dir)
    # Rank 0 decides where to start (fresh, or after the last checkpoint) and tells everyone.
    start: dict[str, Any] | None = None
    if world.is_controller:
        start = {"iteration": 0, "digest": "", "rng": rng_state(np.random.default_rng(args.seed)),
                 "tasks_per_rank": [0] * world.size}
        if ctx.resumed_from is not None:
            ck = store.latest()
            if ck is not None:
                start = dict(ck.state)
                start["iteration"] = ck.iteration + 1
                if len(start["tasks_per_rank"]) != world.size:  # resumed with another rank count
                    start["tasks_per_rank"] = [0] * world.size
                ctx.log.info("resuming job %s after iteration %d", ctx.resumed_from, ck.iteration)
    start = world.bcast(start)
    assert start is not None
    rng = rng_from_state(start["rng"])
    running = start["digest"]
    per_rank = list(start["tasks_per_rank"])
    ok = True
    mismatches: list[str] = []
    delay = args.task_ms / 1000.0
    for it in range(start["iteration"], args.iterations):
        if args.kill_rank == world.rank and args.kill_iteration == it:
            os.kill(os.getpid(), signal.SIGKILL)
        salt = int(rng.integers(0, 2**31))  # the random state a resume must restore
        num = np.zeros((args.box,) * 3, np.float64)
        wgt = np.zeros_like(num)

        def task(i: int) -> tuple[int, int]:
            if args.fail_rank == world.rank and i >= args.fail_task and (world.size == 1 or world.rank != 0):
                raise RuntimeError(f"injected failure at task {i}")
            if args.hang_rank == world.rank:
                time.sleep(3600)
            d = task_data(args.seed, it, salt, i)
            accumulate(num, wgt, d)
            if delay:
                time.sleep(delay)
            return task_checksum(d), world.rank

        def progress(done: int, total: int) -> None:
            if args.fail_rank == 0 and world.size > 1 and done >= max(1, args.fail_task):
                raise RuntimeError(f"injected failure on the controller after {done} tasks")
            ctx.progress(done, total, f"iteration {it + 1}/{args.iterations}")

        results = map_tasks(world, args.tasks, task, progress=progress if world.is_controller else None,
                            chunk_size=args.chunk_size)
        num_slab = reduce_scatter_z(world, num)
        wgt_slab = reduce_scatter_z(world, wgt)
        vol = gather_z(world, normalise(num_slab.data, wgt_slab.data), num.shape)
        if world.is_controller:
            assert results is not None and vol is not None
            sums = [c for c, _ in results]
            for _, r in results:
                per_rank[r] += 1
            ref_sums, ref_vol = serial_answer(args.seed, it, salt, args.tasks, args.box)
            if sums != ref_sums:
                bad = sum(a != b for a, b in zip(sums, ref_sums))
                mismatches.append(f"iteration {it}: {bad} task checksums differ")
            if not np.array_equal(vol, ref_vol):
                mismatches.append(f"iteration {it}: reduce-scattered volume differs (max |diff| "
                                  f"{float(np.max(np.abs(vol - ref_vol))):.3g})")
            ok = ok and not mismatches
            running = digest(running, sums, vol)
            store.save(it, state={"digest": running, "rng": rng_state(rng), "tasks_per_rank": per_rank})
            ctx.log.info("iteration %d: %d tasks, digest %s", it, args.tasks, running[:16])
        world.barrier()  # nobody starts the next iteration (or a fault) before the checkpoint exists
    if not world.is_controller:
        return None
    elapsed = time.monotonic() - t_start
    assert hosts is not None
    per_host: dict[str, int] = {}
    for h in hosts:
        per_host[h] = per_host.get(h, 0) + 1
    result = {
        "world_size": world.size,
        "hosts": hosts,
        "ranks_per_host": per_host,
        "mpi_library": mpi_library(),
        "mpi4py": _mpi4py_version(),
        "tasks": args.tasks,
        "iterations": args.iterations,
        "tasks_per_rank": per_rank,
        "digest": running,
        "parallel_equals_serial": ok,
        "elapsed_s": round(elapsed, 3),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }
    ctx.result.update(result)
    if not ok:
        raise JobFailed("mpi-check: parallel answer differs from the serial one: " + "; ".join(mismatches))
    ctx.log.info("mpi-check passed: %d rank(s) on %s, %s", world.size, ", ".join(sorted(per_host)), result["mpi_library"])
    return result


def _mpi4py_version() -> str:
    try:
        import mpi4py
    except ImportError:
        return ""
    return mpi4py.__version__


# ---------------------------------------------------------------------- job-array mode
def _array_run(args: argparse.Namespace) -> int:
    """One array task: compute this task's share of the items; write a part (no database)."""
    plan = array_mode.read_plan(args.array_run, JOB_TYPE)
    env_task = array_mode.array_task_from_env()
    task = args.array_task if args.array_task is not None else (env_task[0] if env_task else None)
    count = args.array_count if args.array_count is not None else (env_task[1] if env_task else None)
    if task is None or count is None:
        raise InputError("--array-task", "not in a Slurm array: give --array-task and --array-count")
    seed = int(plan["options"]["seed"])
    results = {}
    for i in array_mode.task_items(plan["n_items"], task, count):
        if args.fail_rank is not None and args.fail_rank == task:
            raise RuntimeError(f"injected failure in array task {task}")
        results[i] = (task_checksum(task_data(seed, 0, 0, i)), task, os.uname().nodename)
    path = array_mode.write_part(args.array_run, task, count, results)
    print(f"mpi-check: array task {task}/{count}: {len(results)} items -> {path}")
    return 0


def _array_merge_body(ctx: JobContext) -> dict[str, Any] | None:
    if not ctx.is_controller:
        return None
    args = argparse.Namespace(**ctx.args)
    plan = array_mode.read_plan(args.array_merge, JOB_TYPE)
    n = int(plan["n_items"])
    merged = array_mode.merge_parts(args.array_merge, n)
    seed = int(plan["options"]["seed"])
    ref = [task_checksum(task_data(seed, 0, 0, i)) for i in range(n)]
    ok = [m[0] for m in merged] == ref
    tasks = sorted({m[1] for m in merged})
    result = {
        "mode": "array",
        "array_tasks": len(tasks),
        "hosts": sorted({m[2] for m in merged}),
        "tasks": n,
        "items_per_array_task": [sum(1 for m in merged if m[1] == t) for t in tasks],
        "parallel_equals_serial": ok,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }
    ctx.result.update(result)
    if not ok:
        raise JobFailed("mpi-check: merged array results differ from the serial answer")
    return result

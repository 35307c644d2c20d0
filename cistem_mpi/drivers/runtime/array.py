"""Slurm job-array mode for embarrassingly parallel steps (movies, CTF, picking).

The database is never written by many processes.  So an array step has
three parts (``jobscripts/slurm_array.sh`` submits all three):

1. **prepare** (one small job): the driver reads the project and writes a
   *plan* into an array directory: the list of items and the options;
2. **tasks** (``sbatch --array=0-(M-1)``): task ``k`` of ``M`` reads the plan,
   computes its share of the items and writes ``part_k`` atomically; it
   never opens the database;
3. **merge** (one job, ``--dependency=afterok:<array>``): reads every part,
   checks nothing is missing, and registers the results in one job
   (:func:`cistem_mpi.drivers.jobrun.run_job`).

Items are dealt round-robin (item ``i`` goes to task ``i % M``), so every
task gets a similar mix of early and late (often larger) items.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any, Sequence

from cistem_mpi.errors import InputError

PLAN = "plan.json"


def array_task_from_env(environ: dict[str, str] | None = None) -> tuple[int, int] | None:
    """``(task, count)`` of this Slurm array task, or None outside an array.

    Uses ``SLURM_ARRAY_TASK_ID`` and ``SLURM_ARRAY_TASK_COUNT`` (falling back to
    ``MAX - MIN + 1``); the array must be ``0..M-1``.
    """
    env = os.environ if environ is None else environ
    tid = env.get("SLURM_ARRAY_TASK_ID")
    if tid is None or not tid.isdigit():
        return None
    count = env.get("SLURM_ARRAY_TASK_COUNT")
    if count and count.isdigit():
        n = int(count)
    else:
        n = int(env.get("SLURM_ARRAY_TASK_MAX", tid)) - int(env.get("SLURM_ARRAY_TASK_MIN", "0")) + 1
    return int(tid), n


def task_items(n_items: int, task: int, count: int) -> list[int]:
    """Indices of the items array task ``task`` of ``count`` computes (round-robin)."""
    if not (0 <= task < count):
        raise InputError("--array-task", f"task {task} is outside 0..{count - 1}")
    return list(range(task, n_items, count))


def write_plan(array_dir: str | os.PathLike, job_type: str, n_items: int, options: dict[str, Any]) -> Path:
    """Write the plan of an array step (prepare part); returns its path."""
    d = Path(array_dir)
    d.mkdir(parents=True, exist_ok=True)
    plan = {"job_type": job_type, "n_items": int(n_items), "options": options}
    tmp = d / f".{PLAN}.{os.getpid()}"
    tmp.write_text(json.dumps(plan, sort_keys=True, indent=1))
    os.replace(tmp, d / PLAN)
    return d / PLAN


def read_plan(array_dir: str | os.PathLike, job_type: str) -> dict[str, Any]:
    """Read the plan written by :func:`write_plan` (checks the job type)."""
    p = Path(array_dir) / PLAN
    if not p.is_file():
        raise InputError(p, "array plan not found (run the prepare step first)")
    try:
        plan = json.loads(p.read_text())
    except ValueError as exc:
        raise InputError(p, f"unreadable array plan ({exc})") from None
    if plan.get("job_type") != job_type:
        raise InputError(p, f"array plan is for job {plan.get('job_type')!r}, not {job_type!r}")
    return plan


def part_path(array_dir: str | os.PathLike, task: int) -> Path:
    return Path(array_dir) / f"part_{task:05d}.pkl"


def write_part(array_dir: str | os.PathLike, task: int, count: int, results: dict[int, Any]) -> Path:
    """Write task ``task``'s results ``{item index: result}`` atomically."""
    final = part_path(array_dir, task)
    tmp = final.with_name(f".{final.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        pickle.dump({"task": task, "count": count, "results": results}, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def merge_parts(array_dir: str | os.PathLike, n_items: int) -> list[Any]:
    """Results of all tasks in item order.

    Raises
    ------
    InputError
        Naming the missing part files or items (a task failed or was not run).
    """
    d = Path(array_dir)
    parts = sorted(d.glob("part_*.pkl"))
    if not parts:
        raise InputError(d, "no array task results (part_*.pkl) found")
    merged: dict[int, Any] = {}
    count = None
    for p in parts:
        with open(p, "rb") as f:
            part = pickle.load(f)
        count = part["count"] if count is None else count
        if part["count"] != count:
            raise InputError(p, f"part of an array of {part['count']} tasks, others have {count}")
        merged.update(part["results"])
    assert count is not None
    missing_tasks = [t for t in range(count) if not part_path(d, t).is_file()]
    if missing_tasks:
        raise InputError(d, f"array tasks {_ranges(missing_tasks)} of 0..{count - 1} left no results")
    missing = [i for i in range(n_items) if i not in merged]
    if missing:
        raise InputError(d, f"items {_ranges(missing)} have no result")
    return [merged[i] for i in range(n_items)]


def _ranges(values: Sequence[int]) -> str:
    """``0-3,7,9-10`` from sorted ints."""
    out = []
    start = prev = None
    for v in values:
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            out.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = v
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ",".join(out)

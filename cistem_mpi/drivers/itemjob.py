"""Per-item jobs: one task per movie or image (align-movies, find-ctf, find-particles).

A per-item job is three functions, so that every such job gets the same
queue, the same handling of bad items and the same Slurm job-array mode:

* ``plan(project, args) -> ItemPlan`` on rank 0 (reads the database through
  ``db/``; raises :class:`~cistem_mpi.errors.InputError` for bad input, before
  any work);
* ``compute(payload, options, ictx) -> result`` on any rank, for one item.
  Files it writes are named with ``ictx.stage(final)`` (a job-private name,
  renamed to ``final`` after the job is registered).  Any exception marks
  *that item* as failed: it is skipped, listed in the job's result and log,
  and its staged files are removed;
* ``register(ctx, plan, outcomes) -> dict | None`` on rank 0, which registers
  the rows of the items that worked.

One bad movie among thousands does not stop the job; the job fails only when
every item fails (then with the first item's message: one line, exit 2, the
project as it was).  Items travel one per chunk through the dynamic queue, so
the result of an item never depends on the number of ranks.

Array mode (``jobscripts/slurm_array.sh``): ``--array-prepare DIR`` plans on
the head of the array and writes the plan; ``--array-run DIR`` (Slurm array
task k of M) computes items k, k+M, ... with no database access and writes its
part; ``--array-merge DIR`` is an ordinary recorded job that registers every
part in one transaction.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cistem_mpi.db.project import Project
from cistem_mpi.drivers.jobrun import JobContext, run_job, staged_path
from cistem_mpi.drivers.runtime import Stopped, Terminated, WorkerFailed, map_items
from cistem_mpi.drivers.runtime import array as array_mode
from cistem_mpi.errors import CistemError, InputError

__all__ = ["ItemPlan", "ItemOutcome", "ItemContext", "add_item_arguments", "run_item_job", "compute_items",
           "check_selection"]

#: File holding the pickled :class:`ItemPlan` of an array step, beside ``plan.json``.
ITEMS_FILE = "items.pkl"
#: At most this many failed items are listed in the job's result (all are in the log).
MAX_LISTED_FAILURES = 1000


@dataclass
class ItemPlan:
    """What a per-item job computes (built on rank 0).

    Parameters
    ----------
    items : list
        One picklable payload per item (paths, ids, numbers).
    names : list of str
        One name per item (image or movie name), used in the log and the skip list.
    options : dict
        Picklable settings every rank receives.
    """

    items: list[Any]
    names: list[str]
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.items) != len(self.names):
            raise ValueError(f"{len(self.items)} items but {len(self.names)} names")


@dataclass
class ItemOutcome:
    """The result of one item: ``result`` is None when it failed (``error`` says why)."""

    index: int
    name: str
    result: Any | None
    error: str | None = None
    staged: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


class ItemContext:
    """What ``compute`` gets beside its payload: the item's identity and staged file names."""

    def __init__(self, token: str, index: int, name: str):
        self.token = token
        self.index = index
        self.name = name
        self.staged: list[tuple[str, str]] = []

    def stage(self, final: str | os.PathLike) -> Path:
        """The name to write the asset ``final`` under until the job is registered."""
        staged = staged_path(final, self.token)
        self.staged.append((str(staged), str(Path(final))))
        return staged

    def discard(self) -> None:
        """Remove the item's staged files (it failed)."""
        for staged, _ in self.staged:
            try:
                os.unlink(staged)
            except FileNotFoundError:
                pass
        self.staged = []


# Exceptions that stop the whole job rather than fail one item: the runtime's
# stop protocol, a cancelled job, exhausted memory.
_FATAL = (Stopped, Terminated, WorkerFailed, KeyboardInterrupt, MemoryError, SystemExit)


def _one(compute: Callable[..., Any], options: dict[str, Any], token: str,
         item: tuple[int, str, Any]) -> tuple[str, Any, list[tuple[str, str]]]:
    index, name, payload = item
    ictx = ItemContext(token, index, name)
    try:
        result = compute(payload, options, ictx)
    except _FATAL:
        ictx.discard()
        raise
    except Exception as exc:  # one bad item: skip it, keep the job
        ictx.discard()
        text = str(exc) if isinstance(exc, CistemError) else f"{type(exc).__name__}: {exc}"
        return "error", text, []
    return "ok", result, ictx.staged


def compute_items(plan: ItemPlan, compute: Callable[..., Any], token: str,
                  indices: list[int] | None = None) -> list[ItemOutcome]:
    """Compute items in this process, one after the other (array tasks, notebooks, tests).

    >>> plan = ItemPlan(items=[1, 0], names=["a", "b"])
    >>> [o.result for o in compute_items(plan, lambda x, opt, ictx: 1 / x, "t")]
    [1.0, None]
    """
    out = []
    for i in range(len(plan.items)) if indices is None else indices:
        status, value, staged = _one(compute, plan.options, token, (i, plan.names[i], plan.items[i]))
        out.append(_outcome(i, plan.names[i], status, value, staged))
    return out


def _outcome(index: int, name: str, status: str, value: Any, staged: list[tuple[str, str]]) -> ItemOutcome:
    if status == "ok":
        return ItemOutcome(index, name, value, None, list(staged))
    return ItemOutcome(index, name, None, str(value), [])


def check_selection(rows: list[Any], selection: list[str] | None, what: str, option: str, none_message: str) -> None:
    """Refuse an empty plan or a selected id/name that matched no row (rank 0, before any work).

    Parameters
    ----------
    rows : list of sqlite3.Row
        The rows the selection matched (with ``id`` and ``name``).
    selection : list of str, optional
        What the user typed (ids or names); None = everything.
    what, option : str
        ``"image"`` and ``"--images"``, for the messages.
    none_message : str
        Why there is nothing at all when nothing was selected.

    Raises
    ------
    InputError

    >>> check_selection([{"id": 1, "name": "a"}], ["a", "1"], "image", "--images", "none")
    >>> check_selection([], None, "image", "--images", "no images")
    Traceback (most recent call last):
    cistem_mpi.errors.InputError: --project: no images
    """
    if not rows:
        raise InputError(option if selection else "--project",
                         f"no such {what} in this project" if selection else none_message)
    if selection:
        found = {str(r["id"]) for r in rows} | {str(r["name"]) for r in rows}
        for s in selection:
            if str(s) not in found:
                raise InputError(option, f"no {what} '{s}' in this project")


def add_item_arguments(parser: argparse.ArgumentParser) -> None:
    """The Slurm job-array options of a per-item job (see ``jobscripts/slurm_array.sh``)."""
    arr = parser.add_argument_group("Slurm job-array mode (see jobscripts/slurm_array.sh)")
    mode = arr.add_mutually_exclusive_group()
    mode.add_argument("--array-prepare", metavar="DIR", help="plan the job and write the plan into DIR")
    mode.add_argument("--array-run", metavar="DIR", help="compute this array task's items (SLURM_ARRAY_TASK_ID)")
    mode.add_argument("--array-merge", metavar="DIR", help="register the array tasks' results (one job record)")
    arr.add_argument("--array-task", type=int, help="task index (default: $SLURM_ARRAY_TASK_ID)")
    arr.add_argument("--array-count", type=int, help="number of tasks (default: $SLURM_ARRAY_TASK_COUNT)")


PlanFn = Callable[[Project, argparse.Namespace], ItemPlan]
ComputeFn = Callable[[Any, dict[str, Any], ItemContext], Any]
RegisterFn = Callable[[JobContext, ItemPlan, list[ItemOutcome]], "dict[str, Any] | None"]


def run_item_job(args: argparse.Namespace, job_type: str, plan: PlanFn, compute: ComputeFn,
                 register: RegisterFn) -> int:
    """Run a per-item job (or one part of its array mode); return the exit code.

    Parameters
    ----------
    args : argparse.Namespace
        The command line, with :func:`~cistem_mpi.drivers.jobrun.add_job_arguments`
        and :func:`add_item_arguments` options.
    job_type : str
        Job type recorded in the database (``find_ctf``, ...).
    plan, compute, register : callables
        See the module docstring.
    """
    if getattr(args, "array_prepare", None):
        return _array_prepare(args, job_type, plan)
    if getattr(args, "array_run", None):
        return _array_run(args, job_type, compute)
    if getattr(args, "array_merge", None):
        return run_job(args, job_type, lambda ctx: _merge_body(ctx, job_type, register))

    def body(ctx: JobContext) -> dict[str, Any] | None:
        the_plan: ItemPlan | None = None
        if ctx.is_controller:
            assert ctx.project is not None
            the_plan = plan(ctx.project, args)
            ctx.log.info("%d item(s) to compute", len(the_plan.items))
        options = ctx.world.bcast(the_plan.options if the_plan is not None else None)
        token = f"job{ctx.job_id}"
        items = None
        if the_plan is not None:
            items = [(i, the_plan.names[i], the_plan.items[i]) for i in range(len(the_plan.items))]
        raw = map_items(ctx.world, items, lambda it: _one(compute, options, token, it), min_chunk=1, max_chunk=1,
                        progress=lambda done, total: ctx.progress(done, total, job_type))
        if not ctx.is_controller:
            return None
        assert the_plan is not None and raw is not None
        outcomes = [_outcome(i, the_plan.names[i], *r) for i, r in enumerate(raw)]
        return _finish(ctx, the_plan, outcomes, register)

    return run_job(args, job_type, body)


def _finish(ctx: JobContext, plan: ItemPlan, outcomes: list[ItemOutcome], register: RegisterFn) -> dict[str, Any]:
    """Rank 0: report failed items, adopt the staged files of the others, register."""
    failed = [o for o in outcomes if not o.ok]
    for o in failed:
        ctx.log.warning("skipped %s: %s", o.name, o.error)
    if outcomes and len(failed) == len(outcomes):
        first = failed[0].error or "failed"
        more = f" (and {len(failed) - 1} more item(s) failed)" if len(failed) > 1 else ""
        raise InputError(failed[0].name, f"{_strip_name(first, failed[0].name)}{more}")
    for o in outcomes:
        for staged, final in o.staged:
            ctx.adopt(staged, final)
    out = register(ctx, plan, outcomes) or {}
    summary = {"items": len(outcomes), "succeeded": len(outcomes) - len(failed), "failed": len(failed),
               "failures": [{"name": o.name, "error": o.error} for o in failed[:MAX_LISTED_FAILURES]]}
    summary.update(out)
    if failed:
        ctx.log.warning("%d of %d item(s) skipped (listed in the job's result)", len(failed), len(outcomes))
    return summary


def _strip_name(message: str, name: str) -> str:
    """Avoid ``error: a.mrc: a.mrc: problem`` when the item's message already names its file."""
    for prefix in (f"{name}: ",):
        if message.startswith(prefix):
            return message[len(prefix):]
    return message


# ---------------------------------------------------------------------- Slurm job-array mode
def _array_token(array_dir: str) -> str:
    """Staged-file token of an array step: stable for every task of one array directory."""
    digest = hashlib.sha1(str(Path(array_dir).resolve()).encode()).hexdigest()[:10]
    return f"array{digest}"


def _array_prepare(args: argparse.Namespace, job_type: str, plan: PlanFn) -> int:
    with Project.open(args.project, readonly=True) as project:
        the_plan = plan(project, args)
    d = Path(args.array_prepare)
    array_mode.write_plan(d, job_type, len(the_plan.items), {"token": _array_token(args.array_prepare)})
    tmp = d / f".{ITEMS_FILE}.{os.getpid()}"
    with open(tmp, "wb") as f:
        pickle.dump(the_plan, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / ITEMS_FILE)
    print(f"{job_type}: array plan for {len(the_plan.items)} item(s) written to {d}")
    return 0


def _read_items(array_dir: str, job_type: str) -> tuple[dict[str, Any], ItemPlan]:
    meta = array_mode.read_plan(array_dir, job_type)
    p = Path(array_dir) / ITEMS_FILE
    if not p.is_file():
        raise InputError(p, "array items not found (run the prepare step first)")
    with open(p, "rb") as f:
        the_plan = pickle.load(f)
    if len(the_plan.items) != int(meta["n_items"]):
        raise InputError(p, f"{len(the_plan.items)} items, the plan says {meta['n_items']}")
    return meta, the_plan


def _array_run(args: argparse.Namespace, job_type: str, compute: ComputeFn) -> int:
    meta, the_plan = _read_items(args.array_run, job_type)
    env_task = array_mode.array_task_from_env()
    task = args.array_task if args.array_task is not None else (env_task[0] if env_task else None)
    count = args.array_count if args.array_count is not None else (env_task[1] if env_task else None)
    if task is None or count is None:
        raise InputError("--array-task", "not in a Slurm array: give --array-task and --array-count")
    indices = array_mode.task_items(len(the_plan.items), task, count)
    outcomes = compute_items(the_plan, compute, meta["options"]["token"], indices)
    results = {o.index: ("ok", o.result, o.staged) if o.ok else ("error", o.error, []) for o in outcomes}
    path = array_mode.write_part(args.array_run, task, count, results)
    bad = sum(1 for o in outcomes if not o.ok)
    print(f"{job_type}: array task {task}/{count}: {len(outcomes)} item(s), {bad} failed -> {path}")
    return 0


def _merge_body(ctx: JobContext, job_type: str, register: RegisterFn) -> dict[str, Any] | None:
    if not ctx.is_controller:
        return None
    array_dir = ctx.args["array_merge"]
    _, the_plan = _read_items(array_dir, job_type)
    merged = array_mode.merge_parts(array_dir, len(the_plan.items))
    outcomes = [_outcome(i, the_plan.names[i], *r) for i, r in enumerate(merged)]
    out = _finish(ctx, the_plan, outcomes, register)
    out["mode"] = "array"
    return out

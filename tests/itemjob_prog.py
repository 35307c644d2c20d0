"""A toy per-item job for the itemjob tests: ``python itemjob_prog.py PROJECT V1 V2 ...`` (any number of ranks).

Item k writes ``Assets/item_k.txt`` (staged) holding ``V_k ** 2`` and registers a
``settings`` row; a negative value fails its item, ``nan`` fails it after it wrote its staged file.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from cistem_mpi.drivers.itemjob import ItemPlan, add_item_arguments, run_item_job
from cistem_mpi.drivers.jobrun import add_job_arguments


def plan(project, args):
    values = [float(v) for v in args.values]
    return ItemPlan(items=[(str(project.root / "Assets" / f"item_{k}.txt"), v) for k, v in enumerate(values)],
                    names=[f"item_{k}" for k in range(len(values))], options={"power": 2})


def compute(payload, options, ictx):
    path, value = payload
    if value < 0:
        raise ValueError(f"negative value {value}")
    staged = ictx.stage(path)
    Path(staged).write_text(f"{value ** options['power']!r}\n")
    if math.isnan(value):
        raise ValueError("not finite")
    return value ** options["power"]


def register(ctx, the_plan, outcomes):
    for o in outcomes:
        if o.ok:
            ctx.register("settings", key=o.name, value=repr(o.result))
    return {"sum": sum(o.result for o in outcomes if o.ok), "ranks": ctx.size}


def main(argv=None):
    from cistem_mpi.errors import CistemError

    p = argparse.ArgumentParser()
    add_job_arguments(p)
    add_item_arguments(p)
    p.add_argument("values", nargs="+")
    args = p.parse_args(argv)
    try:
        return run_item_job(args, "toy_items", plan, compute, register)
    except CistemError as exc:
        if not exc.quiet:
            sys.stderr.write(f"error: {exc}\n")
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())

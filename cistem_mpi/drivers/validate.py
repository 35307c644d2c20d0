"""``cistem-mpi validate FILE...``: every problem of .par, .star and MRC files at once (no project needed).

Prints ``<file>: <problem>`` for each problem (or ``<file>: OK``) and exits
1 when any file has a problem, 0 when none has; see :mod:`cistem_mpi.io.validate`.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``validate`` command."""
    p = sub.add_parser("validate", help="check .par, .star and MRC files and list every problem (line, column)",
                       description="Check parameter and image files before a job reads them: every problem of "
                                   "every file, each naming its line and column (MRC: header field or section).")
    p.add_argument("files", nargs="+", help=".par, .star (RELION or cisTEM) or MRC files (.mrc, .mrcs, ...)")
    p.add_argument("--quiet", action="store_true", help="print only the problems (no 'OK' lines)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cistem_mpi.io.validate import validate

    bad = 0
    for path in args.files:
        problems = validate(path)
        if problems:
            bad += 1
            for problem in problems:
                print(f"{path}: {problem}")
        elif not args.quiet:
            print(f"{path}: OK")
    if bad and len(args.files) > 1:
        print(f"{bad} of {len(args.files)} files have problems", file=sys.stderr)
    return 1 if bad else 0

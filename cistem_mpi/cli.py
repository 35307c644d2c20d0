"""The ``cistem-mpi`` command.

Each module in :mod:`cistem_mpi.drivers` that defines ``register(subparsers)``
adds its own sub-command(s); this module only finds them, parses the command
line and turns errors into one line and an exit code.

Only the driver of the command being run is imported (see ``COMMAND_MODULES``):
the numerical drivers pull in numba, scipy and pandas, which costs most of a
second on every rank and makes ``status`` from another shell feel slow.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import traceback

from cistem_mpi import __version__
from cistem_mpi.errors import CistemError


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump)."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        sys.stderr.write(f"error: {self.prog}: {message}\n")
        raise SystemExit(2)


# command -> the driver module that registers it; a test checks this against the drivers
COMMAND_MODULES: dict[str, str] = {
    "ab-initio": "ab_initio",
    "align-movies": "align_movies",
    "auto-refine": "refine",
    "classify-2d": "classify_2d",
    "compress-movies": "compress_movies",
    "convert": "convert",
    "demo": "demo",
    "find-ctf": "find_ctf",
    "find-particles": "find_particles",
    "import": "import_assets",
    "manual-refine": "refine",
    "mpi-check": "mpi_check",
    "package": "package",
    "pipeline": "pipeline",
    "project": "project",
    "reconstruct": "reconstruct",
    "report": "report",
    "simulate": "simulate",
    "status": "status",
    "validate": "validate",
}


def _driver_modules(command: str | None) -> list[str]:
    """The driver modules to import: the command's own, or all of them (help, unknown command)."""
    if command in COMMAND_MODULES:
        return [COMMAND_MODULES[command]]
    import cistem_mpi.drivers as drivers

    return sorted(m.name for m in pkgutil.iter_modules(drivers.__path__) if not m.name.startswith("_"))


def _command_in(argv: list[str]) -> str | None:
    """The sub-command named on the command line (the first word that is not an option)."""
    for word in argv:
        if not word.startswith("-"):
            return word
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Build the parser with ``command``'s sub-commands, or every driver's when None."""
    parser = OneLineParser(
        prog="cistem-mpi",
        description="cisTEM's single-particle pipeline as an MPI job (rank 0 controls, ranks 1.. work).",
    )
    parser.add_argument("--version", action="version", version=f"cistem-mpi {__version__}")
    parser.add_argument("--debug", action="store_true", help="print tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="<job>", parser_class=OneLineParser)
    sub.required = True
    for name in _driver_modules(command):
        module = importlib.import_module(f"cistem_mpi.drivers.{name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


class _Unset:
    """Default of every option while finding which options a command line gives."""

    def __repr__(self) -> str:  # pragma: no cover - never shown
        return "<unset>"


_UNSET = _Unset()


def _explicit_options(command: str | None, argv: list[str]) -> set[str]:
    """Destinations of the options given on ``argv`` (not left at their defaults).

    Parses ``argv`` a second time with every default replaced by a marker;
    whatever is not the marker was given.  ``--resume`` uses it to tell an
    option the user repeats from one that contradicts the killed job.
    """
    parser = build_parser(command)
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
            elif action.dest not in ("help", "version") and action.default is not argparse.SUPPRESS:
                # append-type actions copy their default: keep None (their usual default) for them
                action.default = None if isinstance(action, argparse._AppendAction) else _UNSET
                action.required = False
    try:
        ns = parser.parse_args(argv)
    except SystemExit:  # pragma: no cover - the first parse accepted the same argv
        return set()
    return {k for k, v in vars(ns).items() if v is not _UNSET and v is not None}


def _plain_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings reach the user as one plain line (no source path, no code line)."""
    try:
        (file or sys.stderr).write(f"warning: {message}\n")
    except (OSError, ValueError):  # pragma: no cover - stderr gone
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    import sqlite3
    import warnings

    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    if not debug:
        warnings.showwarning = _plain_warning
    try:
        command = _command_in(argv)
        parser = build_parser(command)
        args = parser.parse_args(argv)
        if getattr(args, "resume", None) is not None:
            args._explicit = _explicit_options(command, argv)
        rc = args.func(args)
        sys.stdout.flush()
        return int(rc or 0)
    except BrokenPipeError:
        # the reader went away (`status | head`): not an error; keep Python from complaining at exit
        import os

        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:  # pragma: no cover
            pass
        return 0
    except sqlite3.DatabaseError as exc:
        if debug:
            traceback.print_exc()
        from cistem_mpi.db.connection import database_error_line

        line, code = database_error_line(exc)
        sys.stderr.write(f"error: {line}\n")
        return code
    except CistemError as exc:
        if exc.quiet:  # another rank reports it (a worker stopped for rank 0's bad input)
            return exc.exit_code
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130
    except Exception as exc:  # an unexpected failure is still one line without --debug
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"error: internal error: {type(exc).__name__}: {exc} (run with --debug for details)\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

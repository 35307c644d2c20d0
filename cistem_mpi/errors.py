"""Errors a user sees as one line: the file and the problem.

Every error caused by input (a file, a flag, a project state) is raised as
:class:`InputError`; the CLI prints ``error: <file>: <problem>`` and exits
with status 2 without a traceback (unless ``--debug``).
"""

from __future__ import annotations

import os


class CistemError(Exception):
    """Base class of errors the CLI reports without a traceback."""

    exit_code = 1
    #: True when another rank reports this failure, so this process exits without a line of its own.
    quiet = False


class InputError(CistemError):
    """Bad input: names the file (or option) and the problem.

    Parameters
    ----------
    path : str or os.PathLike or None
        The offending file or, for a bad option, the option name.
    problem : str
        What is wrong, in words a user understands.
    """

    exit_code = 2

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class JobFailed(CistemError):
    """A job stopped: a worker raised, or a rank died."""

    exit_code = 3


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


class DiskFull(CistemError):
    """No space left for a job's output: names the file, what it needs and what is free.

    Parameters
    ----------
    path : str or os.PathLike
        The file being (or about to be) written.
    needed : int
        Bytes the output needs.
    free : int or None
        Bytes free on its file system (measured when None).
    """

    exit_code = 3

    def __init__(self, path: str | os.PathLike, needed: int, free: int | None = None):
        self.path = os.fspath(path)
        if free is None:
            free = free_bytes(self.path)
        self.needed, self.free = int(needed), int(free)
        super().__init__(f"disk full writing {self.path} (needs {_size(self.needed)}, {_size(self.free)} free)")


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes available to this user on the file system holding ``path`` (its nearest existing parent)."""
    import shutil

    p = os.path.abspath(os.fspath(path))
    while p and not os.path.exists(p):
        p = os.path.dirname(p)
    try:
        return int(shutil.disk_usage(p or "/").free)
    except OSError:
        return 0


def check_free_space(path: str | os.PathLike, needed: int, what: str = "the job's outputs") -> None:
    """InputError before any work when ``needed`` bytes (plus 1 %) do not fit beside ``path``."""
    free = free_bytes(path)
    if needed * 1.01 > free:
        raise InputError(path, f"disk full: {what} need {_size(needed)} but only {_size(free)} are free")

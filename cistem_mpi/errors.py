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

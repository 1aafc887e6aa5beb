"""The one exception type for bad input.

Every problem a user can fix (a missing image, an unknown class name, a malformed CSV, a bad
parameter) is raised as :class:`InputError` with the offending file or item first, so the
command line prints a single line such as ``data/x.csv: missing column 'labels'``.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from os import PathLike
from typing import TypeVar

T = TypeVar("T")

INTERRUPTED = 130
"""Exit status after Ctrl-C, as a shell reports a process ended by SIGINT (128 + 2)."""


class InputError(Exception):
    """Bad input, reported as one line that names the file (or item) and what is wrong."""

    def __init__(self, where: str | PathLike[str], problem: str | None = None) -> None:
        # One argument is a whole message: that is how DataLoader workers re-raise an error
        # in the main process (``type(error)(message)``).
        self.where = str(where)
        self.problem = problem
        super().__init__(self.where if problem is None else f"{self.where}: {problem}")


def as_one_line(action: Callable[[], T]) -> T:
    """Run ``action``; end the process with one line on stderr instead of a traceback where the
    user can act on the cause: bad input and refused permissions (exit 2), Ctrl-C (exit 130).

    Every stage writes each result in full or not at all, so after Ctrl-C what was finished is
    kept and a rerun resumes from it.
    """
    try:
        return action()
    except InputError as error:
        _exit(f"error: {error}", 2)
    except PermissionError as error:
        _exit(f"error: {error.filename or 'a file'}: permission denied", 2)
    except KeyboardInterrupt:
        _exit("interrupted: what was finished is kept, and a rerun resumes from it", INTERRUPTED)


def _exit(line: str, status: int) -> None:
    print(line, file=sys.stderr)
    sys.exit(status)


def ignore_interrupt() -> None:
    """Leave Ctrl-C to the process that started this one (a worker pool's initializer): the
    terminal sends it to every process of the foreground group, and workers that raise
    ``KeyboardInterrupt`` each print a traceback while their parent shuts them down anyway."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


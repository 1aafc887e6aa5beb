"""The one exception type for bad input.

Every problem a user can fix (a missing image, an unknown class name, a malformed CSV, a bad
parameter) is raised as :class:`InputError` with the offending file or item first, so the
command line prints a single line such as ``data/x.csv: missing column 'labels'``.
"""

from __future__ import annotations

from os import PathLike


class InputError(Exception):
    """Bad input, reported as one line that names the file (or item) and what is wrong."""

    def __init__(self, where: str | PathLike[str], problem: str | None = None) -> None:
        # One argument is a whole message: that is how DataLoader workers re-raise an error
        # in the main process (``type(error)(message)``).
        self.where = str(where)
        self.problem = problem
        super().__init__(self.where if problem is None else f"{self.where}: {problem}")

"""The one exception type of the data layer.

Every problem with a dataset on disk (an unreadable or truncated NIfTI, image and label grids that
differ, a label value that dataset.json does not declare, a missing or malformed dataset.json field,
a plans file that lacks normalization statistics) is raised as `DataError`, and its message starts
with the path of the offending file, so a user can go straight to it.
"""
from __future__ import annotations

from collections.abc import Sequence
from os import PathLike


class DataError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names the file.

    `problems` holds the individual errors when one check (a whole-dataset validation) found
    several, so that callers can report or filter them without parsing the message.
    """

    def __init__(self, path: str | PathLike[str], problem: str,
                 problems: Sequence[DataError] = ()):
        self.path = str(path)
        self.problem = problem
        self.problems = tuple(problems)
        super().__init__(f"{self.path}: {problem}")

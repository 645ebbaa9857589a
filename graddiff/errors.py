"""The one error root of graddiff. The CLI maps every ``GraddiffError`` to exit code 2."""

from __future__ import annotations


class GraddiffError(Exception):
    """A problem with the user's input: a bad file, bad options, unrelated runs.

    The message is one line that names the object and the problem (and the fix where known).
    """


class TraceFileError(GraddiffError):
    """A trace file is missing, truncated, corrupt, or not a graddiff file."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class ValuesNotStoredError(GraddiffError):
    """Full values were asked for a record that was recorded as statistics only."""


class TraceUsageError(GraddiffError):
    """``graddiff.trace`` was used in a way that cannot work (nested traces, bad options)."""


class NotATwinError(GraddiffError):
    """``compare --noise TWIN``: TWIN is not a perturbed copy of the run it would measure the
    noise of (another seed, data order, script or model): its drift would hold a real
    difference and hide one in the pair."""

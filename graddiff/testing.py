"""Golden-run tests: assert that a training run still matches a recorded reference.

``assert_runs_match(actual, golden)`` compares two traces (``graddiff.compare``) and adds a length
check; it raises ``AssertionError`` whose message is the short report (verdict, first divergence,
likely cause and fix). ``GoldenRun`` is what the pytest fixture ``graddiff_golden`` hands a test
(graddiff.pytest_plugin): it records the test's training into a temporary trace and asserts it
against a golden file kept next to the test. Reading side: importing this module never imports
torch; recording does, when it starts.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Optional, Union

import h5py
import numpy as np

from .diff import Report, compare
from .diff.api import parse_steps, steps_within
from .errors import GraddiffError
from .modclass import with_class
from .reader import Run, open_run

__all__ = ["GOLDEN_TRACE_OPTIONS", "GoldenRun", "assert_runs_match", "short_report"]

RunLike = Union[str, "os.PathLike[str]", Run]

#: How golden traces are recorded unless a test asks otherwise: statistics and bitwise
#: fingerprints at every step, full values at the first step only (docs/testing.md, "Size").
GOLDEN_TRACE_OPTIONS: dict[str, Any] = {"full_steps": [0]}


def _open(x: RunLike) -> tuple[Run, bool]:
    return (x, False) if isinstance(x, Run) else (open_run(x), True)


def _window(steps: np.ndarray, window: Any) -> np.ndarray:
    bounds = parse_steps(window)
    return steps if bounds is None else steps_within(steps, bounds)


def _span(steps: np.ndarray) -> str:
    if not len(steps):
        return "none"
    if len(steps) == 1:
        return f"step {int(steps[0])}"
    contiguous = int(steps[-1]) - int(steps[0]) + 1 == len(steps)
    if contiguous:
        return f"steps {int(steps[0])}..{int(steps[-1])}"
    shown = ", ".join(str(int(s)) for s in steps[:6])
    return f"steps {shown}{', ...' if len(steps) > 6 else ''} ({len(steps)} steps)"


def length_problem(actual: Run, golden: Run, steps: Any = None) -> Optional[str]:
    """A sentence when the runs do not cover the same steps (a truncated or longer run)."""
    a, g = _window(actual.steps, steps), _window(golden.steps, steps)
    missing, extra = np.setdiff1d(g, a), np.setdiff1d(a, g)
    if not len(missing) and not len(extra):
        return None
    parts = [f"the actual run has {len(a)} step(s), the golden run {len(g)}"]
    if len(missing):
        parts.append(f"missing from the actual run: {_span(missing)}")
    if len(extra):
        parts.append(f"not in the golden run: {_span(extra)}")
    if not actual.complete:
        parts.append(f"the actual recording's status is '{actual.status}'")
    return "; ".join(parts)


def short_report(
    report: Report, *, golden_label: str = "golden", actual_label: str = "actual"
) -> str:
    """The few lines a failing test should show: verdict, runs, cause and fix, first divergence."""
    lines = [report.headline()]
    lines.append(f"  A ({golden_label}): {report.run_a}")
    lines.append(f"  B ({actual_label}): {report.run_b}")
    cause = report.cause
    if cause is not None:
        lines.append(
            f"Likely cause: {cause.title}" if report.diverged else f"Explanation: {cause.title}"
        )
        lines += [f"  - {e}" for e in cause.evidence[:5]]
        if cause.fix:
            lines.append(f"  fix: {cause.fix}")
    f = report.first
    if f is not None:
        where = with_class(f"{f.kind} {f.name}", f.module_class)  # grad fc1.weight (Linear)
        detail = [where + (f" (call {f.call})" if f.call else ""), f"step {f.step}"]
        if f.max_abs_diff is not None:
            detail.append(f"max abs diff {f.max_abs_diff:.3g}")
        if f.index is not None and f.a_value is not None and f.b_value is not None:
            detail.append(f"at index {tuple(f.index)}: A {f.a_value:.6g} vs B {f.b_value:.6g}")
        if f.note:
            detail.append(f.note)
        lines.append("First divergence: " + ", ".join(detail))
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def assert_runs_match(
    actual: RunLike,
    golden: RunLike,
    *,
    rtol: Optional[float] = None,
    kinds: Any = None,
    steps: Any = None,
    exact: bool = False,
) -> Report:
    """Assert that ``actual`` matches the reference run ``golden``, step for step.

    Args:
        actual: the run under test (path or :class:`graddiff.Run`); "B" in the report.
        golden: the reference run; "A" in the report.
        rtol: tolerance on ||a-b|| / max(||a||, ||b||) per tensor (default 1e-3).
        kinds: compare only these kinds (names or a comma-separated string).
        steps: compare only these steps ("LO:HI" inclusive, an int, a range).
        exact: bitwise mode: any difference at all fails (like ``graddiff compare --exact``).

    Returns:
        The :class:`graddiff.Report` when the runs match.

    Raises:
        AssertionError: the runs diverge, or one covers steps the other lacks (a truncated or
            longer run); the message is the short report.
        GraddiffError: a file is missing or not a trace, or the options are invalid.
    """
    __tracebackhide__ = True  # pytest shows the message, not this function's frames
    ra, own_a = _open(actual)
    try:
        rg, own_g = _open(golden)
    except BaseException:
        if own_a:
            ra.close()
        raise
    try:
        length = length_problem(ra, rg, steps)
        if length and not len(np.intersect1d(_window(ra.steps, steps), rg.steps)):
            raise AssertionError(f"LENGTH MISMATCH: {length}; no step in common to compare")
        report = compare(rg, ra, rtol=rtol, exact=exact, steps=steps, kinds=kinds)
    finally:
        if own_a:
            ra.close()
        if own_g:
            rg.close()
    if report.diverged or length:
        message = []
        if length:
            message.append(f"LENGTH MISMATCH: {length}")
        if report.diverged:
            message.append(short_report(report))
        else:
            message.append(f"The {report.steps['compared']} common step(s): {report.headline()}")
        raise AssertionError("\n".join(message))
    return report


def compact_copy(src: Union[str, os.PathLike], dst: Union[str, os.PathLike]) -> None:
    """Copy a trace without the writer's preallocated table chunks (sized for long runs).

    Every dataset is rewritten with exactly its data (contiguous layout), every attribute is
    kept: the same trace, readable by any graddiff, at its data's size. A ten-step run of a small
    model shrinks from ~870 KB to ~70 KB. Written to a temporary name, then renamed.
    """
    tmp = Path(f"{os.fspath(dst)}.tmp")
    try:
        with h5py.File(src, "r") as fin, h5py.File(tmp, "w") as fout:
            fout.attrs.update(dict(fin.attrs))

            def copy(name: str, obj: Any) -> None:
                if isinstance(obj, h5py.Group):
                    fout.require_group(name).attrs.update(dict(obj.attrs))
                else:
                    out = fout.create_dataset(name, data=obj[()], dtype=obj.dtype)
                    out.attrs.update(dict(obj.attrs))

            fin.visititems(copy)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "golden"


class GoldenRun:
    """A test's golden run: ``with graddiff_golden(model): train(model)``.

    Records the block into a temporary trace, then asserts it against ``golden_dir/NAME.h5``;
    with ``regen=True`` it writes (or refreshes) the golden file instead. An exception raised
    by the training propagates unchanged and nothing is compared.
    """

    def __init__(
        self,
        golden_dir: Union[str, os.PathLike],
        name: str,
        work_dir: Union[str, os.PathLike],
        *,
        regen: bool = False,
        regen_command: str = "",
        on_written: Optional[Callable[[Path], None]] = None,
    ) -> None:
        self.golden_dir = Path(golden_dir)
        self.name = _safe(name)
        self.work_dir = Path(work_dir)
        self.regen = regen
        self.regen_command = regen_command
        self._on_written = on_written
        self._used: set[str] = set()

    def golden_path(self, suffix: Optional[str] = None) -> Path:
        """Where this test's golden file lives (``NAME.h5``, or ``NAME-SUFFIX.h5``)."""
        stem = self.name if not suffix else f"{self.name}-{_safe(suffix)}"
        return self.golden_dir / f"{stem}.h5"

    def actual_path(self, suffix: Optional[str] = None) -> Path:
        """Where the run under test is recorded (kept after a failure, for graddiff compare)."""
        return self.work_dir / f"actual{'-' + _safe(suffix) if suffix else ''}.h5"

    def __call__(
        self,
        model: Any,
        name: Optional[str] = None,
        *,
        rtol: Optional[float] = None,
        kinds: Any = None,
        steps: Any = None,
        exact: bool = False,
        **trace_options: Any,
    ) -> _GoldenBlock:
        """Trace ``model`` while the ``with`` block runs, then assert the run against its golden file.

        Args:
            model: the model being trained.
            name: a second golden file for the same test (``NAME-name.h5``).
            rtol, kinds, steps, exact: as :func:`assert_runs_match`.
            **trace_options: passed to ``graddiff.trace`` (default ``full_steps=[0]``).

        Returns:
            A context manager; ``with graddiff_golden(model) as tr`` gives the
            :class:`graddiff.Tracer` (``tr.step()`` ends steps explicitly).
        """
        key = name or ""
        if key in self._used:
            raise GraddiffError(
                f"golden run {self.golden_path(name).name} recorded twice in one test; "
                "pass name='...' to keep a second golden file"
            )
        self._used.add(key)
        check = {"rtol": rtol, "kinds": kinds, "steps": steps, "exact": exact}
        return _GoldenBlock(self, model, name, {**GOLDEN_TRACE_OPTIONS, **trace_options}, check)

    def check(
        self,
        actual: Union[str, os.PathLike],
        name: Optional[str] = None,
        *,
        rtol: Optional[float] = None,
        kinds: Any = None,
        steps: Any = None,
        exact: bool = False,
    ) -> Optional[Report]:
        """Assert a trace recorded elsewhere (e.g. ``graddiff record``) against the golden file."""
        __tracebackhide__ = True
        golden = self.golden_path(name)
        if self.regen:
            golden.parent.mkdir(parents=True, exist_ok=True)
            with open_run(actual) as run:  # never promote an unreadable or empty recording
                if not len(run.steps):
                    raise GraddiffError(
                        f"{actual}: no complete step recorded; golden file not written"
                    )
            compact_copy(actual, golden)
            if self._on_written is not None:
                self._on_written(golden)
            return None
        if not golden.exists():
            raise AssertionError(
                f"golden file {golden} does not exist; create it with:\n"
                f"    {self.regen_command or 'pytest --graddiff-regen'}"
            )
        try:
            return assert_runs_match(
                actual, golden, rtol=rtol, kinds=kinds, steps=steps, exact=exact
            )
        except AssertionError as exc:
            hint = (
                f"\nFull report: graddiff compare {golden} {actual}"
                f"\nIf the change is intended, refresh the golden file: {self.regen_command or 'pytest --graddiff-regen'}"
            )
            raise AssertionError(f"{exc}{hint}") from None


class _GoldenBlock:
    """The ``with`` block of one golden run: trace on entry; on a normal exit, the assertion.

    A class rather than a generator so that pytest hides all of its frames: a failure points at
    the test's own ``with`` line.
    """

    def __init__(
        self, golden: GoldenRun, model: Any, name: Optional[str], options: dict, check: dict
    ) -> None:
        self.golden, self.model, self.name = golden, model, name
        self.options, self.check = options, check
        self.path = golden.actual_path(name)
        self._tracer: Any = None

    def __enter__(self) -> Any:
        from .tracer import trace

        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.path.unlink()
        self._tracer = trace(self.model, self.path, **self.options)
        return self._tracer.__enter__()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        __tracebackhide__ = True
        self._tracer.__exit__(exc_type, exc, tb)
        if exc_type is None:  # the training's own exception propagates untouched
            self.golden.check(self.path, self.name, **self.check)

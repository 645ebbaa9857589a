"""The result of a comparison: verdict, first divergence, diagnosis, environment diff.

Built by ``graddiff.compare`` from the walk and the diagnosis; consumed by the CLI (terminal or
``--json``), by the HTML report and the divergence plot. The report owns the verdict and the
exit code, so the library and the command line cannot disagree.
"""

from __future__ import annotations

import importlib
import io
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from ..errors import GraddiffError
from ..modclass import class_of_label, describe_label, describe_list, with_class
from .diagnose import Cause

EXIT_SAME, EXIT_DIVERGED = 0, 1

_STATUS_TEXT = {
    "values": "values differ",
    "stats": "statistics differ (full values not stored)",
    "missing_in_a": "absent in A",
    "missing_in_b": "absent in B",
    "shape": "shapes differ",
    "nonfinite": "NaN/Inf at different places",
}


def status_text(status: str) -> str:
    """A difference's status (``Difference.status``) in words, for the terminal and HTML."""
    return _STATUS_TEXT.get(status, status.replace("_", " "))


@dataclass
class Difference:
    """One record's difference at one step (the first divergence, or the first bitwise one).

    ``rel_diff`` is exact when ``basis == "values"``, a lower bound from statistics when
    ``basis == "stats"``, and None for structural differences (missing record, shape).
    """

    step: int
    kind: str
    name: str
    call: int
    label: str
    status: str  # values | stats | missing_in_a | missing_in_b | shape | nonfinite
    basis: str  # values | stats | structure
    rel_diff: Optional[float]
    max_abs_diff: Optional[float] = None
    index: Optional[list[int]] = None
    fraction_differing: Optional[float] = None
    a_value: Optional[float] = None
    b_value: Optional[float] = None
    a: Optional[dict] = None
    b: Optional[dict] = None
    rounding_level: bool = False
    #: the tolerance this record was judged by (rtol, or its precision-aware bound)
    tolerance: Optional[float] = None
    note: str = ""
    module_class: Optional[str] = None  # class of the module owning the record, when recorded
    #: a parameter judged by its update (reduced precision, precision.update_difference):
    #: {"rel": the relative difference of the updates' norms, "tolerance": what rounding allows for it,
    #: "from_step": the step whose gradient the update was computed from}
    update: Optional[dict] = None

    @property
    def described(self) -> str:
        """The label with the module class: ``activation fc1.1 (BatchNorm1d)``."""
        kind_name, sep, call = self.label.partition(" #")
        return with_class(kind_name, self.module_class) + (f" #{call}" if sep else "")

    def __getitem__(self, key: str) -> Any:  # report.first["step"] works too
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        return _clean({k: getattr(self, k) for k in self.__dataclass_fields__})


@dataclass
class Report:
    """What ``graddiff.compare`` returns and ``graddiff compare`` prints."""

    run_a: str
    run_b: str
    rtol: float
    exact: bool
    steps: dict[str, Any]
    first: Optional[Difference]
    first_bitwise: Optional[Difference]
    diagnosis: list[Cause]
    environment_diff: list[dict[str, Any]]
    structure: dict[str, Any]
    growth: dict[str, list[tuple[int, float]]]
    kinds: list[str]
    #: kinds that had at least one record to compare (in causal order)
    compared_kinds: list[str] = field(default_factory=list)
    #: the user restricted the kinds (--kinds)
    kinds_filtered: bool = False
    #: steps recorded in one run only (outside --steps): a difference in itself
    steps_mismatch: bool = False
    #: the computing precision the pair is judged in (precision.py): dtype, unit_roundoff,
    #: a, b, reduced (lower than float32: precision-aware tolerance)
    precision: dict[str, Any] = field(default_factory=dict)
    #: the perturbed twin whose drift set the tolerance (--noise), or None
    noise: Optional[str] = None
    #: which run the twin is a perturbed copy of ("A" or "B"), with --noise
    noise_of: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    #: one run scales its loss (lossscale.py): {"run": "B", "log2": [16]}; its loss and output
    #: gradients are judged up to that exact factor, or None
    loss_scale: Optional[dict[str, Any]] = None
    max_rel_diff: float = 0.0
    #: module name -> class name, from both runs (``Linear / Conv1d`` where they differ)
    module_classes: dict[str, str] = field(default_factory=dict)
    _matrix: Optional[Callable[[], tuple[np.ndarray, list[str], np.ndarray]]] = field(
        default=None, repr=False
    )

    # -- verdict ---------------------------------------------------------------------------
    @property
    def diverged(self) -> bool:
        """A record diverged, or the runs record different steps (without --steps)."""
        return self.first is not None or self.steps_mismatch

    @property
    def verdict(self) -> str:
        """``identical``, ``within_tolerance`` or ``diverged``."""
        if self.diverged:
            return "diverged"
        return "within_tolerance" if self.first_bitwise is not None else "identical"

    @property
    def exit_code(self) -> int:
        return EXIT_DIVERGED if self.diverged else EXIT_SAME

    @property
    def cause(self) -> Optional[Cause]:
        """The most likely cause (the first of ``diagnosis``)."""
        return self.diagnosis[0] if self.diagnosis else None

    @property
    def amplified_rounding(self) -> bool:
        """The divergence traces back to a rounding-level origin and no other cause was found."""
        o, f = self.first_bitwise, self.first
        return bool(
            f is not None
            and o is not None
            and (o.step, o.label) != (f.step, f.label)
            and self.cause is not None
            and self.cause.cause == "rounding"
        )

    @property
    def origin(self) -> Optional[Difference]:
        """Where the difference started: the first bitwise difference."""
        return self.first_bitwise

    def scope(self) -> str:
        """What was compared: steps and kinds ("5 steps (0..4) of param, grad (--kinds)")."""
        n = self.steps.get("compared", 0)
        lo, hi = self.steps.get("first"), self.steps.get("last")
        span = f" ({lo}..{hi})" if n > 1 and lo is not None else (f" ({lo})" if n == 1 else "")
        kinds = ", ".join(self.compared_kinds or self.kinds) or "no kind"
        if self.loss_scale:
            p = self.loss_scale["log2"]
            scale = f"2^{p[0]}" if len(p) == 1 else f"2^{p[0]} to 2^{p[-1]}"
            run = self.loss_scale["run"]
            kinds += (
                f" (loss, grad_output: {run}'s are {scale} x the other's, the loss "
                + (
                    f"within {self.loss_scale['within']} precision"
                    if self.loss_scale.get("within")
                    else "exactly"
                )
                + ", output gradients by norm)"
            )
        return f"{n} step{'s' if n != 1 else ''}{span} of {kinds}" + (
            " (--kinds)" if self.kinds_filtered else ""
        )

    @property
    def reduced_precision(self) -> Optional[str]:
        """The reduced computing precision (bfloat16, float16) the pair is judged in, or None."""
        p = self.precision
        return p.get("dtype") if p.get("reduced") and not self.exact else None

    def headline(self) -> str:
        """One line: the verdict, and what it covers (steps and kinds compared)."""
        low = self.reduced_precision
        tol = (
            "any bitwise difference (--exact)"
            if self.exact
            else (
                "10x the twin's drift (--noise)"
                if self.noise
                else (f"{low} rounding" if low else f"rtol {self.rtol:g}")
            )
        )
        scope = self.scope()
        if self.first is None and self.steps_mismatch:
            a, b = self.steps.get("in_a", 0), self.steps.get("in_b", 0)
            same = "bitwise identical" if self.first_bitwise is None else f"within {tol}"
            return (
                f"DIVERGED: the runs record different steps (A {a}, B {b}); compared {scope} are "
                f"{same}. Restrict with --steps to accept this."
            )
        if self.verdict == "identical":
            unsure = self.structure.get("not_comparable") or []
            if unsure:
                return (
                    f"No difference over {scope}: bitwise identical except "
                    f"{len(unsure)} summed or joined record(s) stored as statistics only, "
                    "which agree within rounding (not comparable bitwise)."
                )
            extra = (self.structure.get("extra_outputs") or []) + (
                self.structure.get("stateless_modules") or []
            )
            if extra:
                return (
                    f"No difference: the runs are bitwise identical over {scope}, except "
                    f"{len(extra)} module output record(s) that one run records and the other "
                    "does not (not compared; see notes)."
                )
            zn = self.structure.get("zero_vs_none") or []
            if zn:
                return (
                    f"No difference: the runs are bitwise identical over {scope}, counting a "
                    f"None gradient as zero ({len(zn)} record(s) None in one run and all zeros "
                    "in the other)."
                )
            return f"No difference: the runs are bitwise identical over {scope}."
        if self.verdict == "within_tolerance":
            o = self.first_bitwise
            head = (
                "Within the noise of the perturbed twin: no difference beyond what amplified "
                "rounding explains"
                if self.noise
                else (
                    f"Within {low} precision: no difference beyond what {low} rounding explains"
                    if low
                    else f"No divergence beyond {tol}"
                )
            )
            return (
                f"{head} over {scope} (largest rel diff {_g(self.max_rel_diff)}; "
                f"first bitwise difference: {o.described} at step {o.step})."
            )
        return self._diverged_line(tol) + f"; compared {scope}"

    def _diverged_line(self, tol: str) -> str:
        f = self.first
        if f.status == "nonfinite":
            what = "NaN/Inf at different places"
        elif f.rel_diff is not None and f.basis != "structure":
            limit = f.tolerance if f.tolerance is not None else self.rtol
            what = f"rel {'>= ' if f.basis == 'stats' else ''}{_g_apart(f.rel_diff, limit)[0]}"
        else:
            what = f.status.replace("_", " ")
        low = self.reduced_precision
        if f.update and low:
            u = f.update
            rel, limit = _g_apart(u["rel"], u["tolerance"])
            what = (
                f"rel {_g(f.rel_diff)}, but the size of its update from step "
                f"{u['from_step']} differs by rel {rel}"
            )
            tol = f"beyond what {low} rounding explains for it, {limit}"
        elif self.noise and not self.exact and f.tolerance is not None and f.basis != "structure":
            tol = f"beyond 10x the twin's drift here, {_g(f.tolerance)} (--noise)"
        elif low and f.tolerance is not None and f.basis != "structure":
            tol = f"beyond what {low} rounding explains here, {_g(f.tolerance)}"
        line = f"DIVERGED at step {f.step}: {f.described} ({what}; {tol})"
        if self.amplified_rounding and self.first_bitwise is not None:
            o = self.first_bitwise
            line += (
                f"; origin: rounding-level difference in {o.kind} at step {o.step} "
                f"(rel {'>= ' if o.basis == 'stats' else ''}{_g(o.rel_diff)}), amplified"
            )
        return line

    # -- output ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` object (schema in README.md, "--json schema")."""
        return _clean(
            {
                "diverged": self.diverged,
                "verdict": self.verdict,
                "exit_code": self.exit_code,
                "headline": self.headline(),
                "run_a": self.run_a,
                "run_b": self.run_b,
                "rtol": self.rtol,
                "exact": self.exact,
                "kinds": list(self.kinds),
                "compared_kinds": list(self.compared_kinds),
                "kinds_filtered": self.kinds_filtered,
                "steps_mismatch": self.steps_mismatch,
                "loss_scale": self.loss_scale,
                "precision": dict(self.precision),
                "noise": self.noise,
                "noise_of": self.noise_of,
                "steps": dict(self.steps),
                "first": self.first.to_dict() if self.first else None,
                "first_bitwise": self.first_bitwise.to_dict() if self.first_bitwise else None,
                "amplified_rounding": self.amplified_rounding,
                "max_rel_diff": self.max_rel_diff,
                "diagnosis": [c.to_dict() for c in self.diagnosis],
                "environment_diff": list(self.environment_diff),
                "structure": self._structure_with_classes(),
                "growth": {k: [[s, r] for s, r in v] for k, v in self.growth.items()},
                "notes": list(self.notes),
                "module_classes": dict(self.module_classes),
            }
        )

    def _structure_with_classes(self) -> dict[str, Any]:
        """``structure`` for --json: each entry's module class, as ``module_class`` in the
        dict entries and as ``only_in_a_classes`` (etc.) beside the lists of labels."""
        st = dict(self.structure)
        c = self.module_classes
        for key in ("shape_changes", "dtype_changes", "not_comparable"):
            if key in st:
                st[key] = [
                    dict(e, module_class=class_of_label(c, e["label"])) if "label" in e else e
                    for e in st[key]
                ]
        for key in ("only_in_a", "only_in_b", "pairing"):
            if key in st:
                labels = [x.partition(": ")[0] if key == "pairing" else x for x in st[key]]
                st[f"{key}_classes"] = [class_of_label(c, x) for x in labels]
        return st

    def render(self, console: Any = None) -> None:
        """Print the report with rich (plain text when the console is not a terminal)."""
        from .render import render_report

        if console is None:
            from ..textsafe import safe_console

            console = safe_console()
        render_report(self, console)

    def __str__(self) -> str:
        from ..textsafe import safe_console

        buf = io.StringIO()
        self.render(safe_console(file=buf, force_terminal=False, width=100, color_system=None))
        return "\n".join(line.rstrip() for line in buf.getvalue().split("\n"))  # no padding

    def divergence_matrix(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        """(steps, labels in causal order, rel of shape (n_steps, n_labels); NaN where absent).

        Exact where the comparison read full values, else the statistics' lower bound.
        """
        if self._matrix is None:
            return np.zeros(0, np.int64), [], np.zeros((0, 0))
        return self._matrix()

    def describe(self, label: str) -> str:
        """A ``"kind name"`` label with its module class: ``grad fc1.weight (Linear)``."""
        return describe_label(self.module_classes, label)

    def describe_all(self, labels: list[str], limit: Optional[int] = None) -> str:
        """Labels with their classes, neighbours of one class grouped (modclass.describe_list):
        ``grad fc1.weight, grad fc1.bias (both Linear) and 2 more``."""
        c = self.module_classes
        return describe_list([(x, class_of_label(c, x)) for x in labels], limit)

    def html(self, path: str) -> None:
        """Write an HTML report (graddiff.postmortem.html)."""
        _feature("graddiff.postmortem.html", "write_html", "HTML reports")(self, path)

    def plot(self, path: str) -> None:
        """Plot the divergence (graddiff.postmortem.plots)."""
        _feature("graddiff.postmortem.plots", "plot_divergence", "divergence plots")(self, path)


def _feature(module: str, attr: str, what: str) -> Callable[..., Any]:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module.startswith(exc.name):
            raise GraddiffError(
                f"{what} are not available in this installation ({module} is missing)"
            ) from None
        raise
    fn = getattr(mod, attr, None)
    if fn is None:
        raise GraddiffError(
            f"{what} are not available in this installation ({module}.{attr} is missing)"
        )
    return fn


def _g(x: Optional[float], digits: int = 2) -> str:
    if x is None:
        return "n/a"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}" if x == 0 or 1e-3 <= abs(x) < 1e3 else f"{x:.{digits - 1}e}"


def _g_apart(x: Optional[float], y: Optional[float]) -> tuple[str, str]:
    """``x`` and ``y`` with as few significant digits (2 to 9) as tell them apart when they
    differ, so that a value just beyond a tolerance never prints equal to it."""
    for digits in range(2, 10):
        sx, sy = _g(x, digits), _g(y, digits)
        if sx != sy or x == y or x is None or y is None:
            break
    return sx, sy


def _clean(obj: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN/Inf to None, tuples to lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    return obj

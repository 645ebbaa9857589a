"""Single-run checks (``graddiff check``): what went wrong in one trace, at which step and layer.

Data flow: Run --series (entry stats)--> detectors --> :class:`CheckReport` of :class:`Finding`.
Detectors read statistics first and stored values only where a check needs them (capped by
``max_value_steps``). The report owns the verdict: ``exit_code`` is 0 clean, 1 findings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any, Optional

import numpy as np

from ..diff.noise import floor_factor
from ..kinds import CAUSAL_RANK, GRADIENT_KINDS
from ..modclass import class_of, describe_list, with_class
from ..reader import RecordKey, Run
from .series import Series, collect_series

#: No module classes known (a trace written before they were recorded).
_NO_CLASSES: Mapping[str, str] = MappingProxyType({})

#: Finding kinds, in the order a report lists findings of the same step.
FINDING_KINDS = (
    "nan",
    "inf",
    "grad_accumulation",
    "exploding_grad",
    "vanishing_grad",
    "frozen_param",
    "dead_units",
)

#: Names listed in a finding's evidence at most (the count is always exact).
MAX_NAMES = 20

_NAN_HINTS = {
    "param": "the parameter was already bad at the start of the step: the previous update made it",
    "input": "the batch itself holds it: check the data pipeline",
    "activation": "this layer's forward produced it from finite inputs",
    "loss": "the loss produced it from finite activations (log of 0, division by 0?)",
    "grad_output": "the backward pass produced it at this layer's output",
    "grad": "the backward pass produced it in the parameter gradient",
    "autograd_grad": "torch.autograd.grad produced it",
    "buffer": "a buffer update produced it (BatchNorm running stats?)",
}


@dataclass
class Finding:
    """One problem in a run: ``kind`` (a FINDING_KINDS value), where, and the evidence."""

    kind: str
    step: int
    record_kind: str
    name: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    call: int = 0
    module_class: Optional[str] = None  # class of the module owning the record, when recorded

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def where(self) -> str:
        """``grad fc1.weight (Linear)``, with ``(call N)`` for calls after the first."""
        text = with_class(f"{self.record_kind} {self.name}", self.module_class)
        return text + (f" (call {self.call})" if self.call else "")

    def __str__(self) -> str:
        return f"step {self.step}  {self.kind}  {self.where}: {self.message}"


@dataclass
class CheckReport:
    """The findings of :func:`check_run`, sorted by step. Iterable; falsy when clean."""

    path: str
    n_steps: int
    findings: list[Finding]
    #: module name -> class name of the run (empty for traces without it)
    module_classes: dict[str, str] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not self.findings

    @property
    def exit_code(self) -> int:
        return 0 if self.clean else 1

    def __iter__(self):
        return iter(self.findings)

    def __len__(self) -> int:
        return len(self.findings)

    def __getitem__(self, i: int) -> Finding:
        return self.findings[i]

    def of_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "steps": self.n_steps,
            "clean": self.clean,
            "findings": [f.to_dict() for f in self.findings],
            "module_classes": dict(self.module_classes),
        }


def check_run(
    run: Run,
    *,
    explode_factor: float = 100.0,
    explode_abs: float = 1e6,
    vanish_factor: float = 1e-4,
    max_value_steps: int = 32,
    ignore: tuple[str, ...] = (),
    series: Optional[dict[RecordKey, Series]] = None,
) -> CheckReport:
    """Run every single-run check on ``run``.

    Args:
        run: an open :class:`graddiff.Run`.
        explode_factor: a gradient norm this many times its early level is exploding.
        explode_abs: a gradient norm above this is exploding whatever its early level.
        vanish_factor: a gradient norm that stays below this fraction of its early level vanished.
        max_value_steps: at most this many steps' stored values are read per check.
        ignore: finding kinds to leave out.
        series: the run's series when the caller already collected them.
    """
    if series is None:
        series = collect_series(run)
    with np.errstate(all="ignore"):  # NaN/Inf in the data are findings, not numpy warnings
        found = _detect(run, series, explode_factor, explode_abs, vanish_factor, max_value_steps)
    found = [f for f in found if f.kind not in ignore]
    for f in found:
        f.module_class = run.module_class(f.record_kind, f.name)
    # by step, then causal order within the step: the first listed is what went wrong first
    found.sort(
        key=lambda f: (f.step, CAUSAL_RANK.get(f.record_kind, 99), FINDING_KINDS.index(f.kind))
    )
    return CheckReport(run.path, len(run.steps), found, dict(run.module_classes or {}))


def _detect(
    run, series, explode_factor, explode_abs, vanish_factor, max_value_steps
) -> list[Finding]:
    from .accumulation import find_grad_accumulation
    from .dead import find_dead_units

    found: list[Finding] = []
    found += find_nonfinite(run, series)
    accumulated = find_grad_accumulation(run, series, max_value_steps=max_value_steps)
    found += accumulated
    skip = set()
    for f in accumulated:  # growth explained by accumulation is not reported twice
        skip.update(f.evidence.get("names", [f.name]))
    classes = run.module_classes or {}
    found += find_exploding(series, explode_factor, explode_abs, skip=skip, classes=classes)
    found += find_vanishing(series, vanish_factor, classes=classes)
    found += find_frozen(series, run)
    found += find_dead_units(run, series, max_value_steps=max_value_steps)
    return found


# -- NaN / Inf --------------------------------------------------------------------------------
def find_nonfinite(run: Run, series: dict[RecordKey, Series]) -> list[Finding]:
    """The first NaN and the first Inf (step, then causal order within the step), told as one
    story: the earlier of the two is the origin (with what produced it from finite values);
    the later one is said to follow it, not to come from finite values."""
    classes = run.module_classes or {}
    out = _first_nonfinite(series, classes)
    if len(out) == 2:
        first, later = sorted(out, key=lambda f: f.evidence["position"])
        word = "NaN" if first.kind == "nan" else "Inf"
        where = _where(classes, first.record_kind, first.name)
        later.message = later.message.split("; ", 1)[0] + (
            f"; it follows the first {word} ({where}, step "
            f"{first.step}): arithmetic on {word} (Inf - Inf, 0 x Inf, a normalisation by "
            "Inf) gives NaN"
            if word == "Inf"
            else f"; it follows the first NaN ({where}, step {first.step})"
        )
        later.evidence["follows"] = f"{first.kind} {first.record_kind} {first.name}"
    for f in out:
        f.evidence.pop("position", None)
    return out


def _where(classes: Mapping[str, str], kind: str, name: str) -> str:
    """``grad fc1.weight (Linear)``: a record named in a message, with its module class."""
    return with_class(f"{kind} {name}", class_of(classes, kind, name))


def _first_nonfinite(
    series: dict[RecordKey, Series], classes: Mapping[str, str] = _NO_CLASSES
) -> list[Finding]:
    order = {key: i for i, key in enumerate(series)}  # causal key order
    out = []
    for field_name, kind, word in (("nan", "nan", "NaN"), ("inf", "inf", "Inf")):
        # per record, its steps with a NaN (Inf); vectorised, so a run that is NaN everywhere
        # for thousands of steps costs one pass
        bad = {key: s.rows[s.rows[field_name] > 0] for key, s in series.items()}
        bad = {key: rows for key, rows in bad.items() if len(rows)}
        if not bad:
            continue
        step = min(int(rows["step"][0]) for rows in bad.values())
        at_step = [key for key, rows in bad.items() if int(rows["step"][0]) == step]
        at_step.sort(key=lambda k: (CAUSAL_RANK.get(k.kind, 99), order[k]))
        key = at_step[0]
        row = bad[key][0]
        bad_steps = np.unique(np.concatenate([rows["step"] for rows in bad.values()]))
        count, numel = int(row[field_name]), int(row["numel"])
        others = len(at_step) - 1
        spread = f"; {others} more records have {word} in step {step}" if others else ""
        out.append(
            Finding(
                kind=kind,
                step=step,
                record_kind=key.kind,
                name=key.name,
                call=key.call,
                message=(
                    f"first {word}: {count} of {numel} values in "
                    f"{_where(classes, key.kind, key.name)}"
                    f"{spread}; {_NAN_HINTS.get(key.kind, '')}"
                ),
                evidence={
                    "count": count,
                    "numel": numel,
                    "records_at_step": len(at_step),
                    "steps_affected": len(bad_steps),
                    "last_step_affected": int(bad_steps[-1]),
                    "names": [str(k) for k in at_step[:MAX_NAMES]],
                    "position": (step, CAUSAL_RANK.get(key.kind, 99), order[key]),
                },
            )
        )
    return out


# -- gradient norms ---------------------------------------------------------------------------
def _gradient_series(series: dict[RecordKey, Series]) -> list[Series]:
    return [s for k, s in series.items() if k.kind in GRADIENT_KINDS]


def _baseline(norms: np.ndarray) -> Optional[float]:
    """The early level of a norm series: median of its first three finite, positive values."""
    ok = norms[np.isfinite(norms) & (norms > 0)]
    return float(np.median(ok[:3])) if len(ok) else None


def _aggregate(
    kind: str, hits: list[tuple[int, Series, str, dict]], classes: Mapping[str, str] = _NO_CLASSES
) -> list[Finding]:
    """One finding per kind: the earliest hit speaks, the rest are counted and named (each
    with its module class: ``3 more: fc2.weight, fc2.bias (both Linear), ...``)."""
    if not hits:
        return []
    hits.sort(key=lambda h: (h[0], CAUSAL_RANK.get(h[1].key.kind, 99)))
    step, s, message, evidence = hits[0]
    names = [h[1].key.name for h in hits]
    if len(hits) > 1:
        shown = describe_list(
            [(h[1].key.name, class_of(classes, h[1].key.kind, h[1].key.name)) for h in hits[1:4]]
        )
        message += f" ({len(hits) - 1} more: {shown}{', ...' if len(hits) > 4 else ''})"
    evidence = dict(evidence, count=len(hits), names=names[:MAX_NAMES])
    return [Finding(kind, step, s.key.kind, s.key.name, message, evidence, s.key.call)]


def find_exploding(
    series: dict[RecordKey, Series],
    factor: float,
    absolute: float,
    skip: Optional[set] = None,
    classes: Mapping[str, str] = _NO_CLASSES,
) -> list[Finding]:
    """Gradient norms that grow ``factor`` times over their early level, or beyond ``absolute``."""
    hits = []
    for s in _gradient_series(series):
        if skip and s.key.name in skip:
            continue
        norms = s.norm
        base = _baseline(norms)
        if base is None:
            continue
        # finite growth only: a tensor holding NaN/Inf is the NaN/Inf finding's story
        finite = np.isfinite(norms) & (s.rows["nan"] == 0) & (s.rows["inf"] == 0)
        ratio = norms / base
        grew = (ratio > factor) | ((norms > absolute) & (ratio > np.sqrt(factor)))
        bad = np.flatnonzero(finite & grew)
        if not len(bad):
            continue
        i = int(bad[0])
        value = float(norms[i])
        peak = float(norms[finite].max())
        hits.append(
            (
                int(s.steps[i]),
                s,
                f"gradient norm exploded to {value:.3g} ({value / base:.3g}x its early level "
                f"{base:.3g}; peak {peak:.3g}): lower the learning rate or clip gradients",
                {"baseline": base, "value": value, "ratio": value / base, "peak": peak},
            )
        )
    return _aggregate("exploding_grad", hits, classes)


def find_vanishing(
    series: dict[RecordKey, Series], factor: float, classes: Mapping[str, str] = _NO_CLASSES
) -> list[Finding]:
    """Gradient norms zero at every step, or falling below ``factor`` x early level for good."""
    hits = []
    for s in _gradient_series(series):
        norms = s.norm
        finite = np.isfinite(norms)
        if len(norms) < 2 or not finite.all():
            continue
        if np.all(norms == 0):
            hits.append(
                (
                    int(s.steps[0]),
                    s,
                    f"gradient is zero at every recorded step ({len(norms)} steps): nothing "
                    f"upstream of the loss reaches this parameter (dead path, detached tensor?)",
                    {"value": 0.0, "steps": len(norms)},
                )
            )
            continue
        base = _baseline(norms)
        low = norms < factor * base
        if not low[-1]:
            continue
        # the start of the final run of low values: vanished since then, never recovered
        start = len(low) - int(np.argmin(low[::-1])) if not low.all() else 0
        if len(low) - start < 2:
            continue
        value = float(norms[start])
        hits.append(
            (
                int(s.steps[start]),
                s,
                f"gradient norm vanished to {value:.3g} ({value / base:.2g}x its early level "
                f"{base:.3g}) and stayed there for {len(low) - start} steps",
                {
                    "baseline": base,
                    "value": value,
                    "ratio": value / base,
                    "steps": len(low) - start,
                },
            )
        )
    return _aggregate("vanishing_grad", hits, classes)


# -- parameters that never change -------------------------------------------------------------
def _largest_grad_norm(grads: dict[str, list[Series]]) -> dict[int, float]:
    """step -> the largest finite gradient norm of any parameter at that step."""
    out: dict[int, float] = {}
    for group in grads.values():
        for g in group:
            for step, n in zip(g.steps.tolist(), g.norm.tolist()):
                if np.isfinite(n) and n > out.get(step, 0.0):
                    out[step] = n
    return out


def find_frozen(series: dict[RecordKey, Series], run: Optional[Run] = None) -> list[Finding]:
    """Parameters bit-identical at every step although they received a real gradient.

    A gradient counts only above the same noise floor as ``compare`` uses: a norm below
    ``floor_factor(dtype)`` x the largest gradient norm of that step is rounding residue (a
    Linear's bias before BatchNorm gets ~1e-8 where exact arithmetic gives 0; an update that
    small rounds back to the same float32 parameter).
    """
    grads: dict[str, list[Series]] = {}
    for k, s in series.items():
        if k.kind in GRADIENT_KINDS:
            grads.setdefault(k.name, []).append(s)
    largest = _largest_grad_norm(grads)
    dtypes = (
        {run.record_key(r): run.record_dtype(r) for r in range(run.n_records)}
        if run is not None
        else {}
    )
    hits = []
    for k, s in series.items():
        if k.kind != "param" or len(s.rows) < 2 or k.name not in grads:
            continue
        fp_sum, fp_pos = s.rows["fp_sum"], s.rows["fp_pos"]
        if not (np.all(fp_sum == fp_sum[0]) and np.all(fp_pos == fp_pos[0])):
            continue
        last = int(s.steps[-1])
        grad_norm = 0.0
        for g in grads[k.name]:  # a gradient before the last param step had its chance to apply
            floor = floor_factor(dtypes.get(g.key, "float32"))
            for step, n in zip(g.steps.tolist(), g.norm.tolist()):
                if step < last and np.isfinite(n) and n > floor * largest.get(step, 0.0):
                    grad_norm = max(grad_norm, n)
        if grad_norm <= 0:
            continue
        hits.append(
            (
                int(s.steps[0]),
                s,
                f"never changed over {len(s.rows)} recorded steps although its gradient is "
                f"nonzero (norm up to {grad_norm:.3g}): not in the optimizer, or its lr is 0? "
                f"(if intended, use requires_grad_(False))",
                {"steps": len(s.rows), "grad_norm": grad_norm},
            )
        )
    return _aggregate("frozen_param", hits, (run.module_classes or {}) if run else {})

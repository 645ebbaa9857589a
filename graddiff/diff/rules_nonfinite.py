"""Diagnosis rule for NaN/Inf: where each run first goes non-finite, and what fed it.

The same story as ``graddiff check`` (postmortem/findings.py ``find_nonfinite``): per run, the
first NaN and the first Inf by step and causal order, the earlier of the two being the origin.
``compare`` adds the other run's view of that record and step, and the record computed just
before the origin (finite, by construction: it is what fed it).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..kinds import CAUSAL_RANK
from ..modclass import describe
from ..reader import RecordKey, Run
from .compare_records import NONFINITE
from .context import Cause, Context, fmt

_FIX = {
    "param": "the update before it made the parameter non-finite: lower the learning rate, clip "
    "gradients, or look for an Inf gradient in the step before",
    "buffer_start": "a buffer was already non-finite at the step's start: the previous step's "
    "update of running statistics made it",
    "input": "the batch holds it: check the data pipeline (NaN in the data, a division in a "
    "transform)",
    "activation": "this module's forward produced it from finite inputs: a log/sqrt/division of "
    "zero or a negative number, an overflow (float16), a normalisation without eps",
    "loss": "the loss produced it from finite outputs: log of 0 (probabilities without a clamp), "
    "a division by 0 (an empty mask), an overflow",
    "grad_output": "the backward pass produced it at this module's output (the derivative of "
    "sqrt/log/pow at 0, an overflow in float16 without loss scaling)",
    "grad": "the backward pass produced it in this parameter's gradient",
    "autograd_grad": "torch.autograd.grad produced it",
    "buffer": "a buffer update produced it (BatchNorm running statistics of a non-finite batch?)",
}


#: Kinds that hold state at the step's start rather than values computed in the step.
_STATE = frozenset({"param", "buffer_start"})


def _origin(run: Run, kinds) -> tuple[Optional[Any], dict]:
    """The first non-finite value of a run as ``graddiff check`` tells it (a Finding, or None),
    and the run's series; among the compared kinds only."""
    from ..postmortem.findings import find_nonfinite
    from ..postmortem.series import collect_series

    series = collect_series(run, kinds)
    with np.errstate(all="ignore"):
        found = find_nonfinite(run, series)
    origin = [f for f in found if "follows" not in f.evidence] or found
    return (origin[0] if origin else None), series


def _where(run: Run, f: Any) -> str:
    call = f" #{f.call}" if f.call else ""
    return f"{f.record_kind} {describe(run.module_classes, f.record_kind, f.name)}{call}"


def _told(run: Run, f: Any, compared) -> str:
    """check's sentence for the finding; without its closing hint ("from finite
    inputs/activations") unless the kinds it speaks of were compared."""
    text = f.message
    if not {"input", "activation"} <= set(compared) and "; " in text:
        text = text.rsplit("; ", 1)[0]
    return text


def _fed_by(run: Run, f: Any, series: dict) -> Optional[str]:
    """The record computed just before the origin in the same step (or, for a parameter, its
    gradient in the step before): finite, since the origin is the first non-finite value."""
    keys = list(series)
    key = RecordKey(f.record_kind, f.name, f.call)
    if f.record_kind in ("param", "buffer_start"):
        for kind in ("grad", "autograd_grad"):
            s = series.get(RecordKey(kind, f.name, 0))
            if s is not None:
                earlier = s.rows[s.rows["step"] < f.step]
                if len(earlier):
                    row = earlier[-1]
                    return (
                        f"its gradient at step {int(row['step'])} was finite (norm "
                        f"{fmt(float(row['norm']))}): the update made it non-finite"
                    )
        return None
    if key not in series:
        return None
    pos = (CAUSAL_RANK.get(f.record_kind, 99), keys.index(key))
    best = None
    for i, k in enumerate(keys):
        p = (CAUSAL_RANK.get(k.kind, 99), i)
        if k.kind in _STATE:
            continue  # parameters and buffers at the step's start are not computed in it
        if p < pos and series[k].row_at(f.step) is not None and (best is None or p > best[0]):
            best = (p, k)
    if best is None:
        return None
    k = best[1]
    row = series[k].row_at(f.step)
    big = max(abs(float(row["min"])), abs(float(row["max"])))
    return (
        f"the record computed just before it, {k.kind} "
        f"{describe(run.module_classes, k.kind, k.name)}{f' #{k.call}' if k.call else ''}, "
        f"is finite (largest magnitude {fmt(big)})"
    )


def _place(f: Any) -> tuple:
    return (f.step, f.record_kind, f.name, f.call, f.kind)


def _at(run_series: dict, f: Any) -> Optional[np.void]:
    s = run_series.get(RecordKey(f.record_kind, f.name, f.call))
    return None if s is None else s.row_at(f.step)


def rule_nonfinite(x: Context) -> Optional[Cause]:
    """NaN/Inf at different places: where each run first goes non-finite and what fed it."""
    h = x.hit
    if h.code != NONFINITE:
        return None
    fa, fb = h.facts.get("a") or {}, h.facts.get("b") or {}
    na, nb = fa.get("nan", 0) + fa.get("inf", 0), fb.get("nan", 0) + fb.get("inf", 0)
    runs = {"A": x.pair.a, "B": x.pair.b}
    got = {tag: _origin(run, x.compared) for tag, run in runs.items()}
    counts = (
        f"at {x.label(x.slot)} step {h.step}: NaN/Inf A {fa.get('nan', 0)}/{fa.get('inf', 0)}, "
        f"B {fb.get('nan', 0)}/{fb.get('inf', 0)}"
    )
    a0, b0 = got["A"][0], got["B"][0]
    if a0 is not None and b0 is not None and _place(a0) == _place(b0):
        word = "NaN" if a0.kind == "nan" else "Inf"
        return Cause(
            "nonfinite",
            f"both runs go non-finite at the same place: the first {word} is in "
            f"{_where(x.pair.a, a0)} at step {a0.step} in A and in B",
            [
                f"A: {_told(x.pair.a, a0, x.compared)}",
                f"B: {_told(x.pair.b, b0, x.compared)}",
                f"they differ afterwards in where NaN/Inf spread ({counts})",
            ],
            "the instability is in both runs' training, not in what differs between them: "
            + _FIX.get(a0.record_kind, "look at what produces this tensor at this step"),
        )
    # the run that goes non-finite first (earlier step, else more NaN/Inf at the hit)
    order = [t for t in ("A", "B") if got[t][0] is not None]
    if len(order) == 2:
        ka = (a0.step, CAUSAL_RANK.get(a0.record_kind, 99), -na)
        bad = "A" if ka < (b0.step, CAUSAL_RANK.get(b0.record_kind, 99), -nb) else "B"
    elif order:
        bad = order[0]
    else:
        bad = "A" if na > nb else "B"
    other = "B" if bad == "A" else "A"
    if got[bad][0] is None:  # no origin found (the counts differ only at the hit)
        return Cause(
            "nonfinite",
            f"the first NaN/Inf: {x.label(x.slot)} at step {h.step} (run {bad})",
            [counts],
            "look at what produces this tensor at this step",
        )
    f, series = got[bad]
    word = "NaN" if f.kind == "nan" else "Inf"
    brun, orun = runs[bad], runs[other]
    ev = [f"{bad}: {_told(brun, f, x.compared)}"]
    fed = _fed_by(brun, f, series)
    if fed:
        ev.append(f"in {bad}, {fed}")
    if got[other][0] is None:
        there = _at(got[other][1], f)
        ev.append(
            f"{other} stays finite in all its {len(orun.steps)} steps"
            + (
                f" (at {_where(orun, f)} step {f.step}: largest magnitude "
                f"{fmt(max(abs(float(there['min'])), abs(float(there['max']))))})"
                if there is not None
                else ""
            )
        )
    else:
        g = got[other][0]
        ev.append(f"{other} goes non-finite later: {_told(orun, g, x.compared)} (step {g.step})")
    return Cause(
        "nonfinite",
        f"run {bad} goes non-finite first: {word} in {_where(brun, f)} at step {f.step}",
        ev,
        _FIX.get(f.record_kind, "look at what produces this tensor at this step")
        + f" (in {bad}; compare the code that computes it with {other}'s)",
    )

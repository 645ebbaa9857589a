"""Dead units: activation channels that output zero for every sample, step after step.

Data flow: activation series (+ stored values where present) --> ``dead_units`` findings.
Only activations that are never negative are considered (ReLU-like outputs), so an exact zero
means "off", not a coincidence. With stored values a unit is one channel (axis 1 of a 2-D or 4-D
output, the last axis of a 3-D one) and is dead at a step when it is zero for every sample; it is
reported when it stays dead in every stored step from some step to the last (at least three
stored steps, or all of them when fewer, and at least ``MIN_SAMPLES`` samples). With statistics only, a whole layer is dead when its
max is 0 over those steps.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..reader import RecordKey, Run
from .findings import MAX_NAMES, Finding, _aggregate
from .series import Series

MIN_DEAD_STEPS = 3
MIN_SAMPLES = 64  # a unit off for fewer samples than this may just be rarely on


def _unit_axis(shape: tuple[int, ...]) -> Optional[int]:
    if len(shape) in (2, 4, 5):
        return 1
    if len(shape) == 3:
        return 2
    return None


def _dead_tail(dead: np.ndarray) -> np.ndarray:
    """Per unit, the first step index from which it is dead through the last step (-1: never)."""
    n = dead.shape[0]
    alive_after = np.cumsum(~dead[::-1], axis=0)[::-1]  # alive steps at index >= i
    out = np.full(dead.shape[1], -1)
    for i in range(n - 1, -1, -1):
        out[alive_after[i] == 0] = i
    return out


def find_dead_units(
    run: Run, series: dict[RecordKey, Series], *, max_value_steps: int = 32
) -> list[Finding]:
    """At most one ``dead_units`` finding, naming every activation with dead units."""
    hits = []
    for key, s in series.items():
        if key.kind != "activation" or len(s.rows) == 0:
            continue
        mins = s.rows["min"]
        if not (np.isfinite(mins).all() and (mins >= 0).all()):
            continue
        hit = _from_values(run, s, max_value_steps) or _from_stats(s)
        if hit:
            hits.append(hit)
    found = _aggregate("dead_units", hits, run.module_classes or {})
    for f in found:
        f.evidence["names"] = f.evidence["names"][:MAX_NAMES]
    return found


def _from_values(run: Run, s: Series, max_value_steps: int) -> Optional[tuple]:
    idx = np.flatnonzero(s.has_values)[-max_value_steps:]
    if not len(idx):
        return None
    dead_rows, units, samples = [], None, []
    for i in idx:
        a = run.values_of(s.rows[i])
        axis = _unit_axis(a.shape)
        if axis is None or (units is not None and a.shape[axis] != units):
            return None
        units = a.shape[axis]
        samples.append(a.size // max(units, 1))
        other = tuple(j for j in range(a.ndim) if j != axis)
        dead_rows.append(np.all(a == 0, axis=other))
    if not units:
        return None
    since = _dead_tail(np.array(dead_rows))
    tail_samples = np.cumsum(samples[::-1])[::-1]  # samples seen from stored step i to the end
    need = min(len(idx), MIN_DEAD_STEPS)
    flagged = (since >= 0) & (len(idx) - since >= need)
    flagged[flagged] &= tail_samples[since[flagged]] >= MIN_SAMPLES
    n_dead = int(flagged.sum())
    if not n_dead:
        return None
    first = int(since[flagged].min())
    step = int(s.rows["step"][idx[first]])
    last = int(s.rows["step"][idx[-1]])
    return (
        step,
        s,
        f"{n_dead} of {units} units output 0 for every sample from step {step} through step "
        f"{last} ({len(idx) - first} stored steps): dead ReLUs (learning rate too high, bad init "
        f"or a large negative bias?)",
        {
            "dead": n_dead,
            "units": int(units),
            "fraction": n_dead / units,
            "stored_steps": len(idx) - first,
        },
    )


def _from_stats(s: Series) -> Optional[tuple]:
    zero = s.rows["max"] == 0
    if not zero[-1]:
        return None
    start = 0 if zero.all() else len(zero) - int(np.argmin(zero[::-1]))
    if len(zero) - start < min(len(zero), MIN_DEAD_STEPS):
        return None
    step, last = int(s.rows["step"][start]), int(s.rows["step"][-1])
    return (
        step,
        s,
        f"every output is 0 from step {step} through step {last} ({len(zero) - start} steps): "
        f"the whole layer is dead",
        {"fraction": 1.0, "stored_steps": len(zero) - start},
    )

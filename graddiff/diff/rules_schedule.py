"""The schedule behind a learning-rate difference: restarted on resume (scheduler state not
restored), set back, or stepped per epoch in one run and per step in the other.

Input: the context and the update where the runs' fitted rates part. Each run's rate per
update is fitted from its recorded parameters and gradients as SGD (with momentum and coupled
decay, update_fit.fit_sgd) on its three smallest parameters that can be fitted (reading every
parameter of a large model at every step would cost too much); an update's rate is known when
they all give the same one. Output: a title, evidence and fix for the learning-rate cause, or
no title when no schedule relation (schedule.py) explains every update compared.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .context import Context, fmt
from .schedule import find_shift, find_stride, same
from .update_fit import MIN_PER_COEF, fit_sgd
from .update_series import series

#: Updates read per run (from the first recorded step), and updates read past the parting one.
MAX_UPDATES = 64
AFTER = 16
#: Elements per parameter the rate is fitted on (evenly spaced; the rate is one number), and
#: parameters it is fitted on (the smallest that can be fitted).
SAMPLE = 4096
PARAMS = 3


def rates(x: Context, side: str, until: int) -> dict:
    """Update (its first step) -> the run's learning rate, where every parameter agrees."""
    steps = [int(t) for t in x.pair.steps]
    params = _cheap_params(x)
    out: dict = {}
    for i, t in enumerate(steps[:-1]):
        if t > until or i >= MAX_UPDATES:
            break
        if steps[i + 1] != t + 1:  # a gap holds several updates: no one rate
            continue
        pprev = steps[i - 1] if i > 0 and steps[i - 1] == t - 1 else None
        got = []
        for s in params:
            sr = series(x, s, t + 1, t, pprev, side)
            if sr is None or sr[1] is None:
                continue
            stride = -(-sr[0].size // SAMPLE)
            d, g, p, u = (a[::stride] if a is not None else None for a in sr)
            f = fit_sgd(d, g, p, u)
            if f is not None:
                got.append(f.lr)
        if got and all(same(r, got[0]) for r in got):
            out[t] = float(np.median(got))
    return out


def _cheap_params(x: Context) -> list:
    """The few smallest parameters large enough for a fit: a rate is one number per update,
    and reading every parameter of a large model at every step would cost gigabytes."""
    first = int(x.pair.steps[0])
    sized = []
    for s, _ in x.slots_of(first, ("param",)):
        v = x.v("a", s, first)
        if v is not None and v.size >= 3 * MIN_PER_COEF:
            sized.append((v.size, s.index, s))
    return [s for *_, s in sorted(sized)[:PARAMS]]


def _listing(lr: dict) -> str:
    ts = sorted(lr)
    shown = ", ".join(fmt(lr[t]) for t in ts[:12]) + (", ..." if len(ts) > 12 else "")
    return f"{shown} (updates from step {ts[0]} to {ts[-1]})" if ts else "not known"


def schedule_relation(
    la: dict, lb: dict, t: int, noun: str, var: str
) -> Optional[tuple[str, list[str], str]]:
    """(title, evidence, fix) when the two runs' rates per update (``noun``: "rate" fitted,
    "recorded rate" from the settings) part at update ``t`` by a schedule relation: restarted
    or set back (a shift), or stepped every E updates in one run (a stride)."""
    shift = find_shift(la, lb)
    if shift is not None and shift.start == t:
        late, early = shift.late, "B" if shift.late == "A" else "A"
        k = t if t in shift.ks else shift.ks[0]
        ev = [
            f"from the update at step {t} on, {late}'s {noun} at step {var} is {early}'s at step "
            f"{var} - {k} ({shift.checked} updates compared"
            + (f"; offsets {', '.join(map(str, shift.ks))} fit alike" if len(shift.ks) > 1 else "")
            + ")"
        ]
        if k == t:
            title = (
                f"learning-rate schedule restarted in {late} at step {t}: from there its "
                f"{noun}s repeat the schedule from step 0 (resumed without restoring the "
                "scheduler?)"
            )
        else:
            title = (
                f"learning-rate schedule set back by {k} step{'s' if k > 1 else ''} in {late} at "
                f"step {t} (its step count reset: resumed without restoring the scheduler?)"
            )
        return (
            title,
            ev,
            "save scheduler.state_dict() in the checkpoint with the model and optimizer, and "
            "call scheduler.load_state_dict() after creating the scheduler when resuming",
        )
    stride = find_stride(la, lb)
    if stride is not None:
        fast = "B" if stride.slow == "A" else "A"
        ev = [
            f"{stride.slow}'s {noun} at step {var} is {fast}'s at step {var} // {stride.every} "
            f"({stride.checked} updates compared): {fast}'s schedule advances at every update, "
            f"{stride.slow}'s once every {stride.every}"
        ]
        return (
            f"learning-rate schedule stepped once every {stride.every} steps in {stride.slow} "
            f"and at every step in {fast} (per epoch vs per step?)",
            ev,
            "call scheduler.step() at the same place in both runs (once per optimizer step, or "
            "once per epoch, as the schedule's step counts assume)",
        )
    return None


def schedule_cause(x: Context, prev: int) -> tuple[Optional[str], list[str], Optional[str]]:
    """(title, evidence, fix) when the rates part at update ``prev`` by a schedule relation;
    else (None, the fitted rates as evidence when any are known, None)."""
    la, lb = rates(x, "a", prev + AFTER), rates(x, "b", prev + AFTER)
    if not la and not lb:
        return None, [], None
    ev = [f"learning rate per update, fitted: A {_listing(la)}; B {_listing(lb)}"]
    found = schedule_relation(la, lb, prev, "rate", "t")
    if found is not None:
        title, more, fix = found
        return title, ev + more, fix
    return None, ev, None

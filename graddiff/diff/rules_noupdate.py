"""Diagnosis rule: one run's optimizer step applied no gradient.

The recorded ``.grad`` is the gradient backward produced. When a run clears it between
``backward()`` and ``step()`` (``zero_grad()`` in the wrong place), or skips the step, its
parameters stay bitwise unchanged across the update although their recorded gradients are
not zero, while the other run's move. Bitwise unchanged is read from the fingerprints, so
statistics-only traces show it too.
"""

from __future__ import annotations

from typing import Any, Optional

from .context import Cause, Context

#: How many parameter names the evidence lists.
SHOWN = 4


def _facts(x: Context, side: str, step: int) -> dict[tuple[str, str], Any]:
    """(kind, name) -> the entry row of call 0 at ``step`` in this run, from the step's rows
    (read once and cached by the pair)."""
    run = x.pair.run(side)
    out: dict[tuple[str, str], Any] = {}
    for row in x.pair.rows(side, step):
        k = run.record_key(int(row["record"]))
        if k.call == 0 and k.kind in ("param", "grad"):
            out[(k.kind, k.name)] = row
    return out


def _unchanged(x: Context, side: str, prev: int, step: int) -> tuple[list, list]:
    """(parameters bitwise unchanged from prev to step although their gradient at prev is
    non-zero, parameters that moved) in this run."""
    still, moved = [], []
    settings = x.pair.run(side).optimizer_settings
    at_prev, at_step = _facts(x, side, prev), _facts(x, side, step)
    for s, _ in x.slots_of(step, ("param",)):
        held = settings.for_param(prev, s.name) if settings else None
        if held is not None and held[1].get("lr") == 0:
            continue  # a rate of 0 (a warmup's first step) moves nothing: recorded, not this
        before, after = at_prev.get(("param", s.name)), at_step.get(("param", s.name))
        grad = at_prev.get(("grad", s.name))
        if before is None or after is None or grad is None:
            continue
        if not grad["norm"] or grad["nan"] or grad["inf"]:
            continue  # no usable gradient: not moving is expected (or a skipped inf step)
        same = (before["fp_sum"], before["fp_pos"]) == (after["fp_sum"], after["fp_pos"])
        (still if same else moved).append(s)
    return still, moved


def _moves(x: Context, side: str, prev: int, step: int) -> bool:
    """Every parameter with a usable gradient moved at this update in this run."""
    still, moved = _unchanged(x, side, prev, step)
    return bool(moved) and not still


def rule_no_update(x: Context) -> Optional[Cause]:
    """A parameter diverges after an update that left every parameter of one run unchanged
    despite non-zero gradients, while the other run's parameters moved (and moved at the
    update before, when there is one: otherwise the other run's moving is the change)."""
    if x.slot.kind != "param":
        return None
    prev = x.prev(x.step)
    if prev is None or x.within(prev, ("param",)) is False:
        return None
    found = {side: _unchanged(x, side, prev, x.step) for side in ("a", "b")}
    for side, other in (("a", "b"), ("b", "a")):
        still, moved = found[side]
        o_still, o_moved = found[other]
        if not still or moved or not o_moved or o_still:
            continue
        before = x.prev(prev)
        if before is not None and not _moves(x, other, before, prev):
            continue  # the other run stood still before too: not standing still is the change
        S, T = side.upper(), other.upper()
        grads = x.within(prev, ("grad", "autograd_grad"))
        return Cause(
            "no_update",
            f"{S}'s optimizer step at step {prev} applied no gradient: its parameters stay "
            "bitwise unchanged",
            [
                f"in {S}, {x.names(still, SHOWN)} are bitwise unchanged from step {prev} to "
                f"{x.step} (fingerprints) although their recorded gradients at step {prev} are "
                "non-zero and finite",
                f"in {T}, {x.names(o_moved, SHOWN)} move at the same update",
                (
                    f"at step {prev} the compared parameters and gradients agree: the gradient "
                    f"{S} computed never reached its update"
                    if grads
                    else f"at step {prev} the compared parameters agree"
                ),
            ],
            "call optimizer.zero_grad() before backward() or after step(), never between "
            "backward() and step(); check that step() runs at every update (a condition, or "
            "a GradScaler skipping steps, also leaves the parameters unchanged)",
        )
    return None

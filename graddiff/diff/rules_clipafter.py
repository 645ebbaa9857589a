"""Clipping by global norm that the recorded gradients do not show: a rate that follows the norm.

Where gradients are recorded when the backward pass ends (a loop that updates the parameters
by hand, ``p.data.add_(p.grad, alpha=-lr)``, as word_language_model does), a
``clip_grad_norm_`` between backward and the update rescales them after they were recorded.
The parameters then move as if the learning rate were ``lr x max_norm / (norm + 1e-6)`` at
every update whose global gradient norm exceeds ``max_norm``, and ``lr`` at the others. So
the run's fitted rate (rules_schedule.rates) times its global gradient norm (the recorded
statistics) is one constant, ``lr x max_norm``, wherever the rate is below the other run's
constant rate, and the norm is at most ``max_norm`` wherever the rates agree. That relation,
on at least two clipped updates, names clipping in that run; a schedule cannot produce it
(its rates do not follow the gradient norm).
"""

from __future__ import annotations

from typing import Optional

from .context import Cause, Context, fmt
from .rules_clip import global_norm
from .rules_schedule import AFTER, rates
from .schedule import same

#: How equal ``rate x norm / lr`` must be across clipped updates (the rates are fitted to 1e-4).
SAME_MAX_NORM = 1e-3
#: Clipped updates needed to call the product a constant.
MIN_CLIPPED = 2


def clip_after_record(x: Context, prev: int) -> Optional[Cause]:
    """grad_clipping when one run's rate x global gradient norm is constant where it is
    below the other run's constant rate; else None."""
    la, lb = rates(x, "a", prev + AFTER), rates(x, "b", prev + AFTER)
    for side, mine, other in (("a", la, lb), ("b", lb, la)):
        found = _relation(x, side, mine, other)
        if found is not None:
            return _cause(x, side, *found)
    return None


def _relation(x: Context, side: str, mine: dict, other: dict):
    """(lr, max_norm, clipped updates [(t, rate, norm)], unclipped count) or None."""
    common = sorted(set(mine) & set(other))
    if len(common) < MIN_CLIPPED or not other:
        return None
    base = other[common[0]]
    if not all(same(other[t], base) for t in common):
        return None  # the other run's rate changes: a schedule, not this relation
    clipped, unclipped = [], 0
    for t in common:
        r = mine[t]
        norm = global_norm(x, side, t)
        if norm is None:
            return None
        if same(r, base):
            unclipped += 1
            continue
        if r > base:
            return None  # clipping only lowers the rate
        clipped.append((t, r, norm))
    if len(clipped) < MIN_CLIPPED:
        return None
    ms = [r * (n + 1e-6) / base for _, r, n in clipped]
    m = ms[0]
    if any(abs(v - m) > SAME_MAX_NORM * m for v in ms):
        return None
    for t in common:  # where the rates agree, the norm did not reach max_norm
        if same(mine[t], base) and (global_norm(x, side, t) or 0.0) > m * (1 + SAME_MAX_NORM):
            return None
    return base, m, clipped, unclipped


def _cause(x: Context, side: str, base: float, m: float, clipped: list, unclipped: int) -> Cause:
    me, other = side.upper(), "B" if side == "a" else "A"
    shown = "; ".join(f"step {t}: rate {fmt(r)}, norm {fmt(n)}" for t, r, n in clipped[:4]) + (
        f"; and {len(clipped) - 4} more" if len(clipped) > 4 else ""
    )
    return Cause(
        "grad_clipping",
        f"gradient clipping by global norm in {me} (max_norm {fmt(m)}), applied after the "
        "gradients were recorded: its updates follow lr x max_norm / norm",
        [
            f"{other}'s learning rate per update, fitted, is {fmt(base)} at every update; "
            f"{me}'s is lower at {len(clipped)} update(s) and equal at {unclipped}",
            f"at each lower one, {me}'s rate x its global gradient norm (recorded, before "
            f"clipping) / {fmt(base)} is the same {fmt(m)} (within {SAME_MAX_NORM:g}): "
            "clip_grad_norm_ scales the gradients by max_norm / norm (" + shown + ")",
            f"where the rates agree, {me}'s global gradient norm is at most {fmt(m)}: the clip "
            "does not engage (a schedule would not follow the gradient norm)",
        ],
        "the same torch.nn.utils.clip_grad_norm_(parameters, max_norm) call in both runs, or "
        "none in either",
    )

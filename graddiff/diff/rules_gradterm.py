"""Diagnosis rule: an L2 term ``wd * p`` added to the gradients in one run only (by hand,
``p.grad += wd * p``, or by a gradient hook), told from the gradients and parameters alone.

An optimizer's own ``weight_decay`` acts inside ``optimizer.step()``, after graddiff records the
gradients, so it shows in the update (rules_update, rules_settings), never in ``.grad``. A
term in the recorded gradients was added before the step. Evidence: the forward agrees where
compared; for every differing gradient, the difference B - A is the parameter (recorded at the
same step) times one coefficient ``wd``, the same for all of them. Context in, Cause or None
out (see context.py).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .context import FORWARD_KINDS as _FORWARD
from .context import GRAD_KINDS as _GRADS
from .context import RELATION_TOL, Cause, Context, fmt
from .exact import rel_diff

#: Coefficients fitted on different parameters must agree this closely to be one ``wd``.
SAME_WD = 1e-3


def l2_coefficient(d: np.ndarray, p: np.ndarray) -> Optional[float]:
    """``wd`` with ``d`` = ``wd * p`` to RELATION_TOL, else None."""
    d, p = d.astype(np.float64).ravel(), p.astype(np.float64).ravel()
    pp = float(p @ p)
    if pp <= 0 or not np.any(d) or not np.all(np.isfinite(d)):
        return None
    wd = float(d @ p) / pp
    return wd if wd != 0 and rel_diff(d, wd * p) < RELATION_TOL else None


def rule_l2_in_gradients(x: Context) -> Optional[Cause]:
    """Every differing gradient differs by one ``wd`` times its parameter: an L2 term added to
    the gradients in one run."""
    if x.slot.kind not in _GRADS or x.within(x.step, _FORWARD) is False:
        return None
    step = x.step
    differ = x.differing(step, _GRADS)
    if x.slot not in differ:
        return None
    wds = []
    for s in differ:
        ps = x.pair.slot("param", s.name)
        if ps is None or x.rel(ps, step) != 0:
            return None  # the parameter must be known and the same in both runs
        a, b, p = x.v("a", s, step), x.v("b", s, step), x.v("a", ps, step)
        if a is None or b is None or p is None or not (a.shape == b.shape == p.shape):
            return None
        wd = l2_coefficient(b.astype(np.float64) - a.astype(np.float64), p)
        if wd is None:
            return None
        wds.append(wd)
    wd = float(np.median(wds))
    if any(abs(w / wd - 1) > SAME_WD for w in wds):
        return None
    more, less = ("B", "A") if wd > 0 else ("A", "B")
    ev = [
        f"at step {step} {x.agree(_FORWARD)}; the gradients of {x.names(differ)} differ",
        f"for each of them {more}'s gradient minus {less}'s is {fmt(abs(wd))} x its parameter "
        f"(fitted per parameter: {', '.join(fmt(abs(w)) for w in wds[:4])}"
        + (" ..." if len(wds) > 4 else "")
        + "): an L2 term wd * p in the recorded gradients",
        "an optimizer's weight_decay acts inside optimizer.step(), after the gradients are "
        "recorded, so this term was added before the step (p.grad += wd * p, or a gradient hook)"
        + (
            "; or an L2 penalty wd/2 * ||p||^2 in the loss (the losses were not compared)"
            if "loss" not in x.compared
            else ""
        ),
    ]
    return Cause(
        "weight_decay",
        f"{more} adds an L2 term {fmt(abs(wd))} x p to its gradients before the step (weight "
        f"decay by hand or in a hook), {less} does not (or a smaller one)",
        ev,
        "add the same decay in both runs, preferably through the optimizer's weight_decay (and "
        "the same parameter groups) rather than by hand",
    )

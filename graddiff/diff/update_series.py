"""One parameter's update as the fits read it: (delta, g, p, u) of one run between two steps.

Shared by the update-rule rules (rules_update.py) and the schedule rule (rules_schedule.py).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .context import Context


def series(x: Context, s, step: int, prev: int, pprev: Optional[int], side: str):
    """(delta, g, p, u) of one parameter in one run, float64 and flat; None where missing."""
    p1, p0 = x.v(side, s, step), x.v(side, s, prev)
    if p1 is None or p0 is None or p1.shape != p0.shape or p0.dtype.kind != "f":
        return None
    p0 = p0.astype(np.float64).ravel()
    delta = p1.astype(np.float64).ravel() - p0
    g = None
    for kind in ("grad", "autograd_grad"):
        gs = x.pair.slot(kind, s.name)
        gv = x.v(side, gs, prev) if gs is not None else None
        if gv is not None and gv.size == p0.size:
            g = gv.astype(np.float64).ravel()
            break
    u = None
    if pprev is not None:
        q = x.v(side, s, pprev)
        if q is not None and q.size == p0.size:
            u = p0 - q.astype(np.float64).ravel()
            if not np.any(u):
                u = None
    return delta, g, p0, u

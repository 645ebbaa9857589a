"""Read a learning-rate schedule difference off two runs' per-update learning rates.

Input: each run's learning rate per update (step t -> t + 1), as fitted from the recorded
parameters and gradients (rules_update.py). Output: the relation between the two series that
explains every update where both are known, or None:

- :func:`find_shift`: from the update where they part on, one run's rates repeat the other's
  from ``k`` updates earlier. A resumed run whose scheduler state was not restored restarts
  its schedule: ``k`` is then the resume step (its schedule began again at 0).
- :func:`find_stride`: one run's schedule advances once every ``E`` updates, the other's at
  every update (``lr_slow(t) = lr_fast(t // E)``): stepped per epoch of ``E`` steps vs per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

#: Two fitted rates are the same setting when they agree to this relative precision (an SGD fit
#: recovers the rate to ~1e-6 in float32; schedules step by far more than this).
SAME_RATE = 1e-4
#: A relation must be checked on at least this many updates beyond the parting one.
MIN_CHECKS = 2


def same(a: float, b: float) -> bool:
    return abs(a - b) <= SAME_RATE * max(abs(a), abs(b))


@dataclass
class Shift:
    """``lr_late(t) = lr_early(t - k)`` for every update ``t >= start``, for each ``k`` in ks."""

    late: str  # "A" or "B": the run whose schedule was set back
    start: int  # the first update where the runs' rates part
    ks: list  # every offset that explains the series (ascending)
    checked: int  # updates on which the smallest offset was checked


@dataclass
class Stride:
    """``lr_slow(t) = lr_fast(t // every)`` for every update ``t`` known in both."""

    slow: str
    every: int
    checked: int


def parting(la: dict, lb: dict) -> Optional[int]:
    """The first update whose rates differ (both known), if every earlier one agrees."""
    for t in sorted(set(la) & set(lb)):
        if not same(la[t], lb[t]):
            return t
    return None


def find_shift(la: dict, lb: dict) -> Optional[Shift]:
    """One run's rates, from the parting update on, are the other's ``k`` updates earlier."""
    start = parting(la, lb)
    if start is None:
        return None
    for late, early, name in ((lb, la, "B"), (la, lb, "A")):
        ks = []
        for k in range(1, start + 1):
            checks = [t for t in late if t >= start and t - k in early]
            if len(checks) > MIN_CHECKS and all(same(late[t], early[t - k]) for t in checks):
                ks.append((k, len(checks)))
        if ks:
            return Shift(name, start, [k for k, _ in ks], ks[0][1])
    return None


def find_stride(la: dict, lb: dict) -> Optional[Stride]:
    """One run's schedule advances every ``E`` updates where the other's advances every one.

    At least one change of the slow run must be seen (at an update ``t >= E``), else a run
    whose rate never changes would match any ``E``."""
    for slow, fast, name in ((la, lb, "A"), (lb, la, "B")):
        ts = sorted(slow)
        if 0 not in fast:
            continue
        for every in range(2, (ts[-1] if ts else 0) + 1):
            checks = [t for t in ts if t // every in fast]
            if len(checks) <= MIN_CHECKS or not all(
                same(slow[t], fast[t // every]) for t in checks
            ):
                continue
            changes = [t for t in checks if t >= every and not same(slow[t], fast[0])]
            if changes and any(not same(fast[t], fast[0]) for t in fast if 0 < t < every):
                return Stride(name, every, len(checks))
    return None

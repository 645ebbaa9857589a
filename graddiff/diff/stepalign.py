"""Step alignment of two runs: which step of B compares with which step of A.

A run resumed from a checkpoint of step k numbers its steps from 0 again; ``--offset k`` (or
``--steps-a k: --steps-b 0:``) compares B's step s with A's step s + k. ``suggest_offset``
finds k when B's first parameters equal, bit for bit, A's parameters at the start of step k.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import GraddiffError
from ..kinds import Kind
from ..reader import Run

Window = Optional[tuple[Optional[int], Optional[int]]]


def resolve_offset(
    a: Run, b: Run, window_a: Window, window_b: Window, offset: Optional[int]
) -> int:
    """The step offset from ``--offset`` or from the first steps of ``--steps-a``/``--steps-b``."""
    if offset is not None:
        if window_a is not None or window_b is not None:
            raise GraddiffError("--offset: give either --offset or --steps-a/--steps-b, not both")
        return int(offset)
    if window_a is None and window_b is None:
        return 0
    lo_a = window_a[0] if window_a is not None and window_a[0] is not None else int(a.steps[0])
    lo_b = window_b[0] if window_b is not None and window_b[0] is not None else int(b.steps[0])
    return int(lo_a) - int(lo_b)


def _param_prints(run: Run, rows: np.ndarray, rename=None) -> dict[str, tuple[int, int]]:
    out = {}
    for row in rows:
        key = run.record_key(int(row["record"]))
        if key.kind != Kind.PARAM.value:
            continue
        name = rename(key.name) if rename is not None else key.name
        if name is not None:
            out[name] = (int(row["fp_sum"]), int(row["fp_pos"]))
    return out


def suggest_offset(a: Run, b: Run, rename=None) -> Optional[tuple[int, int, int]]:
    """(k, equal, common) when B's first-step parameters all equal A's at step k, else None.

    ``rename`` maps B's parameter names to A's (None drops one, e.g. a transformed tensor).
    Bitwise equality: a checkpoint restores parameters exactly.
    """
    if not len(a.steps) or not len(b.steps):
        return None
    first = int(b.steps[0])
    mine = _param_prints(b, b.entries(first, first), rename)
    if not mine:
        return None
    best: Optional[tuple[int, int, int]] = None
    for block in a.iter_step_blocks(64):
        if not len(block):
            continue
        for s in np.unique(block["step"]):
            theirs = _param_prints(a, block[block["step"] == s])
            common = [n for n in mine if n in theirs]
            if not common:
                continue
            equal = sum(mine[n] == theirs[n] for n in common)
            if equal == len(common) and (best is None or equal > best[1]):
                best = (int(s), equal, len(common))
                return best  # the first step where they all agree
    return best


def offset_note(a: Run, b: Run, rename=None) -> Optional[str]:
    """A suggestion for the report when B's start matches a later step of A."""
    hit = suggest_offset(a, b, rename)
    if hit is None:
        return None
    k, equal, common = hit
    first = int(b.steps[0])
    if k == first:
        return None
    return (
        f"B's step {first} parameters equal A's at step {k} ({equal} of {common} parameters, "
        f"bitwise): B looks resumed from A's step {k}; compare with --offset {k - first} "
        f"(or --steps-a {k}: --steps-b {first}:)"
    )

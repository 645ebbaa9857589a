"""Relative differences of many single-tensor cells of one step at once: the walk's fast path.

When two runs differ by rounding in every step, the walk must compare every differing tensor
of every step up to the divergence. Per tensor, Python overhead dominates; this module joins
the stored bytes of all such cells of a step and reduces them with numpy in one pass. The
bytes are not fingerprint-checked here: a cell this pass reports is re-read (and verified) by
the exact path before the report shows it. Cells it cannot handle (joined or summed calls,
NaN/Inf, integer or bfloat16 data) are left to the exact path.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .compare_records import DIFF, Cells
from .pair import RunPair

_FLOATS = {"float16": "<f2", "float32": "<f4", "float64": "<f8"}


def eligible(c: Cells, names: list[str]) -> np.ndarray:
    """Cells the batch pass can take: one stored float tensor per side, same dtype and size."""
    ok_dtype = np.array([n in _FLOATS for n in names] + [False], bool)  # index -1 -> False
    return (
        (c.code == DIFF)
        & (c.a.count == 1)
        & (c.b.count == 1)
        & (c.a.dtype == c.b.dtype)
        & ok_dtype[c.a.dtype]
        & (c.a.numel == c.b.numel)
        & (c.a.numel > 0)
        & (c.a.offset >= 0)
        & (c.b.offset >= 0)
    )


def batch_rel(
    pair: RunPair, c: Cells, idx: np.ndarray, rows_of: dict[str, Callable[[int], np.ndarray]]
) -> dict[int, tuple[bool, float]]:
    """cell index -> (bitwise equal, relative difference with the cell's noise floor)."""
    out: dict[int, tuple[bool, float]] = {}
    names = pair.dtypes.names
    for step in np.unique(c.step[idx]):
        cells = idx[c.step[idx] == step]
        for side in ("a", "b"):
            pair.prefetch(side, rows_of[side](int(step)))
        keep, seg_a, seg_b, same = [], [], [], []
        for i in cells:
            ra = pair.raw("a", int(step), int(c.a.offset[i]), int(c.a.nbytes[i]))
            rb = pair.raw("b", int(step), int(c.b.offset[i]), int(c.b.nbytes[i]))
            if ra is None or rb is None or ra.size != rb.size:
                continue
            dt = _FLOATS[names[int(c.a.dtype[i])]]
            keep.append(int(i))
            same.append(ra.tobytes() == rb.tobytes())
            seg_a.append(np.frombuffer(ra.tobytes(), dt))
            seg_b.append(np.frombuffer(rb.tobytes(), dt))
        if not keep:
            continue
        starts = np.cumsum([0] + [len(s) for s in seg_a[:-1]])
        a = np.concatenate(seg_a).astype(np.float64)
        b = np.concatenate(seg_b).astype(np.float64)
        finite = np.logical_and.reduceat(np.isfinite(a) & np.isfinite(b), starts)
        with np.errstate(over="ignore", invalid="ignore"):
            num = np.sqrt(np.add.reduceat((a - b) ** 2, starts))
            den = np.sqrt(
                np.maximum(np.add.reduceat(a * a, starts), np.add.reduceat(b * b, starts))
            )
        floor = c.floor[keep]
        den = np.maximum(den, floor)
        for j, i in enumerate(keep):
            if not finite[j]:
                continue  # NaN/Inf: the exact path compares their places
            rel = float(num[j] / den[j]) if den[j] > 0 else (0.0 if num[j] == 0 else float("inf"))
            out[i] = (bool(same[j]), 0.0 if same[j] else rel)
    return out

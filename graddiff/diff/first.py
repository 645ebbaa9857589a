"""Walk the steps in order to find the first bitwise difference and the first divergence.

Third stage of the differ: cells (per block of steps, vectorized) --> this walk --> diagnosis.
Within a step the order is causal (param, input, activation in call order, loss, grad_output in
firing order, grad, autograd_grad, buffer). Full values are read only for cells whose
fingerprints differ, from the first bitwise difference until the first divergence (and a few
steps after it, for the growth curve); elsewhere the statistics' lower bound is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..kinds import ALL_KINDS
from .batch import batch_rel, eligible
from .compare_records import (
    CODE_NAMES,
    DEFINITE,
    DIFF,
    EQUAL,
    NONFINITE,
    SHAPE,
    STATS,
    Cells,
    classify,
    extra_outputs,
    one_sided_stateless,
    output_slots,
)
from .exact import ValueDiff
from .pair import RunPair

#: Steps per block of the vectorized pass (memory is proportional to this, not to the run).
BLOCK_STEPS = 128
#: After the first divergence, exact differences are still computed for this many steps.
EXACT_STEPS_AFTER = 8
#: The growth curve keeps at most this many steps (halved when full; pinned steps stay).
GROWTH_POINTS = 256


@dataclass
class Hit:
    """One cell the walk stopped at: a record's difference at a step."""

    step: int
    slot: int
    code: int
    rel: float  # exact where values were compared, else the stats lower bound
    basis: str  # "values", "stats" or "structure"
    value_diff: Optional[ValueDiff] = None
    cell: int = -1  # index into the block's cells (internal)
    facts: dict = field(default_factory=dict)  # shapes, dtypes, NaN/Inf counts, presence

    @property
    def status(self) -> str:
        return CODE_NAMES[self.code]


@dataclass
class WalkResult:
    first: Optional[Hit]
    first_bitwise: Optional[Hit]
    growth: dict[str, list[tuple[int, float]]]
    steps_differing: int
    max_rel: float
    changes: dict[tuple[str, int], tuple[int, dict]] = field(default_factory=dict)
    #: slot -> steps where its summed or joined calls were stats-only and agreed within
    #: rounding: not comparable bitwise there, and not counted as a difference
    unjudged: dict[int, int] = field(default_factory=dict)
    #: slot -> steps where its gradient was None in one run and all zeros in the other
    #: (compared as equal: compare_records.none_vs_zero)
    zero_none: dict[int, int] = field(default_factory=dict)
    #: slot -> steps where this module output was recorded in one run only while another
    #: output of the module was in both (compare_records.extra_outputs): not compared
    extra_outputs: dict[int, int] = field(default_factory=dict)
    #: slot -> steps where a stateless module's output was recorded in one run only
    #: (compare_records.one_sided_stateless): not compared
    stateless_one_sided: dict[int, int] = field(default_factory=dict)
    #: the first record beyond its rounding bound that tipped kinks explain (kinks.py):
    #: {"step", "slot", "rel", "tolerance", **allowance}; None when none
    kinks: Optional[dict] = None
    #: the first parameter beyond its bound that gradient elements rounding dominated explain
    #: (pair.residue_explains): {"step", "slot", "rel", "tolerance", ...}; None when none
    residue: Optional[dict] = None


def _facts(c: Cells, i: int, pair: RunPair) -> dict:
    names = pair.dtypes.names

    def side(s):
        if not s.present[i]:
            return None
        nd = int(s.ndim[i])
        return {
            "shape": [int(x) for x in s.shape[i][:nd]],
            "dtype": names[int(s.dtype[i])] if s.dtype[i] >= 0 else "mixed",
            "nan": int(s.nan[i]),
            "inf": int(s.inf[i]),
            # a sum of several calls: its norm is only bracketed by theirs (not stored)
            "norm": None if s.merged_sum[i] else float(s.norm_hi[i]),
            "values_stored": bool(s.values[i]),
            "training": bool(s.training[i]),
        }

    return {"a": side(c.a), "b": side(c.b)}


class _Growth:
    """Per-step, per-kind maximum relative difference, bounded in memory."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.rows: list[np.ndarray] = []
        self.pinned: set[int] = set()

    def add(self, step: int, row: np.ndarray) -> None:
        self.steps.append(step)
        self.rows.append(row)
        if len(self.steps) > 2 * GROWTH_POINTS:
            keep = [i for i in range(len(self.steps)) if i % 2 == 0 or self.steps[i] in self.pinned]
            keep.append(len(self.steps) - 1)
            keep = sorted(set(keep))
            self.steps = [self.steps[i] for i in keep]
            self.rows = [self.rows[i] for i in keep]

    def result(self) -> dict[str, list[tuple[int, float]]]:
        if not self.steps:
            return {}
        m = np.vstack(self.rows)
        out = {}
        for j, kind in enumerate(ALL_KINDS):
            col = m[:, j]
            if np.all(np.isnan(col)):
                continue
            out[kind] = [(s, float(v)) for s, v in zip(self.steps, col) if not np.isnan(v)]
        return out


def _by_step(rows: np.ndarray):
    """rows (sorted by step) -> a function giving the rows of one step, without a scan."""
    steps = rows["step"]

    def get(step: int) -> np.ndarray:
        lo, hi = np.searchsorted(steps, step, "left"), np.searchsorted(steps, step, "right")
        return rows[lo:hi]

    return get


def walk(pair: RunPair, rtol: float, exact: bool) -> WalkResult:
    """Find the first bitwise difference and the first divergence beyond the tolerance (or any,
    exact): ``rtol``, or per slot ``pair.tol`` when set (precision-aware, precision.py)."""
    tol = pair.tol if pair.tol is not None else np.full(max(len(pair.al.slots), 1), rtol)
    first: Optional[Hit] = None
    first_bitwise: Optional[Hit] = None
    growth = _Growth()
    steps_differing = 0
    max_rel = 0.0
    changes: dict[tuple[str, int], tuple[int, dict]] = {}
    unjudged: dict[int, int] = {}
    zero_none: dict[int, int] = {}
    one_sided: dict[int, int] = {}
    stateless: dict[int, int] = {}
    kinks: Optional[dict] = None
    residue: Optional[dict] = None
    outs = output_slots(pair.al)
    kind_col = {k: j for j, k in enumerate(ALL_KINDS)}
    slot_col = np.array([kind_col.get(s.kind, 0) for s in pair.al.slots] or [0], np.int64)
    steps = pair.steps
    for lo in range(0, len(steps), BLOCK_STEPS):
        block = steps[lo : lo + BLOCK_STEPS]
        ea = pair.a.entries(int(block[0]), int(block[-1]))
        eb = pair.b.entries(int(block[0]), int(block[-1]))
        c = classify(pair.a, pair.b, pair.al, pair.dtypes, block, ea, eb)
        if not len(c):
            continue  # nothing of the compared kinds was recorded in these steps
        best = c.rel_lb.copy()
        different = c.code != EQUAL
        different[c.code == STATS] &= c.proven[c.code == STATS] | (c.rel_lb[c.code == STATS] > 0)
        # summed/joined stats-only calls within rounding: neither equal nor a difference
        unsure = (c.code == STATS) & c.loose & ~different
        for slot, n in zip(*np.unique(c.slot[unsure], return_counts=True)):
            unjudged[int(slot)] = unjudged.get(int(slot), 0) + int(n)
        extra = extra_outputs(outs, c)
        free = one_sided_stateless(outs, c) & ~extra
        different &= ~(extra | free)
        for slot, n in zip(*np.unique(c.slot[extra], return_counts=True)):
            one_sided[int(slot)] = one_sided.get(int(slot), 0) + int(n)
        for slot, n in zip(*np.unique(c.slot[free], return_counts=True)):
            stateless[int(slot)] = stateless.get(int(slot), 0) + int(n)
        zn = (c.code == EQUAL) & (c.a.present != c.b.present)
        for slot, n in zip(*np.unique(c.slot[zn], return_counts=True)):
            zero_none[int(slot)] = zero_none.get(int(slot), 0) + int(n)
        need_exact = first is None or int(block[0]) <= first.step + EXACT_STEPS_AFTER
        by_step_a, by_step_b = _by_step(ea), _by_step(eb)
        fast: dict[int, tuple[bool, float]] = {}
        if need_exact:
            window = c.step <= (
                first.step + EXACT_STEPS_AFTER if first is not None else c.step.max()
            )
            cand = np.flatnonzero(different & window & eligible(c, pair.dtypes.names))
            fast = batch_rel(pair, c, cand, {"a": by_step_a, "b": by_step_b})
        for i in np.flatnonzero(different) if need_exact else ():
            step, slot = int(c.step[i]), int(c.slot[i])
            if first is not None and step > first.step + EXACT_STEPS_AFTER:
                break
            code, vd, basis = int(c.code[i]), None, "stats"
            if code == DIFF:
                ra, rb = by_step_a(step), by_step_b(step)
                if int(i) in fast:
                    same, rel = fast[int(i)]
                    vd = ValueDiff(same, rel, np.nan, None, np.nan, None, None, False)
                else:
                    vd = pair.diff(
                        pair.al.slots[slot], step, ra, rb, float(c.floor[i]), detail=False
                    )
                if vd is not None:
                    basis = "values"
                    if vd.bitwise_equal:
                        different[i] = False
                        best[i] = 0.0
                        continue
                    best[i] = vd.rel_diff
            elif code in DEFINITE and code != NONFINITE:
                basis = "structure"
            if first is not None:
                continue
            nonfinite = code == NONFINITE or (vd is not None and vd.nonfinite_mismatch)
            limit = (
                pair.tolerance(slot, step)
                if pair.noise is not None or pair.rounding is not None
                else tol[slot]
            )
            diverged = exact or code in DEFINITE or nonfinite or best[i] > limit
            if diverged and not exact and code == DIFF and not nonfinite and pair.kinks:
                k = pair.kinks.allowance(pair.al.slots[slot], step, pair)
                if k is not None and best[i] <= limit + k["allowed"]:
                    diverged = False
                    if kinks is None:
                        kinks = {"step": step, "slot": slot, "rel": float(best[i]),
                                 "tolerance": float(limit), **k}  # fmt: skip
            if diverged and not exact and code == DIFF and not nonfinite and pair.kinks:
                res = pair.residue_explains(pair.al.slots[slot], step, limit)
                if res is not None:
                    diverged = False
                    if residue is None:
                        residue = {"step": step, "slot": slot, "rel": float(best[i]),
                                   "tolerance": float(limit), **res}  # fmt: skip
            update = None
            if not diverged and vd is not None and pair.rounding is not None:
                names = pair.dtypes.names
                update = pair.update_beyond(
                    pair.al.slots[slot],
                    step,
                    names[int(c.a.dtype[i])] if c.a.dtype[i] >= 0 else "",
                    names[int(c.b.dtype[i])] if c.b.dtype[i] >= 0 else "",
                )
                diverged = update is not None
            if first_bitwise is not None and not diverged:
                continue
            if vd is not None:  # element detail, only for the cells the report shows
                vd = pair.diff(pair.al.slots[slot], step, ra, rb, float(c.floor[i]))
            hit = Hit(step, slot, code, float(best[i]), basis, vd, int(i), _facts(c, i, pair))
            if update is not None:
                hit.facts["update"] = update
            if basis == "structure":
                hit.rel = float("nan")
            if nonfinite:
                hit.code = NONFINITE
            if first_bitwise is None:
                first_bitwise = hit
            if diverged:
                first = hit
        # growth, vectorized: steps from the first bitwise difference on
        if first_bitwise is not None:
            comparable = np.isin(c.code, (EQUAL, DIFF, STATS)) & ~unsure
            val = np.where(different & comparable, best, 0.0)
            val = np.where(comparable, val, np.nan)
            for s in np.unique(c.step[c.step >= first_bitwise.step]):
                m = c.step == s
                row = np.full(len(ALL_KINDS), np.nan)
                cols = slot_col[c.slot[m]]
                v = val[m]
                ok = ~np.isnan(v)
                np.fmax.at(row, cols[ok], v[ok])
                growth.add(int(s), row)
            if first is not None:
                growth.pinned.update({first_bitwise.step, first.step})
        for what, mask in (("shape", c.code == SHAPE), ("dtype", c.dtype_diff)):
            slots, idx = np.unique(c.slot[mask], return_index=True)
            for slot, i in zip(slots, np.flatnonzero(mask)[idx]):
                changes.setdefault((what, int(slot)), (int(c.step[i]), _facts(c, int(i), pair)))
        steps_differing += len(np.unique(c.step[different]))
        if different.any():
            max_rel = max(max_rel, float(np.nanmax(np.where(different, best, 0.0))))
    return WalkResult(
        first,
        first_bitwise,
        growth.result(),
        steps_differing,
        max_rel,
        changes,
        unjudged,
        zero_none,
        one_sided,
        stateless,
        kinks,
        residue,
    )

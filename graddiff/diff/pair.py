"""Two open runs plus their alignment: cells, statistics and full values of any slot on demand.

The walk (first.py) streams over blocks of steps; the diagnosis rules (diagnose.py) look at a
few steps around the divergence. Both ask this object, which caches the last few steps read.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Optional

import numpy as np

from ..errors import ValuesNotStoredError
from ..modclass import merge
from ..reader import Run
from .align import Alignment, Slot
from .compare_records import Cells, DtypeTable, classify
from .exact import ValueDiff, combine, compare_values, quick_diff
from .precision import UNIT_ROUNDOFF, steps_factor, update_difference
from .stepvalues import StepValues

_CACHE_STEPS = 8


class RunPair:
    """Random access to two aligned runs, step by step."""

    def __init__(self, a: Run, b: Run, alignment: Alignment, steps: np.ndarray) -> None:
        self.a, self.b, self.al = a, b, alignment
        self.steps = steps
        self.dtypes = DtypeTable(a, b)
        #: module name -> class name of both runs (graddiff.modclass.merge; old traces: empty)
        self.classes = merge(
            getattr(a, "module_classes", {}) or {}, getattr(b, "module_classes", {}) or {}
        )
        self._rows: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._cells: OrderedDict[int, Cells] = OrderedDict()
        self._by_label = {(s.kind, s.name, max(s.call, 0)): s for s in alignment.slots}
        self._sv = {"a": StepValues(a), "b": StepValues(b)}
        self._index: OrderedDict[tuple[str, int], dict[int, np.ndarray]] = OrderedDict()
        #: per-slot tolerance (precision-aware), set by compare; None: the flat rtol
        self.tol: Optional[np.ndarray] = None
        #: per-slot rounding bound of one step in a reduced precision (precision.py), which
        #: grows with the steps since ``first_step``; None: the tolerance does not grow
        self.rounding: Optional[np.ndarray] = None
        self.first_step = int(steps[0]) if len(steps) else 0
        self.precision = None  # precision.Precision, set by compare
        #: per (slot, step) tolerance from a perturbed twin (noiseref.py), set by --noise
        self.noise = None
        #: tipped kinks (kinks.Kinks): what they allow a backward record; set by compare for a
        #: reduced-precision pair judged by its bound
        self.kinks = None
        #: parameter name -> (last step read, elements whose gradient rounding dominated)
        self._taint: dict[str, tuple] = {}

    def tolerance(self, slot: int, step: int) -> float:
        """The tolerance of a slot at a step: the twin's (--noise), else per slot, else rtol."""
        if self.noise is not None:
            return float(self.noise(slot, step))
        if self.tol is None:
            return 0.0
        if self.rounding is None:
            return float(self.tol[slot])
        grown = float(self.rounding[slot]) * steps_factor(step, self.first_step)
        return max(float(self.tol[slot]), grown)

    def update_beyond(self, slot: Slot, step: int, dtype_a: str, dtype_b: str) -> Optional[dict]:
        """A parameter whose update into ``step`` differs beyond the tolerance of the gradient
        it was computed from (precision.update_difference): {"rel", "tolerance", "from_step"};
        None when within, not a reduced-precision pair judged by its bound, or not comparable
        (no full values at ``step`` and ``step - 1``)."""
        if slot.kind != "param" or self.rounding is None or self.noise is not None:
            return None
        prev = int(step) - 1
        if not self.has_step(prev) or not self._grad_above_floor(slot.name, prev):
            return None
        vals = [self.values(side, slot, s) for side in ("a", "b") for s in (prev, step)]
        if any(v is None for v in vals) or len({v.shape for v in vals}) != 1:
            return None
        mask = self.tainted(slot.name, step, vals[0].size)
        if mask is not None and mask.any():  # Adam's full-sized updates of rounding residue
            if mask.all():
                return None
            vals = [v.ravel()[~mask] for v in vals]
        got = update_difference(
            *vals,
            self.tolerance(slot.index, prev),
            UNIT_ROUNDOFF.get(dtype_a, 0.0),
            UNIT_ROUNDOFF.get(dtype_b, 0.0),
        )
        if got is None or not got[0] > got[1]:
            return None
        return {"rel": got[0], "tolerance": got[1], "from_step": prev}

    def residue_explains(self, slot: Slot, step: int, limit: float) -> Optional[dict]:
        """A parameter beyond ``limit`` whose difference, apart from the elements whose
        gradient rounding dominated at some earlier compared step (the runs' elements differ
        by at least the smaller of the two: a sign or size that rounding decided, such as
        residue that is zero in exact arithmetic), is within it: Adam scales such an element
        to a full-sized update of either sign. {"rel_rest", "elements", "size", "share"};
        None otherwise (or not a reduced-precision pair judged by its bound)."""
        if self.rounding is None or self.noise is not None:
            return None
        if slot.kind == "activation":
            return self._bias_residue_explains(slot, step, limit)
        if slot.kind == "buffer" and slot.name.endswith(".running_mean"):
            return self._running_mean_follows(slot, step, limit)
        if slot.kind == "buffer_start":
            return self._carried(slot, step)
        if slot.kind != "param":
            return None
        pa, pb = self.values("a", slot, step), self.values("b", slot, step)
        if pa is None or pb is None or pa.shape != pb.shape:
            return None
        mask = self.tainted(slot.name, step, pa.size)
        if mask is None or not mask.any():
            return None
        d = pa.astype(np.float64).ravel() - pb.astype(np.float64).ravel()
        scale = max(float(np.linalg.norm(pa.astype(np.float64))), float(np.linalg.norm(pb)))
        if not scale:
            return None
        # every element rounding-dominated (a bias before BatchNorm): nothing else to judge
        rest = float(np.linalg.norm(d[~mask])) / scale if not mask.all() else 0.0
        if rest > limit:
            return None
        share = float(np.linalg.norm(d[mask])) / scale
        return {
            "rel_rest": rest,
            "elements": int(mask.sum()),
            "size": int(mask.size),
            "share": share,
        }

    def _bias_residue_explains(self, slot: Slot, step: int, limit: float) -> Optional[dict]:
        """A module output beyond ``limit`` that is within it once the shift its own bias
        adds is taken out, for the bias elements whose gradient rounding dominated (see
        :meth:`residue_explains`): a bias adds its value to every output element of its
        channel (dim 1 of a convolution's output, the last dim of a Linear's), so the residue
        Adam turned into full-sized bias updates shows in the output as that shift. Same dict
        as for a parameter, with ``"bias"``: the bias's record name."""
        module, _, path = slot.name.partition(":")
        bias = self.slot("param", f"{module}.bias")
        if path not in ("", "0") or bias is None:
            return None
        oa, ob = self.values("a", slot, step), self.values("b", slot, step)
        ba, bb = self.values("a", bias, step), self.values("b", bias, step)
        if any(v is None for v in (oa, ob, ba, bb)) or oa.shape != ob.shape or ba.shape != bb.shape:
            return None
        if ba.ndim != 1 or oa.ndim < 1:
            return None
        mask = self.tainted(bias.name, step, ba.size)
        if mask is None or not mask.any():
            return None
        c = ba.size
        conv = "Conv" in (self.classes.get(module) or "")
        if oa.ndim >= 3 and oa.shape[1] == c and (conv or oa.shape[-1] != c):
            shape = (1, c) + (1,) * (oa.ndim - 2)
        elif oa.shape[-1] == c:
            shape = (1,) * (oa.ndim - 1) + (c,)
        else:
            return None
        shift = np.where(mask, ba.astype(np.float64) - bb.astype(np.float64), 0.0)
        d = oa.astype(np.float64) - ob.astype(np.float64) - shift.reshape(shape)
        scale = max(float(np.linalg.norm(oa.astype(np.float64))), float(np.linalg.norm(ob)))
        if not scale:
            return None
        rest = float(np.linalg.norm(d)) / scale
        if rest > limit:
            return None
        whole = float(np.linalg.norm(oa.astype(np.float64) - ob.astype(np.float64))) / scale
        return {
            "rel_rest": rest,
            "elements": int(mask.sum()),
            "size": int(mask.size),
            "share": whole,
            "bias": bias.name,
        }

    def _running_mean_follows(self, slot: Slot, step: int, limit: float) -> Optional[dict]:
        """A BatchNorm ``running_mean`` beyond ``limit`` that is the running average of its
        input's batch means, as BatchNorm computes it, ``(1 - m) * start + m * mean(input)``
        per channel, within ``limit`` in both runs' difference: it adds nothing of its own to
        its input's difference, which the walk judged (within) before it. The input is the
        module output recorded just before the BatchNorm's own output (one call each), ``m``
        its recorded momentum. ``{"rel_rest", "input", "momentum"}``; None otherwise."""
        module = slot.name.rsplit(".", 1)[0]
        text = (getattr(self.a, "module_settings", {}) or {}).get(module, "")
        found = re.search(r"momentum=([0-9.eE+-]+)", text)
        if found is None or text != (getattr(self.b, "module_settings", {}) or {}).get(module):
            return None
        m = float(found.group(1))
        inp = self.activation_before("a", step, module)
        start = self.slot("buffer_start", slot.name)
        if inp is None or start is None or self.slot("activation", module, 1) is not None:
            return None
        vals = {}
        for side in ("a", "b"):
            x, s0, s1 = (self.values(side, k, step) for k in (inp, start, slot))
            if x is None or s0 is None or s1 is None or x.ndim < 2 or x.shape[1] != s1.size:
                return None
            mean = x.astype(np.float64).mean(axis=(0,) + tuple(range(2, x.ndim)))
            vals[side] = (s1.astype(np.float64), (1 - m) * s0.astype(np.float64) + m * mean)
        (ra, pa), (rb, pb) = vals["a"], vals["b"]
        scale = max(float(np.linalg.norm(ra)), float(np.linalg.norm(rb)))
        if not scale:
            return None
        rest = float(np.linalg.norm((ra - rb) - (pa - pb))) / scale
        if rest > limit:
            return None
        return {"rel_rest": rest, "input": inp.label, "momentum": m}

    def _carried(self, slot: Slot, step: int) -> Optional[dict]:
        """A buffer at the step's start that is, in both runs, bitwise the same buffer at the
        end of the previous compared step: its difference was judged there (the walk would
        have stopped at it), so it is not a new one. ``{"rel_rest": 0, "carried_from"}``."""
        earlier = self.steps[self.steps < step]
        end = self.slot("buffer", slot.name)
        if not len(earlier) or end is None:
            return None
        prev = int(earlier[-1])
        for side in ("a", "b"):
            now, before = self.values(side, slot, step), self.values(side, end, prev)
            if now is None or before is None or now.shape != before.shape:
                return None
            if now.tobytes() != before.tobytes():
                return None
        return {"rel_rest": 0.0, "carried_from": prev}

    def keys_in_order(self, side: str, step: int) -> list:
        """The record keys of one run's step in capture order (``seq``)."""
        rows = self.rows(side, step)
        run = self.run(side)
        return [
            run.record_key(int(r)) for r in rows["record"][np.argsort(rows["seq"], kind="stable")]
        ]

    def activation_before(self, side: str, step: int, name: str, call: int = 0) -> Optional[Slot]:
        """The activation slot recorded just before ``name``'s output (call ``call``) in this
        run's step: the module's input, in a sequential model. None when it comes first or is
        not recorded."""
        prev = None
        for k in self.keys_in_order(side, step):
            if k.kind != "activation":
                continue
            if (k.name, k.call) == (name, call):
                return None if prev is None else self.slot("activation", prev.name, prev.call)
            prev = k
        return None

    def tainted(self, name: str, step: int, size: int) -> Optional[np.ndarray]:
        """Elements of parameter ``name`` whose gradient, at some compared step before
        ``step``, the two runs do not agree on even in size or sign (``0 < |a - b| >=
        min(|a|, |b|)``); None without a compared gradient. Kept per parameter, read on."""
        g = self.slot("grad", name) or self.slot("autograd_grad", name)
        if g is None:
            return None
        last, mask = self._taint.get(name, (None, np.zeros(size, bool)))
        if mask.size != size:
            return None
        for k in self.steps[self.steps < step].tolist():
            if last is not None and k <= last:
                continue
            ga, gb = self.values("a", g, k), self.values("b", g, k)
            if ga is not None and gb is not None and ga.size == size == gb.size:
                ga = ga.astype(np.float64).ravel()
                gb = gb.astype(np.float64).ravel()
                diff = np.abs(ga - gb)
                mask = mask | ((diff > 0) & (diff >= np.minimum(np.abs(ga), np.abs(gb))))
            last = k
        self._taint[name] = (last, mask)
        return mask

    def _grad_above_floor(self, name: str, step: int) -> bool:
        """The parameter's gradient at ``step`` is compared and, in both runs, above the noise
        floor: an update computed from rounding residue (a Linear's bias before BatchNorm,
        normalised to full size by Adam) is residue too, and says nothing."""
        g = self.slot("grad", name)
        i = self.cell(g, step) if g is not None else None
        if i is None:
            return False
        c = self.cells(step)
        if not (c.a.present[i] and c.b.present[i]):
            return False
        return min(float(c.a.norm_hi[i]), float(c.b.norm_hi[i])) > float(c.floor[i])

    def close(self) -> None:
        """Close the extra file handles of the value readers (not the runs)."""
        for sv in self._sv.values():
            sv.close()

    # -- lookups ------------------------------------------------------------------------
    def run(self, side: str) -> Run:
        return self.a if side == "a" else self.b

    def slot(self, kind: str, name: str, call: int = 0) -> Optional[Slot]:
        return self._by_label.get((kind, name, call))

    def has_step(self, step: int) -> bool:
        i = int(np.searchsorted(self.steps, step))
        return i < len(self.steps) and int(self.steps[i]) == int(step)

    def rows(self, side: str, step: int) -> np.ndarray:
        """Entry rows of one run at one step (cached)."""
        key = (side, int(step))
        if key not in self._rows:
            self._rows[key] = self.run(side).entries(int(step), int(step))
            if len(self._rows) > 2 * _CACHE_STEPS:
                self._rows.popitem(last=False)
        return self._rows[key]

    def cells(self, step: int) -> Cells:
        """Classification of every slot at one step (cached)."""
        step = int(step)
        if step not in self._cells:
            self._cells[step] = classify(
                self.a,
                self.b,
                self.al,
                self.dtypes,
                np.array([step]),
                self.rows("a", step),
                self.rows("b", step),
            )
            if len(self._cells) > _CACHE_STEPS:
                self._cells.popitem(last=False)
        return self._cells[step]

    def cell(self, slot: Slot, step: int) -> Optional[int]:
        """Index of a slot's cell in ``cells(step)``, or None when neither run has it."""
        c = self.cells(step)
        hit = np.flatnonzero(c.slot == slot.index)
        return int(hit[0]) if len(hit) else None

    # -- values -------------------------------------------------------------------------
    def prefetch(self, side: str, rows: np.ndarray) -> None:
        """Read the stored bytes of these rows (one step) in one call."""
        self._sv[side].prefetch(rows)

    def raw(self, side: str, step: int, offset: int, nbytes: int) -> Optional[np.ndarray]:
        """Prefetched, unverified bytes (see batch.py), or None."""
        return self._sv[side].raw(step, offset, nbytes)

    def _slot_index(
        self, side: str, step: int, rows: Optional[np.ndarray]
    ) -> dict[int, np.ndarray]:
        """slot -> its rows (in call order) at one step; the step's values are read once."""
        key = (side, int(step))
        index = self._index.get(key)
        if index is None:
            rows = self.rows(side, step) if rows is None else rows
            if len(rows) and rows["step"][0] != rows["step"][-1]:
                rows = rows[rows["step"] == step]
            rmap = self.al.side(side)
            slots = rmap.slot_of[rows["record"]] if len(rows) else np.zeros(0, np.int64)
            order = np.lexsort((rmap.part_of[rows["record"]], slots)) if len(rows) else slots
            rows, slots = rows[order], slots[order]
            uniq, start = np.unique(slots, return_index=True)
            parts = np.split(rows, start[1:]) if len(rows) else []
            index = {int(u): p for u, p in zip(uniq, parts) if u >= 0}
            self._sv[side].prefetch(rows)
            self._index[key] = index
            if len(self._index) > 2 * _CACHE_STEPS:
                self._index.popitem(last=False)
        return index

    def values(
        self, side: str, slot: Slot, step: int, rows: Optional[np.ndarray] = None
    ) -> Optional[np.ndarray]:
        """Full values of a slot in one run at a step; None when absent or statistics only."""
        if not self.has_step(step):
            return None
        sel = self._slot_index(side, step, rows).get(slot.index)
        if sel is None or not len(sel):
            return None
        rmap = self.al.side(side)
        try:
            return combine(self._sv[side].get, sel, int(rmap.mode_of_slot[slot.index]))
        except ValuesNotStoredError:
            return None

    def diff(
        self,
        slot: Slot,
        step: int,
        rows_a: Optional[np.ndarray] = None,
        rows_b: Optional[np.ndarray] = None,
        floor: Optional[float] = None,
        detail: bool = True,
    ) -> Optional[ValueDiff]:
        """Element-level difference of a slot at a step, or None without values or shapes.

        ``floor``: the noise floor of the relative difference (default: the cell's).
        ``detail``: False gives only equality and the relative difference (faster).
        """
        va = self.values("a", slot, step, rows_a)
        vb = self.values("b", slot, step, rows_b)
        if va is None or vb is None or va.shape != vb.shape:
            return None
        if floor is None:
            i = self.cell(slot, step)
            floor = float(self.cells(step).floor[i]) if i is not None else 0.0
        return (compare_values(va, vb) if detail else quick_diff(va, vb)).with_floor(floor)

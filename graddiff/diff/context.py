"""What the diagnosis rules see: the Cause they return and the context they query.

Part of the differ's last stage (walk --> diagnose --> Report): the context answers "how far
apart are these two records at this step?" (exact where values exist, else the stats bound),
reads values, and lists the cells of a step, so each rule module stays about evidence only.

Naming records in a Cause's title, evidence or fix: every record name carries the class of its
module, as everywhere else in graddiff's output (``param 0.weight (Linear)``). Never write
``slot.label`` or ``slot.name`` into a sentence; write ``x.label(slot)`` ("param 0.weight
(Linear)"), ``x.name(slot)`` ("0.weight (Linear)"), ``x.record(kind, name)``,
``x.module(name)`` ("3 (Dropout)") or, for a list, ``x.names(slots)`` ("0.weight, 2.weight
(both Linear) and 3 more"). Code in a fix (``model.head.weight = model.emb.weight``) is code,
not a record name. Old traces without module classes get the bare names. The tests
(tests/classcheck.py) fail on a sentence that names a record without its class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

from ..modclass import class_of, describe, describe_label, describe_list
from .align import Slot
from .compare_records import DIFF, EQUAL, MISSING_A, MISSING_B, NONFINITE, SHAPE, STATS
from .first import Hit, WalkResult
from .pair import RunPair

#: The kinds that make up the forward pass (what rules check agrees before blaming a backward).
FORWARD_KINDS = ("param", "input", "activation", "loss")
#: Parameter gradients, from ``.grad`` or from ``torch.autograd.grad``.
GRAD_KINDS = ("grad", "autograd_grad")
#: How many steps back the accumulation rule sums gradients.
ACCUMULATION_LOOKBACK = 8
#: A relation (sum, scale, ...) "holds" when its residual is below this relative error and far
#: below the plain difference it explains.
RELATION_TOL = 0.02
#: How much larger than the previous step's parameter/gradient differences a parameter
#: difference may be and still be called amplified rounding.
UPDATE_AMPLIFICATION = 100.0


@dataclass
class Cause:
    """One candidate explanation."""

    cause: str  # stable id: different_init, grad_accumulation, rounding, ...
    title: str
    evidence: list[str] = field(default_factory=list)
    fix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "cause": self.cause,
            "title": self.title,
            "evidence": list(self.evidence),
            "fix": self.fix,
        }


#: How evidence names each kind.
KIND_WORDS = {
    "param": "parameters",
    "input": "inputs",
    "activation": "activations",
    "loss": "losses",
    "grad_output": "output gradients",
    "grad": "gradients",
    "autograd_grad": "autograd.grad results",
    "buffer": "buffers",
}


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def fmt(x: Optional[float]) -> str:
    """A number for evidence text; never "None" or "nan" (those read as a bug)."""
    if x is None:
        return "not comparable"
    if np.isnan(x):
        return "NaN"
    if not np.isfinite(x):
        return "infinite"
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 or x == 0 else f"{x:.2e}"


class Context:
    """What the rules may ask: relative differences, values and cells around a step."""

    def __init__(
        self, pair: RunPair, walk: WalkResult, hit: Hit, rtol: float, env_rows: list
    ) -> None:
        self.pair, self.walk, self.hit, self.rtol, self.env_rows = pair, walk, hit, rtol, env_rows
        self.slot: Slot = pair.al.slots[hit.slot]
        self.step = hit.step
        self.compared = {s.kind for s in pair.al.slots}
        #: module name -> class name (both runs merged; empty for old traces)
        self.classes: dict[str, str] = getattr(pair, "classes", {}) or {}

    # -- naming records in sentences (see the module docstring) ----------------------------
    def name(self, slot: Slot) -> str:
        """The record's name with its module class: ``0.weight (Linear)``."""
        return describe(self.classes, slot.kind, slot.name)

    def label(self, slot: Slot) -> str:
        """Kind, name and class (and ``#call`` after the first): ``param 0.weight (Linear)``."""
        return describe_label(self.classes, slot.label)

    def module(self, name: str) -> str:
        """A module's name with its class: ``3 (Dropout)``."""
        return describe(self.classes, "activation", name)

    def record(self, kind: str, name: str) -> str:
        """A record given by kind and name, with its class: ``emb.weight (Embedding)``."""
        return describe(self.classes, kind, name)

    def names(self, records: Sequence[Union[Slot, tuple[str, str]]], limit: int = 4) -> str:
        """Up to ``limit`` records (slots, or ``(kind, name)`` pairs), each with its class,
        neighbours of one class grouped: ``0.weight, 2.weight (both Linear), 1.weight
        (LayerNorm) and 3 more``."""
        pairs = [(r.kind, r.name) if isinstance(r, Slot) else r for r in records]
        return describe_list([(n, class_of(self.classes, k, n)) for k, n in pairs], limit)

    def hit_text(self) -> str:
        """The hit's size in words: "rel 0.01", "rel >= 0.01" (statistics) or its status."""
        h = self.hit
        if h.basis == "structure" or h.code == NONFINITE or not np.isfinite(h.rel):
            return {
                MISSING_A: "absent in A",
                MISSING_B: "absent in B",
                SHAPE: "shapes differ",
                NONFINITE: "NaN/Inf at different places",
            }.get(h.code, h.status.replace("_", " "))
        return f"rel {'>= ' if h.basis == 'stats' else ''}{fmt(h.rel)}"

    def agree(self, kinds: tuple[str, ...], verb: str = "agree") -> str:
        """ "the parameters and inputs agree (activations not compared)": never a claim about a
        kind that was not compared."""
        have = [KIND_WORDS[k] for k in kinds if k in self.compared]
        lack = [KIND_WORDS[k] for k in kinds if k not in self.compared]
        if not have:
            return f"{_and(lack)} were not compared"
        text = f"the compared {_and(have)} {verb}"
        return text + (f" ({_and(lack)} not compared)" if lack and have else "")

    def prev(self, step: int) -> Optional[int]:
        earlier = self.pair.steps[self.pair.steps < step]
        return int(earlier[-1]) if len(earlier) else None

    def v(self, side: str, slot: Slot, step: int) -> Optional[np.ndarray]:
        return self.pair.values(side, slot, step)

    def rel(self, slot: Slot, step: int) -> Optional[float]:
        """Exact relative difference where both runs stored values, else the stats bound."""
        i = self.pair.cell(slot, step)
        if i is None:
            return None
        c = self.pair.cells(step)
        code = int(c.code[i])
        if code == EQUAL:
            return 0.0
        if code in (MISSING_A, MISSING_B, SHAPE) or code == NONFINITE:
            return None
        if code == DIFF:
            vd = self.pair.diff(slot, step)
            if vd is not None:
                return 0.0 if vd.bitwise_equal else vd.rel_diff
        return float(c.rel_lb[i])

    def agrees(self, slot: Slot, code: int, step: int) -> bool:
        """The cell (of classification ``code``) agrees within the slot's tolerance at step."""
        if code == EQUAL:
            return True
        r = self.rel(slot, step)
        return r is not None and r <= self.pair.tolerance(slot.index, step)

    def loss_calls(self, side: str, step: int) -> int:
        """How many losses the run recorded at the step (one per backward/autograd.grad call)."""
        run = self.pair.run(side)
        return sum(
            1
            for rec in self.pair.rows(side, step)["record"]
            if run.record_key(int(rec)).kind == "loss"
        )

    def slots_of(self, step: int, kinds: tuple[str, ...]) -> list[tuple[Slot, int]]:
        c = self.pair.cells(step)
        return [
            (self.pair.al.slots[int(s)], int(code))
            for s, code in zip(c.slot, c.code)
            if self.pair.al.slots[int(s)].kind in kinds
        ]

    def differing(self, step: int, kinds: tuple[str, ...]) -> list[Slot]:
        """The records of these kinds that differ at ``step`` by a measurable amount (not
        missing, reshaped or non-finite)."""
        return [
            s
            for s, code in self.slots_of(step, kinds)
            if code != EQUAL and self.rel(s, step) is not None
        ]

    def within(
        self, step: Optional[int], kinds: tuple[str, ...], tol: Optional[float] = None
    ) -> Optional[bool]:
        """True when every record of these kinds agrees within ``tol`` at ``step`` (None: none)."""
        if step is None:
            return None
        tol = self.rtol if tol is None else tol
        found = False
        for slot, code in self.slots_of(step, kinds):
            found = True
            if code == EQUAL:
                continue
            if tol == 0 and code == STATS:
                return False  # statistics cannot prove bitwise equality
            r = self.rel(slot, step)
            if r is None or r > tol:
                return False
        return True if found else None

    def within_judged(self, step: Optional[int], kinds: tuple[str, ...]) -> Optional[bool]:
        """Like :meth:`within`, with each record's own tolerance where the comparison judges
        records by one (a reduced-precision pair's bound, a twin's drift): "agree" then means
        what the walk means by it. Plain pairs: :meth:`within` at ``rtol``."""
        if self.pair.noise is None and self.pair.rounding is None:
            return self.within(step, kinds)
        if step is None:
            return None
        found = False
        for slot, code in self.slots_of(step, kinds):
            found = True
            if not self.agrees(slot, code, step):
                return False
        return True if found else None


# -- rules --------------------------------------------------------------------------------


def some_names(names: list[str]) -> str:
    """Up to four strings and how many more. Not for record names: use ``Context.names``."""
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def cosine(u: np.ndarray, v: np.ndarray) -> float:
    nu, nv = float(u @ u), float(v @ v)
    return float(u @ v) / np.sqrt(nu * nv) if nu > 0 and nv > 0 else 0.0

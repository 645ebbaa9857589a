"""Align two runs' records into comparison slots: the first stage of the differ.

Runs --> align (slots: which records of A compare with which of B) --> cells (per step) -->
first divergence --> diagnosis --> Report. Records pair by (kind, name, call); two exceptions
keep equivalent loops equal: a parameter's ``.grad`` pairs with the sum of another run's
``autograd_grad`` outputs, and a name with a different number of calls (micro-batching) is
compared as the calls joined along the batch dimension (losses: summed). Only records that carry
the batch are joined (dim 0 adds up to the same batch size in both runs, other dims equal); a
scalar (``num_items_in_batch``) or a tensor repeated per micro-batch (position ids of shape
(1, T), a mask broadcast over the batch) is compared by its first call when it is the same in
every micro-batch, and otherwise not compared (a note says so). A gradient recorded
both as ``.grad`` and as ``autograd_grad`` in one run is compared with the kind the other run
has (the extra kind is a structure note, not a missing record).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..errors import GraddiffError
from ..kinds import CAUSAL_RANK, Kind
from ..reader import RecordKey, Run

#: How one run's records of a slot combine into the tensor that is compared.
MODE_ONE, MODE_CONCAT, MODE_SUM = 0, 1, 2
MODE_NAMES = ("one", "concat", "sum")

#: Kinds whose calls are micro-batches of one batch: joined along dim 0 when counts differ.
_CONCAT_KINDS = frozenset({Kind.INPUT.value, Kind.ACTIVATION.value, Kind.GRAD_OUTPUT.value})
#: Kinds whose calls add up: summed when counts differ.
_SUM_KINDS = frozenset({Kind.LOSS.value, Kind.AUTOGRAD_GRAD.value})


@dataclass(frozen=True)
class Slot:
    """One comparison unit: the records of A and of B that hold the same tensor.

    Attributes:
        index: position in ``Alignment.slots``.
        kind: the kind reported (``grad`` for a .grad/autograd_grad pair).
        name: the record name.
        call: the call index, or -1 when the slot merges several calls.
        keys_a: A's record keys (empty when A lacks the name); ``keys_b`` likewise.
        mode_a: how A's records combine (MODE_ONE, MODE_CONCAT, MODE_SUM); ``mode_b`` likewise.
        note: how the slot was paired, when not one-to-one.
    """

    index: int
    kind: str
    name: str
    call: int
    keys_a: tuple[RecordKey, ...]
    keys_b: tuple[RecordKey, ...]
    mode_a: int = MODE_ONE
    mode_b: int = MODE_ONE
    note: str = ""

    @property
    def label(self) -> str:
        """``"kind name"`` plus ``" #call"`` for calls after the first."""
        return f"{self.kind} {self.name}" + (f" #{self.call}" if self.call > 0 else "")

    @property
    def rank(self) -> int:
        return CAUSAL_RANK.get(self.kind, 99)


@dataclass
class RunMap:
    """Per record id of one run: the slot it feeds (-1: none) and its part (the call)."""

    slot_of: np.ndarray
    part_of: np.ndarray
    mode_of_slot: np.ndarray


@dataclass
class Alignment:
    """The slots of two runs, the maps from record ids to slots, and structural notes."""

    slots: list[Slot]
    map_a: RunMap
    map_b: RunMap
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    kinds: tuple[str, ...] = ()

    def side(self, which: str) -> RunMap:
        return self.map_a if which == "a" else self.map_b


def _calls(run: Run, kinds: Iterable[str]) -> dict[tuple[str, str], list[int]]:
    """(kind, name) -> sorted calls, in the run's causal key order."""
    wanted = set(kinds)
    out: dict[tuple[str, str], list[int]] = {}
    for key in run.keys:
        if key.kind in wanted:
            out.setdefault((key.kind, key.name), []).append(key.call)
    return {k: sorted(v) for k, v in out.items()}


def _first_step_rows(run: Run) -> dict[RecordKey, tuple[tuple[int, ...], tuple[int, int]]]:
    """Shape and fingerprint of every record at the run's first step (where the batch
    structure of the calls shows)."""
    if not len(run.steps):
        return {}
    step = int(run.steps[0])
    return {
        run.record_key(int(r["record"])): (
            tuple(int(d) for d in r["shape"][: int(r["ndim"])]),
            (int(r["fp_sum"]), int(r["fp_pos"])),
        )
        for r in run.entries(step, step)
    }


def carries_batch(shapes_a: list[tuple[int, ...]], shapes_b: list[tuple[int, ...]]) -> bool:
    """Do calls of these shapes split one batch along dim 0 (so that joining them is right)?

    Yes when every call has a dim 0, the other dims agree, and dim 0 adds up to the same batch
    size in both runs. A scalar, or a (1, T) tensor repeated once per micro-batch, does not.
    Unknown shapes (empty lists) keep the join.
    """
    if not shapes_a or not shapes_b:
        return True
    every = shapes_a + shapes_b
    if any(len(s) == 0 for s in every) or len({s[1:] for s in every}) != 1:
        return False
    return sum(s[0] for s in shapes_a) == sum(s[0] for s in shapes_b)


def _unbatched(kind: str, rows_a: list, rows_b: list) -> tuple[int, str]:
    """How a record that does not carry the batch is compared: (mode or -1, why).

    - A scalar output or output gradient (a loss computed inside the model, its backward
      seed) is a per-micro-batch reduction whose scaling is the loop's convention: not
      compared (the loss and the gradients are).
    - The gradient of a tensor broadcast over the batch (a (1, T, C) position embedding) is a
      sum over the batch: the micro-batches' gradients are summed.
    - Otherwise its first call stands for the batch when every micro-batch has the same
      value (bitwise: ``num_items_in_batch``, position ids, a broadcast mask); a value that
      differs between micro-batches is not compared.
    """
    shapes = [shape for shape, _ in rows_a + rows_b]
    if kind != Kind.INPUT.value and shapes and all(len(s) == 0 for s in shapes):
        return -1, "not compared: a per-micro-batch scalar (its loss and gradients are)"
    if kind == Kind.GRAD_OUTPUT.value:
        return MODE_SUM, "summed (the gradient of a tensor broadcast over the batch)"
    for rows in (rows_a, rows_b):
        if len(rows) > 1 and len(set(rows)) > 1:
            return -1, "not compared: its value differs between micro-batches"
    return MODE_ONE, "the same in every micro-batch"


def check_related(a: Run, b: Run) -> None:
    """Refuse runs of unrelated models: no parameter (or gradient) names in common."""
    for kinds in (("param",), ("grad", "autograd_grad")):
        na = {n for k in kinds for n in a.names(k)}
        nb = {n for k in kinds for n in b.names(k)}
        if na and nb:
            if not na & nb:
                raise GraddiffError(
                    f"{a.path} and {b.path} record unrelated models: no {kinds[0]} names in common "
                    f"({_sample(na)} vs {_sample(nb)})"
                )
            return
    if (
        a.keys
        and b.keys
        and not {(k.kind, k.name) for k in a.keys} & {(k.kind, k.name) for k in b.keys}
    ):
        raise GraddiffError(
            f"{a.path} and {b.path} have no record names in common: nothing to compare"
        )


def _sample(names: set[str]) -> str:
    items = sorted(names)
    return ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")


def recorded_kinds(a: Run, b: Run, kinds: tuple[str, ...]) -> tuple[tuple[str, ...], list[str]]:
    """Restrict ``kinds`` to those both runs were asked to record; notes for the others."""
    notes = []
    out = list(kinds)
    ka, kb = a.options.get("kinds"), b.options.get("kinds")
    if isinstance(ka, list) and isinstance(kb, list) and set(ka) != set(kb):
        skipped = [k for k in out if (k in ka) != (k in kb)]
        if skipped:
            notes.append(
                f"not compared: {', '.join(skipped)} (recorded in one run only, by trace(kinds=...))"
            )
        out = [k for k in out if k not in skipped]
    return tuple(out), notes


def _grad_vs_summed_autograd(name: str, calls: list[int], summed_side: str) -> tuple:
    """The spec pairing one run's .grad with the sum of the other's autograd_grad calls."""
    one = (RecordKey("grad", name),)
    summed = tuple(RecordKey("autograd_grad", name, c) for c in calls)
    sum_note = f"sum of {len(calls)} autograd_grad call(s)"
    if summed_side == "B":
        return ("grad", name, -1, one, summed, MODE_ONE, MODE_SUM, f".grad in A vs {sum_note} in B")
    return ("grad", name, -1, summed, one, MODE_SUM, MODE_ONE, f"{sum_note} in A vs .grad in B")


def align(a: Run, b: Run, kinds: tuple[str, ...]) -> Alignment:
    """Pair the records of two runs into slots, in causal order (A's order first)."""
    kinds, notes = recorded_kinds(a, b, kinds)
    grad_kinds = {"grad", "autograd_grad"} & set(kinds)
    # Pairing needs both gradient kinds visible, whichever of them the user asked for.
    scan = set(kinds) | ({"grad", "autograd_grad"} if grad_kinds else set())
    ca, cb = _calls(a, scan), _calls(b, scan)
    specs: list[tuple] = []  # (kind, name, call, keys_a, keys_b, mode_a, mode_b, note)
    used: set[tuple[str, str]] = set()

    # (a) gradient source. A parameter's gradient is present in a run when it has .grad or
    # autograd_grad records; only a run with neither lacks it (a frozen layer). Both runs have
    # .grad: .grad is compared and autograd_grad records in one run only are a note (and the
    # other way round); .grad in one run only and autograd_grad in the other only: .grad is
    # compared with the sum of the autograd_grad calls; both kinds in both runs: each with its own.
    extra: dict[tuple[str, str], str] = {}  # (kind, name) compared -> note on the other kind
    if grad_kinds:
        names = dict.fromkeys(n for (k, n) in [*ca, *cb] if k in ("grad", "autograd_grad"))
        for name in names:
            ga, gb = ("grad", name) in ca, ("grad", name) in cb
            aa, ab = ("autograd_grad", name) in ca, ("autograd_grad", name) in cb
            if (ga and gb and aa != ab) or (aa and ab and ga != gb):
                kept, other = ("grad", "autograd_grad") if ga and gb else ("autograd_grad", "grad")
                side = "A" if (aa if other == "autograd_grad" else ga) else "B"
                shown = {"grad": ".grad", "autograd_grad": "autograd_grad"}
                if kept in kinds:
                    extra[(kept, name)] = (
                        f"{shown[other]} records only in {side} (its {shown[kept]} is compared)"
                    )
                else:
                    notes.append(
                        f"{other} {name}: {shown[other]} records only in {side} (not compared: "
                        f"its {shown[kept]} is not among the compared kinds)"
                    )
                used.add((other, name))
                continue
            if ga and not gb and ab and not aa:
                specs.append(_grad_vs_summed_autograd(name, cb[("autograd_grad", name)], "B"))
            elif gb and not ga and aa and not ab:
                specs.append(_grad_vs_summed_autograd(name, ca[("autograd_grad", name)], "A"))
            else:
                continue
            used.update({("grad", name), ("autograd_grad", name)})

    # (b) the rest, by (kind, name): per call, or merged when the call counts differ.
    only_a: list[str] = []
    only_b: list[str] = []
    rows: Optional[tuple[dict, dict]] = None  # first-step shapes, read only if a join is considered
    for kind, name in dict.fromkeys([*ca, *cb]):
        if (kind, name) in used or kind not in kinds:
            continue
        calls_a, calls_b = ca.get((kind, name), []), cb.get((kind, name), [])
        if not calls_a:
            only_b.append(_describe(kind, name, calls_b))
        elif not calls_b:
            only_a.append(_describe(kind, name, calls_a))
        mergeable = kind in _CONCAT_KINDS or kind in _SUM_KINDS
        if calls_a == calls_b or not calls_a or not calls_b or not mergeable:
            for c in sorted(set(calls_a) | set(calls_b)):
                ka = (RecordKey(kind, name, c),) if c in calls_a else ()
                kb = (RecordKey(kind, name, c),) if c in calls_b else ()
                specs.append(
                    (kind, name, c, ka, kb, MODE_ONE, MODE_ONE, extra.get((kind, name), ""))
                )
            continue
        if kind in _CONCAT_KINDS:
            if rows is None:
                rows = (_first_step_rows(a), _first_step_rows(b))
            ra = [rows[0][k] for c in calls_a if (k := RecordKey(kind, name, c)) in rows[0]]
            rb = [rows[1][k] for c in calls_b if (k := RecordKey(kind, name, c)) in rows[1]]
            if not carries_batch([r[0] for r in ra], [r[0] for r in rb]):
                mode, why = _unbatched(kind, ra, rb)
                head = (
                    f"{len(calls_a)} call(s) in A vs {len(calls_b)} in B of shape "
                    f"{_shape_text([r[0] for r in ra + rb])}, which does not carry the batch"
                )
                if mode < 0:
                    notes.append(f"{kind} {name}: {head}: {why}")
                    used.add((kind, name))
                    continue
                if mode == MODE_SUM:
                    ka = tuple(RecordKey(kind, name, c) for c in calls_a)
                    kb = tuple(RecordKey(kind, name, c) for c in calls_b)
                    specs.append((kind, name, -1, ka, kb, mode, mode, f"{head}: {why}"))
                    continue
                first = min(calls_a[0], calls_b[0])
                ka = (RecordKey(kind, name, first),) if first in calls_a else ()
                kb = (RecordKey(kind, name, first),) if first in calls_b else ()
                note = f"{head}: call {first} compared ({why})"
                specs.append((kind, name, first, ka, kb, MODE_ONE, MODE_ONE, note))
                continue
        mode = MODE_CONCAT if kind in _CONCAT_KINDS else MODE_SUM
        how = "joined along dim 0" if mode == MODE_CONCAT else "summed"
        how += f"; {extra[(kind, name)]}" if (kind, name) in extra else ""
        specs.append(
            (
                kind,
                name,
                -1,
                tuple(RecordKey(kind, name, c) for c in calls_a),
                tuple(RecordKey(kind, name, c) for c in calls_b),
                mode,
                mode,
                f"{len(calls_a)} call(s) in A vs {len(calls_b)} in B, {how}",
            )
        )

    specs.sort(key=lambda s: CAUSAL_RANK.get(s[0], 99))  # stable: keeps first-seen order per kind
    slots = [Slot(i, *spec) for i, spec in enumerate(specs)]
    # one note per (kind, name): the calls of a name share its note
    notes.extend(dict.fromkeys(f"{s.kind} {s.name}: {s.note}" for s in slots if s.note))
    return Alignment(
        slots, _run_map(a, slots, "a"), _run_map(b, slots, "b"), only_a, only_b, notes, kinds
    )


def _shape_text(shapes: list[tuple[int, ...]]) -> str:
    return " / ".join(str(s) for s in dict.fromkeys(shapes))


def _describe(kind: str, name: str, calls: list[int]) -> str:
    return f"{kind} {name}" + (f" ({len(calls)} calls)" if len(calls) > 1 else "")


def _run_map(run: Run, slots: list[Slot], which: str) -> RunMap:
    index: dict[RecordKey, tuple[int, int]] = {}
    for s in slots:
        for key in s.keys_a if which == "a" else s.keys_b:
            index[key] = (s.index, key.call)
    n = run.n_records
    slot_of = np.full(n, -1, np.int64)
    part_of = np.zeros(n, np.int64)
    for rid in range(n):
        hit = index.get(run.record_key(rid))
        if hit is not None:
            slot_of[rid], part_of[rid] = hit
    modes = np.array([s.mode_a if which == "a" else s.mode_b for s in slots] or [0], np.int64)
    return RunMap(slot_of, part_of, modes)

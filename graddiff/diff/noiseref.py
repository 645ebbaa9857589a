"""``compare A B --noise TWIN``: per-record, per-step tolerance from a perturbed twin.

The twin (``graddiff.trace(..., perturb=...)``, perturb.py) is the same training as one of the
two runs (its origin) with the initial parameters nudged by one ulp. How far it drifts from its
origin at each record, at this or any earlier step (the drift's envelope: a drift that happens
to be small at one step is no sign that the noise went away), is what rounding-sized
perturbations grow into in this training; a difference between A and B within
``NOISE_FACTOR`` times that drift is amplified rounding, a larger one is real. This replaces the
flat ``--rtol`` (and the precision bound): early in a run the drift is tiny, so small real
differences (a weight decay of 1e-4) are caught; late in a chaotic run it is large, so
amplified rounding is not called a divergence.

Which run is the origin: the one whose recorded dtypes the twin shares (a twin of a
bfloat16-autocast run records bfloat16 module outputs), else A; ``noise_of`` says it
explicitly. A pair that computes in reduced precision needs the twin of its lower-precision
run, nudged by one ulp of that precision (``perturb="bfloat16"``): its drift then holds the
rounding of every operation in that precision, which a float32 twin's does not, and a float32
nudge is rounded away by autocast (no drift at all).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import GraddiffError, NotATwinError
from ..optimizer_settings import IMPLEMENTATION_KEYS
from ..reader import Run
from .align import Alignment, align, check_related
from .compare_records import DIFF, EQUAL, STATS
from .noise import ROUNDING_ULPS, eps_of, floor_factor
from .pair import RunPair
from .precision import (
    UNIT_ROUNDOFF,
    Precision,
    computing_dtype,
    pair_chain,
    precision_of,
    slot_rounding,
)

#: A difference up to this many times the twin's drift at that record and step is amplified
#: rounding (docs/tolerance.md, "--noise": measured ratios and why 10).
NOISE_FACTOR = 10.0


def _signature(run: Run) -> dict:
    return {run.record_key(r): run.record_dtype(r) for r in range(run.n_records)}


def twin_origin(a: Run, b: Run, twin: Run, noise_of: Optional[str] = None) -> tuple[str, str]:
    """("A" or "B", why): the run the twin is a perturbed copy of. Checks that its drift can
    measure the pair's rounding (GraddiffError otherwise)."""
    options = twin.options or {}
    perturb = options.get("perturb")
    if not perturb:
        raise GraddiffError(
            f"--noise {twin.path}: not a perturbed twin (record it with "
            "graddiff.trace(..., perturb='ulp'))"
        )
    runs = {"A": a, "B": b}
    if noise_of is not None:
        tag = str(noise_of).upper()
        if tag not in runs:
            raise GraddiffError(f"--noise-of {noise_of!r}: choose A or B")
        why = f"--noise-of {tag}"
    else:
        sig = _signature(twin)
        same = [t for t in ("A", "B") if _signature(runs[t]) == sig]
        if len(same) == 1:
            tag, why = same[0], f"it records the same records and dtypes as {same[0]}"
        else:
            low = computing_dtype(twin)
            same = [t for t in ("A", "B") if computing_dtype(runs[t]) == low]
            if len(same) == 1:
                tag, why = same[0], f"it computes in {low} like {same[0]}"
            else:
                tag, why = "A", "A by default (--noise-of B to choose B)"
    origin = runs[tag]
    pair = precision_of(a, b)
    mine = computing_dtype(origin) or "float32"
    if pair.reduced and UNIT_ROUNDOFF.get(mine, 0.0) < pair.u:
        low = "B" if tag == "A" else "A"
        raise GraddiffError(
            f"--noise {twin.path}: the twin is of {tag}, which computes in {mine}, but {low} "
            f"computes in {pair.dtype}: its drift holds no {pair.dtype} rounding. Record the "
            f"twin from {low}: graddiff.trace(..., perturb='{pair.dtype}')"
        )
    if pair.reduced:
        nudge = perturb
        if perturb == "ulp":  # one ulp of the twin's own (coarsest) parameter dtype
            params = [
                twin.record_dtype(r)
                for r in range(twin.n_records)
                if twin.record_key(r).kind == "param"
            ]
            nudge = max(params, key=lambda d: UNIT_ROUNDOFF.get(d, 0.0), default="float32")
        if UNIT_ROUNDOFF.get(nudge, 0.0) < pair.u:
            raise GraddiffError(
                f"--noise {twin.path}: the twin was nudged by one {nudge} ulp, but {tag} "
                f"computes in {pair.dtype}, which rounds such a nudge away (no drift). Record it "
                f"with graddiff.trace(..., perturb='{pair.dtype}')"
            )
    return tag, why


def twin_drift(
    a: Run, twin: Run, kinds: tuple[str, ...], rtol: float = 1e-3
) -> dict[tuple, dict[int, float]]:
    """(kind, name, call) -> {step: the largest relative difference between the twin and its
    origin ``a`` at this or any earlier step}. Refuses (NotATwinError) a twin that is not a
    perturbed copy of ``a`` (its records, optimizer settings, inputs, initial parameters and
    first step: the ``_check_*`` functions below)."""
    check_related(a, twin)
    al = align(a, twin, kinds)
    common = np.intersect1d(a.steps, twin.steps)
    if not len(common):
        raise GraddiffError(f"--noise {twin.path}: no step in common with {a.path}")
    _check_structure(a, twin)
    _check_settings(a, twin, common)
    out: dict[tuple, dict[int, float]] = {}
    for step, rels in _rels(a, twin, al, common).items():
        for label, rel in rels.items():
            out.setdefault(label, {})[step] = rel
    _check_copy(a, twin, out, int(common[0]))
    _check_first_step(a, twin, out, int(common[0]), al, rtol)
    for series in out.values():  # the envelope: noise, once there, is not taken back
        top = 0.0
        for step in sorted(series):
            top = series[step] = max(top, series[step])
    return out


def _rels(
    a: Run, twin: Run, al: Alignment, steps: np.ndarray, floor: float = 0.0
) -> dict[int, dict[tuple, float]]:
    """step -> (kind, name, call) -> relative difference between the twin and ``a`` (records
    missing, reshaped or non-finite in either are left out: no reference there). ``floor``:
    a noise floor factor to judge at, when above the records' own (a reduced precision)."""
    pair = RunPair(a, twin, al, steps)
    if floor:
        pair.dtypes.floor = np.maximum(pair.dtypes.floor, floor)
    out: dict[int, dict[tuple, float]] = {}
    try:
        for step in steps.tolist():
            c = pair.cells(step)
            row = out.setdefault(int(step), {})
            for i in range(len(c)):
                slot = al.slots[int(c.slot[i])]
                code = int(c.code[i])
                if code == EQUAL:
                    rel = 0.0
                elif code == DIFF:
                    vd = pair.diff(slot, step, detail=False)
                    rel = (
                        float(c.rel_lb[i])
                        if vd is None
                        else (0.0 if vd.bitwise_equal else vd.rel_diff)
                    )
                elif code == STATS:
                    rel = float(c.rel_lb[i])
                else:
                    continue
                row[(slot.kind, slot.name, max(slot.call, 0))] = rel
    finally:
        pair.close()
    return out


def _not_a_copy(origin: Run, twin: Run, what: str) -> NotATwinError:
    return NotATwinError(
        f"--noise {twin.path}: not a perturbed copy of {origin.path}: {what} (a twin is the "
        "same script, data and seeds, recorded with trace(..., perturb=...))"
    )


def _check_structure(origin: Run, twin: Run) -> None:
    """The same records, with the same dtypes: the same model, traced the same way."""
    so, st = _signature(origin), _signature(twin)
    if so == st:
        return
    only_t = sorted(str(k) for k in st.keys() - so.keys())
    only_o = sorted(str(k) for k in so.keys() - st.keys())
    dtype = sorted(f"{k} ({so[k]} vs {st[k]})" for k in so.keys() & st.keys() if so[k] != st[k])
    parts = []
    for what, names in (
        ("only in the twin", only_t),
        ("only in the origin", only_o),
        ("other dtypes in the twin", dtype),
    ):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            parts.append(f"{what}: {', '.join(names[:3])}{more}")
    raise _not_a_copy(origin, twin, "its records differ (" + "; ".join(parts) + ")")


def _settings(run: Run, step: int) -> list:
    """The optimizer settings that decide the update at ``step`` (not how it is computed)."""
    return [
        (
            o.class_name,
            [
                (
                    g.index,
                    g.params,
                    {k: v for k, v in g.hyper.items() if k not in IMPLEMENTATION_KEYS},
                )
                for g in o.groups
            ],
        )
        for o in run.optimizer_settings.at(step)
    ]


def _check_settings(origin: Run, twin: Run, common: np.ndarray) -> None:
    """The same recorded optimizer settings at every common step: a twin of another script
    (another learning rate, weight decay, schedule) drifts by that difference after its first
    update, and would hide it in the pair."""
    so, st = origin.optimizer_settings, twin.optimizer_settings
    if not so and not st:
        return
    lo, hi = int(common[0]), int(common[-1])
    steps = sorted({lo} | {s for s in so.change_steps + st.change_steps if lo <= s <= hi})
    for step in steps:
        a, t = _settings(origin, step), _settings(twin, step)
        if a == t:
            continue
        what = "a different optimizer"
        if len(a) == len(t):
            for (ca, ga), (ct, gt) in zip(a, t):
                if ca != ct:
                    what = (
                        f"the twin's optimizer is {ct.rsplit('.', 1)[-1]}, the run's "
                        f"{ca.rsplit('.', 1)[-1]}"
                    )
                    break
                for (ia, pa, ha), (_, pt, ht) in zip(ga, gt):
                    keys = sorted(k for k in ha.keys() | ht.keys() if ha.get(k) != ht.get(k))
                    if keys:
                        k = keys[0]
                        what = (
                            f"{k} is {ht.get(k)} in the twin, {ha.get(k)} in the run "
                            f"(param group {ia})"
                        )
                        break
                    if pa != pt:
                        what = f"param group {ia} holds other parameters in the twin"
                        break
                else:
                    if len(ga) != len(gt):
                        what = f"the twin has {len(gt)} param groups, the run {len(ga)}"
                    continue
                break
        raise _not_a_copy(origin, twin, f"its optimizer settings differ at step {step}: {what}")


def _nudge_dtype(twin: Run) -> str:
    """The precision of the twin's nudge: ``perturb``, or for "ulp" its coarsest parameter
    dtype."""
    perturb = str((twin.options or {}).get("perturb"))
    if perturb != "ulp":
        return perturb
    params = [
        twin.record_dtype(r) for r in range(twin.n_records) if twin.record_key(r).kind == "param"
    ]
    return max(params, key=lambda d: UNIT_ROUNDOFF.get(d, 0.0), default="float32")


def _check_copy(origin: Run, twin: Run, drift: dict, first: int) -> None:
    """A twin differs from its origin by the nudge only: the same inputs at every step, and
    initial parameters at most one ulp of the nudge's precision apart (tensor-level rel <=
    2 eps). Otherwise its drift would hold a real difference and hide one in the pair."""
    perturb = (twin.options or {}).get("perturb")
    for (kind, name, _), series in drift.items():
        if kind == "input":
            bad = [s for s, r in series.items() if r > 0]
            if bad:
                raise _not_a_copy(
                    origin, twin, f"its input '{name}' differs at step {min(bad)} (other data)"
                )
        elif kind == "param" and first in series:
            dtypes = [origin.record_dtype(r) for r in range(origin.n_records)]
            own = next((d for r, d in enumerate(dtypes) if origin.record_key(r).name == name), "")
            nudge = own if perturb == "ulp" else str(perturb)
            limit = 2 * max(eps_of(nudge), eps_of(own))
            if series[first] > limit:
                raise _not_a_copy(
                    origin,
                    twin,
                    f"parameter '{name}' differs by rel {series[first]:.3g} at step {first}, "
                    f"more than one {nudge} ulp (different initial weights)",
                )


def _check_first_step(
    origin: Run, twin: Run, drift: dict, first: int, al: Alignment, rtol: float
) -> None:
    """At the first step, before any update, the twin computes what its origin computes from
    parameters one ulp apart: every record within ``NOISE_FACTOR`` x the tolerance compare
    gives a pair of runs in the nudge's precision (``rtol``, or the precision bound at the
    record's depth). Beyond it the twin computes something else (another op, loss or
    dropout draw): another script."""
    nudge = _nudge_dtype(twin)
    low = max(
        (computing_dtype(origin) or "float32", nudge), key=lambda d: UNIT_ROUNDOFF.get(d, 0.0)
    )
    u = UNIT_ROUNDOFF.get(low, UNIT_ROUNDOFF["float32"])
    prec = Precision(low, u, low, low)
    rounding = slot_rounding(al, prec, pair_chain(origin, twin, first) if prec.reduced else None)
    if prec.reduced:  # rounding residue at the reduced precision's noise floor, as compare
        rels = _rels(origin, twin, al, np.array([first]), floor_factor(low))[first]
    else:
        rels = {label: series[first] for label, series in drift.items() if first in series}
    by_label = {(s.kind, s.name, max(s.call, 0)): s for s in al.slots}
    for label, rel in rels.items():
        slot = by_label.get(label)
        if slot is None or label[0] in ("input", "param"):
            continue
        tol = max(rtol, float(rounding[slot.index]) if rounding is not None else 0.0)
        if rel > NOISE_FACTOR * tol:
            raise _not_a_copy(
                origin,
                twin,
                f"at step {first}, before any update, {slot.label} differs by rel "
                f"{rel:.3g}, more than a one-ulp nudge explains ({NOISE_FACTOR:g} x "
                f"{tol:.3g}): another computation",
            )


class NoiseTolerance:
    """Tolerance of a slot of the A-B alignment at a step, from the twin's drift."""

    def __init__(self, al: Alignment, drift: dict[tuple, dict[int, float]], dtype_of) -> None:
        self._by_slot = [drift.get((s.kind, s.name, max(s.call, 0)), {}) for s in al.slots]
        self._floor = [ROUNDING_ULPS * eps_of(dtype_of(s)) for s in al.slots]

    def __call__(self, slot: int, step: int) -> float:
        """NOISE_FACTOR x the drift, at least rounding level of the record's dtype; where
        the twin has no reference (a record it lacks), rounding level only."""
        d = self._by_slot[slot].get(step)
        return max(NOISE_FACTOR * d, self._floor[slot]) if d is not None else self._floor[slot]

    def covers(self, slot: int) -> bool:
        return bool(self._by_slot[slot])

"""``compare A B --noise TWIN``: per-record, per-step tolerance from a perturbed twin of A.

The twin (``graddiff.trace(..., perturb="ulp")``, perturb.py) is the same training as A with
its initial parameters nudged by one ulp. How far it drifts from A at each record and step is
what rounding-sized perturbations grow into in this training; a difference between A and B
within ``NOISE_FACTOR`` times that drift is amplified rounding, a larger one is real. This
replaces the flat ``--rtol`` (and the precision bound): early in a run the drift is tiny, so
small real differences (a weight decay of 1e-4) are caught; late in a chaotic run it is large,
so amplified rounding is not called a divergence.
"""

from __future__ import annotations

import numpy as np

from ..errors import GraddiffError
from ..reader import Run
from .align import Alignment, align, check_related
from .compare_records import DIFF, EQUAL, STATS
from .noise import ROUNDING_ULPS, eps_of
from .pair import RunPair

#: A difference up to this many times the twin's drift at that record and step is amplified
#: rounding (docs/tolerance.md, "--noise": measured ratios and why 10).
NOISE_FACTOR = 10.0


def twin_drift(a: Run, twin: Run, kinds: tuple[str, ...]) -> dict[tuple, dict[int, float]]:
    """(kind, name, call) -> {step: relative difference between A and its twin}."""
    options = twin.options or {}
    if not options.get("perturb"):
        raise GraddiffError(
            f"--noise {twin.path}: not a perturbed twin (record it with "
            "graddiff.trace(..., perturb='ulp'))"
        )
    check_related(a, twin)
    al = align(a, twin, kinds)
    common = np.intersect1d(a.steps, twin.steps)
    if not len(common):
        raise GraddiffError(f"--noise {twin.path}: no step in common with {a.path}")
    pair = RunPair(a, twin, al, common)
    out: dict[tuple, dict[int, float]] = {}
    try:
        for step in common.tolist():
            c = pair.cells(step)
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
                else:  # missing, reshaped or NaN/Inf in the twin: no reference here
                    continue
                out.setdefault((slot.kind, slot.name, max(slot.call, 0)), {})[step] = rel
    finally:
        pair.close()
    return out


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

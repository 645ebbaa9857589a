"""A loss scale (AMP ``GradScaler``) in one run: the same training, scaled backward quantities.

``scaler.scale(loss).backward()`` records a loss and output gradients 2^n times the unscaled
run's, exactly: multiplying by a power of two is exact in floating point (barring overflow and
underflow), and every backward op is linear in the gradient flowing into it. When the scaler
unscales the gradients before the update, everything the update uses (``.grad``, parameters,
buffers) and the forward pass agree. Input: two runs and their compared steps; output: the
power of two per step, or None when the losses are not exactly such multiples or an output
gradient's norm is not scaled by the same factor. When the pair computes in reduced
precision (float16 autocast with a GradScaler vs float32), the scaled run also rounds
differently: the multiples then hold within each record's precision tolerance. api.py then judges the loss and output
gradients up to that factor and every other kind as usual.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from ..reader import Run
from .first import BLOCK_STEPS

#: The kinds a loss scale multiplies.
SCALED_KINDS = ("loss", "grad_output")
#: Output-gradient norms are float64 sums of exactly scaled values: equal up to this.
_NORM_RTOL = 1e-9


def _by_key(run: Run, steps: np.ndarray) -> dict[tuple[int, str, str, int], dict]:
    """The loss and output-gradient entries of ``steps``, read block by block as the walk does
    (first.BLOCK_STEPS), so that only these kinds' rows are held at once; the calls of one
    name combined as the alignment joins micro-batches: losses summed, output-gradient norms
    as the norm of the calls joined (an accumulating run has one call per micro-batch)."""
    scaled = np.array(
        [i for i in range(run.n_records) if run.record_key(i).kind in SCALED_KINDS], np.int64
    )
    out: dict[tuple[int, str, str, int], dict] = {}
    for lo in range(0, len(steps), BLOCK_STEPS):
        block = steps[lo : lo + BLOCK_STEPS]
        rows = run.entries(int(block[0]), int(block[-1]))
        for e in rows[np.isin(rows["step"], block) & np.isin(rows["record"], scaled)]:
            k = run.record_key(int(e["record"]))
            got = out.setdefault(
                (int(e["step"]), k.kind, k.name, 0),
                {"mean": 0.0, "norm2": 0.0, "numel": 0, "nan": 0, "inf": 0, "calls": 0},
            )
            got["mean"] += float(e["mean"]) * int(e["numel"])  # a sum, for losses (numel 1)
            got["norm2"] += float(e["norm"]) ** 2
            got["numel"] = max(got["numel"], int(e["numel"]))
            got["nan"] += int(e["nan"])
            got["inf"] += int(e["inf"])
            got["calls"] += 1
    for got in out.values():
        got["norm"] = float(np.sqrt(got["norm2"]))
    return out


def loss_scale(
    a: Run, b: Run, steps: np.ndarray, tol: Optional[Callable[[tuple], float]] = None
) -> Optional[tuple[str, dict[int, int]]]:
    """("A" or "B", {step: n}) when at every compared step every loss of that run is exactly
    2^n times the other's (one n per step, n >= 1) and every output gradient's norm is 2^n times
    the other's; else None. ``tol``: for a pair that computes in reduced precision, (step,
    kind, name, call) -> the record's precision tolerance: the scaled run also rounds
    differently (float16 autocast with a GradScaler vs float32), so 2^n holds within it."""
    if not len(steps):
        return None
    ea, eb = _by_key(a, steps), _by_key(b, steps)
    if not ea or ea.keys() != eb.keys():
        return None
    powers: dict[int, int] = {}
    for key, x in ea.items():
        step, kind = key[0], key[1]
        if kind != "loss":
            continue
        y = eb[key]
        va, vb = float(x["mean"]), float(y["mean"])
        if x["numel"] != 1 or y["numel"] != 1 or not (np.isfinite(va) and np.isfinite(vb)):
            return None
        if va == 0 or vb == 0:
            return None
        n = int(round(float(np.log2(abs(vb / va)))))
        if n == 0 or not _scaled(va, vb, n, 0.0 if tol is None else tol(key)):
            return None
        if powers.setdefault(step, n) != n:
            return None
    if set(powers) != {int(s) for s in steps}:
        return None  # a step without a loss: nothing says how it was scaled
    signs = {n > 0 for n in powers.values()}
    if len(signs) != 1:
        return None
    for key, x in ea.items():
        step, kind = key[0], key[1]
        if kind != "grad_output":
            continue
        y = eb[key]
        if x["nan"] or x["inf"] or y["nan"] or y["inf"]:
            return None
        limit = _NORM_RTOL if tol is None else max(_NORM_RTOL, tol(key))
        if not _scaled(float(x["norm"]), float(y["norm"]), powers[step], limit):
            return None
    if signs == {True}:
        return "B", powers
    return "A", {s: -n for s, n in powers.items()}


def _scaled(va: float, vb: float, n: int, tol: float) -> bool:
    """``vb`` is ``va x 2^n``: exactly (tol 0), or within ``tol`` relative to the larger."""
    want = va * 2.0**n
    if not tol:
        return vb == want
    return abs(vb - want) <= tol * max(abs(want), abs(vb), 1e-300)


def describe_powers(powers: dict[int, int]) -> str:
    """'2^16' or '2^15 to 2^16' (a scaler that changed its scale)."""
    lo, hi = min(powers.values()), max(powers.values())
    return f"2^{lo}" if lo == hi else f"2^{lo} to 2^{hi}"

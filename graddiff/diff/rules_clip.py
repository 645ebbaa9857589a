"""Diagnosis rule: gradient clipping by global norm applied while a GradScaler's scale is still in
the gradients (``clip_grad_norm_`` before ``scaler.unscale_``), in one of two runs that both use
a scaler, or clipping in one run only.

Evidence from the gradients alone (their recorded norms: statistics suffice): each gradient of
one run is the other's times one constant, and that run's global gradient norm is the same at
every step from there on (``clip_grad_norm_`` rescales to exactly ``max_norm``), while the
other's varies or sits at a norm 2^k times larger. Clipping scaled gradients pins the global
norm of the *unscaled* gradients at ``max_norm / scale``: a value that times a power of two
(the scale, 2^k with k >= 4) is a round ``max_norm`` (two significant digits). Context in,
Cause or None out (see context.py).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .compare_records import EQUAL
from .context import FORWARD_KINDS as _FORWARD
from .context import GRAD_KINDS as _GRADS
from .context import RELATION_TOL, Cause, Context, fmt
from .exact import rel_diff

#: Steps read from the first divergence on for the global norms.
CLIP_STEPS = 16
#: How equal two global norms must be to be "the same" (clip_grad_norm_ divides by norm + 1e-6).
SAME_NORM = 1e-4


def global_norm(x: Context, side: str, step: int) -> Optional[float]:
    """The run's global norm over its recorded ``.grad`` at the step (from the statistics)."""
    run = x.pair.run(side)
    rows = x.pair.rows(side, step)
    total, found = 0.0, False
    for rec, norm in zip(rows["record"], rows["norm"]):
        if run.record_key(int(rec)).kind == "grad":
            if not np.isfinite(norm):
                return None
            total += float(norm) ** 2
            found = True
    return math.sqrt(total) if found else None


def _digits(m: float) -> Optional[int]:
    """Significant decimal digits of ``m`` (1 or 2, within 1e-5), else None."""
    for d in (1, 2):
        e = 10.0 ** (math.floor(math.log10(m)) - d + 1)
        if abs(m - round(m / e) * e) <= 1e-5 * m:
            return d
    return None


def round_max_norm(n: float, least: int = 0) -> Optional[tuple[int, float]]:
    """(k, M) with ``n * 2**k`` = M a round number (one or two significant digits, within
    1e-5) in [1e-3, 1e4] and k >= ``least``: the fewest digits first, then k closest to 16 (a
    GradScaler's default initial scale is 2^16; each factor 2 of the scale doubles M, so a
    power of two times M is as round and the scale stays a guess unless told otherwise)."""
    if not np.isfinite(n) or n <= 0:
        return None
    found = []
    for k in range(least, 64):
        m = n * 2.0**k
        if m > 1e4:
            break
        if m >= 1e-3:
            d = _digits(m)
            if d is not None:
                found.append((d, abs(k - 16), k, float(f"{m:.2g}")))
    if not found:
        return None
    _, _, k, m = min(found)
    return k, m


def _factor(x: Context) -> Optional[float]:
    """One constant c with A's gradients = c x B's at the hit step (values where stored, else
    the per-record norms), or None."""
    cs = []
    for s, code in x.slots_of(x.step, ("grad",)):
        a, b = x.v("a", s, x.step), x.v("b", s, x.step)
        if a is not None and b is not None and a.shape == b.shape:
            a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
            bb = float(b64 @ b64)
            if bb == 0:
                continue
            c = float(a64 @ b64) / bb
            if rel_diff(a64, c * b64) > RELATION_TOL:
                return None
            cs.append(c)
        elif code != EQUAL:
            i = x.pair.cell(s, x.step)
            cells = x.pair.cells(x.step)
            na, nb = float(cells.a.norm_hi[i]), float(cells.b.norm_hi[i])
            if nb > 0 and np.isfinite(na / nb):
                cs.append(na / nb)
    if not cs or min(cs) <= 0:
        return None
    c = float(np.median(cs))
    return c if max(abs(v / c - 1) for v in cs) < SAME_NORM else None


def rule_clip_while_scaled(x: Context) -> Optional[Cause]:
    """One run's global gradient norm is pinned at a constant from the first divergence on,
    and its gradients are the other's scaled down: that run clips by global norm where the
    other does not (or at a 2^k larger norm: clipped before scaler.unscale_)."""
    if x.slot.kind != "grad" or x.within(x.step, _FORWARD) is False:
        return None
    c = _factor(x)
    if c is None or abs(c - 1) < 10 * x.rtol:
        return None
    small, big = ("a", "b") if c < 1 else ("b", "a")
    steps = [int(t) for t in x.pair.steps[x.pair.steps >= x.step][:CLIP_STEPS]]
    ns, nb = [], []
    for t in steps:
        s_, b_ = global_norm(x, small, t), global_norm(x, big, t)
        if s_ is None or b_ is None:
            break
        ns.append(s_)
        nb.append(b_)
    # the clipped run's norm: the same at every step from the divergence (at least two)
    run_len = 1
    while run_len < len(ns) and abs(ns[run_len] / ns[0] - 1) < SAME_NORM:
        run_len += 1
    if run_len < 2:
        return None
    n = ns[0]
    S, B = small.upper(), big.upper()
    span = f"steps {steps[0]}..{steps[run_len - 1]}"
    big_same = all(abs(v / nb[0] - 1) < SAME_NORM for v in nb[:run_len])
    ev = [
        f"at step {x.step} {x.agree(_FORWARD)}; each gradient of {S} is {B}'s x {fmt(min(c, 1 / c))} "
        "(one constant for all)",
        f"{S}'s global gradient norm is {fmt(n)} at every step of {span}, while {B}'s is "
        + (
            f"{fmt(nb[0])} at every step too"
            if big_same
            else f"{', '.join(fmt(v) for v in nb[: min(run_len, 4)])}"
            + (" ..." if run_len > 4 else "")
        )
        + f": {S}'s gradients are rescaled to one norm at every step (clip_grad_norm_)",
    ]
    scaled = round_max_norm(n, least=4)
    if n >= 1e-3 and _digits(n) is not None:
        # the norm itself is round: clipping in one run only (or at another max_norm)
        ev.append(
            f"{B}'s global norm "
            + (
                f"is {fmt(nb[0])} at every step too: both clip, at different max_norm"
                if big_same
                else f"exceeds {fmt(n)}: {B} does not clip there (no clip_grad_norm_, or a "
                "larger max_norm)"
            )
        )
        return Cause(
            "grad_clipping",
            f"{S} clips gradients by global norm at max_norm {fmt(n)}"
            + (" and B at another" if big_same else f", {B} does not"),
            ev,
            "use the same clip_grad_norm_(parameters, max_norm) call in both runs",
        )
    if scaled is None:
        return None
    k, M = scaled
    both = big_same and round_max_norm(nb[0]) is not None
    if both:
        # both clip, at one max_norm: the big run's norm is max_norm, the ratio the scale
        k, M = round(math.log2(nb[0] / n)), nb[0]
        ev.append(
            f"{B}'s global norm is {fmt(M)} at every step: {B} clips at max_norm {fmt(M)} after "
            f"scaler.unscale_, {S} before it, at the scale 2^{k}: {S}'s gradients are exactly "
            f"{B}'s / 2^{k}"
        )
    else:
        ev.append(
            f"{fmt(n)} = max_norm / scale: {fmt(n)} x 2^{k} = {fmt(M)}, e.g. "
            f"clip_grad_norm_(max_norm={fmt(M)}) on gradients still multiplied by a "
            f"GradScaler's scale 2^{k}"
            + (" (its default initial scale)" if k == 16 else "")
            + ", which scaler.step divides out afterwards (each factor 2 in the scale doubles "
            "the max_norm this reading gives)"
        )
        if max(nb[:run_len]) < M:
            ev.append(
                f"{B}'s global norm stays below {fmt(M)}: {B} clips after scaler.unscale_ and "
                "its clip does not engage"
            )
    return Cause(
        "clip_before_unscale",
        f"{S} clips its gradients while they are still scaled by the GradScaler "
        f"(clip_grad_norm_ before scaler.unscale_): its global norm is max_norm / scale "
        f"({fmt(M)} / 2^{k}) at every step",
        ev,
        f"in {S}, call scaler.unscale_(optimizer) before clip_grad_norm_, then "
        "scaler.step(optimizer) and scaler.update()",
    )


def _clip_value(u: np.ndarray, v: np.ndarray) -> Optional[float]:
    """``c`` when ``u`` is ``v`` clamped elementwise to [-c, c] (``c`` = max |u|, exactly) and
    the clamp engaged on at least one element, else None."""
    u, v = u.astype(np.float64).ravel(), v.astype(np.float64).ravel()
    if not u.size or not np.all(np.isfinite(u)) or not np.all(np.isfinite(v)):
        return None
    c = float(np.max(np.abs(u)))
    if c <= 0 or not np.any(np.abs(v) > c) or not np.array_equal(u, np.clip(v, -c, c)):
        return None
    return c


def rule_clip_by_value(x: Context) -> Optional[Cause]:
    """Every differing gradient of one run is the other's clamped elementwise to [-c, c], one
    ``c`` for all (``clip_grad_value_``): that run clips by value, the other does not (or at a
    larger value). Needs full values of the differing gradients; the relation is exact (a clamp
    copies the elements it does not touch), so rounding cannot fake it."""
    if x.slot.kind not in _GRADS or x.within(x.step, _FORWARD) is False:
        return None
    step = x.step
    differ = x.differing(step, _GRADS)
    if x.slot not in differ:
        return None
    for small, big in (("a", "b"), ("b", "a")):
        cs = []
        for s in differ:
            u, v = x.v(small, s, step), x.v(big, s, step)
            if u is None or v is None or u.shape != v.shape or u.dtype.kind != "f":
                return None
            c = _clip_value(u, v)
            if c is None:
                break
            cs.append(c)
        else:
            c = cs[0]
            if any(abs(ci / c - 1) > 1e-6 for ci in cs):
                continue
            S, B = small.upper(), big.upper()
            clipped = sum(int(np.sum(np.abs(x.v(big, s, step)) > c)) for s in differ)
            ev = [
                f"at step {step} {x.agree(_FORWARD)}; the gradients of {x.names(differ)} differ",
                f"each of them in {S} is {B}'s clamped elementwise to [-{fmt(c)}, {fmt(c)}]: "
                f"{clipped} element(s) beyond {fmt(c)} in {B} are exactly \u00b1{fmt(c)} in "
                f"{S}, every other element is bitwise equal (clip_grad_value_)",
            ]
            return Cause(
                "grad_clipping",
                f"{S} clips gradients by value at {fmt(c)} (clip_grad_value_), {B} does not "
                "(or at a larger value)",
                ev,
                "use the same clip_grad_value_(parameters, clip_value) call, on the same "
                "parameters, in both runs",
            )
    return None

"""Diagnosis rules about gradients: accumulation across steps, scaled gradients, micro-batches.

Each rule: context in, Cause or None out (see context.py).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .align import Slot
from .compare_records import EQUAL
from .context import ACCUMULATION_LOOKBACK, RELATION_TOL, Cause, Context, fmt
from .exact import rel_diff
from .rules_clip import SAME_NORM, global_norm


def _grad_pairs(x: Context, limit: int = 8) -> list[Slot]:
    """The hit's slot and up to ``limit - 1`` other differing gradient slots of its step."""
    out = [x.slot]
    for s, code in x.slots_of(x.step, ("grad", "autograd_grad")):
        if code != EQUAL and s.index != x.slot.index and len(out) < limit:
            out.append(s)
    return out


def rule_accumulation(x: Context) -> Optional[Cause]:
    """One run's .grad equals the sum of the other's gradients since an earlier step."""
    if x.slot.kind not in ("grad", "autograd_grad") or x.prev(x.step) is None:
        return None
    best = None
    for acc, ref in (("a", "b"), ("b", "a")):
        g = x.v(acc, x.slot, x.step)
        if g is None:
            return _accumulation_stats(x)
        total = None
        plain = None
        step = x.step
        for back in range(ACCUMULATION_LOOKBACK + 1):
            gr = x.v(ref, x.slot, step)
            if gr is None or gr.shape != g.shape:
                break
            total = gr.astype(np.float64) if total is None else total + gr
            if back == 0:
                plain = rel_diff(g, gr)
            else:
                r = rel_diff(g, total)
                if r < RELATION_TOL and r < 0.1 * plain and (best is None or r < best[2]):
                    best = (acc, ref, r, step, plain)
            step = x.prev(step)
            if step is None:
                break
    if best is None:
        return None
    acc, ref, r, since, plain = best
    A, R = acc.upper(), ref.upper()
    n_ok = 1
    others = _grad_pairs(x)[1:]
    for s in others:
        g = x.v(acc, s, x.step)
        parts = [x.v(ref, s, t) for t in x.pair.steps if since <= t <= x.step]
        ok = g is not None and parts and all(p is not None and p.shape == g.shape for p in parts)
        if ok and rel_diff(g, np.sum([p.astype(np.float64) for p in parts], axis=0)) < RELATION_TOL:
            n_ok += 1
    steps = f"steps {since}..{x.step}" if since < x.step - 1 else f"steps {since}+{x.step}"
    return Cause(
        "grad_accumulation",
        f"gradients accumulate across steps in {A} (missing zero_grad?)",
        [
            f"{A}'s {x.label(x.slot)} at step {x.step} equals the sum of {R}'s gradients of {steps} "
            f"(residual rel {fmt(r)}; plain difference rel {fmt(plain)})",
            f"the same holds for {n_ok} of {1 + len(others)} differing gradients checked",
        ],
        f"call optimizer.zero_grad() once per step in {A} (before backward); if {A} accumulates "
        "micro-batches on purpose, step the optimizer after the last one only",
    )


def _accumulation_stats(x: Context) -> Optional[Cause]:
    """Statistics-only variant: means add up exactly, so compare mean(A,k) with sum of B's means."""

    def mean(side, step):
        i = x.pair.cell(x.slot, step)
        if i is None:
            return None
        s = getattr(x.pair.cells(step), side)
        return float(s.mean[i]) if s.present[i] else None

    prev = x.prev(x.step)
    for acc, ref in (("a", "b"), ("b", "a")):
        ma, m0, m1 = mean(acc, x.step), mean(ref, x.step), mean(ref, prev)
        if None in (ma, m0, m1):
            continue
        scale = max(abs(ma), abs(m0) + abs(m1), 1e-30)
        if abs(ma - (m0 + m1)) / scale < RELATION_TOL and abs(ma - m0) / scale > 0.1:
            return Cause(
                "grad_accumulation",
                f"gradients accumulate across steps in {acc.upper()} (missing zero_grad?)",
                [
                    f"mean of {acc.upper()}'s {x.label(x.slot)} at step {x.step} = {fmt(ma)} equals "
                    f"{ref.upper()}'s step {x.step} + step {prev} means ({fmt(m0)} + {fmt(m1)}) "
                    "(statistics only)"
                ],
                "call optimizer.zero_grad() once per step",
            )
    return None


def rule_scaled_grads(x: Context) -> Optional[Cause]:
    """Forward and loss agree; each gradient is the other run's times a constant."""
    if x.slot.kind not in ("grad", "autograd_grad"):
        return None
    if not x.within(x.step, ("param", "input", "activation", "loss")):
        return None
    ratios, worst = [], 0.0
    for s in _grad_pairs(x):
        a, b = x.v("a", s, x.step), x.v("b", s, x.step)
        if a is None or b is None or a.shape != b.shape:
            continue
        a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        bb = float(b64 @ b64)
        if bb == 0:
            continue
        c = float(a64 @ b64) / bb
        worst = max(worst, rel_diff(a64, c * b64))
        ratios.append(c)
    if not ratios or worst > RELATION_TOL or all(abs(c - 1) < 10 * x.rtol for c in ratios):
        return None
    same = max(ratios) - min(ratios) <= 1e-3 * max(abs(max(ratios)), 1e-30)
    small, big = ("A", "B") if abs(np.median(ratios)) < 1 else ("B", "A")
    factors = ratios if small == "A" else [1 / c if c else float("inf") for c in ratios]
    ev = [
        f"at step {x.step} {x.agree(('param', 'input', 'activation', 'loss'))}; "
        f"each differing gradient of {small} is "
        f"{big}'s times a constant (residual rel {fmt(worst)})",
        f"factors: {', '.join(fmt(c) for c in factors[:5])}"
        + (" (the same for all)" if same else ""),
    ]
    norms = _global_norms(x)
    if norms is not None:
        ev.append(
            f"global gradient norm at step {x.step}: {fmt(norms[0])} in A, {fmt(norms[1])} in B"
        )
    n = power_of_two(1 / float(np.median(factors))) if same else None
    if n is not None:
        ev.append(f"{big}'s gradients are exactly 2^{n} x {small}'s: a loss scale's factor")
        varies = _norm_varies(x, small.lower())
        if varies:
            ev.append(
                f"{small}'s global gradient norm varies over the steps ({varies}): not clipped "
                "to one norm, so not clipped while scaled"
            )
        return Cause(
            "scaled_gradients",
            f"{big}'s gradients are 2^{n} x {small}'s: an AMP GradScaler's scale is left in "
            f"{big}'s gradients (optimizer.step() instead of scaler.step(optimizer))"
            + (
                ""
                if varies
                else f", or {small}'s were clipped while scaled (clip_grad_norm_ before "
                "scaler.unscale_)"
            ),
            ev,
            "call scaler.unscale_(optimizer) before clipping or inspecting gradients, and "
            "scaler.step(optimizer) instead of optimizer.step()",
        )
    what = (
        "gradient clipping by global norm or loss scaling"
        if same
        else "per-parameter gradient clipping or scaling"
    )
    return Cause(
        "scaled_gradients",
        f"{small}'s gradients are scaled down: {what}",
        ev,
        "compare the clip_grad_norm_ / clip_grad_value_ calls and loss scaling (GradScaler, "
        "loss / n) of the two runs",
    )


def _norm_varies(x: Context, side: str) -> str:
    """The run's global gradient norms over the steps from the hit (at most 4 shown) when they
    differ from step to step (clip_grad_norm_ would pin them), else ""."""
    norms = []
    for t in x.pair.steps[x.pair.steps >= x.step][:4].tolist():
        n = global_norm(x, side, int(t))
        if n is None or n == 0:
            break
        norms.append(n)
    if len(norms) < 2 or all(abs(v / norms[0] - 1) < SAME_NORM for v in norms):
        return ""
    return ", ".join(fmt(v) for v in norms)


def power_of_two(k: float, least: int = 4) -> Optional[int]:
    """n when ``k`` is ``2**n`` with ``n >= least`` (a GradScaler's scale), else None. Within
    2e-5 in log2 (1.4e-5 relative): clip_grad_norm_ divides by ``norm + 1e-6``, which leaves a
    clipped-while-scaled gradient ``1e-6 / norm`` away from the exact power of two."""
    if not np.isfinite(k) or k <= 0:
        return None
    n = float(np.log2(k))
    return int(round(n)) if round(n) >= least and abs(n - round(n)) < 2e-5 else None


def _global_norms(x: Context) -> Optional[tuple[float, float]]:
    """Each run's global gradient norm over the gradients both recorded at this step."""
    sa = sb = 0.0
    for s, _ in x.slots_of(x.step, ("grad",)):
        a, b = x.v("a", s, x.step), x.v("b", s, x.step)
        if a is None or b is None or a.shape != b.shape or a.dtype.kind != "f":
            return None
        sa += float(np.sum(np.square(a.astype(np.float64))))
        sb += float(np.sum(np.square(b.astype(np.float64))))
    return (float(np.sqrt(sa)), float(np.sqrt(sb))) if sa > 0 and sb > 0 else None


def rule_unscaled_micro_batches(x: Context) -> Optional[Cause]:
    """Summed micro-batch losses that are n x the other run's loss: the loss was not divided."""
    s = x.slot
    if s.kind != "loss" or s.call != -1:
        return None
    a, b = x.v("a", s, x.step), x.v("b", s, x.step)
    if a is None or b is None or a.size != 1 or b.size != 1:
        return None
    va, vb = float(a.ravel()[0]), float(b.ravel()[0])
    for side, n, mine, other in (("A", len(s.keys_a), va, vb), ("B", len(s.keys_b), vb, va)):
        if n > 1 and other != 0 and abs(mine / other - n) < 1e-3 * n:
            return Cause(
                "unscaled_micro_batches",
                f"{side}'s {n} micro-batch losses are not divided by {n}: its gradients are {n}x too large",
                [
                    f"sum of {side}'s {n} loss calls at step {x.step} = {fmt(mine)}, {n}x the other run's "
                    f"{fmt(other)}"
                ],
                f"backpropagate loss / {n} for each micro-batch (or scale the learning rate)",
            )
    return None


def _scalars(x: Context, side: str, slot: Slot) -> Optional[float]:
    v = x.v(side, slot, x.step)
    return float(v.ravel()[0]) if v is not None and v.size == 1 else None


def rule_loss_scale(x: Context):
    """Every loss is the other run's times one constant k, with the forward pass agreeing: an
    un-normalised accumulation over k micro-batches, a loss scale, or a loss weight."""
    if x.slot.kind != "loss" or x.within(x.step, ("param", "input", "activation")) is False:
        return None
    ratios, calls = [], {"a": 0, "b": 0}
    for s, _ in x.slots_of(x.step, ("loss",)):
        va, vb = _scalars(x, "a", s), _scalars(x, "b", s)
        calls["a"] += va is not None
        calls["b"] += vb is not None
        if va is not None and vb is not None and vb != 0 and np.isfinite(va / vb):
            ratios.append(va / vb)
    if not ratios:
        return None
    c = float(np.median(ratios))
    if c <= 0 or max(abs(r / c - 1) for r in ratios) > 1e-4 or abs(c - 1) < 10 * x.rtol:
        return None
    big, k = ("A", c) if c > 1 else ("B", 1 / c)
    n = calls[big.lower()]
    if calls["a"] != calls["b"] and not (n > 1 and abs(k - n) < 1e-3 * n):
        return None  # different loss calls per step: a ratio of their sums is no loss weight
    ev = [
        f"at step {x.step} each of the {len(ratios)} loss call(s) of {big} is {fmt(k)}x the other "
        f"run's; {x.agree(('param', 'input', 'activation'))}"
    ]
    gk = _grad_factor(x, big)
    if gk is not None:
        ev.append(f"{big}'s gradients are {fmt(gk)}x the other run's (residual below 2%)")
    if n > 1 and abs(k - n) < 1e-3 * n:
        return Cause(
            "unscaled_micro_batches",
            f"{big}'s {n} micro-batch losses are not divided by {n}: its gradients are {n}x too "
            "large (un-normalised gradient accumulation)",
            ev,
            f"backpropagate loss / {n} for each of the {n} micro-batches (or scale the learning "
            "rate)",
        )
    p2 = power_of_two(k)
    if p2 is None:
        # a loss weight only from corroborating evidence: one ratio of two different losses
        # exists for any two losses (a dropped term, another loss function)
        why = _weight_corroborated(x, c, len(ratios), gk, k)
        if why is None:
            return None
        ev.append(why)
    weight = Cause(
        "loss_scale",
        f"{big}'s loss is {fmt(k)}x the other run's: a loss weight or normalisation differs "
        "(sum vs mean, / k)",
        ev,
        "use the same loss reduction and weights in both runs",
    )
    if p2 is None:
        return weight
    fix = (
        "a GradScaler scales the loss; call scaler.unscale_(optimizer) before clipping or "
        "inspecting gradients, and scaler.step(optimizer) instead of optimizer.step()"
    )
    scaled = f"{big}'s loss is scaled by 2^{p2} (AMP GradScaler)"
    if gk is not None and abs(gk - 1) < 0.01:
        # only a loss scale that is removed again leaves the gradients as they were
        return Cause(
            "loss_scaling", scaled + "; its gradients are unscaled before the update", ev, fix
        )
    if gk is not None and abs(gk / k - 1) < 0.01:
        # a loss weight of 2^n does the same to the gradients: both fit, the scaler first
        return [
            Cause("loss_scaling", scaled + " and its gradients are not unscaled", ev, fix),
            weight,
        ]
    if gk is not None and gk < 1:
        norms = _global_norms(x)
        if norms is not None:
            g = norms[0] if big == "A" else norms[1]
            ev = ev + [
                f"{big}'s global gradient norm is {fmt(g)}; times the loss scale 2^{p2} it is "
                f"{fmt(g * k)}: a clip_grad_norm_ max_norm applied to the scaled gradients?"
            ]
        return Cause(
            "loss_scaling",
            scaled + f"; its gradients are {fmt(gk)}x the other run's, smaller than unscaled: "
            "clipped while still scaled (clip_grad_norm_ before scaler.unscale_)",
            ev,
            fix,
        )
    return Cause("loss_scaling", scaled, ev, fix)


def _weight_corroborated(
    x: Context, c: float, n_ratios: int, gk: Optional[float], k: float
) -> Optional[str]:
    """What besides one loss ratio shows a constant loss weight c (A's loss / B's), or None:
    several loss calls of the step with the same ratio, the gradients scaled by the same
    factor, or the same ratio at another step."""
    if n_ratios >= 2:
        return f"all {n_ratios} loss calls of step {x.step} have this ratio"
    if gk is not None and abs(gk / k - 1) < 0.01:
        return "the gradients are scaled by the same factor as the loss"
    for t in x.pair.steps.tolist():
        if t == x.step:
            continue
        got = []
        for s, _ in x.slots_of(t, ("loss",)):
            va, vb = x.v("a", s, t), x.v("b", s, t)
            if va is None or vb is None or va.size != 1 or vb.size != 1:
                continue
            a, b = float(va.ravel()[0]), float(vb.ravel()[0])
            if b != 0 and np.isfinite(a / b):
                got.append(a / b)
        if got and all(abs(r / c - 1) <= 1e-4 for r in got):
            return f"the losses have the same ratio at step {t} (within 1e-4)"
    return None


def _grad_factor(x: Context, big: str) -> Optional[float]:
    """One factor that maps the other run's gradients at this step onto ``big``'s, or None."""
    num = den = 0.0
    worst = 0.0
    found = False
    pairs = []
    for s, _ in x.slots_of(x.step, ("grad", "autograd_grad")):
        a, b = x.v("a", s, x.step), x.v("b", s, x.step)
        if a is None or b is None or a.shape != b.shape:
            continue
        hi, lo = (a, b) if big == "A" else (b, a)
        hi, lo = hi.astype(np.float64).ravel(), lo.astype(np.float64).ravel()
        num += float(hi @ lo)
        den += float(lo @ lo)
        pairs.append((hi, lo))
        found = True
    if not found or den == 0:
        return None
    k = num / den
    for hi, lo in pairs:
        worst = max(worst, rel_diff(hi, k * lo))
    return k if worst < RELATION_TOL else None

"""Diagnosis rule: an extra (or missing) gradient path, told from parameter gradients alone.

rules_graph's ``rule_extra_grad_path`` sees an extra backward pass in recorded output gradients.
Without them (``--kinds``, or a run that takes gradients with ``torch.autograd.grad`` of chosen
parameters only, which backpropagates into no module output it does not need), the path still
shows in the parameter gradients of a step whose forward agrees:

- a parameter has a gradient in one run only at this step, while the other run computes
  gradients for it at other steps (so it is not frozen) and the one run's gradient is not all
  zeros (a ``zero_grad(set_to_none=False)`` of an unused parameter): a backward pass reaches it
  in one run only (a GAN discriminator loss flowing into the generator);
- the gradients of a set of parameters differ while those of the other parameters agree, and
  the difference is none of the known transforms of a gradient (a factor: clipping or scaling;
  an elementwise clip; a term proportional to the weights: L2 decay; the previous step's
  gradient: a missing ``zero_grad``): the backward into that sub-network differs.

- every parameter's gradient differs while the losses agree bitwise (a target or input computed
  by the model and not detached, a TD target): the same test of known transforms, and loss
  scaling or another reduction (a factor) or another loss (its value) ruled out;
- recorded as statistics only: the norms, means, minima and maxima rule a transform out where
  they can (one factor maps max, min, mean and norm alike; a clamp lowers the norm and moves the
  maximum or minimum to the clip value; means add up for a missing zero_grad, norms obey the
  triangle inequality; one L2 coefficient from the means for all, within the norms' bounds);
  a path is named only for gradients where all are ruled out, "(from statistics)".

Which run has the path is named when the records show it (a gradient in one run only, all
zeros in the other, autograd.grad calls that leave it out; output gradients: rules_graph).
Otherwise the records are symmetric (an extra contribution d in A and the same d missing from
B are the same records), and the cause says so instead of naming a side.

Every statement is about compared kinds only: the rule needs the losses or the activations
compared (the forward is then known to agree), and says which were. Context in, Cause or None
out (see context.py).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..modclass import ROOT, owner
from .align import Slot
from .compare_records import EQUAL, MISSING_A, MISSING_B
from .context import FORWARD_KINDS as _FORWARD
from .context import GRAD_KINDS as _GRADS
from .context import RELATION_TOL, Cause, Context, fmt
from .exact import rel_diff
from .rules_gradterm import l2_coefficient


def _forward_agrees(x: Context, step: int) -> bool:
    """The forward was compared beyond the parameters (losses or activations) and agrees."""
    if "loss" not in x.compared and "activation" not in x.compared:
        return False
    if x.within(step, _FORWARD) is not True:
        return False
    return x.slot.kind == "grad_output" or x.within(step, ("grad_output",)) is not False


def _subnet(x: Context, slots: list[Slot]) -> str:
    """These records (parameter or module output gradients) by the outermost modules that hold
    them: a module is named when every record of these kinds under it is in the set (``G`` for
    all of G's parameters), else the records are named one by one; each with its class."""
    kinds = tuple({s.kind for s in slots})
    every = [(s.kind, s.name, owner(s.kind, s.name)) for s, _ in x.slots_of(x.step, kinds)]
    mine = {(s.kind, s.name) for s in slots}
    named = []
    for s in slots:
        m = owner(s.kind, s.name)
        pick = None
        if m and m != ROOT:
            parts = m.split(".")
            for i in range(1, len(parts) + 1):
                top = ".".join(parts[:i])
                under = [(k, n) for k, n, o in every if o and (o == top or o.startswith(top + "."))]
                if all(u in mine for u in under):
                    pick = top
                    break
        named.append(("grad_output", pick) if pick else (s.kind, s.name))
    return x.names(list(dict.fromkeys(named)), 3)


def _calls_text(x: Context, step: int) -> Optional[str]:
    """ "both runs take 2 gradients (backward or autograd.grad calls) of losses that agree" """
    if "loss" not in x.compared:
        return None
    na, nb = x.loss_calls("a", step), x.loss_calls("b", step)
    if na == nb:
        return (
            f"both runs take {na} gradient(s) (backward or autograd.grad calls) at step {step}, "
            "of losses that agree"
        )
    return (
        f"A takes {na} gradient(s) (backward or autograd.grad calls) at step {step}, B {nb}; "
        "the compared losses agree"
    )


def _autograd_calls(x: Context, side: str, step: int) -> Optional[list[set]]:
    """Per torch.autograd.grad call of the step (in order), the parameters it returned; None
    when the run records none or its calls cannot be told apart (losses not recorded)."""
    run = x.pair.run(side)
    rows = np.sort(x.pair.rows(side, step), order="seq")
    calls: list[set] = []
    seen_grad = False
    for row in rows:
        k = run.record_key(int(row["record"]))
        if k.kind == "loss":
            calls.append(set())
        elif k.kind == "autograd_grad" and not k.name.startswith("input["):
            seen_grad = True
            if not calls:
                return None
            calls[-1].add(k.name)
    calls = [c for c in calls if c]
    return calls if seen_grad and len(calls) > 1 else None


def _routing(x: Context, step: int, differ: list[Slot]) -> tuple[Optional[str], list[str]]:
    """Which run asks some autograd.grad call for gradients of other parameters only: there, a
    loss's path into the differing parameters may be left out. (side or None, evidence)."""
    names = {s.name for s in differ}
    ev, sides = [], []
    for side in ("a", "b"):
        calls = _autograd_calls(x, side, step)
        if calls is None:
            continue
        skip = [i for i, c in enumerate(calls) if not (c & names)]
        reach = [i for i, c in enumerate(calls) if c & names]
        if not skip or not reach:
            continue
        S = side.upper()
        other = sorted(set().union(*(calls[i] for i in skip)))
        ev.append(
            f"{S} takes {len(calls)} torch.autograd.grad calls at step {step}; the parameters "
            f"whose gradients differ get theirs from call(s) {', '.join(map(str, reach))} only; "
            f"call(s) {', '.join(map(str, skip))} ask for "
            f"{x.names([('grad', n) for n in other], 3)} only: a loss whose path also runs "
            "through the differing parameters gets no gradient there in "
            f"{S} (autograd.grad returns only the inputs it is asked for)"
        )
        sides.append(S)
    return (sides[0] if len(sides) == 1 else None), ev


def rule_grad_path(x: Context) -> Optional[Cause]:
    """Parameters of a sub-network get a gradient (or a different one) in one run while the
    forward and every other parameter's gradient agree: an extra or missing gradient path."""
    if x.slot.kind not in (*_GRADS, "grad_output") or not _forward_agrees(x, x.step):
        return None
    if x.hit.code in (MISSING_A, MISSING_B):
        return None if x.slot.kind == "grad_output" else _reached_in_one(x)
    return _differs_in_subnet(x)


def _fix(extra: Optional[str], missing: Optional[str] = None) -> str:
    if missing is not None:
        return (
            f"in {missing}, ask each torch.autograd.grad call for every parameter its loss "
            "should train (or sum into .grad with backward()); if the path is unwanted, detach "
            f"the shared tensor in the other run"
        )
    where = f" in {extra}" if extra else ""
    return (
        f"detach the tensor that feeds the other loss{where} (e.g. D(fake.detach()) in a GAN's "
        "discriminator step) or zero these parameters' gradients between the backward passes; "
        "with torch.autograd.grad, ask each call for every parameter its loss should train"
    )


def _reached_in_one(x: Context) -> Optional[Cause]:
    h, step = x.hit, x.step
    has, lacks = ("b", "a") if h.code == MISSING_A else ("a", "b")
    gone = [s for s, code in x.slots_of(step, _GRADS) if code == h.code]
    if x.slot not in gone:
        gone.insert(0, x.slot)
    # frozen there: the lacking run never computes a gradient for it
    if any(not getattr(s, f"keys_{lacks}") for s in gone):
        return None
    # all zeros where it is present: an unused parameter zeroed (set_to_none=False), not a path
    vals = [x.v(has, s, step) for s in gone]
    if any(v is None for v in vals) or all(not np.any(v) for v in vals):
        return None
    H, L = has.upper(), lacks.upper()
    other = [t for t in x.pair.steps.tolist() if t != step and _present(x, lacks, gone[0], t)]
    both = [(s, c) for s, c in x.slots_of(step, _GRADS) if c not in (MISSING_A, MISSING_B)]
    n_same = sum(1 for s, c in both if x.agrees(s, c, step))
    ev = [
        f"at step {step} {x.agree(_FORWARD)}, but {H} has gradients for {len(gone)} "
        f"parameter(s) that {L} does not: {x.names(gone)}",
        f"{L} computes gradients for them at other steps"
        + (f" (step {other[0]})" if other else "")
        + ": they are not frozen there, so a backward pass reaches them in "
        f"{H} only at this step",
    ]
    if both:
        ev.append(
            f"the gradients of {n_same} of the {len(both)} parameter(s) both runs have at "
            "this step agree"
        )
    calls = _calls_text(x, step)
    if calls:
        ev.append(calls)
    return Cause(
        "extra_grad_path",
        f"an extra gradient path reaches {_subnet(x, gone)} in {H} at step {step} "
        "(a missing .detach()?)",
        ev,
        _fix(H),
    )


def _present(x: Context, side: str, slot: Slot, step: int) -> bool:
    i = x.pair.cell(slot, step)
    return i is not None and bool(getattr(x.pair.cells(step), side).present[i])


def _explained(x: Context, slot: Slot, step: int, a: np.ndarray, b: np.ndarray) -> Optional[str]:
    """A known transform of a gradient that maps one run's onto the other's, or None."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    plain = rel_diff(a, b)
    bb = float(b @ b)
    if bb > 0 and rel_diff(a, (float(a @ b) / bb) * b) < RELATION_TOL:
        return "a factor (clipping or scaling)"
    for u, v in ((a, b), (b, a)):
        m = float(np.max(np.abs(u))) if u.size else 0.0
        if m > 0 and rel_diff(u, np.clip(v, -m, m)) < 1e-6 * max(plain, 1e-30) + 1e-12:
            return "an elementwise clip (clip_grad_value_)"
    ps = x.pair.slot("param", slot.name)
    p = None if ps is None else x.v("a", ps, step)
    if p is not None and p.size == a.size and l2_coefficient(a - b, p) is not None:
        return "a term proportional to the weights (L2 decay)"
    prev = x.prev(step)
    if prev is not None:
        for u, v, side in ((a, b, "b"), (b, a, "a")):
            w = x.v(side, slot, prev)
            if w is not None and w.size == u.size:
                r = rel_diff(u, v + w.astype(np.float64).ravel())
                if r < RELATION_TOL and r < 0.1 * plain:
                    return "the previous step's gradient (a missing zero_grad)"
    return None


def _partition(x: Context, step: int, kinds: tuple[str, ...]) -> tuple[list, list]:
    """(differing, agreeing) records of these kinds at the step, both runs present."""
    differ, agree = [], []
    for s, code in x.slots_of(step, kinds):
        if code not in (MISSING_A, MISSING_B):
            (agree if x.agrees(s, code, step) else differ).append(s)
    return differ, agree


def _stats(x: Context, side: str, slot: Slot, step: int) -> Optional[dict]:
    """One call's statistics of a record (norm, mean, min, max, numel), or None."""
    i = x.pair.cell(slot, step)
    if i is None:
        return None
    s = getattr(x.pair.cells(step), side)
    if not s.present[i] or s.count[i] != 1 or s.nan[i] or s.inf[i] or not s.numel[i]:
        return None
    return {
        "norm": float(s.norm_hi[i]),
        "mean": float(s.mean[i]),
        "min": float(s.min[i]),
        "max": float(s.max[i]),
        "n": int(s.numel[i]),
    }


def _close(u: float, v: float, tol: float) -> bool:
    return abs(u - v) <= tol * max(abs(u), abs(v), 1e-30)


def _stats_factor(a: dict, b: dict) -> bool:
    """Can one factor map B's gradient onto A's, as far as the statistics show?"""
    if a["norm"] == 0 or b["norm"] == 0:
        return True
    scale = max(abs(a["max"]), abs(a["min"]))
    rms = a["norm"] / np.sqrt(a["n"])
    for c in (a["norm"] / b["norm"], -a["norm"] / b["norm"]):
        hi, lo = (b["max"], b["min"]) if c > 0 else (b["min"], b["max"])
        if (
            abs(a["max"] - c * hi) <= RELATION_TOL * scale
            and abs(a["min"] - c * lo) <= RELATION_TOL * scale
            and abs(a["mean"] - c * b["mean"]) <= RELATION_TOL * rms
        ):
            return True
    return False


def _stats_clip(u: dict, v: dict) -> bool:
    """Can ``u`` be ``v`` clamped elementwise to [-m, m] (clip_grad_value_)? A clamp lowers
    the norm and moves the maximum to m or the minimum to -m (both when both move)."""
    if u["norm"] > v["norm"] * (1 + 1e-6):
        return False
    up, down = not _close(u["max"], v["max"], 1e-6), not _close(u["min"], v["min"], 1e-6)
    if not up and not down:
        return False
    if (up and not u["max"] < v["max"]) or (down and not u["min"] > v["min"]):
        return False
    return not (up and down) or _close(u["max"], -u["min"], 1e-6)


def _stats_accumulated(u: dict, v: dict, vp: Optional[dict]) -> bool:
    """Can ``u`` be ``v`` plus ``vp`` (the other run's previous gradient: a missing
    zero_grad)? Means add exactly; norms obey the triangle inequality."""
    if vp is None:
        return False
    rms = (u["norm"] + v["norm"] + vp["norm"]) / np.sqrt(u["n"])
    if abs(u["mean"] - (v["mean"] + vp["mean"])) > RELATION_TOL * rms:
        return False
    slack = 1 + RELATION_TOL
    return abs(u["norm"] - v["norm"]) <= vp["norm"] * slack <= (u["norm"] + v["norm"]) * slack**2


def _stats_l2(x: Context, s: Slot, step: int, a: dict, b: dict) -> Optional[float]:
    """The L2 coefficient wd with g_A - g_B = wd * p that the means give, when the norms allow
    it (| |g_A| - |g_B| | <= |wd| |p| <= |g_A| + |g_B|); None when they do not."""
    ps = x.pair.slot("param", s.name)
    p = None if ps is None else _stats(x, "a", ps, step)
    if p is None or p["n"] != a["n"]:
        return None
    if p["mean"] == 0:
        return None if a["mean"] != b["mean"] else 0.0
    wd = (a["mean"] - b["mean"]) / p["mean"]
    size = abs(wd) * p["norm"]
    slack = 1 + RELATION_TOL
    if abs(a["norm"] - b["norm"]) > size * slack or size > (a["norm"] + b["norm"]) * slack:
        return None
    return wd


def _stats_unexplained(x: Context, step: int, differ: list[Slot]) -> Optional[list[str]]:
    """From statistics alone (norm, mean, min, max): the differing gradients for which a
    factor, an elementwise clip, one L2 term for all and a missing zero_grad are all ruled
    out (their names); None when some statistics are missing."""
    prev = x.prev(step)
    wds: dict[str, Optional[float]] = {}
    stats = {}
    for s in differ:
        a, b = _stats(x, "a", s, step), _stats(x, "b", s, step)
        if a is None or b is None or a["n"] != b["n"]:
            return None
        stats[s.name] = (a, b)
        wds[s.name] = _stats_l2(x, s, step, a, b)
    fitted = [w for w in wds.values() if w is not None]
    one_wd = (
        bool(fitted)
        and len(fitted) == len(differ)
        and all(_close(w, fitted[0], RELATION_TOL) for w in fitted)
    )
    out = []
    for s in differ:
        a, b = stats[s.name]
        ap = _stats(x, "a", s, prev) if prev is not None else None
        bp = _stats(x, "b", s, prev) if prev is not None else None
        if (
            _stats_factor(a, b)
            or _stats_clip(a, b)
            or _stats_clip(b, a)
            or _stats_accumulated(a, b, bp)
            or _stats_accumulated(b, a, ap)
            or one_wd
        ):
            continue
        out.append(s)
    return out


def _losses_equal(x: Context, step: int) -> bool:
    """The losses were compared and agree bitwise at the step (fingerprints prove it)."""
    if "loss" not in x.compared:
        return False
    found = [code for _, code in x.slots_of(step, ("loss",))]
    return bool(found) and all(code == EQUAL for code in found)


def _reach_counts(x: Context, step: int, names: list[str]) -> Optional[tuple[list, list]]:
    """Per parameter, the backward passes that accumulated into its .grad at the step in A
    and in B (``/reach``), or None where either run did not record them, or where one has a
    count of 0 for a gradient it recorded (left from an earlier step, or a name the map
    changed): the counts then say nothing about this step's paths."""
    ra, rb = x.pair.run("a").reach(step), x.pair.run("b").reach(step)
    if ra is None or rb is None or not names:
        return None
    ca, cb = [ra.get(n, 0) for n in names], [rb.get(n, 0) for n in names]
    return (ca, cb) if min(ca + cb) >= 1 else None


def _reach_side(
    x: Context, step: int, differ: list[Slot], agree: list[Slot]
) -> tuple[Optional[str], list[str], Optional[str]]:
    """The run in which more backward passes reach the parameters whose gradients differ:
    (side or None, evidence, why no side or None). A path from another backward call shows
    there; paths within one backward pass meet in one accumulation and count once."""
    grads = [s for s in differ if s.kind == "grad"]
    counts = _reach_counts(x, step, [s.name for s in grads])
    if counts is None:
        return None, [], None
    ca, cb = counts
    if all(a > b for a, b in zip(ca, cb)) or all(a < b for a, b in zip(ca, cb)):
        side = "A" if ca[0] > cb[0] else "B"
        other = "B" if side == "A" else "A"
        ev = [
            f"backward passes that accumulate into the .grad of {x.names(grads, 3)} at step "
            f"{step}: {_counts_text(ca)} in A, {_counts_text(cb)} in B (counted by a "
            "post-accumulate-grad hook per parameter): a backward pass reaches them in "
            f"{side} and not in {other}"
        ]
        rest = [s for s in agree if s.kind == "grad"]
        same = _reach_counts(x, step, [s.name for s in rest])
        if same is not None and same[0] == same[1]:
            ev.append(
                f"the other {len(rest)} parameter(s) are reached by as many backward passes "
                "in both runs"
            )
        ev.append(
            f"so the extra path is in {side} (or {other} cuts a path that {side} keeps: a "
            f".detach() or no_grad too many in {other})"
        )
        return side, ev, None
    if ca == cb:
        return (
            None,
            [],
            (
                f"as many backward passes accumulate into their .grad in both runs "
                f"({_counts_text(ca)}): the paths part within one backward pass, where they meet "
                "in one accumulation"
            ),
        )
    return (
        None,
        [],
        (
            f"the backward passes that accumulate into them differ both ways ({_counts_text(ca)} "
            f"in A, {_counts_text(cb)} in B)"
        ),
    )


def _counts_text(counts: list[int]) -> str:
    got = sorted(set(counts))
    return str(got[0]) if len(got) == 1 else f"{got[0]}..{got[-1]}"


def _no_side(x: Context, step: int, kinds: tuple[str, ...], reach: Optional[str] = None) -> str:
    """Why the run with the path is not named: the records are symmetric (the numbers of
    gradient calls are said next to it, by _calls_text)."""
    reasons = ["no torch.autograd.grad call leaves these parameters out in either run"]
    reasons.append("neither run's gradients of them are all zeros")
    if reach is not None:
        reasons.append(reach)
    if "grad_output" in x.compared:
        reasons.append(
            "the output gradients were compared and no module's output receives gradients "
            "from more backward passes in one run"
        )
    else:
        reasons.append(
            "output gradients were not compared (they would count the backward passes that "
            "reach each module)"
        )
    what = "output gradients" if kinds == ("grad_output",) else "gradients"
    return (
        "which run has the path is not known from these records: "
        + "; ".join(reasons)
        + f". An extra contribution d in one run's {what} and the same contribution missing "
        "from the other's are the same records (g_A - g_B = d either way), and which run's "
        "gradient norm is larger says nothing about which one is intended"
    )


def _differs_in_subnet(x: Context) -> Optional[Cause]:
    step = x.step
    kinds = ("grad_output",) if x.slot.kind == "grad_output" else _GRADS
    differ, agree = _partition(x, step, kinds)
    if not differ or x.slot not in differ:
        return None
    every = not agree
    # every gradient differs: a path through the whole network (a target or input computed by
    # the model and not detached) only if the losses agree bitwise (a different loss function
    # or reduction would change them) and no factor explains it (loss scaling)
    if every and (kinds != _GRADS or not _losses_equal(x, step)):
        return None
    zero = {"a": True, "b": True}
    known = []
    stats_only = False
    for s in differ:
        a, b = x.v("a", s, step), x.v("b", s, step)
        if a is None or b is None:
            stats_only = True
            break
        if a.shape != b.shape or a.dtype.kind != "f":
            return None
        known.append(_explained(x, s, step, a, b))
        zero["a"] &= not np.any(a)
        zero["b"] &= not np.any(b)
    if stats_only:
        left = _stats_unexplained(x, step, differ)
        if not left:
            return None  # statistics cannot rule out a scale, clip, decay or accumulation
        zero = {
            side: all((_stats(x, side, s, step) or {}).get("norm") == 0 for s in differ)
            for side in ("a", "b")
        }
    # one transform for every differing gradient is another cause (a small tensor alone can
    # fit a factor by chance: a scalar-output network's gradients are nearly parallel)
    elif all(k is not None for k in known):
        return None
    what = "output gradients" if kinds == ("grad_output",) else "gradients"
    unit = "module(s)" if kinds == ("grad_output",) else "parameter(s)"
    where = _subnet(x, differ)
    exact = all(code == EQUAL for s, code in x.slots_of(step, kinds) if s in agree)
    if every:
        ev = [
            f"at step {step} {x.agree(_FORWARD)}, the losses bitwise; the {what} of every "
            f"one of the {len(differ)} {unit} differ ({x.names(differ)})",
        ]
    else:
        ev = [
            f"at step {step} {x.agree(_FORWARD)}; the {what} of {len(differ)} {unit} "
            f"differ ({x.names(differ)}) while those of the other {len(agree)} agree"
            + ("" if exact or not stats_only else " as far as their statistics show")
            + f" ({x.names(agree, 3)})",
        ]
    if stats_only:
        ev.append(
            "recorded as statistics only: the norms, means, minima and maxima of "
            f"{x.names(left, 3)} rule out one factor (clipping, scaling), an elementwise clip, "
            "one term proportional to the weights for all (L2 decay) and the other run's "
            "previous gradient (missing zero_grad); the values themselves were not compared"
        )
    else:
        ev.append(
            "the difference is not one factor (clipping, scaling), elementwise clip, term "
            "proportional to the weights (L2 decay) or previous step's gradient (missing "
            "zero_grad) for all of them: a contribution to these gradients in one run that "
            "the other lacks"
        )
    if every:
        ev.append(
            "not loss scaling or another reduction (no single factor maps one run's gradients "
            "onto the other's), not another loss value (the losses agree bitwise): a loss "
            "whose value is the same and whose gradient reaches every parameter differently"
        )
    side = None
    if zero["a"] != zero["b"]:
        side = "B" if zero["a"] else "A"
        ev.append(
            f"their {what} are all zeros in {'A' if side == 'B' else 'B'}: no backward pass "
            "reaches them there"
        )
    pdiff, pagree = (differ, agree) if kinds == _GRADS else _partition(x, step, _GRADS)
    rside, rev = _routing(x, step, pdiff) if pdiff else (None, [])
    ev.extend(rev)
    cside, cev, why_not = (None, [], None)
    if side is None and rside is None:
        cside, cev, why_not = _reach_side(x, step, pdiff, pagree)
        ev.extend(cev)
    calls = _calls_text(x, step)
    if calls:
        ev.append(calls)
    if side is None and rside is None and cside is None:
        ev.append(_no_side(x, step, kinds, why_not))
    side = side or cside
    if cside is not None:
        ev.append(
            "not a backward hook or custom autograd.Function alone: those change a gradient, "
            "not how many backward passes reach it"
        )
    elif _same_hooks(x) and _same_functions(x):
        ev.append(
            "the user's backward hooks on the traced modules and parameters and the custom "
            "autograd.Functions in the first step's graphs are the same in both runs "
            "(recorded), so neither; "
            + ("ranked second: " if every else "")
            + "a hook on an intermediate tensor (registered in forward, not recorded) that "
            "changes these gradients alone "
            + ("(or gradient noise) " if every else "")
            + "would look the same"
        )
    elif _same_hooks(x):
        ev.append(
            "the user's backward hooks on the traced modules and parameters are the same in "
            "both runs (recorded at trace entry and exit), so not such a hook; "
            + ("ranked second: " if every else "")
            + "a custom autograd.Function or a hook on an intermediate tensor (registered in "
            "forward, not recorded) that changes these gradients alone "
            + ("(or gradient noise) " if every else "")
            + "would look the same"
        )
    else:
        ev.append(
            ("ranked second: " if every else "")
            + "a backward hook or custom autograd.Function that changes these gradients alone "
            + ("(or gradient noise) " if every else "")
            + "would look the same"
        )
    if not stats_only:
        worst = max((x.rel(s, step) or 0.0) for s in differ)
        ev.append(f"largest relative difference among them: {fmt(worst)}")
    if side is not None:
        title = f"an extra gradient path reaches {where} in {side} (a missing .detach()?)"
    elif rside is not None:
        other = "A" if rside == "B" else "B"
        title = (
            f"a gradient path into {where} is missing in {rside} (or extra in {other}): "
            f"{rside}'s torch.autograd.grad calls leave it out"
        )
    elif every:
        title = (
            f"a gradient path differs for every parameter ({where}) while the loss agrees "
            "bitwise: an extra (or missing) path in one run, side not known (a .detach() "
            "missing on a target or input computed by the model?)"
        )
    else:
        title = (
            f"a gradient path into {where} differs: an extra (or missing) path in one run, "
            "side not known (a forgotten .detach()?)"
        )
    if stats_only:
        title += " (from statistics)"
    fix = _fix(side) if side is not None or rside is None else _fix(None, rside)
    return Cause("extra_grad_path", title, ev, fix)


def _same_hooks(x: Context) -> bool:
    """Both runs recorded their backward hooks (``backward_hooks``) and they are the same."""
    ha, hb = x.pair.run("a").backward_hooks, x.pair.run("b").backward_hooks
    return ha is not None and hb is not None and _canon(ha) == _canon(hb)


def _same_functions(x: Context) -> bool:
    """Both runs recorded the custom autograd Functions of their first step's graphs (walked
    whole) and they are the same."""
    fa, fb = x.pair.run("a").custom_functions, x.pair.run("b").custom_functions
    if fa is None or fb is None or not (fa.get("complete") and fb.get("complete")):
        return False
    return sorted(fa.get("names") or []) == sorted(fb.get("names") or [])


def _canon(hooks: dict) -> dict:
    return {part: hooks.get(part) or {} for part in ("modules", "params", "global")}


def _zero_none_slots(x: Context, step: int) -> tuple[list[Slot], Optional[str]]:
    """Gradient slots None in one run and all zeros in the other at ``step`` (compared as
    equal, compare_records.none_vs_zero), and the run that has the zeros ("a"/"b")."""
    c = x.pair.cells(step)
    out, has = [], set()
    for i in np.flatnonzero((c.code == EQUAL) & (c.a.present != c.b.present)):
        slot = x.pair.al.slots[int(c.slot[i])]
        if slot.kind in _GRADS:
            out.append(slot)
            has.add("a" if c.a.present[i] else "b")
    return out, (has.pop() if len(has) == 1 else None)


def rule_zero_vs_none(x: Context) -> Optional[Cause]:
    """A parameter's gradient is all zeros in one run and None in the other at a step (unused
    there, its .grad zeroed in place in one run and set to None in the other). The gradients
    compare as equal (a None gradient is zero); the update that follows differs when momentum
    or weight decay moves a parameter whose gradient is zero, and an optimizer skips one whose
    gradient is None."""
    h, step = x.hit, x.step
    if x.slot.kind in _GRADS and h.code in (MISSING_A, MISSING_B):  # not all zeros: no
        return None
    if x.slot.kind != "param":
        return None
    prev = x.prev(step)
    if prev is None:
        return None
    gone, has = _zero_none_slots(x, prev)
    diverging = [s for s, code in x.slots_of(step, ("param",)) if code != EQUAL]
    names = {s.name for s in gone}
    if not gone or has is None or not diverging or not all(s.name in names for s in diverging):
        return None
    H, L = has.upper(), ("b" if has == "a" else "a").upper()
    ev = [
        f"at step {prev} {H}'s gradients of {x.names(gone)} are all zeros and {L}'s are None: "
        "compared as equal (a None gradient is zero)",
        f"at step {step} the parameters that differ are exactly among them "
        f"({x.names(diverging, 2)}): momentum or weight decay moves a parameter whose gradient "
        "is zero, while an optimizer skips one whose gradient is None",
    ]
    return Cause(
        "zero_vs_none_grad",
        f"zero vs no gradient: {x.names(gone, 2)} unused at step {prev}, .grad zeroed in "
        f"place in {H} (zero_grad(set_to_none=False)) and None in {L}; the update after it "
        "differs",
        ev,
        "call zero_grad with the same set_to_none in both runs (PyTorch's default is "
        "set_to_none=True); with plain SGD the two are the same training",
    )

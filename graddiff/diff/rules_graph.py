"""Diagnosis rules about the autograd graph: tied weights, an extra gradient path.

Both are differences in which tensors gradients flow into, not in the numbers: a parameter
shared by two modules in one run (``head.weight = emb.weight``) and separate in the other; a
module reached by more backward passes in one run while both compute the same forward (a
missing ``.detach()``). Each rule: context in, Cause or None out (see context.py).
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

import numpy as np

from ..modclass import owner
from .compare_records import MISSING_A, MISSING_B
from .context import FORWARD_KINDS as _FORWARD
from .context import GRAD_KINDS as _GRADS
from .context import RELATION_TOL, Cause, Context, fmt
from .exact import rel_diff


def _first_value(x: Context, side: str, kind: str, name: str) -> Optional[np.ndarray]:
    """The record's values at the first compared step, or None."""
    slot = x.pair.slot(kind, name)
    return None if slot is None else x.v(side, slot, int(x.pair.steps[0]))


def _recorded_tie(x: Context) -> Optional[tuple[str, str, str]]:
    """(alias, run lacking it, run having it) for a parameter missing in one run at the hit's
    step that this run's trace records as tied to another parameter: the divergence found
    first (the shared tensor's value, which keeps the last initialisation written to it) is
    the tie's consequence."""
    for slot, code in x.slots_of(x.step, ("param",)):
        if code not in (MISSING_A, MISSING_B):
            continue
        lacks, has = ("a", "b") if code == MISSING_A else ("b", "a")
        if slot.name in (x.pair.run(lacks).tied_parameters or {}):
            return slot.name, lacks, has
    return None


def rule_tied_weights(x: Context) -> Optional[Cause]:
    """A parameter one run records and the other does not, because there it is the same tensor
    as another parameter (tied weights). Evidence: the aliasing recorded at trace time, the
    initial values, and the shared tensor's gradient = the sum of the two separate gradients.
    The first divergence may be the shared tensor itself (its value is the alias's
    initialisation): the recorded aliasing of a parameter missing at that step decides."""
    s = x.slot
    first: list[str] = []
    if s.kind in ("param", *_GRADS) and x.hit.code in (MISSING_A, MISSING_B):
        lacks, has = ("a", "b") if x.hit.code == MISSING_A else ("b", "a")
        alias = s.name
    else:
        found = _recorded_tie(x) if s.kind in ("param", *_GRADS) else None
        if found is None:
            return None
        alias, lacks, has = found
        first.append(f"first divergence: {x.label(s)} at step {x.step} ({x.hit_text()})")
    tied = x.pair.run(lacks).tied_parameters
    target = (tied or {}).get(alias)
    recorded = target is not None
    if target is None:  # older trace: look for a same-shaped parameter the grads add up to
        target = _sum_partner(x, has, lacks, alias)
        if target is None:
            return None
    L, H = lacks.upper(), has.upper()
    alias_c, target_c = x.record("param", alias), x.record("param", target)
    ev = []
    if recorded:
        ev.append(
            f"in {L}, {alias_c} is the same tensor as {target_c} (parameter aliasing recorded "
            f"at trace time); {H} has a separate {alias_c}"
        )
    else:
        ev.append(f"{H} has a parameter {alias_c} that {L} lacks")
    pa, pt = _first_value(x, has, "param", alias), _first_value(x, has, "param", target)
    if pa is not None and pt is not None and pa.shape == pt.shape:
        r = rel_diff(pa, pt)
        ev.append(
            f"{H}'s {alias_c} starts "
            + ("bitwise equal to" if r == 0 else f"at rel {fmt(r)} from")
            + f" its {target_c} (step {int(x.pair.steps[0])})"
        )
    shared = _first_value(x, lacks, "param", target)
    if (
        pa is not None
        and shared is not None
        and pa.shape == shared.shape
        and np.array_equal(pa, shared)
        and not (pt is not None and np.array_equal(pa, pt))
    ):
        ev.append(
            f"{L}'s shared {target_c} starts bitwise equal to {H}'s {alias_c}: the tied "
            "tensor keeps the initialisation written last (through the alias)"
        )
    sums = _grad_sum(x, has, lacks, alias, target)
    if sums is not None:
        r, plain = sums
        ev.append(
            f"{L}'s gradient of {target_c} equals the sum of {H}'s gradients of {target_c} and "
            f"{alias_c} at step {int(x.pair.steps[0])} (residual rel {fmt(r)}; plain difference "
            f"rel {fmt(plain)}): one tensor receiving both modules' contributions"
        )
    elif not recorded:
        return None
    return Cause(
        "tied_weights",
        f"tied vs untied weights: {alias_c} shares {target_c} in {L}, has its own copy in {H}",
        first + ev,
        f"tie the weights in both runs (model.{alias.rsplit('.', 1)[0]}.weight = "
        f"model.{target.rsplit('.', 1)[0]}.weight after building the model, or the library's "
        "tie_word_embeddings / tie_weights()), or untie them in both",
    )


def _grad_slot_values(x: Context, side: str, name: str) -> Optional[np.ndarray]:
    for kind in _GRADS:
        slot = x.pair.slot(kind, name)
        if slot is not None:
            v = x.v(side, slot, int(x.pair.steps[0]))
            if v is not None:
                return v.astype(np.float64)
    return None


def _grad_sum(x: Context, has: str, lacks: str, alias: str, target: str):
    """(residual, plain) of lacks' grad(target) vs has' grad(target) + grad(alias)."""
    g = _grad_slot_values(x, lacks, target)
    g1, g2 = _grad_slot_values(x, has, target), _grad_slot_values(x, has, alias)
    if g is None or g1 is None or g2 is None or not (g.shape == g1.shape == g2.shape):
        return None
    r, plain = rel_diff(g, g1 + g2), rel_diff(g, g1)
    return (r, plain) if r < RELATION_TOL and r < 0.1 * plain else None


def _sum_partner(x: Context, has: str, lacks: str, alias: str) -> Optional[str]:
    """A parameter both runs have whose gradient in ``lacks`` is the sum of its gradient and
    ``alias``'s in ``has`` (for traces without recorded aliasing)."""
    for slot, code in x.slots_of(int(x.pair.steps[0]), ("param",)):
        if slot.name == alias or code in (MISSING_A, MISSING_B):
            continue
        if _grad_sum(x, has, lacks, alias, slot.name) is not None:
            return slot.name
    return None


def _backward_reach(x: Context, side: str, step: int) -> Counter:
    """module -> how many output gradients of it the run recorded at the step."""
    run = x.pair.run(side)
    out: Counter = Counter()
    for rec in x.pair.rows(side, step)["record"]:
        k = run.record_key(int(rec))
        if k.kind == "grad_output":
            out[owner(k.kind, k.name)] += 1
    return out


def _ever_reached(x: Context, side: str) -> set:
    return {owner(k.kind, k.name) for k in x.pair.run(side).keys if k.kind == "grad_output"}


def rule_extra_grad_path(x: Context) -> Optional[Cause]:
    """The same forward, but some modules receive output gradients more often in one run: an
    extra backward path reaches them (a loss backpropagated through a tensor that was meant to
    be detached), and their parameters' gradients carry its contribution."""
    if x.slot.kind not in ("grad_output", *_GRADS) or "grad_output" not in x.compared:
        return None
    step = x.step
    if x.within(step, _FORWARD) is not True:
        return None
    ra, rb = _backward_reach(x, "a", step), _backward_reach(x, "b", step)
    more_a = {m for m in ra if ra[m] > rb.get(m, 0)}
    more_b = {m for m in rb if rb[m] > ra.get(m, 0)}
    if bool(more_a) == bool(more_b):
        return None  # none, or both ways: a different graph, not an extra path
    side, more, mine, other = ("A", more_a, ra, rb) if more_a else ("B", more_b, rb, ra)
    oth = "B" if side == "A" else "A"
    # modules the other run never reaches at all are frozen there, not missing a detach
    reached = _ever_reached(x, oth.lower())
    if not more <= reached:
        return None
    mods = sorted(more, key=lambda m: (m.count("."), m))
    n_mine = Counter(mine[m] for m in more).most_common(1)[0][0]
    n_other = Counter(other.get(m, 0) for m in more).most_common(1)[0][0]
    ev = [
        f"at step {step} {x.agree(_FORWARD)}, but the outputs of {len(mods)} module(s) "
        f"receive gradients from {n_mine} backward pass(es) in {side} vs {n_other} in {oth}: "
        + x.names([("grad_output", m) for m in mods]),
        f"{oth} backpropagates into them "
        + ("at other steps or calls" if n_other == 0 else "too")
        + ": they are not frozen there",
    ]
    grads = _affected_grads(x, step, more)
    if grads is not None:
        differ, same = grads
        if differ:
            ev.append(
                f"the gradients of {len(differ)} of their parameter(s) differ at step "
                f"{differ[0][1]} ({x.names([('grad', n) for n, _ in differ])}); "
                + (
                    f"those of the other {same} parameter(s) agree"
                    if same
                    else "no other parameter's gradient was compared there"
                )
            )
        else:
            ev.append(
                "their parameters' gradients agree: the extra contribution is discarded before "
                "the update (wasted backward work)"
            )
    return Cause(
        "extra_grad_path",
        f"an extra gradient path reaches {x.names([('grad_output', m) for m in _roots(mods)], 2)} "
        f"in {side} (a missing .detach()?)",
        ev,
        f"detach the tensor that feeds the second loss in {side} (e.g. D(fake.detach()) in a "
        "GAN's discriminator step), or zero these parameters' gradients between the two "
        "backward passes (optimizer.zero_grad())",
    )


def _roots(mods: list[str]) -> list[str]:
    """The modules none of whose parents is in the list (``G`` for ``G, G.0, G.1``)."""
    return [m for m in mods if not any(m.startswith(p + ".") for p in mods if p != m)]


def _affected_grads(x: Context, step: int, mods: set):
    """([(param, step)] whose gradient differs, number of other gradients that agree) at the
    first step from ``step`` where a gradient of a parameter of ``mods`` is recorded."""
    for t in x.pair.steps[x.pair.steps >= step][:4].tolist():
        slots = x.slots_of(t, _GRADS)
        mine = [(s, c) for s, c in slots if owner("param", s.name) in mods]
        if not mine:
            continue
        differ = [(s.name, t) for s, c in mine if not x.agrees(s, c, t)]
        same = sum(1 for s, c in slots if owner("param", s.name) not in mods and x.agrees(s, c, t))
        return differ, same
    return None

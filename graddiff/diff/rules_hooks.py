"""Diagnosis rule: a backward hook present in one run only changes the gradients it reaches.

Evidence: the root attribute ``backward_hooks`` of both runs (the user's module backward and
backward-pre hooks, tensor and post-accumulate-grad hooks on parameters, torch's global module
hooks, each by its function's name; hooks/reach.py), the forward agreeing at the step (losses
or activations compared), and the gradients that differ lying where such a hook acts:

- a hook on a parameter (``p.register_hook``, ``register_post_accumulate_grad_hook``)
  changes that parameter's gradient only;
- a module's backward or backward-pre hook changes the gradient flowing into the module's
  inputs or out of its output: its own parameters and those of the modules that ran before it
  in the forward pass (their order from the recorded activations; every parameter when the
  activations were not recorded);
- a global module hook acts everywhere.

Named only where every differing gradient lies within reach of the differing hooks; a hook
that merely logs is then still possible, and the evidence says what differs. Hooks on
intermediate tensors (registered inside ``forward``) and custom ``autograd.Function``s are not
recorded, so the rule says nothing about them. Old traces (no attribute): not applicable.
Context in, Cause or None out (see context.py).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..modclass import ROOT, owner
from .compare_records import MISSING_A, MISSING_B
from .context import FORWARD_KINDS as _FORWARD
from .context import GRAD_KINDS as _GRADS
from .context import Cause, Context
from .rules_path import _forward_agrees

#: How evidence names each recorded hook kind.
_HOOK_WORDS = {
    ("params", "tensor"): "tensor hook (register_hook)",
    ("params", "post_accumulate"): "post-accumulate-grad hook",
    ("modules", "backward"): "backward hook (register_full_backward_hook)",
    ("modules", "backward_pre"): "backward pre-hook (register_full_backward_pre_hook)",
    ("global", "backward"): "global module backward hook",
    ("global", "backward_pre"): "global module backward pre-hook",
}


def hook_differences(
    ha: dict[str, Any], hb: dict[str, Any]
) -> list[tuple[str, str, str, list, list]]:
    """(part, where, hook kind, A's hooks, B's hooks) wherever the two inventories differ;
    ``where`` is a parameter or module name ("" for global hooks)."""
    out = []
    for part in ("params", "modules", "global"):
        pa, pb = ha.get(part) or {}, hb.get(part) or {}
        if part == "global":
            pa, pb = {"": pa}, {"": pb}
        for where in sorted({*pa, *pb}):
            ka, kb = pa.get(where) or {}, pb.get(where) or {}
            for kind in sorted({*ka, *kb}):
                a, b = sorted(ka.get(kind) or []), sorted(kb.get(kind) or [])
                if a != b:
                    out.append((part, where, kind, a, b))
    return out


def _forward_order(x: Context, step: int) -> Optional[dict[str, int]]:
    """Module name -> position of its first recorded output in A's step (None: no
    activations recorded at the step)."""
    run = x.pair.run("a")
    rows = np.sort(x.pair.rows("a", step), order="seq")
    order: dict[str, int] = {}
    for row in rows:
        k = run.record_key(int(row["record"]))
        if k.kind == "activation":
            order.setdefault(k.name.split(":", 1)[0], len(order))
    return order or None


def _reaches(part: str, where: str, param: str, order: Optional[dict[str, int]]) -> bool:
    """Can a hook of this part at ``where`` change ``param``'s gradient?"""
    if part == "global":
        return True
    if part == "params":
        return param == where
    mod = owner("grad", param) or ROOT
    if where == ROOT or mod == where or mod.startswith(where + "."):
        return True  # the module's own parameters (its output's gradient)
    if order is None or where not in order:
        return True  # the forward order is not known: any parameter before it may be
    return mod in order and order[mod] < order[where]


def _differing_grads(x: Context, step: int) -> list:
    """The gradient slots missing in one run or beyond their tolerance at ``step``."""
    return [
        s
        for s, code in x.slots_of(step, _GRADS)
        if code in (MISSING_A, MISSING_B) or not x.agrees(s, code, step)
    ]


def _hooks_text(hooks: list) -> str:
    return ", ".join(hooks) if hooks else "none"


def rule_backward_hook(x: Context) -> Optional[Cause]:
    """The gradients differ where a backward hook that one run has and the other lacks (or
    another hook) acts, while the forward agrees."""
    if x.slot.kind not in (*_GRADS, "grad_output"):
        return None
    ha, hb = x.pair.run("a").backward_hooks, x.pair.run("b").backward_hooks
    if ha is None or hb is None:
        return None
    diffs = hook_differences(ha, hb)
    if not diffs:
        return None
    step = x.step
    if not _forward_agrees(x, step):
        return None
    differ = _differing_grads(x, step)
    if not differ:
        return None
    order = _forward_order(x, step)
    outside = [
        s
        for s in differ
        if not any(_reaches(part, where, s.name, order) for part, where, *_ in diffs)
    ]
    if outside:
        return None
    agree = [
        s
        for s, code in x.slots_of(step, _GRADS)
        if code not in (MISSING_A, MISSING_B) and x.agrees(s, code, step)
    ]
    named = []
    for part, where, kind, a, b in diffs[:3]:
        what = _HOOK_WORDS.get((part, kind), f"{kind} hook")
        place = (
            "every module"
            if part == "global"
            else x.record("grad", where)
            if part == "params"
            else x.module(where)
        )
        named.append(f"{what} on {place}: {_hooks_text(a)} in A, {_hooks_text(b)} in B")
    only = {("A" if a and not b else "B" if b and not a else None) for *_, a, b in diffs}
    side = only.pop() if len(only) == 1 else None
    first = diffs[0]
    where = (
        "every module"
        if first[0] == "global"
        else x.record("grad", first[1])
        if first[0] == "params"
        else x.module(first[1])
    )
    more = f" and {len(diffs) - 1} more" if len(diffs) > 1 else ""
    title = (
        f"a backward hook on {where}{more} in {side} only changes the gradients it reaches"
        if side is not None
        else f"the backward hooks on {where}{more} differ and change the gradients they reach"
    )
    ev = [
        "the user's backward hooks recorded at trace entry and exit differ: "
        + "; ".join(named)
        + (f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""),
        f"at step {step} {x.agree(_FORWARD)}; the gradients of {len(differ)} parameter(s) "
        f"differ ({x.names(differ, 3)})"
        + (f" while those of the other {len(agree)} agree ({x.names(agree, 3)})" if agree else ""),
        "every differing gradient lies where a differing hook acts (a parameter's own hook; a "
        "module hook's module and the modules that ran before it"
        + (
            ""
            if order is not None
            else ", here every parameter: the forward order was not recorded"
        )
        + ")",
        "a hook that only reads (logs) changes nothing: if this one does, look at the next cause",
    ]
    fix = (
        "register the same backward hooks in both runs, or remove the extra one; a hook that "
        "returns a tensor replaces the gradient (register_hook), one that writes p.grad "
        "changes it in place (post-accumulate-grad hook)"
    )
    return Cause("backward_hook", title, ev, fix)


def function_sets(x: Context) -> Optional[tuple[set, set, bool]]:
    """(A's custom autograd Functions, B's, both graphs walked whole) from ``custom_functions``
    (the first step's graphs), or None when either run did not record them."""
    fa, fb = x.pair.run("a").custom_functions, x.pair.run("b").custom_functions
    if fa is None or fb is None:
        return None
    names_a = {str(n) for n in fa.get("names") or []}
    names_b = {str(n) for n in fb.get("names") or []}
    return names_a, names_b, bool(fa.get("complete")) and bool(fb.get("complete"))


def rule_custom_function(x: Context) -> Optional[Cause]:
    """A custom autograd.Function in one run's graph only, while the forward agrees and the
    gradients differ: its forward matches what the other run computes, its backward does not
    (a gradient reversal, a straight-through estimator, a hand-written backward)."""
    if x.slot.kind not in (*_GRADS, "grad_output"):
        return None
    sets = function_sets(x)
    if sets is None:
        return None
    fa, fb, whole = sets
    only_a, only_b = sorted(fa - fb), sorted(fb - fa)
    if not only_a and not only_b:
        return None
    step = x.step
    if not _forward_agrees(x, step):
        return None
    differ = _differing_grads(x, step)
    if not differ:
        return None
    side = "A" if only_a and not only_b else "B" if only_b and not only_a else None
    names = only_a if side == "A" else only_b if side == "B" else only_a + only_b
    listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    title = (
        f"a custom autograd.Function ({listed}) in {side}'s graph only changes the gradients "
        "behind it"
        if side is not None
        else f"the custom autograd.Functions differ ({listed}) and change the gradients behind them"
    )
    ev = [
        "the user's custom autograd.Functions found in the graphs of the first step's "
        f"gradient computations: {', '.join(sorted(fa)) or 'none'} in A, "
        f"{', '.join(sorted(fb)) or 'none'} in B"
        + ("" if whole else " (a graph was too large to walk whole)"),
        f"at step {step} {x.agree(_FORWARD)}; the gradients of {len(differ)} parameter(s) "
        f"differ ({x.names(differ, 3)}): the Function's forward matches what the other run "
        "computes there, its backward does not",
        "where in the model the Function sits is not recorded: every parameter whose "
        "gradient flows through it may differ",
    ]
    return Cause(
        "custom_function",
        title,
        ev,
        "check the Function's backward against the derivative of its forward "
        "(torch.autograd.gradcheck), or use the same op in both runs",
    )

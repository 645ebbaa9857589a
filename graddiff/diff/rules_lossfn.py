"""Diagnosis rule: the loss function differs while the model's output agrees.

The backward pass starts at the loss: the first output gradient a backward call records is
d loss / d output of the module whose output the loss reads. When that gradient differs
while the forward pass (parameters, inputs, activations) agrees, and it is not the other
run's loss times one constant (a loss weight or scale: rules_backward), the loss's derivative
differs: another criterion or criterion setting (label smoothing, class weights,
``ignore_index``, an extra term) or other targets. The loss values may still agree (label
smoothing near uniform predictions changes the value by little and the gradient by much).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .context import Cause, Context, cosine, fmt
from .exact import rel_diff


def _first_after_loss(x: Context, side: str, step: int) -> set[tuple[str, int]]:
    """(module name, call) of each output gradient recorded first after a loss record: the
    modules whose outputs the losses read."""
    rows = x.pair.rows(side, step)
    run = x.pair.run(side)
    order = np.argsort(rows["seq"], kind="stable")
    out: set[tuple[str, int]] = set()
    after_loss = False
    for i in order.tolist():
        k = run.record_key(int(rows["record"][i]))
        if k.kind == "loss":
            after_loss = True
        elif k.kind == "grad_output" and after_loss:
            out.add((k.name, k.call))
            after_loss = False
    return out


def _loss_text(x: Context, step: int) -> Optional[str]:
    """How far apart the losses are at the step (None when not compared)."""
    rels = [x.rel(s, step) for s, _ in x.slots_of(step, ("loss",))]
    rels = [r for r in rels if r is not None]
    if not rels:
        return None
    worst = max(rels)
    if worst == 0:
        return "the losses are bitwise equal"
    return f"the losses agree within the tolerance (rel {fmt(worst)})"


def rule_loss_function(x: Context) -> Optional[Cause]:
    """The gradient the loss feeds the model's output differs; the forward pass agrees."""
    s = x.slot
    if s.kind != "grad_output" or "activation" not in x.compared:
        return None
    if x.within(x.step, ("param", "input", "activation", "loss")) is not True:
        return None
    key = (s.name, s.call)
    if key not in _first_after_loss(x, "a", x.step) or key not in _first_after_loss(x, "b", x.step):
        return None
    a, b = x.v("a", s, x.step), x.v("b", s, x.step)
    ev = [
        f"{x.label(s)} differs at step {x.step} ({x.hit_text()}): the gradient the loss "
        f"feeds the output of {x.module(s.name)}, the first module the backward pass reaches",
        f"at step {x.step}, " + x.agree(("param", "input", "activation")),
    ]
    loss = _loss_text(x, x.step)
    if loss:
        ev.append(loss)
    if a is not None and b is not None and a.shape == b.shape and a.size:
        a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        aa = float(a64 @ a64)
        c = float(a64 @ b64) / aa if aa > 0 else 0.0
        if c != 0 and rel_diff(b64, c * a64) < 1e-3:
            # a loss weight scales the loss too, and the losses agree here
            ev.append(
                f"B's output gradient is A's x {fmt(c)} while the losses agree: the loss's "
                "derivative differs, not its weight (label smoothing near uniform predictions "
                "scales it so; a backward hook scaling this gradient would too)"
            )
        else:
            ev.append(
                f"not one run's gradient times a constant (cosine {fmt(cosine(a64, b64))}): "
                "not a loss weight or scale"
            )
    return Cause(
        "loss_function",
        f"the loss function differs: the gradient it feeds {x.module(s.name)} differs while "
        "the model's output agrees",
        ev,
        "use the same criterion and settings in both runs (label_smoothing, class weight, "
        "ignore_index, an extra loss term) and the same targets",
    )

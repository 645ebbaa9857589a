"""Diagnosis rule: the loss function differs while the model's output agrees.

The backward pass starts at the loss: the first output gradient a backward call records is
d loss / d output of the module whose output the loss reads. When that gradient differs
while the forward pass (parameters, inputs, activations) agrees, and it is not the other
run's loss times one constant (a loss weight or scale: rules_backward), the loss's derivative
differs: another criterion or criterion setting (label smoothing, class weights,
``ignore_index``, an extra term) or other targets. The loss values may still agree (label
smoothing near uniform predictions changes the value by little and the gradient by much).

``rule_loss_term``: the losses differ at all while the forward pass is bitwise equal, the
gradient into the model's output agrees and earlier output gradients differ: the loss reads
those outputs through a term the other run lacks (a VAE's KL term, an auxiliary loss).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .compare_records import EQUAL
from .context import Cause, Context, cosine, fmt
from .exact import rel_diff


def _first_after_loss(x: Context, side: str, step: int) -> set[tuple[str, int]]:
    """(module name, call) of each output gradient recorded first after a loss record: the
    modules whose outputs the losses read."""
    out: set[tuple[str, int]] = set()
    after_loss = False
    for k in x.pair.keys_in_order(side, step):
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


def rule_loss_term(x: Context) -> Optional[Cause]:
    """The losses differ while every forward record is bitwise equal, and the gradient the loss
    feeds the model's output agrees while gradients into earlier outputs differ: a term of the
    loss computed from those outputs (a KL term on an encoder's outputs, an auxiliary loss on a
    hidden layer) is in one run only, or differs.

    The same code on bitwise-equal tensors gives a bitwise-equal loss, so a loss that differs
    at all (even below the tolerance) is computed differently; a forgotten ``.detach()`` adds a
    gradient path without changing any value, and a loss weight also scales the gradient into
    the model's output (rules_backward), so neither fits. Where the gradient into the model's
    output is bitwise equal, an earlier output gradient that differs at all (even below the
    tolerance) received a different contribution from the loss directly: backpropagating equal
    gradients through an equal forward gives equal results (a deterministic backward; not
    claimed for CUDA runs without deterministic algorithms).

    Read at the divergence's step, or else at the first bitwise difference, when that is an
    earlier step whose forward pass was still bitwise equal (a small term: the runs part below
    the tolerance there, and the divergence shows later, after updates made the forward differ).
    """
    s = x.slot
    if s.kind not in ("grad_output", "grad", "autograd_grad", "param", "activation", "loss"):
        return None
    if not {"loss", "activation", "grad_output"} <= x.compared:
        return None
    if s.kind in ("grad_output", "grad", "autograd_grad"):
        cause = _loss_term_at(x, x.step)
        if cause is not None:
            return cause
    if s.kind in ("loss", "grad", "autograd_grad"):
        cause = _parameter_term_at(x, x.step)
        if cause is not None:
            return cause
    o = x.walk.first_bitwise
    if o is None or o.step >= x.step:
        return None
    cause = _loss_term_at(x, o.step)
    if cause is not None:
        cause.evidence.insert(
            1,
            f"this is the first step where the runs part (the first bitwise difference, step "
            f"{o.step}); the divergence beyond the tolerance shows at step {x.step} "
            f"({x.label(s)}: {x.hit_text()}), after updates from these gradients",
        )
    return cause


def _deterministic_backward(x: Context) -> bool:
    """Equal gradients through an equal forward give equal results: on the CPU, or with
    deterministic algorithms on an accelerator (both runs)."""
    for side in ("a", "b"):
        env = x.pair.run(side).environment or {}
        if env.get("device", "cpu") != "cpu" and not env.get("deterministic_algorithms"):
            return False
    return True


def _loss_term_at(x: Context, step: int) -> Optional[Cause]:
    if any(code != EQUAL for _, code in x.slots_of(step, ("param", "input", "activation"))):
        return None
    losses = [(t, x.rel(t, step)) for t, code in x.slots_of(step, ("loss",)) if code != EQUAL]
    losses = [(t, r) for t, r in losses if r is not None and r > 0]
    if not losses:
        return None
    first = _first_after_loss(x, "a", step) & _first_after_loss(x, "b", step)
    outs = x.slots_of(step, ("grad_output",))
    head = [t for t, _ in outs if (t.name, t.call) in first]
    if not head or any((x.rel(t, step) or 0.0) > x.rtol for t in head):
        return None
    exact = _deterministic_backward(x) and all(
        code == EQUAL for t, code in outs if (t.name, t.call) in first
    )
    inner = [
        t
        for t, code in outs
        if code != EQUAL
        and (t.name, t.call) not in first
        and (exact or (x.rel(t, step) or 0.0) > x.rtol)
    ]
    if not inner:
        return None
    worst = max(r for _, r in losses)
    ev = [
        f"at step {step} the loss differs (rel {fmt(worst)}"
        + (", below the tolerance" if worst <= x.rtol else "")
        + f") while {x.agree(('param', 'input', 'activation'), 'are bitwise equal')}: the same "
        "code on the same tensors gives the same loss, so the loss is computed differently",
        (
            f"the gradient the loss feeds the model's output is bitwise equal ({x.names(head)}), "
            f"but the output gradients of {len(inner)} earlier record(s) differ "
            f"({x.names(inner)}): backpropagating an equal gradient through an equal forward "
            "gives equal results, so the loss reaches those outputs directly, differently in "
            "the two runs"
            if exact
            else f"the gradient the loss feeds the model's output agrees ({x.names(head)}), "
            f"but the output gradients of {len(inner)} earlier record(s) differ "
            f"({x.names(inner)}): the loss also reads those outputs, differently in the two runs"
        ),
        "not a forgotten .detach() (a path changes gradients, not the loss value) and not a "
        "loss weight (it would scale the gradient into the model's output too)",
    ]
    return Cause(
        "loss_function",
        f"a loss term differs: a term computed from the outputs of {x.names(inner, limit=2)} "
        "is in one run only or differs (a regulariser such as a KL term, an auxiliary loss)",
        ev,
        "compare the terms of the two runs' losses (which terms, their weights, their inputs)",
    )


def _parameter_term_at(x: Context, step: int) -> Optional[Cause]:
    """The losses differ while the forward pass is bitwise equal, every output gradient is
    bitwise equal and parameter gradients differ: a term of the loss computed from the
    parameters themselves (a weight penalty) is in one run only or differs. Backpropagating
    equal output gradients through an equal forward gives equal parameter gradients (a
    deterministic backward), so the difference enters at the parameters. When full values show
    each differing gradient as the other's plus c·W with one c, the term is an L2 penalty."""
    if not _deterministic_backward(x):
        return None
    if any(code != EQUAL for _, code in x.slots_of(step, ("param", "input", "activation"))):
        return None
    if any(code != EQUAL for _, code in x.slots_of(step, ("grad_output",))):
        return None
    if not x.slots_of(step, ("grad_output",)):
        return None
    losses = [x.rel(t, step) for t, code in x.slots_of(step, ("loss",)) if code != EQUAL]
    losses = [r for r in losses if r is not None and r > 0]
    grads = [t for t, code in x.slots_of(step, ("grad", "autograd_grad")) if code != EQUAL]
    if not losses or not grads:
        return None
    ev = [
        f"at step {step} the loss differs (rel {fmt(max(losses))}) while "
        f"{x.agree(('param', 'input', 'activation'), 'are bitwise equal')} and every output "
        "gradient is bitwise equal: the loss is computed differently, and not from the "
        "model's outputs",
        f"the gradients of {x.names(grads)} differ: an equal backward from equal output "
        "gradients gives equal parameter gradients, so the difference enters at the "
        "parameters directly",
    ]
    title = (
        f"a loss term on the parameters differs: a penalty on {x.names(grads, limit=2)} is in "
        "one run only or differs (a weight penalty added to the loss)"
    )
    coef = _l2_coefficient(x, step, grads)
    if coef is not None:
        side = "B" if coef > 0 else "A"
        c = abs(coef)
        title = (
            f"a loss term on the parameters differs: {side}'s loss adds an L2 penalty "
            f"(c/2)·‖W‖² with c = {fmt(c)} on {x.names(grads, limit=2)}"
        )
        ev.append(
            f"each differing gradient is, in {side}, the other run's + c·W with one c = "
            f"{fmt(c)} (the gradient of (c/2)·‖W‖²)"
        )
    return Cause(
        "loss_function",
        title,
        ev,
        "add the same regularisation terms to both losses (or use the optimizer's "
        "weight_decay in both, not a penalty in one)",
    )


def _l2_coefficient(x: Context, step: int, grads: list) -> Optional[float]:
    """One c with g_B - g_A = c·W for every differing gradient (values), or None."""
    coefs = []
    for t in grads:
        p = x.pair.slot("param", t.name)
        w = None if p is None else x.v("a", p, step)
        a, b = x.v("a", t, step), x.v("b", t, step)
        if w is None or a is None or b is None or not (w.shape == a.shape == b.shape):
            return None
        w64 = w.astype(np.float64).ravel()
        d = b.astype(np.float64).ravel() - a.astype(np.float64).ravel()
        ww = float(w64 @ w64)
        if not ww:
            return None
        c = float(d @ w64) / ww
        if not c or float(np.linalg.norm(d - c * w64)) > 0.02 * float(np.linalg.norm(d)):
            return None
        coefs.append(c)
    if not coefs or max(coefs) - min(coefs) > 0.02 * max(abs(c) for c in coefs):
        return None
    return float(np.mean(coefs))


def head_factor(x: Context, step: int) -> Optional[tuple[float, list]]:
    """(c, head slots): the gradient the loss feeds the model's output is, in A, B's × one
    constant c (rel residual below 1e-3 for every such record), or None."""
    first = _first_after_loss(x, "a", step) & _first_after_loss(x, "b", step)
    heads = [t for t, _ in x.slots_of(step, ("grad_output",)) if (t.name, t.call) in first]
    factors = []
    for t in heads:
        a, b = x.v("a", t, step), x.v("b", t, step)
        if a is None or b is None or a.shape != b.shape or not a.size:
            return None
        a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        if not (np.all(np.isfinite(a64)) and np.all(np.isfinite(b64))):
            return None
        bb = float(b64 @ b64)
        if bb == 0:
            return None
        c = float(a64 @ b64) / bb
        if c <= 0 or rel_diff(a64, c * b64) > 1e-3:
            return None
        factors.append(c)
    if not factors or any(abs(f / factors[0] - 1) > 1e-3 for f in factors):
        return None
    return factors[0], heads


def rule_loss_reduction(x: Context) -> Optional[Cause]:
    """The losses differ while the forward pass is bitwise equal, and the gradient the loss
    feeds the model's output is the other run's times one constant c, while the losses are not
    in that ratio: the term that reads the model's output is weighted or reduced differently
    (a sum vs a mean over c elements), and the loss has another term that c does not scale
    (a VAE's KL term next to its reconstruction loss)."""
    if x.slot.kind != "loss" or not {"loss", "grad_output"} <= x.compared:
        return None
    step = x.step
    if any(code != EQUAL for _, code in x.slots_of(step, ("param", "input", "activation"))):
        return None
    ratios = []
    for t, _ in x.slots_of(step, ("loss",)):
        a, b = x.v("a", t, step), x.v("b", t, step)
        if a is None or b is None or a.size != 1 or b.size != 1 or float(b.ravel()[0]) == 0:
            return None
        ratios.append(float(a.ravel()[0]) / float(b.ravel()[0]))
    if len(ratios) != 1:
        return None
    found = head_factor(x, step)
    if found is None:
        return None
    c, heads = found
    k = ratios[0]
    if not (np.isfinite(k) and np.isfinite(c)) or k == 0:
        return None
    if abs(c - 1) < 1e-3 or abs(c / k - 1) < 0.01:
        return None  # no factor, or the loss's own ratio (a loss weight: rules_backward)
    big, f = ("A", c) if c > 1 else ("B", 1 / c)
    n = round(f)
    mean = n >= 2 and abs(f - n) <= 1e-3 * f
    ev = [
        f"at step {step} {x.agree(('param', 'input', 'activation'), 'are bitwise equal')}, "
        f"and the losses differ (A's is {fmt(k)}x B's)",
        f"the gradient the loss feeds the model's output ({x.names(heads)}) is {big}'s = "
        f"the other's x {n if mean else fmt(f)} (one constant, residual below 1e-3)"
        + (": a whole number, the elements a mean divides by" if mean else ""),
        f"the losses are not in that ratio ({fmt(k)}): a part of the loss that does not read "
        "the model's output (a term on intermediate outputs or on the weights, such as a KL "
        "term or a penalty) is not scaled with it",
    ]
    title = (
        f"the loss's reduction differs: {big} sums the term on the model's output where the "
        f"other run averages it over {n} elements (reduction='sum' vs 'mean'), and another "
        "term is not scaled alike"
        if mean
        else f"the weight of the loss term on the model's output differs ({big}'s is "
        f"{fmt(f)}x the other's), and another term is not scaled alike"
    )
    return Cause(
        "loss_function",
        title,
        ev,
        "use the same reduction and weights for every loss term in both runs",
    )

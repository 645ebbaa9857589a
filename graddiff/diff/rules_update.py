"""Diagnosis rules about what changes state between steps: the update rule, BatchNorm statistics.

Each rule: context in, Cause or None out (see context.py).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .compare_records import EQUAL
from .context import RELATION_TOL, Cause, Context, cosine, fmt
from .exact import rel_diff


def rule_batchnorm(x: Context) -> Optional[Cause]:
    """Only buffers differ: BatchNorm momentum, or an extra forward in train mode."""
    if x.slot.kind != "buffer":
        return None
    if not x.within(
        x.step, ("param", "input", "activation", "loss", "grad_output", "grad", "autograd_grad")
    ):
        return None
    ev = [
        f"{x.slot.label} differs at step {x.step} ({x.hit_text()}) while "
        + x.agree(("param", "activation", "grad"))
    ]
    title = "BatchNorm running statistics differ (momentum, or an extra forward in train mode)"
    counter = next(
        (
            s
            for s, _ in x.slots_of(x.step, ("buffer",))
            if s.name.endswith("num_batches_tracked")
            and s.name.rsplit(".", 1)[0] == x.slot.name.rsplit(".", 1)[0]
        ),
        None,
    )
    na = x.v("a", counter, x.step) if counter else None
    nb = x.v("b", counter, x.step) if counter else None
    if na is not None and nb is not None and int(na.ravel()[0]) != int(nb.ravel()[0]):
        title = "an extra forward in train mode updates BatchNorm statistics in one run"
        ev.append(f"num_batches_tracked: {int(na.ravel()[0])} in A vs {int(nb.ravel()[0])} in B")
    else:
        ratio = _bn_ratio(x)
        if ratio is not None:
            title = "BatchNorm momentum differs"
            ev.append(
                f"running statistics move {fmt(ratio)}x as far per step in A as in B "
                f"(momentum ratio A/B ~ {fmt(ratio)})"
            )
    return Cause(
        "batchnorm_stats",
        title,
        ev,
        "use the same BatchNorm momentum; run evaluation forwards under model.eval()",
    )


def _bn_ratio(x: Context) -> Optional[float]:
    """How far A's running statistic moved this step, relative to B's (least squares)."""
    a, b = x.v("a", x.slot, x.step), x.v("b", x.slot, x.step)
    if a is None or b is None or a.dtype.kind != "f":
        return None
    prev = x.prev(x.step)
    if prev is not None:
        pa, pb = x.v("a", x.slot, prev), x.v("b", x.slot, prev)
    elif x.slot.name.endswith(("running_mean", "running_var")):
        init = 0.0 if x.slot.name.endswith("running_mean") else 1.0
        pa = pb = np.full_like(a, init)
    else:
        return None
    if pa is None or pb is None:
        return None
    da, db = (a - pa).astype(np.float64).ravel(), (b - pb).astype(np.float64).ravel()
    if float(db @ db) == 0:
        return None
    return float(da @ db) / float(db @ db)


def rule_update_rule(x: Context) -> Optional[Cause]:
    """Parameters differ while the previous step's parameters and gradients agree."""
    if x.slot.kind != "param" or x.step == int(x.pair.steps[0]):
        return None
    prev = x.prev(x.step)
    grads_ok = x.within(prev, ("grad", "autograd_grad"))
    params_ok = x.within(prev, ("param",))
    if grads_ok is False or params_ok is False:
        return None
    ev = [f"{x.slot.label} differs at step {x.step} ({x.hit_text()})"]
    ev.append(
        f"at step {prev} the parameters and gradients agree"
        if grads_ok
        else f"at step {prev} the parameters agree (gradients not recorded)"
    )
    title = "update rule differs (learning rate, weight decay, momentum or a manual update)"
    detail = _update_detail(x, prev)
    if detail:
        title, more = detail
        ev.extend(more)
    return Cause(
        "update_rule",
        title,
        ev,
        "compare the optimizers: learning rate and its schedule, weight_decay, momentum, "
        "and any manual update of the parameters",
    )


def _update_detail(x: Context, prev: int) -> Optional[tuple[str, list[str]]]:
    """Classify the update difference: uniform ratio, proportional to weights, or momentum."""
    votes: dict[str, list[float]] = {"ratio": [], "momentum": [], "decay": []}
    pprev = x.prev(prev)
    for s, code in x.slots_of(x.step, ("param",)):
        if code == EQUAL:
            continue
        pa, pb, qa, qb = (x.v(side, s, t) for t in (x.step, prev) for side in ("a", "b"))
        if any(v is None for v in (pa, pb, qa, qb)):
            continue
        da = (pa.astype(np.float64) - qa).ravel()
        db = (pb.astype(np.float64) - qb).ravel()
        if float(db @ db) == 0:
            continue
        c = float(da @ db) / float(db @ db)
        if rel_diff(da, c * db) < RELATION_TOL:
            votes["ratio"].append(c)
            continue
        e = da - db
        rb = x.v("b", s, pprev) if pprev is not None else None
        if rb is not None and abs(cosine(e, (qb.astype(np.float64) - rb).ravel())) > 0.99:
            votes["momentum"].append(1.0)
            continue
        w = qa.astype(np.float64).ravel()
        if abs(cosine(e, w)) > 0.99:
            votes["decay"].append(float(e @ w) / float(w @ w))
    kind = max(votes, key=lambda k: len(votes[k]))
    vals = votes[kind]
    if not vals:
        return None
    if kind == "ratio":
        same = max(vals) - min(vals) <= 1e-3 * max(abs(max(vals)), 1e-30)
        return (
            "learning rate differs" + (" (a schedule?)" if x.step > 1 else ""),
            [
                f"A's update is B's x {fmt(float(np.median(vals)))}"
                + (
                    " for every parameter"
                    if same
                    else f" (factors {', '.join(fmt(c) for c in vals[:4])})"
                )
            ],
        )
    if kind == "decay":
        return (
            "weight decay differs",
            [
                f"A's update minus B's is proportional to the weights (coefficient {fmt(float(np.median(vals)))} "
                "= -lr x the weight_decay difference)"
            ],
        )
    return (
        "momentum (optimizer state) differs",
        [f"A's update minus B's points along the previous update ({len(vals)} parameters)"],
    )


def rule_update_specific(x: Context) -> Optional[Cause]:
    """The update-rule rule, only when it names the difference (lr, decay, momentum)."""
    c = rule_update_rule(x)
    return c if c is not None and not c.title.startswith("update rule differs") else None

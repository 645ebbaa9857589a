"""Diagnosis rules about what changes state between steps: the update rule, BatchNorm statistics.

Each rule: context in, Cause or None out (see context.py).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .compare_records import EQUAL
from .context import Cause, Context, fmt
from .noise import ROUNDING_ULPS, eps_of
from .update_fit import differs, fit_difference, fit_sgd, fresh_adam


def rule_batchnorm(x: Context) -> Optional[Cause]:
    """Only buffers differ: BatchNorm momentum, or an extra forward in train mode."""
    if x.slot.kind != "buffer":
        return None
    if not x.within(
        x.step, ("param", "input", "activation", "loss", "grad_output", "grad", "autograd_grad")
    ):
        return None
    ev = [
        f"{x.label(x.slot)} differs at step {x.step} ({x.hit_text()}) while "
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
    """Parameters differ while the previous step's parameters and gradients agree (generic)."""
    if not _after_agreeing_step(x):
        return None
    prev = x.prev(x.step)
    ev = [f"{x.label(x.slot)} differs at step {x.step} ({x.hit_text()})"]
    grads_ok = x.within(prev, ("grad", "autograd_grad"))
    ev.append(
        f"at step {prev} the parameters and gradients agree"
        if grads_ok
        else f"at step {prev} the parameters agree (gradients not compared)"
    )
    return Cause(
        "update_rule",
        "update rule differs (learning rate, weight decay, momentum or a manual update)",
        ev,
        "compare the optimizers: learning rate and its schedule, weight_decay, momentum, "
        "and any manual update of the parameters",
    )


def _after_agreeing_step(x: Context, step: Optional[int] = None) -> bool:
    step = x.step if step is None else step
    if x.slot.kind != "param" or step == int(x.pair.steps[0]):
        return False
    prev = x.prev(step)
    return (
        x.within(prev, ("grad", "autograd_grad")) is not False
        and x.within(prev, ("param",)) is not False
    )


def rule_update_specific(x: Context) -> list[Cause]:
    """The update-rule causes the recorded series prove: learning rate, weight decay (and on
    which parameters), momentum / optimizer state. Several when the evidence fits several.

    The update looked at is the first one that differs (the origin, when it is a parameter),
    else the one that diverged.
    """
    o = x.walk.first_bitwise
    steps = [x.step]
    if o is not None and x.pair.al.slots[o.slot].kind == "param" and o.step < x.step:
        steps.insert(0, o.step)
    for step in steps:
        if _after_agreeing_step(x, step):
            causes = _update_causes(x, step)
            if causes:
                return causes
    return []


def _update_causes(x: Context, step: int) -> list[Cause]:
    prev = x.prev(step)
    pprev = x.prev(prev)
    found: dict[tuple, list] = {}  # finding -> parameter slots
    alike, total = [], 0
    for s, code in x.slots_of(step, ("param",)):
        total += 1
        if code == EQUAL:
            if _decay_could_show(x, s, prev):
                alike.append(s)
            continue
        for f in _findings(x, s, step, prev, pprev):
            found.setdefault(f, []).append(s)
    if not found:
        return []
    causes = [_cause(x, f, names, alike, total, prev, step) for f, names in found.items()]
    order = {f: -len(n) for f, n in found.items()}
    ranked = sorted(zip(found, causes), key=lambda fc: order[fc[0]])
    out, seen = [], set()
    for _, c in ranked:  # one cause per id, the best-supported first
        if c.cause not in seen:
            seen.add(c.cause)
            out.append(c)
    return out


def _decay_could_show(x: Context, s, prev: int) -> bool:
    """Whether weight decay would have changed this parameter's update at all: decaying a
    tensor of zeros (a zero-initialised bias) gives zero, so a bitwise-alike update of such a
    tensor says nothing about which parameter groups are decayed. Unknown values: no evidence."""
    p = x.v("a", s, prev)
    return p is not None and p.dtype.kind == "f" and bool(np.any(p != 0))


def _series(x: Context, s, step: int, prev: int, pprev: Optional[int], side: str):
    """(delta, g, p, u) of one parameter in one run, float64 and flat; None where missing."""
    p1, p0 = x.v(side, s, step), x.v(side, s, prev)
    if p1 is None or p0 is None or p1.shape != p0.shape or p0.dtype.kind != "f":
        return None
    p0 = p0.astype(np.float64).ravel()
    delta = p1.astype(np.float64).ravel() - p0
    g = None
    for kind in ("grad", "autograd_grad"):
        gs = x.pair.slot(kind, s.name)
        gv = x.v(side, gs, prev) if gs is not None else None
        if gv is not None and gv.size == p0.size:
            g = gv.astype(np.float64).ravel()
            break
    u = None
    if pprev is not None:
        q = x.v(side, s, pprev)
        if q is not None and q.size == p0.size:
            u = p0 - q.astype(np.float64).ravel()
            if not np.any(u):
                u = None
    return delta, g, p0, u


def _findings(x: Context, s, step: int, prev: int, pprev: Optional[int]) -> list[tuple]:
    """What differs in this parameter's update, as hashable findings."""
    a = _series(x, s, step, prev, pprev, "a")
    b = _series(x, s, step, prev, pprev, "b")
    if a is None or b is None:
        return []
    (da, ga, pa, ua), (db, gb, pb, ub) = a, b
    out: list[tuple] = []
    if ga is not None and gb is not None:
        fa, fb = fit_sgd(da, ga, pa, ua), fit_sgd(db, gb, pb, ub)
        if fa is not None and fb is not None:  # both runs are SGD: read the hyperparameters
            if differs(fa.lr, fb.lr, fa.se["lr"], fb.se["lr"]):
                out.append(("lr", fa.lr, fb.lr))
            se_wd = (fa.se["p"] / max(fa.lr, 1e-30), fb.se["p"] / max(fb.lr, 1e-30))
            if differs(fa.wd, fb.wd, *se_wd):
                # the relative change per step the decay difference makes: lr x |wd_a - wd_b|
                out.append(("wd", _round(fa.wd), _round(fb.wd), _round(fa.lr * abs(fa.wd - fb.wd))))
            ma, mb = fa.momentum, fb.momentum
            if (
                ma is not None
                and mb is not None
                and differs(ma, mb, fa.se["momentum"], fb.se["momentum"])
            ):
                reset = _momentum_before(x, s, prev, pprev, "a" if ma == 0 else "b")
                if min(abs(ma), abs(mb)) == 0 and reset:
                    out.append(("momentum_reset", "A" if ma == 0 else "B", _round(reset)))
                else:
                    out.append(("momentum", _round(ma), _round(mb)))
            return out
        for side, d, g, other, og in (("A", da, ga, db, gb), ("B", db, gb, da, ga)):
            if pprev is not None:  # not the first update: a fresh Adam here was reset
                lr = fresh_adam(d, g)
                if lr is not None and fresh_adam(other, og) is None:
                    return [("adam_reset", side, _round(lr))]
    fits = fit_difference(da, db, pb, ub)
    for fit in fits[:2]:
        t = fit.terms
        if set(t) == {"ratio"}:
            out.append(("ratio", _round(1 + t["ratio"])))
        elif set(t) == {"decay"}:
            out.append(("decoupled", _round(t["decay"])))
        elif "state" in t:
            out.append(("state",))
        else:
            out.append(("ratio+decay",))
    return out


def _momentum_before(x: Context, s, step: int, prev: Optional[int], side: str) -> float:
    """The momentum one run's previous update used (0 when unknown): a run whose momentum drops
    to 0 after being positive had its buffer reset."""
    if prev is None:
        return 0.0
    got = _series(x, s, step, prev, x.prev(prev), side)
    if got is None or got[1] is None:
        return 0.0
    f = fit_sgd(*got)
    return f.momentum if f is not None and f.momentum else 0.0


def _round(v: float) -> float:
    """Three significant digits, so that parameters with the same setting group together."""
    return float(f"{v:.3g}")


def _who(x: Context, slots: list, total: int) -> str:
    if len(slots) == total:
        return "every parameter"
    return f"{len(slots)} of {total} parameters: {x.names(slots)}"


def _cause(
    x: Context, f: tuple, names: list, alike: list, total: int, prev: int, step: int
) -> Cause:
    who = _who(x, names, total)
    head = f"at step {prev} the parameters and gradients agree; the updates to step {step} differ"
    # parameters updated bitwise alike are evidence of other parameter groups only when the
    # decay difference is large enough to survive rounding (> 16 ulps of float32 per step)
    visible = f[0] in ("wd", "decoupled") and abs(f[-1]) > ROUNDING_ULPS * eps_of("float32")
    groups = (
        f"; {x.names(alike)} are updated bitwise alike: the decay covers different parameter groups"
        if alike and visible
        else ""
    )
    later = prev > int(x.pair.steps[0])
    if f[0] == "lr":
        return Cause(
            "learning_rate",
            f"learning rate differs: {fmt(f[1])} in A vs {fmt(f[2])} in B"
            + (" (a schedule stepped differently?)" if later else ""),
            [
                head,
                f"fitting each run's update as p -= lr * (g + wd * p) (+ momentum) gives lr "
                f"{fmt(f[1])} in A and {fmt(f[2])} in B for {who}",
            ]
            + ([f"earlier updates agree: the rates part at step {prev}"] if later else []),
            "use the same learning rate and scheduler; step the scheduler at the same place (per "
            "step vs per epoch) and restore it (scheduler.load_state_dict) when resuming",
        )
    if f[0] == "ratio":
        return Cause(
            "learning_rate",
            "learning rate differs" + (" (a schedule stepped differently?)" if later else ""),
            [head, f"A's update is B's x {fmt(f[1])} for {who}"],
            "use the same learning rate and scheduler; step the scheduler at the same place (per "
            "step vs per epoch) and restore it (scheduler.load_state_dict) when resuming",
        )
    if f[0] in ("wd", "decoupled"):
        if f[0] == "wd":
            what = f"weight_decay {fmt(f[1])} in A vs {fmt(f[2])} in B (coupled L2: g + wd * p)"
            ev = (
                f"fitting each run's update as p -= lr * (g + wd * p) (+ momentum) gives "
                f"{what} for {who}{groups}"
            )
        else:
            what = "decoupled weight decay (AdamW-style)"
            ev = (
                f"A's update minus B's is {fmt(f[1])} x the weights (= lr x (wd_B - wd_A)) for "
                f"{who}{groups}"
            )
        return Cause(
            "weight_decay",
            f"weight decay differs: {what}" + (" on different parameter groups" if groups else ""),
            [head, ev],
            "use the same weight_decay, the same optimizer class (SGD/Adam add wd * p to the "
            "gradient, AdamW decays the weights directly) and the same parameter groups "
            "(e.g. no decay on biases and norm weights in both)",
        )
    if f[0] == "momentum":
        return Cause(
            "optimizer_state",
            f"momentum differs: {fmt(f[1])} in A vs {fmt(f[2])} in B",
            [
                head,
                f"fitting each run's update as p -= lr * (g + wd * p) - momentum * previous update "
                f"gives momentum {fmt(f[1])} in A and {fmt(f[2])} in B for {who}",
            ],
            "use the same momentum; when resuming, restore the optimizer "
            "(optimizer.load_state_dict) along with the model",
        )
    if f[0] == "momentum_reset":
        return Cause(
            "optimizer_state",
            f"momentum buffer reset in {f[1]} at step {prev} (resumed without optimizer state?)",
            [
                head,
                f"fitting {f[1]}'s updates as p -= lr * (g + wd * p) - momentum * previous update "
                f"gives momentum {fmt(f[2])} until step {prev}, then 0 (a fresh buffer) for {who}",
            ],
            "save and restore optimizer.state_dict() with the model when resuming",
        )
    if f[0] == "adam_reset":
        return Cause(
            "optimizer_state",
            f"optimizer state reset in {f[1]} at step {prev}: Adam's moments start from zero "
            "(resumed without optimizer state?)",
            [
                head,
                f"{f[1]}'s update at step {prev} moves every element by ~{fmt(f[2])} in the "
                "direction of -sign(grad): the first step of an Adam with empty moments; the "
                f"other run's is not, for {who}",
            ],
            "save and restore optimizer.state_dict() with the model when resuming",
        )
    if f[0] == "state":
        return Cause(
            "optimizer_state",
            "optimizer state differs (momentum or Adam moments)",
            [head, f"A's update minus B's points along B's previous update for {who}"],
            "use the same momentum/betas; when resuming, restore optimizer.state_dict()",
        )
    return Cause(
        "learning_rate",
        "learning rate and weight decay differ",
        [head, f"A's update minus B's is a mix of B's update and the weights for {who}"],
        "compare the learning rate and weight_decay of the two optimizers",
    )

"""Diagnosis rules about what changes state between steps: the update rule, BatchNorm statistics.

Each rule: context in, Cause or None out (see context.py).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .compare_records import EQUAL
from .context import Cause, Context, fmt
from .noise import ROUNDING_ULPS, eps_of
from .pooled import MAX_SOURCES, decay_only, fresh_given, fresh_pooled, predicted, sgd_residual
from .rules_clipafter import clip_after_record
from .rules_config import settings_evidence
from .rules_schedule import schedule_cause
from .update_fit import (
    FIT_TOL,
    MIN_PER_COEF,
    SIGNIFICANCE,
    FreshFit,
    SgdFit,
    differs,
    fit_difference,
    fit_fresh,
    fit_sgd,
    fresh_decay,
)
from .update_series import series as _series


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
    settings = settings_evidence(x, x.slot.name.rsplit(".", 1)[0])
    if settings:
        ev.append(settings)
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
        x.within_judged(prev, ("grad", "autograd_grad")) is not False
        and x.within_judged(prev, ("param",)) is not False
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
    fits = _Fits(x, step, prev, pprev)
    for s, code in x.slots_of(step, ("param",)):
        total += 1
        if code == EQUAL:
            if _decay_could_show(x, s, prev):
                alike.append(s)
            continue
        for f in _findings(x, fits, s, step, prev, pprev):
            found.setdefault(f, []).append(s)
    if not found:
        return []
    found = _merge_fresh(found)
    causes = [_cause(x, f, names, alike, total, prev, step) for f, names in found.items()]
    order = {f: -len(n) for f, n in found.items()}
    ranked = sorted(zip(found, causes), key=lambda fc: order[fc[0]])
    out: list[Cause] = []
    by_id: dict[str, Cause] = {}
    for _, c in ranked:  # one cause per id, the best-supported first; the others' evidence
        if c.cause not in by_id:  # (other parameters, another reading) joins it
            by_id[c.cause] = c
            out.append(c)
        else:
            by_id[c.cause].evidence.extend("also: " + e for e in c.evidence[1:])
    return out


def _decay_could_show(x: Context, s, prev: int) -> bool:
    """Whether weight decay would have changed this parameter's update at all: decaying a
    tensor of zeros (a zero-initialised bias) gives zero, so a bitwise-alike update of such a
    tensor says nothing about which parameter groups are decayed. Unknown values: no evidence."""
    p = x.v("a", s, prev)
    return p is not None and p.dtype.kind == "f" and bool(np.any(p != 0))


class _Fits:
    """Each run's fits of every parameter at one update (cached), and the pooled readings of
    parameters too small to fit alone (pooled.py): tested against a larger parameter's
    coefficients, the same module's first."""

    def __init__(self, x: Context, step: int, prev: int, pprev: Optional[int]) -> None:
        self.x, self.step, self.prev, self.pprev = x, step, prev, pprev
        self.params = [s for s, _ in x.slots_of(step, ("param",))]
        self._sr: dict = {}
        self._sgd: dict = {}
        self._fresh: dict = {}

    def series(self, s, side: str):
        key = (s.index, side)
        if key not in self._sr:
            self._sr[key] = _series(self.x, s, self.step, self.prev, self.pprev, side)
        return self._sr[key]

    def sgd(self, s, side: str) -> Optional[SgdFit]:
        key = (s.index, side)
        if key not in self._sgd:
            sr = self.series(s, side)
            self._sgd[key] = fit_sgd(*sr) if sr is not None and sr[1] is not None else None
        return self._sgd[key]

    def fresh(self, s, side: str) -> Optional[FreshFit]:
        key = (s.index, side)
        if key not in self._fresh:
            sr = self.series(s, side)
            ok = sr is not None and sr[1] is not None
            self._fresh[key] = fit_fresh(sr[0], sr[1], sr[2]) if ok else None
        return self._fresh[key]

    def _sources(self, s) -> list:
        module = s.name.rpartition(".")[0]
        size = {o.index: (self.series(o, "a") or (np.empty(0),))[0].size for o in self.params}
        others = sorted(
            (o for o in self.params if o.index != s.index), key=lambda o: -size[o.index]
        )
        same = [o for o in others if o.name.rpartition(".")[0] == module]
        return (same + [o for o in others if o not in same])[:MAX_SOURCES]

    def sgd_reading(self, s, side: str) -> Optional[tuple[SgdFit, object, bool]]:
        """(fit, the slot whose coefficients it uses, pooled?) of one run's update."""
        f = self.sgd(s, side)
        if f is not None:
            return f, s, False
        sr = self.series(s, side)
        if sr is None or sr[1] is None:
            return None
        cols = 2 + (sr[3] is not None)
        if sr[0].size >= MIN_PER_COEF * cols and np.any(sr[2]):
            return None  # large enough to fit: it is not SGD
        sources = [(o, self.sgd(o, side)) for o in self._sources(s)]
        sources = [(o, f) for o, f in sources if f is not None]
        for o, f in sources:
            if predicted(sr, f):
                return f, o, True
        if sources:
            g = decay_only(sr, sources[0][1])
            if g is not None:
                return g, sources[0][0], True
        return None

    def fresh_reading(self, s, side: str) -> Optional[tuple[FreshFit, bool]]:
        f = self.fresh(s, side)
        if f is not None:
            return f, False
        sr = self.series(s, side)
        if sr is None or sr[1] is None or np.count_nonzero(sr[0]) >= 2 * MIN_PER_COEF:
            return None
        for o in self._sources(s):
            src = self.fresh(o, side)
            if src is not None:
                got = fresh_pooled(sr, src)
                return (got, True) if got is not None else None
        return None


def _rejects(sr: tuple, f: SgdFit, **swap) -> bool:
    """This run's update does not follow its coefficients with one swapped for the other run's
    (the evidence a pooled reading must give to count)."""
    c = {"lr": f.lr, "wd": f.wd, "momentum": f.momentum, **swap}
    return sgd_residual(sr, c["lr"], c["wd"], c["momentum"]) > 10 * FIT_TOL


def _findings(
    x: Context, fits: _Fits, s, step: int, prev: int, pprev: Optional[int]
) -> list[tuple]:
    """What differs in this parameter's update, as hashable findings."""
    a, b = fits.series(s, "a"), fits.series(s, "b")
    if a is None or b is None:
        return []
    (da, ga, _, _), (db, gb, pb, ub) = a, b
    out: list[tuple] = []
    if ga is not None and gb is not None:
        ra, rb = fits.sgd_reading(s, "a"), fits.sgd_reading(s, "b")
        if ra is not None and rb is not None:  # both runs are SGD: read the hyperparameters
            (fa, sa_, pooled_a), (fb, sb_, pooled_b) = ra, rb
            out = _sgd_findings(x, fa, fb, sa_, sb_, step, prev)
            if pooled_a or pooled_b:
                out = [f for f in out if _swap_rejected(f, a, b, fa, fb)]
            return out
        fra, frb = fits.fresh_reading(s, "a"), fits.fresh_reading(s, "b")
        ea, eb = (fra or (None,))[0], (frb or (None,))[0]
        if ea is not None and eb is not None:  # both: Adam's step from empty moments
            out = _fresh_findings(ea, eb)
            if fra[1] or frb[1]:
                out = [f for f in out if _fresh_swap_rejected(f, a, b, ea, eb)]
            if out:
                return out
        elif pprev is not None:  # not the first update: a fresh Adam here was reset
            for side, e in (("A", ea), ("B", eb)):
                if e is not None:
                    return [("adam_reset", side, _round(e.lr))]
    if min(da.size, db.size) < 2 * MIN_PER_COEF:
        return out  # too small for a cross-run fit to tell its terms apart
    for fit in fit_difference(da, db, pb, ub)[:2]:
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


def _sgd_findings(x: Context, fa: SgdFit, fb: SgdFit, sa, sb, step: int, prev: int) -> list:
    """Rate, decay and momentum compared between two SGD readings (``sa``/``sb``: the slots
    whose fits they are, for the momentum's previous rate)."""
    out: list[tuple] = []
    if differs(fa.lr, fb.lr, fa.se["lr"], fb.se["lr"]):
        out.append(("lr", _round(fa.lr), _round(fb.lr)))
    se_wd = (fa.se["p"] / max(fa.lr, 1e-30), fb.se["p"] / max(fb.lr, 1e-30))
    if differs(fa.wd, fb.wd, *se_wd):
        # the relative change per step the decay difference makes: lr x |wd_a - wd_b|
        out.append(("wd", _round(fa.wd), _round(fb.wd), _round(fa.lr * abs(fa.wd - fb.wd))))
    # a pooled reading carries its source's rate and momentum: the source's previous rate
    ma, sea = _momentum(x, sa, step, "a", fa)
    mb, seb = _momentum(x, sb, step, "b", fb)
    if ma is not None and mb is not None and differs(ma, mb, sea, seb):
        side, src = ("a", sa) if ma == 0 else ("b", sb)
        before = _sgd_at(x, src, prev, side)
        reset = _momentum(x, src, prev, side, before)[0] if before is not None else 0.0
        if min(abs(ma), abs(mb)) == 0 and reset:
            out.append(("momentum_reset", side.upper(), _round(reset)))
        else:
            out.append(("momentum", _round(ma), _round(mb)))
    return out


def _swap_rejected(f: tuple, a: tuple, b: tuple, fa: SgdFit, fb: SgdFit) -> bool:
    key = {"lr": "lr", "wd": "wd", "momentum": "momentum", "momentum_reset": "momentum"}[f[0]]
    return _rejects(a, fa, **{key: getattr(fb, key)}) and _rejects(b, fb, **{key: getattr(fa, key)})


def _fresh_swap_rejected(f: tuple, a: tuple, b: tuple, ea: FreshFit, eb: FreshFit) -> bool:
    if f[0] == "adam_lr":
        return (
            fresh_given(a, eb.lr, ea.decoupled) is None
            and fresh_given(b, ea.lr, eb.decoupled) is None
        )
    if "coupled" in (f[1][0], f[2][0]):
        return True  # the directions of this parameter's own elements bound the decay
    return (
        fresh_given(a, ea.lr, eb.decoupled) is None and fresh_given(b, eb.lr, ea.decoupled) is None
    )


def _fresh_findings(ea: FreshFit, eb: FreshFit) -> list[tuple]:
    """What differs between two updates from empty Adam moments: the rate (every element moves
    by it) and the decay, coupled (directions) or decoupled (a term in the weights)."""
    out: list[tuple] = []
    if abs(ea.lr - eb.lr) > 1e-3 * max(ea.lr, eb.lr):
        out.append(("adam_lr", _round(ea.lr), _round(eb.lr)))
    ka, kb = fresh_decay(ea), fresh_decay(eb)
    if ka[0] == kb[0] == "decoupled":
        differ = differs(ea.decoupled, eb.decoupled, ea.se_decoupled, eb.se_decoupled)
    elif ka[0] == kb[0] == "coupled" and ea.sized and eb.sized:  # the sizes read each decay
        differ = differs(ea.sized[0], eb.sized[0], ea.sized[1], eb.sized[1])
    elif ka[0] == kb[0] == "coupled":  # disjoint intervals of the decay
        differ = ea.coupled[0] >= eb.coupled[1] or eb.coupled[0] >= ea.coupled[1]
    else:
        differ = ka[0] != kb[0]
    if differ:
        # the intervals are merged over the parameters that share the finding (_merge_fresh)
        sized = tuple(e.sized if k[0] == "coupled" else None for e, k in ((ea, ka), (eb, kb)))
        out.append(("adam_decay", ka, kb, ea.coupled, eb.coupled) + sized)
    return out


def _merge_fresh(found: dict) -> dict:
    """Group the fresh-Adam decay findings by what each run does, intersecting the coupled
    decay intervals of the parameters in a group (kept when they do not intersect: one
    parameter's interval then stands for the group's)."""
    out: dict = {}
    for f, slots in found.items():
        if f[0] != "adam_decay":
            out.setdefault(f, []).extend(slots)
            continue
        key = next((k for k in out if k[:3] == f[:3]), None)
        if key is None:
            out[f] = list(slots)
            continue
        ia = (max(key[3][0], f[3][0]), min(key[3][1], f[3][1]))
        ib = (max(key[4][0], f[4][0]), min(key[4][1], f[4][1]))
        ia = ia if ia[0] < ia[1] else key[3]
        ib = ib if ib[0] < ib[1] else key[4]
        # the most precise size reading of each run stands for the group
        sa, sb = (
            min((v for v in (key[i], f[i]) if v), key=lambda v: v[1], default=None) for i in (5, 6)
        )
        out[key[:3] + (ia, ib, sa, sb)] = out.pop(key) + list(slots)
    return out


def _sgd_at(x: Context, s, step: Optional[int], side: str) -> Optional[SgdFit]:
    """One run's update to ``step`` fitted as SGD (None: no earlier step, or not SGD)."""
    prev = x.prev(step) if step is not None else None
    if prev is None:
        return None
    got = _series(x, s, step, prev, x.prev(prev), side)
    return fit_sgd(*got) if got is not None and got[1] is not None else None


def _momentum(x: Context, s, step: int, side: str, f: SgdFit) -> tuple[Optional[float], float]:
    """The momentum of one run's update to ``step``, and its standard error.

    PyTorch's SGD moves by ``-lr_t * (g + wd * p + mu * buf)`` and its previous update was
    ``-lr_(t-1) * buf``: the fitted coefficient of the previous update is ``mu * lr_t / lr_(t-1)``,
    so a schedule that changes the rate changes the coefficient. The previous update's fitted
    rate undoes that (the coefficient is kept where that update cannot be fitted)."""
    if not f.momentum:
        return f.momentum, f.se["momentum"]
    before = _sgd_at(x, s, x.prev(step), side)
    scale = before.lr / f.lr if before is not None else 1.0
    return f.momentum * scale, f.se["momentum"] * scale


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
    if f[0] == "adam_decay":  # per parameter: would the decay have changed its update at all?
        alike = [s for s in alike if _fresh_decay_shows(x, s, prev, f)]
        visible = True
    groups = (
        f"; {x.names(alike)} are updated bitwise alike: the decay covers different parameter groups"
        if alike and visible
        else ""
    )
    later = prev > int(x.pair.steps[0])
    if f[0] == "lr":
        title, sched_ev, fix = schedule_cause(x, prev) if later else (None, [], None)
        ev = [
            head,
            f"fitting each run's update as p -= lr * (g + wd * p) (+ momentum) gives lr "
            f"{fmt(f[1])} in A and {fmt(f[2])} in B for {who}",
        ]
        if title is not None:
            return Cause("learning_rate", title, ev + sched_ev, fix)
        clip = clip_after_record(x, prev)
        if clip is not None:
            clip.evidence.insert(0, head)
            return clip
        return Cause(
            "learning_rate",
            f"learning rate differs: {fmt(f[1])} in A vs {fmt(f[2])} in B"
            + (" (a schedule stepped differently?)" if later else ""),
            ev
            + ([f"earlier updates agree: the rates part at step {prev}"] if later else [])
            + sched_ev,
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
    if f[0] == "adam_lr":
        return Cause(
            "learning_rate",
            f"learning rate differs: {fmt(f[1])} in A vs {fmt(f[2])} in B"
            + (" (a schedule stepped differently?)" if later else ""),
            [
                head,
                f"both updates are Adam's first step from empty moments, which moves every "
                f"element by the learning rate: {fmt(f[1])} in A, {fmt(f[2])} in B for {who}",
            ],
            "use the same learning rate and scheduler; step the scheduler at the same place (per "
            "step vs per epoch) and restore it (scheduler.load_state_dict) when resuming",
        )
    if f[0] == "adam_decay":
        return _adam_decay_cause(f, head, who, groups)
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


def _fresh_decay_shows(x: Context, s, prev: int, f: tuple) -> bool:
    """Whether a fresh-Adam decay finding would have changed this parameter's update: a
    decoupled decay always moves a nonzero tensor; a coupled one only where it turns a direction
    (``sign(g + wd * p) != sign(g)``); its effect through eps alone is below rounding on most
    tensors, so a parameter it does not turn is no evidence of parameter groups."""
    kinds = (f[1][0], f[2][0])
    if "decoupled" in kinds:
        return True
    p, gs = x.v("a", s, prev), x.pair.slot("grad", s.name)
    g = x.v("a", gs, prev) if gs is not None else None
    if p is None or g is None or p.shape != g.shape:
        return False
    p, g = p.astype(np.float64).ravel(), g.astype(np.float64).ravel()
    for k, interval, sized in ((f[1], f[3], f[5]), (f[2], f[4], f[6])):
        if k[0] != "coupled":
            continue
        lo, hi = interval
        wd = sized[0] if sized else (lo if lo > 0 else hi)
        if np.isfinite(wd) and np.any(np.sign(g + wd * p) != np.sign(g)):
            return True
    return False


def _adam_decay_cause(f: tuple, head: str, who: str, groups: str) -> Cause:
    """Weight decay told apart on updates from empty Adam moments: none, coupled L2 inside
    Adam, or decoupled (AdamW)."""

    def short(k: tuple) -> str:
        return {
            "none": "none",
            "coupled": "coupled L2 inside Adam",
            "decoupled": "decoupled (AdamW-style)",
        }[k[0]]

    def detail(side: str, k: tuple, interval: tuple, sized) -> str:
        if k[0] == "coupled" and sized and sized_ok(sized, interval):
            return (
                f"{side}'s moves the elements whose gradient is near Adam's eps by less than the "
                f"learning rate, as lr * |g~| / (|g~| + eps) with g~ = g + wd * p: weight_decay "
                f"{fmt(sized[0])} (standard error {fmt(sized[1])}, eps {fmt(sized[2])}): a decay "
                "inside Adam's normalisation (coupled L2: Adam(weight_decay=wd) adds wd * p to the "
                "gradient before the moments)"
            )
        if k[0] == "coupled":
            lo, hi = interval
            wd = f"between {fmt(lo)} and {fmt(hi)}" if np.isfinite(hi) else f"at least {fmt(lo)}"
            return (
                f"{side}'s still moves every element by the learning rate, along -sign(g + wd * p) "
                f"with weight_decay {wd}: the decay passed through Adam's normalisation (coupled "
                "L2: Adam(weight_decay=wd) adds wd * p to the gradient before the moments)"
            )
        if k[0] == "decoupled":
            return (
                f"{side}'s is -lr * sign(g) - lr * wd * p with wd {fmt(k[1])}: a decay outside "
                "the normalisation (decoupled, AdamW)"
            )
        return f"{side}'s moves every element by the learning rate along -sign(g): no decay"

    ka, kb, ia, ib, sa, sb = f[1:7]

    def sized_ok(sized, interval) -> bool:
        return abs(sized[0]) > SIGNIFICANCE * sized[1] and interval[0] <= sized[0] <= interval[1]

    title = f"weight decay differs: {short(ka)} in A vs {short(kb)} in B"
    if "none" in (ka[0], kb[0]):
        side, k = ("B", kb) if ka[0] == "none" else ("A", ka)
        title = f"weight decay differs: {short(k)} in {side} only"
    return Cause(
        "weight_decay",
        title + (" on different parameter groups" if groups else ""),
        [
            head,
            "both updates are Adam steps from empty moments (every element moves by the "
            f"learning rate); {detail('A', ka, ia, sa)}; {detail('B', kb, ib, sb)}; for {who}{groups}",
        ],
        "Adam(weight_decay=wd) is L2 regularisation coupled to the gradient (normalised away "
        "where gradients are large); for decoupled decay use torch.optim.AdamW(weight_decay=wd); "
        "use the same optimizer class, weight_decay and parameter groups in both runs",
    )

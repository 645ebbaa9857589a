"""Name the most likely cause of a divergence, with the evidence: the differ's last stage.

Input: the pair of runs and the walk's result (first divergence, first bitwise difference).
Output: a ranked list of :class:`Cause`. Each rule looks at the records around the divergence
(the previous step's gradients, the module before, both runs' .grad histories, ...) and either
returns a cause with evidence and a fix, or None. Rules run from specific to generic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from .align import Slot
from .compare_records import DIFF, EQUAL, MISSING_A, MISSING_B, NONFINITE, SHAPE
from .envdiff import numeric_differences
from .exact import rel_diff
from .first import Hit, WalkResult
from .noise import rounding_level
from .pair import RunPair

#: How many steps back the accumulation rule sums gradients.
ACCUMULATION_LOOKBACK = 8
#: A relation (sum, scale, ...) "holds" when its residual is below this relative error and far
#: below the plain difference it explains.
RELATION_TOL = 0.02
#: How much larger than the previous step's parameter/gradient differences a parameter
#: difference may be and still be called amplified rounding.
UPDATE_AMPLIFICATION = 100.0


@dataclass
class Cause:
    """One candidate explanation."""

    cause: str  # stable id: different_init, grad_accumulation, rounding, ...
    title: str
    evidence: list[str] = field(default_factory=list)
    fix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "cause": self.cause,
            "title": self.title,
            "evidence": list(self.evidence),
            "fix": self.fix,
        }


def _fmt(x: Optional[float]) -> str:
    if x is None or not np.isfinite(x):
        return str(x)
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 or x == 0 else f"{x:.2e}"


class _Ctx:
    """What the rules may ask: relative differences, values and cells around a step."""

    def __init__(
        self, pair: RunPair, walk: WalkResult, hit: Hit, rtol: float, env_rows: list
    ) -> None:
        self.pair, self.walk, self.hit, self.rtol, self.env_rows = pair, walk, hit, rtol, env_rows
        self.slot: Slot = pair.al.slots[hit.slot]
        self.step = hit.step

    def prev(self, step: int) -> Optional[int]:
        earlier = self.pair.steps[self.pair.steps < step]
        return int(earlier[-1]) if len(earlier) else None

    def v(self, side: str, slot: Slot, step: int) -> Optional[np.ndarray]:
        return self.pair.values(side, slot, step)

    def rel(self, slot: Slot, step: int) -> Optional[float]:
        """Exact relative difference where both runs stored values, else the stats bound."""
        i = self.pair.cell(slot, step)
        if i is None:
            return None
        c = self.pair.cells(step)
        code = int(c.code[i])
        if code == EQUAL:
            return 0.0
        if code in (MISSING_A, MISSING_B, SHAPE) or code == NONFINITE:
            return None
        if code == DIFF:
            vd = self.pair.diff(slot, step)
            if vd is not None:
                return 0.0 if vd.bitwise_equal else vd.rel_diff
        return float(c.rel_lb[i])

    def slots_of(self, step: int, kinds: tuple[str, ...]) -> list[tuple[Slot, int]]:
        c = self.pair.cells(step)
        return [
            (self.pair.al.slots[int(s)], int(code))
            for s, code in zip(c.slot, c.code)
            if self.pair.al.slots[int(s)].kind in kinds
        ]

    def within(
        self, step: Optional[int], kinds: tuple[str, ...], tol: Optional[float] = None
    ) -> Optional[bool]:
        """True when every record of these kinds agrees within ``tol`` at ``step`` (None: none)."""
        if step is None:
            return None
        tol = self.rtol if tol is None else tol
        found = False
        for slot, code in self.slots_of(step, kinds):
            found = True
            if code == EQUAL:
                continue
            r = self.rel(slot, step)
            if r is None or r > tol:
                return False
        return True if found else None


# -- rules --------------------------------------------------------------------------------
def _nonfinite(x: _Ctx) -> Optional[Cause]:
    h = x.hit
    if h.code != NONFINITE:
        return None
    fa, fb = h.facts.get("a") or {}, h.facts.get("b") or {}
    bad = (
        "A"
        if (fa.get("nan", 0) + fa.get("inf", 0)) > (fb.get("nan", 0) + fb.get("inf", 0))
        else "B"
    )
    return Cause(
        "nonfinite",
        f"the first NaN/Inf: {x.slot.label} at step {h.step} (run {bad})",
        [
            f"NaN/Inf counts: A {fa.get('nan')}/{fa.get('inf')}, B {fb.get('nan')}/{fb.get('inf')}",
            "every record before it in causal order agrees within tolerance",
        ],
        "look at what produces this tensor at this step: learning rate, log/div of zero, "
        "overflow in float16 (loss scaling), an exploding gradient",
    )


def _structure(x: _Ctx) -> Optional[Cause]:
    h, s = x.hit, x.slot
    if h.code == SHAPE:
        fa, fb = h.facts["a"], h.facts["b"]
        return Cause(
            "structure",
            f"{s.label}: shapes differ at step {h.step}",
            [f"shape {tuple(fa['shape'])} in A vs {tuple(fb['shape'])} in B"],
            "the two runs build different models or feed different batch sizes",
        )
    if h.code not in (MISSING_A, MISSING_B):
        return None
    has, lacks = ("A", "B") if h.code == MISSING_B else ("B", "A")
    if s.kind in ("grad", "autograd_grad", "grad_output"):
        gone = [
            g.name for g, code in x.slots_of(h.step, ("grad", "autograd_grad")) if code == h.code
        ]
        if gone or s.kind != "grad_output":
            names = gone or [s.name]
            return Cause(
                "frozen_parameter",
                f"{len(names)} parameter(s) have a gradient in {has} only: a frozen layer?",
                [
                    f"run {lacks} computes no gradient for {_names(names)} at step {h.step}",
                    f"first missing record: {s.label}",
                ],
                "a frozen layer (requires_grad=False) or a parameter unused in one run; "
                "freeze the same parameters in both",
            )
    return Cause(
        "missing_record",
        f"{s.label} is recorded in {has} only at step {h.step}",
        [f"run {lacks} has no {s.kind} '{s.name}' (call {max(s.call, 0)}) at step {h.step}"],
        "the runs execute different modules or a different number of calls",
    )


def _names(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _init(x: _Ctx) -> Optional[Cause]:
    if x.slot.kind != "param" or x.step != int(x.pair.steps[0]) or x.hit.rel <= x.rtol:
        return None
    params = x.slots_of(x.step, ("param",))
    differ = [(s, x.rel(s, x.step)) for s, code in params if code != EQUAL]
    big = [(s, r) for s, r in differ if r is None or r > x.rtol]
    return Cause(
        "different_init",
        f"different initial weights: {len(big)} of {len(params)} parameters differ at step {x.step}",
        [f"{s.name}: rel {_fmt(r)}" for s, r in big[:5]],
        "start both runs from the same weights: copy.deepcopy(model), "
        "model_b.load_state_dict(model_a.state_dict()), or torch.manual_seed(...) before building",
    )


def _sample_bytes(x: np.ndarray) -> list[bytes]:
    """The raw bytes of each sample (row along dim 0) of a batch."""
    flat = np.ascontiguousarray(x).reshape(len(x), -1)
    return [row.tobytes() for row in flat]


def _inputs(x: _Ctx) -> Optional[Cause]:
    if x.slot.kind != "input":
        return None
    ev = [
        f"{x.slot.label} differs at step {x.step} (rel {_fmt(x.hit.rel)}) while the parameters agree"
    ]
    a, b = x.v("a", x.slot, x.step), x.v("b", x.slot, x.step)
    title = "different inputs"
    if a is not None and b is not None and a.shape == b.shape and a.ndim >= 1 and a.size:
        rows_a, rows_b = _sample_bytes(a), _sample_bytes(b)
        if sorted(rows_a) == sorted(rows_b):
            title = "different data order: the same samples in a different order"
            ev.append("the batch holds the same samples in both runs, permuted")
        else:
            shared = len(set(rows_a) & set(rows_b))
            ev.append(f"{shared} of {len(a)} samples of the batch occur in both runs")
            title = "different inputs: different samples (data order) or augmentation"
    return Cause(
        "different_inputs",
        title,
        ev,
        "seed the data pipeline identically: DataLoader(generator=torch.Generator().manual_seed(0)), "
        "the same sampler, augmentation seeded the same way",
    )


def _grad_pairs(x: _Ctx, limit: int = 8) -> list[Slot]:
    out = [x.slot]
    for s, code in x.slots_of(x.step, ("grad", "autograd_grad")):
        if code != EQUAL and s.index != x.slot.index and len(out) < limit:
            out.append(s)
    return out


def _accumulation(x: _Ctx) -> Optional[Cause]:
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
            f"{A}'s {x.slot.label} at step {x.step} equals the sum of {R}'s gradients of {steps} "
            f"(residual rel {_fmt(r)}; plain difference rel {_fmt(plain)})",
            f"the same holds for {n_ok} of {1 + len(others)} differing gradients checked",
        ],
        f"call optimizer.zero_grad() once per step in {A} (before backward); if {A} accumulates "
        "micro-batches on purpose, step the optimizer after the last one only",
    )


def _accumulation_stats(x: _Ctx) -> Optional[Cause]:
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
                    f"mean of {acc.upper()}'s {x.slot.label} at step {x.step} = {_fmt(ma)} equals "
                    f"{ref.upper()}'s step {x.step} + step {prev} means ({_fmt(m0)} + {_fmt(m1)}) "
                    "(statistics only)"
                ],
                "call optimizer.zero_grad() once per step",
            )
    return None


def _scaled_grads(x: _Ctx) -> Optional[Cause]:
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
        f"the forward pass and loss agree at step {x.step}; each differing gradient of {small} is "
        f"{big}'s times a constant (residual rel {_fmt(worst)})",
        f"factors: {', '.join(_fmt(c) for c in factors[:5])}"
        + (" (the same for all)" if same else ""),
    ]
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


def _mode(x: _Ctx) -> Optional[Cause]:
    if x.slot.kind not in ("activation", "grad_output", "loss"):
        return None
    c = x.pair.cells(x.step)
    flips = []
    for i in range(len(c)):
        s = x.pair.al.slots[int(c.slot[i])]
        if (
            s.kind == "activation"
            and c.a.present[i]
            and c.b.present[i]
            and c.a.training[i] != c.b.training[i]
        ):
            flips.append(
                (s, "train" if c.a.training[i] else "eval", "train" if c.b.training[i] else "eval")
            )
    if not flips:
        return None
    s, ma, mb = flips[0]
    wrong = "A" if ma == "eval" else "B"
    return Cause(
        "train_eval_mode",
        f"train/eval mode differs: run {wrong} trains in eval mode (forgotten model.train()?)",
        [
            f"{len(flips)} module(s) run in different modes at step {x.step}, e.g. '{s.name}': {ma} in A, {mb} in B",
            f"first divergence: {x.slot.label} (rel {_fmt(x.hit.rel)})",
        ],
        f"call model.train() after evaluation in run {wrong}",
    )


def _dropout(x: _Ctx) -> Optional[Cause]:
    if x.slot.kind != "activation":
        return None
    a, b = x.v("a", x.slot, x.step), x.v("b", x.slot, x.step)
    if a is None or b is None or a.shape != b.shape or not a.size:
        return None
    za, zb = a == 0, b == 0
    if not (za != zb).any():
        return None
    both = ~za & ~zb
    if both.sum() == 0 or rel_diff(a[both], b[both]) > 1e-5:
        return None
    return Cause(
        "dropout_rng",
        f"different dropout masks in '{x.slot.name}' (random number state differs)",
        [
            f"at step {x.step} the outputs agree where both runs kept an element, but different elements are "
            f"zeroed ({za.mean():.1%} in A, {zb.mean():.1%} in B)",
            "the module's input agrees (every earlier record is within tolerance)",
        ],
        "seed torch identically (torch.manual_seed) and make both runs draw the same random numbers "
        "before this step (an extra random op shifts every later mask)",
    )


def _batchnorm(x: _Ctx) -> Optional[Cause]:
    if x.slot.kind != "buffer":
        return None
    if not x.within(
        x.step, ("param", "input", "activation", "loss", "grad_output", "grad", "autograd_grad")
    ):
        return None
    ev = [
        f"{x.slot.label} differs at step {x.step} (rel {_fmt(x.hit.rel)}) while parameters, "
        "activations and gradients agree"
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
                f"running statistics move {_fmt(ratio)}x as far per step in A as in B "
                f"(momentum ratio A/B ~ {_fmt(ratio)})"
            )
    return Cause(
        "batchnorm_stats",
        title,
        ev,
        "use the same BatchNorm momentum; run evaluation forwards under model.eval()",
    )


def _bn_ratio(x: _Ctx) -> Optional[float]:
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


def _update_rule(x: _Ctx) -> Optional[Cause]:
    if x.slot.kind != "param" or x.step == int(x.pair.steps[0]):
        return None
    prev = x.prev(x.step)
    grads_ok = x.within(prev, ("grad", "autograd_grad"))
    params_ok = x.within(prev, ("param",))
    if grads_ok is False or params_ok is False:
        return None
    ev = [f"{x.slot.label} differs at step {x.step} (rel {_fmt(x.hit.rel)})"]
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


def _update_detail(x: _Ctx, prev: int) -> Optional[tuple[str, list[str]]]:
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
        if rb is not None and abs(_cos(e, (qb.astype(np.float64) - rb).ravel())) > 0.99:
            votes["momentum"].append(1.0)
            continue
        w = qa.astype(np.float64).ravel()
        if abs(_cos(e, w)) > 0.99:
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
                f"A's update is B's x {_fmt(float(np.median(vals)))}"
                + (
                    " for every parameter"
                    if same
                    else f" (factors {', '.join(_fmt(c) for c in vals[:4])})"
                )
            ],
        )
    if kind == "decay":
        return (
            "weight decay differs",
            [
                f"A's update minus B's is proportional to the weights (coefficient {_fmt(float(np.median(vals)))} "
                "= -lr x the weight_decay difference)"
            ],
        )
    return (
        "momentum (optimizer state) differs",
        [f"A's update minus B's points along the previous update ({len(vals)} parameters)"],
    )


def _cos(u: np.ndarray, v: np.ndarray) -> float:
    nu, nv = float(u @ u), float(v @ v)
    return float(u @ v) / np.sqrt(nu * nv) if nu > 0 and nv > 0 else 0.0


def _rounding(x: _Ctx, secondary: bool = False) -> Optional[Cause]:
    o = x.walk.first_bitwise
    if o is None or o.status not in ("values", "stats"):
        return None
    os_ = x.pair.al.slots[o.slot]
    dtype = (o.facts.get("a") or o.facts.get("b") or {}).get("dtype", "")
    if not rounding_level(o.rel, dtype):
        return None
    ev = [
        f"origin: rounding-level difference in {os_.kind} ({os_.name}) at step {o.step} (rel {_fmt(o.rel)})"
    ]
    h = x.hit
    same = (h.step, h.slot) == (o.step, o.slot)
    if secondary:
        return Cause(
            "rounding",
            "a rounding-level difference precedes the divergence (not its cause)",
            ev[:1],
            "",
        )
    if not same:
        ev.append(f"amplified to rel {_fmt(h.rel)} in {x.slot.label} by step {h.step}")
    if os_.kind == "param" and o.step > int(x.pair.steps[0]):
        prev = x.prev(o.step)
        if x.within(prev, ("grad", "autograd_grad"), 0.0):
            ev.append(
                f"the gradients of step {prev} are bitwise equal: the update rounds differently "
                "(e.g. p -= lr * g vs optimizer.step(), foreach vs single-tensor kernels)"
            )
    env = numeric_differences(x.env_rows)
    if env:
        ev.append("environment: " + "; ".join(f"{r['key']} {r['a']} vs {r['b']}" for r in env[:4]))
    else:
        ev.append("the environments agree (same versions, device, threads, determinism flags)")
    return Cause(
        "rounding",
        "float-rounding-level difference" + ("" if same else ", amplified by training"),
        ev,
        "probably not a bug: the runs compute the same thing in a different order; "
        "confirm with --exact on a shorter run, or make both runs use the same code path",
    )


def _module_output(x: _Ctx) -> Optional[Cause]:
    if x.slot.kind != "activation":
        return None
    return Cause(
        "module_output",
        f"module '{x.slot.name}' gives a different output from the same input",
        [
            f"{x.slot.label} differs at step {x.step} (rel {_fmt(x.hit.rel)}) while every earlier "
            "record (parameters, inputs, earlier modules) agrees"
        ],
        "a different op or module here (e.g. a swapped activation), different module settings, "
        "or random numbers (dropout)",
    )


def _generic(x: _Ctx) -> Optional[Cause]:
    what = {
        "loss": "the loss differs while the model output agrees: different targets or loss function",
        "grad_output": "the backward pass differs while the forward agrees: loss scaling or a custom backward",
        "grad": "gradients differ while the forward pass agrees",
        "autograd_grad": "gradients differ while the forward pass agrees",
        "param": "parameters differ",
        "buffer": "buffers differ",
    }.get(x.slot.kind, f"{x.slot.kind} differs")
    return Cause(
        "unknown",
        what,
        [f"first divergence: {x.slot.label} at step {x.step} (rel {_fmt(x.hit.rel)})"],
        "inspect the two runs' code around this step",
    )


def _amplification_plausible(x: _Ctx) -> bool:
    """Can rounding noise have grown into this difference? Training amplifies within a step
    (forward and backward), but an update moves parameters by lr x gradient: a parameter cannot
    jump far beyond the previous step's parameter and gradient differences."""
    if x.slot.kind != "param":
        return True
    prev = x.prev(x.step)
    if prev is None:
        return False
    worst = 0.0
    for slot, code in x.slots_of(prev, ("param", "grad", "autograd_grad")):
        if code != EQUAL:
            r = x.rel(slot, prev)
            worst = max(worst, float("inf") if r is None else r)
    return x.hit.rel <= UPDATE_AMPLIFICATION * worst


def _unscaled_micro_batches(x: _Ctx) -> Optional[Cause]:
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
                    f"sum of {side}'s {n} loss calls at step {x.step} = {_fmt(mine)}, {n}x the other run's "
                    f"{_fmt(other)}"
                ],
                f"backpropagate loss / {n} for each micro-batch (or scale the learning rate)",
            )
    return None


def _update_specific(x: _Ctx) -> Optional[Cause]:
    c = _update_rule(x)
    return c if c is not None and not c.title.startswith("update rule differs") else None


RULES: tuple[Callable[[_Ctx], Optional[Cause]], ...] = (
    _nonfinite,
    _structure,
    _init,
    _inputs,
    _accumulation,
    _scaled_grads,
    _mode,
    _dropout,
    _batchnorm,
    _update_specific,
    _unscaled_micro_batches,
)
#: Generic rules: used only when no specific rule matched and rounding does not explain it.
LATE_RULES: tuple[Callable[[_Ctx], Optional[Cause]], ...] = (_update_rule, _module_output, _generic)


def diagnose(pair: RunPair, walk: WalkResult, rtol: float, env_rows: list) -> list[Cause]:
    """Ranked causes for the first divergence (or, without one, the first bitwise difference).

    Specific rules come first; a rounding-level origin is listed after them (or alone when none
    matched); generic descriptions are the fallback.
    """
    hit = walk.first or walk.first_bitwise
    if hit is None:
        return []
    x = _Ctx(pair, walk, hit, rtol, env_rows)
    dtype = (hit.facts.get("a") or hit.facts.get("b") or {}).get("dtype", "")
    tiny = hit.status in ("values", "stats") and rounding_level(hit.rel, dtype)
    rules = (_nonfinite, _structure) if tiny else RULES  # rounding-level: no behavioural cause
    causes = [c for c in (rule(x) for rule in rules) if c is not None]
    plausible = tiny or _amplification_plausible(x)
    rounding = _rounding(x, secondary=bool(causes) or not plausible)
    if not causes and (rounding is None or not plausible):
        for rule in LATE_RULES:
            c = rule(x)
            if c is not None:
                causes.append(c)
                break
    if rounding is not None:
        causes.append(rounding)
    return causes

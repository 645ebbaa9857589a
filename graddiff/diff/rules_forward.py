"""Diagnosis rules about the forward pass and the records themselves.

Missing or reshaped records, initial weights, inputs, train/eval mode, dropout masks,
a module whose output differs from the same input. Each rule: context in, Cause or None out.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..modclass import owner
from .compare_records import EQUAL, MISSING_A, MISSING_B, SHAPE
from .context import Cause, Context, fmt
from .exact import rel_diff
from .noise import eps_of
from .rules_config import settings_evidence


def rule_structure(x: Context) -> Optional[Cause]:
    """A record missing or reshaped in one run (a frozen layer has no gradient)."""
    h, s = x.hit, x.slot
    if h.code == SHAPE:
        if _swapped_modules(x, [s]):
            params = x.slots_of(h.step, ("param",))
            big = [
                (p, x.rel(p, h.step))
                for p, code in params
                if code not in (EQUAL, MISSING_A, MISSING_B)
            ]
            big = [(p, r) for p, r in big if r is None or r > x.rtol]
            return _module_swap(x, _swapped_modules(x, [s] + [p for p, _ in big]), big, len(params))
        fa, fb = h.facts["a"], h.facts["b"]
        return Cause(
            "structure",
            f"{x.label(s)}: shapes differ at step {h.step}",
            [f"shape {tuple(fa['shape'])} in A vs {tuple(fb['shape'])} in B"],
            "the two runs build different models or feed different batch sizes",
        )
    if h.code not in (MISSING_A, MISSING_B):
        return None
    has, lacks = ("A", "B") if h.code == MISSING_B else ("B", "A")
    if s.kind in ("grad", "autograd_grad", "grad_output"):
        gone = [g for g, code in x.slots_of(h.step, ("grad", "autograd_grad")) if code == h.code]
        if gone or s.kind != "grad_output":
            names = gone or [s]
            ev = [
                f"run {lacks} computes no gradient for {x.names(names)} at step {h.step}",
                f"first missing record: {x.label(s)}",
            ]
            firm = _frozen_evidence(x, lacks.lower(), names)
            ev.extend(firm)
            title = f"{len(names)} parameter(s) have a gradient in {has} only: a frozen layer?"
            if len(firm) == 2:
                title = (
                    f"frozen vs trainable: {x.names(names, 2)} frozen in {lacks} (no gradient, "
                    f"never updated), trained in {has}"
                )
            return Cause(
                "frozen_parameter",
                title,
                ev,
                "a frozen layer (requires_grad=False) or a parameter unused in one run; "
                "freeze the same parameters in both",
            )
    return Cause(
        "missing_record",
        f"{x.label(s)} is recorded in {has} only at step {h.step}",
        [f"run {lacks} has no {s.kind} {x.name(s)}, call {max(s.call, 0)}, at step {h.step}"],
        "the runs execute different modules or a different number of calls",
    )


def _frozen_evidence(x: Context, lacks: str, grads: list) -> list[str]:
    """Whether the run lacking these gradients ever records one for them, and whether their
    parameters stay bitwise unchanged there over the compared steps (values where stored)."""
    out = []
    if all(not getattr(g, f"keys_{lacks}") for g in grads):
        out.append(f"{lacks.upper()} records no gradient for them at any step")
    first, last = int(x.pair.steps[0]), int(x.pair.steps[-1])
    if last > first:
        same = []
        for g in grads:
            ps = x.pair.slot("param", g.name)
            u = None if ps is None else x.v(lacks, ps, first)
            w = None if ps is None else x.v(lacks, ps, last)
            if u is None or w is None or u.shape != w.shape:
                return out
            same.append(bool(np.array_equal(u, w)))
        if all(same):
            out.append(
                f"their parameters stay bitwise unchanged in {lacks.upper()} from step {first} "
                f"to {last}: not trained there (requires_grad=False, or not in the optimizer)"
            )
    return out


def rule_init(x: Context) -> Optional[Cause]:
    """Parameters differ at the first compared step: different initial weights."""
    if x.slot.kind != "param" or x.step != int(x.pair.steps[0]) or x.hit.rel <= x.rtol:
        return None
    params = x.slots_of(x.step, ("param",))
    # a parameter one run lacks is structure (frozen, tied, another model), not its init
    differ = [
        (s, x.rel(s, x.step)) for s, code in params if code not in (EQUAL, MISSING_A, MISSING_B)
    ]
    big = [(s, r) for s, r in differ if r is None or r > x.rtol]
    if not big:
        return None
    swapped = _swapped_modules(x, [s for s, _ in differ])
    if swapped:
        return _module_swap(x, swapped, big, len(params))
    return Cause(
        "different_init",
        f"different initial weights: {len(big)} of {len(params)} parameters differ at step {x.step}",
        [
            f"{x.name(s)}: " + (f"rel {fmt(r)}" if r is not None else "not comparable by value")
            for s, r in big[:5]
        ]
        + ([f"and {len(big) - 5} more"] if len(big) > 5 else []),
        "start both runs from the same weights: copy.deepcopy(model), "
        "model_b.load_state_dict(model_a.state_dict()), or torch.manual_seed(...) before building",
    )


def _swapped_modules(x: Context, slots: list) -> dict[str, tuple[str, str]]:
    """module -> (class in A, class in B) for the owners of these parameters whose recorded
    module class differs between the runs (another layer type at the same name)."""
    out: dict[str, tuple[str, str]] = {}
    for s in slots:
        ca, cb = x.pair.a.module_class(s.kind, s.name), x.pair.b.module_class(s.kind, s.name)
        mod = owner(s.kind, s.name)
        if ca and cb and ca != cb and mod is not None:
            out[mod] = (ca, cb)
    return out


def _module_swap(x: Context, swapped: dict, big: list, total: int) -> Cause:
    """A module of another class at the same name: the parameters differ at the first step
    because the models differ, not their seeds."""
    first = next(iter(swapped))
    listed = "; ".join(
        f"{x.module(m)}: {a} in A, {b} in B" for m, (a, b) in list(swapped.items())[:4]
    )
    shapes = [s for s, r in big if r is None]
    ev = [f"module classes differ at the same names: {listed}"]
    if shapes:
        ev.append(
            f"{x.names(shapes)}: shapes differ (not comparable by value): the layers hold "
            "other parameters"
        )
    rest = [s for s, r in big if owner(s.kind, s.name) not in swapped]
    if rest:
        ev.append(
            f"{len(rest)} other parameter(s) of {total} differ at step {x.step} too "
            f"({x.names(rest, 2)}): building another layer draws other random numbers, so "
            "layers initialised after it start from other weights (or the seed differs too)"
        )
    a, b = swapped[first]
    return Cause(
        "module_swap",
        f"a different module: {x.module(first)} is {a} in A and {b} in B",
        ev,
        "build the same layer types in both runs (a model flag or config such as --model "
        "LSTM vs GRU, or an activation or norm swapped)",
    )


def _sample_bytes(x: np.ndarray) -> list[bytes]:
    """The raw bytes of each sample (row along dim 0) of a batch."""
    flat = np.ascontiguousarray(x).reshape(len(x), -1)
    return [row.tobytes() for row in flat]


#: How many recorded steps the data-order search reads per run (full values only).
ORDER_SEARCH_STEPS = 64


def _step_list(steps: list[int]) -> str:
    steps = sorted(set(steps))
    return ", ".join(map(str, steps[:6])) + (
        f" and {len(steps) - 6} more" if len(steps) > 6 else ""
    )


def _elsewhere(x: Context, rows_a: list[bytes], rows_b: list[bytes]):
    """(samples of one run's batch found in the other run at other steps, those steps, steps
    searched, the run searched, samples of a batch found nowhere): A's batch in B's steps and
    B's batch in A's, the larger count found; the samples not found are counted over both
    directions (a sample one run has and the other never shows is no reordering). None when
    no other step has values to search."""
    near = x.pair.steps[x.pair.steps != x.step]
    near = near[np.argsort(np.abs(near - x.step), kind="stable")][:ORDER_SEARCH_STEPS]
    best, searched, nowhere = None, 0, 0
    for mine, side in ((set(rows_a) - set(rows_b), "b"), (set(rows_b) - set(rows_a), "a")):
        # side: the run searched for the other run's samples
        found: set = set()
        steps: list[int] = []
        n = 0
        for t in near.tolist():
            v = x.v(side, x.slot, int(t))
            if v is None or v.ndim < 1 or v.shape[1:] != x.v("a", x.slot, x.step).shape[1:]:
                continue
            n += 1
            hit = mine & set(_sample_bytes(v))
            if hit - found:
                steps.append(int(t))
            found |= hit
        searched = max(searched, n)
        if n:
            nowhere = max(nowhere, len(mine - found))
        if n and (best is None or len(found) > best[0]):
            best = (len(found), steps, side)
    return None if best is None else (best[0], best[1], searched, best[2], nowhere)


def _in_place(rows_a: list[bytes], rows_b: list[bytes]) -> int:
    """How many of the samples both batches hold sit at the same position in each (0 when
    any shared sample moved): the batch was drawn in the same order."""
    shared = set(rows_a) & set(rows_b)
    same = sum(1 for ra, rb in zip(rows_a, rows_b) if ra == rb)
    return same if shared and same == len(shared) else 0


def rule_inputs(x: Context) -> Optional[Cause]:
    """An input differs while parameters agree: data order or augmentation."""
    if x.slot.kind != "input":
        return None
    ev = [
        f"{x.label(x.slot)} differs at step {x.step} ({x.hit_text()}) while " + x.agree(("param",))
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
            moved = _elsewhere(x, rows_a, rows_b)
            same_place = _in_place(rows_a, rows_b)
            if moved is not None:
                found, steps, searched, side, nowhere = moved
                mine = "A" if side == "b" else "B"
                if found:
                    ev.append(
                        f"{found} of the {len(a)} samples of {mine}'s batch at step {x.step} "
                        f"occur in {side.upper()} at other steps ({_step_list(steps)})"
                    )
                if found and not same_place:
                    title = "different data order: the same samples at other steps"
                    ev[-1] += ": one dataset, drawn in a different order (sampler, shuffle seed)"
                    if nowhere:
                        ev.append(
                            f"{nowhere} sample(s) of a batch occur nowhere in the other run's "
                            f"{searched} recorded steps searched (drawn at steps not recorded, "
                            "or changed by augmentation)"
                        )
                elif nowhere and same_place:
                    title = (
                        "different inputs: augmentation or data (the same order, some samples "
                        "changed in place)"
                    )
                    ev.append(
                        f"the {same_place} shared sample(s) sit at the same positions in both "
                        f"batches (the same draw order), and {nowhere} sample(s) of a batch "
                        f"occur nowhere in the other run's {searched} recorded steps searched: "
                        "random transforms drawn differently (augmentation RNG), or different "
                        "preprocessing or data"
                    )
                elif not found:
                    title = "different inputs: not the same samples (augmentation or data)"
                    ev.append(
                        f"none of the batch's samples occurs in the other run at any of the "
                        f"{searched} recorded steps searched: different data, preprocessing "
                        "or augmentation (or an order the recorded steps do not reach)"
                    )
                elif found and not nowhere:  # shared in place, the rest found elsewhere
                    title = "different data order: the same samples at other steps"
    fix = (
        "seed the data pipeline identically: DataLoader(generator=torch.Generator().manual_seed(0)), "
        "the same sampler, augmentation seeded the same way"
    )
    # another call's input at the same argument agrees: that call reads the same data, so
    # this one comes from elsewhere (inputs of other names prove nothing: an attention mask
    # of ones agrees whatever the order)
    same = [
        sl
        for sl, code in x.slots_of(x.step, ("input",))
        if code == EQUAL and sl.name == x.slot.name and sl.call != x.slot.call
    ]
    if same:
        labels = ", ".join(x.label(sl) for sl in same[:4]) + (
            f" and {len(same) - 4} more" if len(same) > 4 else ""
        )
        title = (
            f"different inputs: {x.label(x.slot)} differs while the same input of the model's "
            "other calls at this step agrees (an input computed upstream, e.g. another model's "
            "output)"
        )
        ev.append(
            f"{labels} agree at step {x.step}: the data those calls read is the same, so "
            f"{x.label(x.slot)} comes from elsewhere: another model's output (a GAN "
            "generator's), or a view transformed separately"
        )
        fix = (
            "compare the traces of the model that computes this input (graddiff record writes "
            "one per model); seed a separately transformed view the same way in both runs"
        )
    return Cause("different_inputs", title, ev, fix)


def rule_mode(x: Context) -> Optional[Cause]:
    """A module runs in train mode in one run and eval mode in the other (FLAG_TRAINING)."""
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
            f"{len(flips)} module(s) run in different modes at step {x.step}, e.g. {x.module(s.name)}: {ma} in A, {mb} in B",
            f"first divergence: {x.label(x.slot)} ({x.hit_text()})",
        ],
        f"call model.train() after evaluation in run {wrong}",
    )


def rule_dropout(x: Context) -> Optional[Cause]:
    """Same values where both runs kept an element, different elements zeroed."""
    if x.slot.kind != "activation":
        return None
    a, b = x.v("a", x.slot, x.step), x.v("b", x.slot, x.step)
    if a is None or b is None or a.shape != b.shape or not a.size:
        return None
    za, zb = a == 0, b == 0
    if not (za != zb).any():
        return None
    both = ~za & ~zb
    if both.sum() == 0:
        return None
    if rel_diff(a[both], b[both]) > 1e-5:
        return _dropout_rate(x, a, b, za, zb, both)
    return Cause(
        "dropout_rng",
        f"different dropout masks in {x.module(x.slot.name)} (random number state differs)",
        [
            f"at step {x.step} the outputs agree where both runs kept an element, but different elements are "
            f"zeroed ({za.mean():.1%} in A, {zb.mean():.1%} in B)",
            "the module's input agrees (every earlier compared record is within tolerance)",
        ],
        "seed torch identically (torch.manual_seed) and make both runs draw the same random numbers "
        "before this step (an extra random op shifts every later mask)",
    )


def _dropout_rate(x: Context, a, b, za, zb, both) -> Optional[Cause]:
    """Different elements zeroed and the kept ones scaled by one constant c != 1: inverted
    dropout scales kept elements by 1 / (1 - p), so a different p gives c = (1 - p_B) / (1 - p_A)
    on the elements both runs kept."""
    a64, b64 = a[both].astype(np.float64), b[both].astype(np.float64)
    aa = float(a64 @ a64)
    if aa == 0:
        return None
    c = float(a64 @ b64) / aa
    if abs(c - 1) < 1e-3 or rel_diff(b64, c * a64) > 1e-5:
        return None
    fa, fb = float(za.mean()), float(zb.mean())
    ev = [
        f"at step {x.step} different elements are zeroed ({fa:.1%} in A, {fb:.1%} in B: p "
        "plus the input's own zeros), and where both runs kept an element B's output is "
        f"A's x {fmt(c)} exactly (one constant: (1 - p_A) / (1 - p_B) with inverted dropout)",
    ]
    b_in_a, a_in_b = not (zb & ~za).any(), not (za & ~zb).any()
    if b_in_a != a_in_b:  # one run zeroes only what the other does too
        side, p, f_side = ("B", 1 - c, fb) if b_in_a else ("A", 1 - 1 / c, fa)
        other = "A" if side == "B" else "B"
        before = _output_before(x, side.lower(), b if side == "B" else a)
        if before is not None:  # its output is its input, unchanged: no dropout there
            ev.append(
                f"{side}'s output is bitwise the output recorded just before it "
                f"({x.label(before)}), its input: p = 0 in {side}, p = {fmt(p)} in {other} (the "
                "kept elements' factor)"
            )
        elif f_side == 0:  # no element zeroed at all: that run does not drop here
            ev.append(
                f"{side} zeroes no element: p = 0 in {side}, p = {fmt(p)} in {other} (the kept "
                "elements' factor)"
            )
        else:  # its input's own zeros (p = 0), or masks drawn from the same random numbers
            ev.append(
                f"every element {side} zeroes is zero in {other} too: either p = 0 in {side} "
                f"(its zeros are the input's own) and p = {fmt(p)} in {other}, or both runs draw "
                "their masks from the same random numbers (masks nested: u < p_A inside "
                f"u < p_B), with p near the zero fractions ({fa:.1%} in A, {fb:.1%} in B, when "
                "the input has no zeros of its own)"
            )
    return Cause(
        "dropout_rate",
        f"dropout probability differs in {x.module(x.slot.name)}: its kept elements are "
        f"scaled by 1/(1-p) with another p in each run",
        ev
        + [
            "the module's input agrees (every earlier compared record is within tolerance)",
        ]
        + [t for t in (settings_evidence(x, x.slot.name),) if t],
        "use the same dropout probability in both runs (nn.Dropout(p), a config's "
        "*_pdrop / hidden_dropout_prob)",
    )


def _output_before(x: Context, side: str, out: np.ndarray):
    """The activation recorded just before the hit in this run's step (the module's input,
    in a sequential model) when the hit's output equals it bitwise, else None."""
    slot = x.pair.activation_before(side, x.step, x.slot.name, x.slot.call)
    v = None if slot is None else x.v(side, slot, x.step)
    return slot if v is not None and v.shape == out.shape and np.array_equal(v, out) else None


def rule_module_output(x: Context) -> Optional[Cause]:
    """Generic: a module's output differs while everything before it agrees."""
    if x.slot.kind != "activation":
        return None
    ca = x.pair.a.module_class("activation", x.slot.name)
    cb = x.pair.b.module_class("activation", x.slot.name)
    if ca and cb and ca != cb:
        return Cause(
            "module_swap",
            f"a different module: {x.module(x.slot.name)} is {ca} in A and {cb} in B",
            [
                f"{x.label(x.slot)} differs at step {x.step} ({x.hit_text()}) while every earlier "
                "module's output agrees; " + x.agree(("param", "input")),
                f"the recorded module classes differ at this name: {ca} in A, {cb} in B",
            ],
            "build the same layer types in both runs (an activation, norm or layer swapped, "
            "or a config flag that selects it)",
        )
    before = _stateless_before(x)
    if before:
        side, mods = before
        other = "B" if side == "A" else "A"
        return Cause(
            "module_output",
            f"module {x.module(x.slot.name)} gives a different output after {x.names(mods, 2)}, "
            f"which run{'s' if len(mods) == 1 else ''} in {side} only",
            [
                f"{x.label(x.slot)} differs at step {x.step} ({x.hit_text()}) while every "
                "earlier output both runs record agrees; " + x.agree(("param", "input")),
                f"{side} records {x.names(mods)} (no parameters or buffers) before it at this "
                f"step; {other} has no such module: an op missing in {other}, or written there "
                "as a function that computes differently",
            ],
            f"check the forward pass between the previous module and this one in {other}: an "
            "activation, dropout or reshape left out or replaced",
        )
    return Cause(
        "module_output",
        f"module {x.module(x.slot.name)} gives a different output while every earlier "
        "recorded output agrees",
        [
            f"{x.label(x.slot)} differs at step {x.step} ({x.hit_text()}) while every earlier "
            "module's output agrees; " + x.agree(("param", "input")),
            "its own input is not recorded: code between the recorded modules may compute it "
            "(a functional op, or random numbers such as torch.randn_like in a VAE's "
            "reparameterisation), or the module computes differently",
        ],
        "a different op or module here (e.g. a swapped activation), different module settings, "
        "random numbers (dropout, torch.randn_like: seed and draw them alike), or different "
        "code between the previous module and this one",
    )


def _stateless_before(x: Context) -> Optional[tuple[str, list]]:
    """(side, output slots) of stateless modules one run records at this step, before the hit
    and after the last output both runs record (compare_records.one_sided_stateless)."""
    found: dict[str, list] = {"a": [], "b": []}
    for index in x.walk.stateless_one_sided:
        s = x.pair.al.slots[index]
        if s.kind == "activation" and x.pair.cell(s, x.step) is not None:
            found["a" if s.keys_a else "b"].append(s)
    for side, slots in found.items():
        if not slots:
            continue
        names = [(k.kind, k.name) for k in x.pair.keys_in_order(side, x.step)]
        hit = ("activation", x.slot.name)
        if hit not in names:
            continue
        at = names.index(hit)
        shared = {("activation", s.name) for s in x.pair.al.slots if s.keys_a and s.keys_b}
        start = max((i for i in range(at) if names[i] in shared), default=-1)
        mine = [s for s in slots if ("activation", s.name) in names[start + 1 : at]]
        if mine:
            return side.upper(), mine
    return None


def rule_generic(x: Context) -> Optional[Cause]:
    """Fallback: name where the first difference is, by kind."""
    forward = ("param", "input", "activation") + (("loss",) if x.slot.kind != "loss" else ())
    seen = any(k in x.compared for k in forward)
    what = {
        "loss": "the loss differs"
        + (": different targets or loss function" if "activation" in x.compared else ""),
        "grad_output": "the backward pass differs"
        + (": loss scaling or a custom backward" if seen else ""),
        "grad": "gradients differ",
        "autograd_grad": "gradients differ",
        "param": "parameters differ",
        "buffer": "buffers differ",
    }.get(x.slot.kind, f"{x.slot.kind} differs")
    ev = [f"first divergence: {x.label(x.slot)} at step {x.step} ({x.hit_text()})"]
    if x.slot.kind in ("loss", "grad_output", "grad", "autograd_grad"):
        ev.append(f"at step {x.step}, " + x.agree(forward))
    return Cause("unknown", what, ev, "inspect the two runs' code around this step")


def _float_dtypes(x: Context, side: str, kinds: tuple[str, ...]) -> dict[str, int]:
    """dtype -> number of records of these kinds at the step (floating point only)."""
    c = x.pair.cells(x.step)
    sd = getattr(c, side)
    out: dict[str, int] = {}
    for i in range(len(c)):
        s = x.pair.al.slots[int(c.slot[i])]
        if s.kind in kinds and sd.present[i] and sd.dtype[i] >= 0:
            name = x.pair.dtypes.names[int(sd.dtype[i])]
            if eps_of(name) > 0:
                out[name] = out.get(name, 0) + 1
    return out


def precision_of(x: Context) -> dict[str, dict[str, dict[str, int]]]:
    """side -> kind -> dtype counts, for activations and parameters at the hit's step."""
    return {
        side: {k: _float_dtypes(x, side, (k,)) for k in ("activation", "param")}
        for side in ("a", "b")
    }


def rule_precision(x: Context) -> Optional[Cause]:
    """The runs compute in different floating-point precision (autocast, parameter dtype)."""
    p = precision_of(x)
    ev, lower = [], None
    for kind, what in (("param", "parameters"), ("activation", "module outputs")):
        da, db = p["a"][kind], p["b"][kind]
        if not da or not db or set(da) == set(db):
            continue
        ea = max(eps_of(d) for d in da)
        eb = max(eps_of(d) for d in db)
        side = "A" if ea > eb else "B"
        lower = lower or (side, max(da, key=eps_of) if side == "A" else max(db, key=eps_of))
        ev.append(
            f"{what} at step {x.step}: {_dtypes(da)} in A vs {_dtypes(db)} in B (recorded dtypes)"
        )
    if lower is None:
        return None
    side, dtype = lower
    tol = x.pair.tolerance(x.slot.index, x.step) if x.pair.tol is not None else x.rtol
    beyond = x.hit.basis != "structure" and x.hit.rel > tol
    bound = (
        "10x the perturbed twin's drift here (--noise)"
        if x.pair.noise is not None
        else f"what {dtype} rounding explains at its depth"
    )
    ev.append(
        f"{x.label(x.slot)} at step {x.step} ({x.hit_text()}) is "
        + ("beyond " if beyond else "within ")
        + f"{bound} ({fmt(tol)})"
    )
    return Cause(
        "precision",
        f"different precision: {side} computes in {dtype} (autocast or a {dtype} model)"
        + (", but this difference is larger than its rounding explains" if beyond else ""),
        ev,
        f"expected rounding differences of {dtype} are judged by its tolerance (docs: tolerance); "
        "to compare the computation itself, record both runs in the same precision",
    )


def _dtypes(counts: dict[str, int]) -> str:
    return ", ".join(f"{d} ({n})" for d, n in sorted(counts.items(), key=lambda kv: -kv[1]))

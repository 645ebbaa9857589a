"""Diagnosis rule: the runs accumulate different numbers of micro-batches per optimizer step.

One run takes one batch per optimizer step, the other accumulates k micro-batches of the same
size (Lightning's ``accumulate_grad_batches``, the HF Trainer's
``gradient_accumulation_steps``): each of its steps sees k times the samples, so inputs, losses
and gradients differ from the first step on, and a loss ratio there is no loss weight. One
batch split into micro-batches (the same samples per step) is not this: the differ joins such
calls and compares them as one batch. Evidence: the recorded model inputs per step (calls and
their batch sizes) and the loss calls per step. Context in, Cause or None out (see context.py).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

from ..errors import GraddiffError
from .context import Cause, Context


def _batches(x: Context, side: str, step: int) -> dict[str, list[int]]:
    """input name -> the batch size (dim 0) of each call at the step, for inputs with a dim."""
    run = x.pair.run(side)
    rows = x.pair.rows(side, step)
    out: dict[str, list[int]] = defaultdict(list)
    for rec, ndim, shape in zip(rows["record"], rows["ndim"], rows["shape"]):
        k = run.record_key(int(rec))
        if k.kind == "input" and int(ndim) >= 1:
            out[k.name].append(int(shape[0]))
    return out


def micro_batches(x: Context, step: int) -> Optional[tuple[str, list[int], list[int]]]:
    """(input name, A's batch sizes, B's) at the step when the runs feed different numbers of
    model calls per step *and* different numbers of samples; None otherwise."""
    ba, bb = _batches(x, "a", step), _batches(x, "b", step)
    common = [n for n in ba if n in bb]
    if not common:
        return None
    # the batch-carrying input: the largest batch per call (not a (1, T) position tensor)
    name = max(common, key=lambda n: (max(ba[n] + bb[n]), n))
    ca, cb = ba[name], bb[name]
    if len(ca) == len(cb) or sum(ca) == sum(cb):
        return None
    return name, ca, cb


def _calls(sizes: list[int]) -> str:
    if len(set(sizes)) == 1:
        return f"{len(sizes)} call{'s' if len(sizes) > 1 else ''} of {sizes[0]} samples"
    return f"{len(sizes)} calls of " + "+".join(map(str, sizes)) + " samples"


def rule_accumulation_steps(x: Context) -> Optional[Cause]:
    """Different numbers of micro-batches (and samples) per optimizer step."""
    step = x.step
    found = micro_batches(x, step)
    if found is None:
        return None
    name, ca, cb = found
    more, fewer = ("A", "B") if len(ca) > len(cb) else ("B", "A")
    cm, cf = (ca, cb) if more == "A" else (cb, ca)
    ev = [
        f"at step {step} the model takes {_calls(ca)} in A and {_calls(cb)} in B per "
        f"optimizer step (recorded input {name}): {sum(ca)} vs {sum(cb)} samples per step",
    ]
    later = [int(t) for t in x.pair.steps[x.pair.steps > step][:3]]
    same = [t for t in later if micro_batches(x, t) is not None]
    if same:
        ev.append(f"the same at step(s) {', '.join(map(str, same))}")
    la, lb = x.loss_calls("a", step), x.loss_calls("b", step)
    if la != lb:
        ev.append(f"loss calls per step: {la} in A, {lb} in B")
    na, nb = len(x.pair.run("a").steps), len(x.pair.run("b").steps)
    if na != nb:
        ev.append(f"A records {na} optimizer steps, B {nb}")
    ev.append(
        "the inputs, losses and gradients of a step cover different samples: their "
        "differences follow from this, not from a loss weight or the data order"
    )
    return Cause(
        "accumulation_steps",
        f"{more} accumulates {len(cm)} micro-batches per optimizer step ({sum(cm)} samples), "
        f"{fewer} {len(cf)} ({sum(cf)} samples): a different gradient accumulation setting",
        ev,
        "use the same gradient accumulation (Lightning accumulate_grad_batches, HF "
        "gradient_accumulation_steps) and batch size in both runs; to check that accumulation "
        "is equivalent, give both runs the same samples per optimizer step (batch x "
        "micro-batches)",
    )


#: Steps whose loss calls per step must repeat the divergence step's counts.
LOSS_CALL_STEPS = 3


def rule_loss_calls(x: Context) -> Optional[Cause]:
    """Without recorded inputs: the runs make different numbers of loss calls (backward
    passes) per optimizer step, the same counts at every step compared from here (at least
    two), one count a multiple of the other, and the summed losses not in that ratio (that is
    unscaled_micro_batches): micro-batches accumulated differently. Like
    rule_accumulation_steps, it comes before the loss readings (a ratio of losses over
    different samples is no loss weight). Asked as
    a question: an extra backward pass per step (a second loss) gives the same counts, and
    without inputs the samples per step are not known."""
    if "input" in x.compared:
        return None  # with inputs, rule_accumulation_steps reads the samples per step
    step = x.step
    steps = [int(t) for t in x.pair.steps[x.pair.steps >= step][: LOSS_CALL_STEPS + 1]]
    counts = {(x.loss_calls("a", t), x.loss_calls("b", t)) for t in steps}
    if len(steps) < 2 or len(counts) != 1:
        return None
    la, lb = counts.pop()
    lo, hi = min(la, lb), max(la, lb)
    if lo < 1 or la == lb or hi % lo:
        return None
    more, fewer = ("A", "B") if la > lb else ("B", "A")
    sums = _loss_sums(x, step)
    if sums is not None and sums[1 if la < lb else 0] != 0:
        k = sums[0 if la > lb else 1] / sums[1 if la > lb else 0]
        if abs(k - hi / lo) <= 1e-3 * hi / lo:
            return None  # micro-batch losses summed, not divided: unscaled_micro_batches
    ev = [
        f"loss calls (backward passes) per optimizer step: {la} in A, {lb} in B, at each of "
        f"steps {', '.join(map(str, steps))}",
        "the model's inputs were not recorded (or not compared): the samples per step are "
        "not known",
    ]
    na, nb = len(x.pair.run("a").steps), len(x.pair.run("b").steps)
    if na != nb:
        ev.append(f"A records {na} optimizer steps, B {nb}")
    ev.append(
        f"{more}'s extra loss calls are micro-batches accumulated before each update, or a "
        "second loss backpropagated at every step (then an extra gradient path)"
    )
    return Cause(
        "accumulation_steps",
        f"{more} makes {hi} loss calls per optimizer step, {fewer} {lo}: a different gradient "
        "accumulation setting? (inputs not compared)",
        ev,
        "use the same gradient accumulation (Lightning accumulate_grad_batches, HF "
        "gradient_accumulation_steps) and batch size in both runs; record the inputs "
        "(kinds including input) to see the samples per step",
    )


def _loss_sums(x: Context, step: int) -> Optional[tuple[float, float]]:
    """Each run's sum of its scalar losses at the step (None when any is not a stored
    scalar)."""
    out = []
    for side in ("a", "b"):
        run = x.pair.run(side)
        total = 0.0
        for rec in x.pair.rows(side, step)["record"]:
            k = run.record_key(int(rec))
            if k.kind != "loss":
                continue
            try:
                v = run.get(k.kind, k.name, step, k.call)
            except GraddiffError:  # statistics only: no value to add
                return None
            if v.size != 1:
                return None
            total += float(v.ravel()[0])
        out.append(total)
    return out[0], out[1]

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

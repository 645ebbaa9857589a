"""Why the ranks of one run disagree: rank-specific rules over the fingerprint vote.

Each rule reads the Consistency (and, where it needs element values, the traces) and returns a
Cause or None; the first that applies is the diagnosis. The rules test what data parallelism
guarantees, never one example's numbers: a step holds the same number of passes on every rank,
replicas start equal, the all-reduce makes every ``.grad`` equal, a buffer broadcast makes the
step-start buffers equal, and equal gradients on equal parameters give equal updates.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from ..diff.context import Cause, fmt
from ..errors import GraddiffError
from ..kinds import Kind
from ..modclass import class_of, describe_list, with_class
from .consistency import Consistency, Disagreement
from .files import RankSet

_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def _same_step(c: Consistency, step: int, kinds: tuple[str, ...]) -> list[Disagreement]:
    return [d for d in c.disagreements if d.step == step and d.key.kind in kinds]


def _names(rs: RankSet, ds: list[Disagreement], limit: int = 4) -> str:
    """The records named with their module classes: ``fc1.weight, fc1.bias (both Linear)``."""
    classes = rs.module_classes
    keys = list(dict.fromkeys((d.key.kind, d.key.name) for d in ds))
    return describe_list([(n, class_of(classes, k, n)) for k, n in keys], limit)


def _key(rs: RankSet, d: Disagreement) -> str:
    """``grad fc1.weight (Linear)``, with ``(call N)`` after the first call."""
    k = d.key
    text = with_class(f"{k.kind} {k.name}", class_of(rs.module_classes, k.kind, k.name))
    return text + (f" (call {k.call})" if k.call else "")


def rule_passes(rs: RankSet, c: Consistency) -> Optional[Cause]:
    """A step with more forward/backward passes on some ranks: their optimizer did not step."""
    p = c.first_passes
    if p is None or (c.first is not None and c.first.step < p.step):
        return None
    ref = next(n for r, n in enumerate(p.counts) if r not in p.odd)
    odd = p.odd
    more = [r for r in odd if p.counts[r] > ref]
    evidence = [
        f"step {p.step}: {_ranks([r])} ran {p.counts[r]} forward/backward pass(es), the others {ref}"
        for r in odd[:4]
    ]
    if more:
        return Cause(
            "skipped_step",
            f"{_ranks(more)} skipped optimizer.step() at step {p.step}: its step {p.step} holds "
            f"{p.counts[more[0]]} passes where the others hold {ref}, and every later step is shifted",
            evidence + [_count_line(rs, c)],
            "call optimizer.step() on every rank (a condition such as a NaN check or a "
            "GradScaler skip must be decided the same way on all ranks, e.g. after an all-reduce)",
        )
    return Cause(
        "extra_step",
        f"{_ranks(odd)} stepped the optimizer more often: step {p.step} holds {p.counts[odd[0]]} "
        f"pass(es) where the others hold {ref}",
        evidence + [_count_line(rs, c)],
        "make the optimizer.step() schedule identical on every rank",
    )


def _count_line(rs: RankSet, c: Consistency) -> str:
    counts = ", ".join(f"rank {r}: {n}" for r, n in enumerate(c.step_counts[:8]))
    return f"steps recorded: {counts}" + (" ..." if len(c.step_counts) > 8 else "")


def rule_step_count(rs: RankSet, c: Consistency) -> Optional[Cause]:
    """Complete ranks that recorded different numbers of steps (no per-step pass difference)."""
    complete = [r for r, run in enumerate(rs.runs) if run.complete]
    counts = {c.step_counts[r] for r in complete}
    if len(counts) < 2 or c.first is not None:
        return None
    common = max(counts, key=lambda n: sum(c.step_counts[r] == n for r in complete))
    odd = [r for r in complete if c.step_counts[r] != common]
    return Cause(
        "step_count",
        f"step count differs on {_ranks(odd)}: {c.step_counts[odd[0]]} steps where the others "
        f"recorded {common}",
        [_count_line(rs, c)],
        "make the number of optimizer steps identical on every rank (same number of batches "
        "per rank: DistributedSampler(drop_last=True) or a join context)",
    )


def rule_initial_params(rs: RankSet, c: Consistency) -> Optional[Cause]:
    d = c.first
    if d is None or d.key.kind != Kind.PARAM.value or d.step != int(c.steps[0]):
        return None
    ds = _same_step(c, d.step, (Kind.PARAM.value,))
    return Cause(
        "different_initial_params",
        f"the replicas start from different parameters ({_names(rs, ds)} differ on "
        f"{_ranks(d.odd)} at the first compared step)",
        [f"{len(ds)} parameter(s) differ at step {d.step}"],
        "build the model from the same seed on every rank, or let DistributedDataParallel "
        "broadcast rank 0's parameters (wrap the model before training)",
    )


def rule_unreduced_grads(rs: RankSet, c: Consistency) -> Optional[Cause]:
    """Gradients differ on equal parameters: those parameters missed the all-reduce."""
    d = c.first
    if d is None or d.key.kind != Kind.GRAD.value:
        return None
    bad = _same_step(c, d.step, (Kind.GRAD.value,))
    n_grads = sum(1 for k in rs.runs[0].names(Kind.GRAD.value))
    evidence = [
        f"step {d.step}: parameters and step-start buffers agree on every rank",
        f"{len(bad)} of {n_grads} gradients differ across ranks: {_names(rs, bad)}",
    ]
    if len(bad) < n_grads:
        return Cause(
            "grad_not_allreduced",
            f"{_names(rs, bad)} left out of the gradient all-reduce: its .grad differs across "
            f"ranks while the other {n_grads - len(bad)} gradients agree",
            evidence,
            "let DDP reduce it (remove it from _ddp_params_and_buffers_to_ignore; use it inside "
            "the DDP-wrapped forward), or all-reduce it yourself before optimizer.step()",
        )
    return Cause(
        "no_grad_allreduce",
        "no gradient is all-reduced: every .grad differs across ranks on equal parameters",
        evidence,
        "wrap the model in DistributedDataParallel (and call the wrapper, not the inner model), "
        "and leave no_sync() before the step's last backward",
    )


def rule_local_buffers(rs: RankSet, c: Consistency) -> Optional[Cause]:
    d = c.first
    if d is None or d.key.kind != Kind.BUFFER_START.value:
        return None
    bad = _same_step(c, d.step, (Kind.BUFFER_START.value,))
    bn = all(d.key.name.rsplit(".", 1)[-1] in _BN_BUFFERS for d in bad)
    evidence = [
        f"step {d.step}: parameters agree on every rank; buffers at the step's start differ: "
        f"{_names(rs, bad)}",
    ]
    if d.step == int(c.steps[0]):
        return Cause(
            "different_initial_buffers",
            f"buffers differ across ranks from the first compared step ({_names(rs, bad)})",
            evidence,
            "initialise buffers identically on every rank, or let DDP broadcast them",
        )
    if bn:
        return Cause(
            "rank_local_batchnorm",
            "BatchNorm statistics are rank-local: each rank's running stats follow its own "
            "batches and are never synchronised",
            evidence,
            "use SyncBatchNorm (torch.nn.SyncBatchNorm.convert_sync_batchnorm) or "
            "DistributedDataParallel(broadcast_buffers=True)",
        )
    return Cause(
        "rank_local_buffers",
        f"buffers are rank-local: {_names(rs, bad)} differ across ranks at the step's start",
        evidence,
        "synchronise the buffers (DistributedDataParallel(broadcast_buffers=True)) or keep "
        "them out of the replicated state",
    )


def _update_ratio(rs: RankSet, c: Consistency, step: int, odd: int, ref: int) -> Optional[float]:
    """rank ``odd``'s update / rank ``ref``'s, when one factor fits every parameter (full values)."""
    prev = [s for s in c.steps if s < step]
    if not prev:
        return None
    p0 = int(prev[-1])
    ratios = []
    for name in rs.runs[ref].names(Kind.PARAM.value):
        try:
            a0 = rs.runs[ref].get(Kind.PARAM.value, name, p0).astype(np.float64)
            a1 = rs.runs[ref].get(Kind.PARAM.value, name, step).astype(np.float64)
            b1 = rs.runs[odd].get(Kind.PARAM.value, name, step).astype(np.float64)
        except (KeyError, GraddiffError):
            return None
        da, db = (a1 - a0).ravel(), (b1 - a0).ravel()
        den = float(da @ da)
        if den == 0.0:
            continue
        ratio = float(da @ db) / den
        resid = np.linalg.norm(db - ratio * da) / max(np.linalg.norm(db), np.sqrt(den))
        if resid > 1e-3:
            return None
        ratios.append(ratio)
    if not ratios or max(ratios) - min(ratios) > 1e-3 * max(abs(max(ratios)), 1e-12):
        return None
    return float(np.mean(ratios))


def rule_local_update(rs: RankSet, c: Consistency) -> Optional[Cause]:
    """Parameters part after a step whose parameters and gradients agreed: the update itself
    differs (learning rate, optimizer state, an extra in-place change on one rank)."""
    d = c.first
    if d is None or d.key.kind != Kind.PARAM.value or d.step == int(c.steps[0]):
        return None
    bad = _same_step(c, d.step, (Kind.PARAM.value,))
    ref = d.groups[0][0]
    evidence = [
        "the step before: parameters, step-start buffers and gradients agree on every rank",
        f"step {d.step}: {len(bad)} parameter(s) differ on {_ranks(d.odd)}: {_names(rs, bad)}",
    ]
    ratio = _update_ratio(rs, c, d.step, d.odd[0], ref) if len(d.odd) else None
    if ratio is not None:
        evidence.append(
            f"rank {d.odd[0]}'s update is {fmt(ratio)} x rank {ref}'s for every parameter"
        )
        return Cause(
            "rank_local_lr",
            f"the learning rate differs on {_ranks(d.odd)} (its update is {fmt(ratio)} x "
            f"rank {ref}'s with the same gradients): a scheduler or lr change applied on some "
            "ranks only",
            evidence,
            "step the LR scheduler (and change param_groups' lr) on every rank",
        )
    return Cause(
        "rank_local_update",
        f"the update differs on {_ranks(d.odd)} with the same gradients: a rank-local learning "
        "rate, optimizer state or in-place parameter change",
        evidence,
        "step the optimizer and scheduler identically on every rank; change parameters only "
        "through the replicated update",
    )


def rule_generic(rs: RankSet, c: Consistency) -> Optional[Cause]:
    d = c.first
    if d is None:
        return None
    return Cause(
        "rank_difference",
        f"{_key(rs, d)} differs across ranks",
        [f"first at step {d.step} on {_ranks(d.odd)}"],
        "inspect the code paths that run on some ranks only",
    )


RULES: tuple[Callable[[RankSet, Consistency], Optional[Cause]], ...] = (
    rule_passes,
    rule_step_count,
    rule_initial_params,
    rule_unreduced_grads,
    rule_local_buffers,
    rule_local_update,
    rule_generic,
)


def diagnose_ranks(rs: RankSet, c: Consistency) -> Optional[Cause]:
    for rule in RULES:
        cause = rule(rs, c)
        if cause is not None:
            return cause
    return None

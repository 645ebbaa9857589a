"""Diagnosis rules for a side merged from the ranks of a data-parallel run.

A merged side (``graddiff compare "run_*.h5" single.h5``) joins every rank's micro-batch into
the global batch. Most modules compute each sample on its own, so the merged forward equals a
single process's; a module that mixes samples through batch statistics does not: a plain
BatchNorm in training mode normalises each rank's micro-batch with that micro-batch's mean and
variance. Context in, Cause or None out.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..modclass import class_of
from .context import Cause, Context, fmt

#: Class-name parts of modules that normalise with statistics synchronised across ranks (or
#: fixed ones): not rank-local even though the name says BatchNorm.
_NOT_PER_RANK = ("SyncBatchNorm", "FrozenBatchNorm")


def merged_ranks(x: Context, side: str) -> int:
    """Ranks merged into ``side`` (1: a single process)."""
    try:
        return max(1, int(x.pair.run(side).environment.get("merged_ranks") or 1))
    except (TypeError, ValueError):
        return 1


def _batch_stat_norm(cls: Optional[str]) -> bool:
    return bool(cls) and "BatchNorm" in cls and not any(p in cls for p in _NOT_PER_RANK)


def _part_mean_gap(out: np.ndarray, beta: np.ndarray, parts: int) -> Optional[float]:
    """Largest |per-channel mean of a part - beta| over ``parts`` equal parts of dim 0,
    relative to the output's RMS. A BatchNorm in training mode makes the per-channel mean of
    the batch it normalised equal to its bias (beta): ~0 when each part was normalised alone."""
    if out.ndim < 2 or out.shape[0] % parts or out.shape[1] != beta.size or not out.size:
        return None
    a = out.astype(np.float64).reshape(parts, out.shape[0] // parts, out.shape[1], -1)
    means = a.mean(axis=(1, 3))  # parts x channels
    scale = float(np.sqrt(np.mean(a * a))) or 1.0
    return float(np.abs(means - beta.astype(np.float64)[None, :]).max()) / scale


def rule_rank_local_batchnorm(x: Context) -> Optional[Cause]:
    """A BatchNorm's output differs from the same input, and the two sides split the global
    batch into different numbers of ranks: each rank normalised its own micro-batch."""
    if x.slot.kind != "activation":
        return None
    ka, kb = merged_ranks(x, "a"), merged_ranks(x, "b")
    if ka == kb:
        return None
    name = x.slot.name
    cls = class_of(x.classes, "activation", name)
    if not _batch_stat_norm(cls):
        return None
    i = x.pair.cell(x.slot, x.step)
    if i is None:
        return None
    c = x.pair.cells(x.step)
    if not (c.a.training[i] and c.b.training[i]):
        return None  # in eval mode BatchNorm uses its running statistics: not per batch
    if x.within(x.step, ("input",)) is False:
        return None
    many, few = ("A", "B") if ka > kb else ("B", "A")
    k_many, k_few = max(ka, kb), min(ka, kb)
    who = (
        "the single process normalises the whole global batch with its statistics"
        if k_few == 1
        else f"{few}'s {k_few} ranks normalise larger micro-batches, each with its own"
    )
    evidence = [
        f"{x.label(x.slot)} differs at step {x.step} ({x.hit_text()}) while every earlier "
        f"module's output agrees; " + x.agree(("param", "input")),
        f"{x.module(name)} runs in training mode: it normalises with the mean and variance of "
        f"the batch it sees, and {many} is merged from {k_many} ranks, each seeing only its own "
        f"micro-batch",
    ]
    check = _check_parts(x, name, {"a": ka, "b": kb}, many.lower(), k_many)
    if check:
        evidence.append(check)
    return Cause(
        "rank_local_batchnorm",
        f"BatchNorm statistics are per rank: each of {many}'s {k_many} ranks normalises its "
        f"micro-batch in layer {x.module(name)} with that micro-batch's mean and variance; {who}",
        evidence,
        "expected for plain BatchNorm under data parallelism: use SyncBatchNorm "
        "(torch.nn.SyncBatchNorm.convert_sync_batchnorm) for statistics of the global batch, "
        "or compare against a run with the same per-rank batches",
    )


def _check_parts(x: Context, name: str, ranks: dict, side: str, k: int) -> str:
    """Evidence from the values: the per-channel mean of each rank's part of the output."""
    out = x.v(side, x.slot, x.step)
    bias = x.pair.slot("param", f"{name}.bias")
    beta = x.v(side, bias, x.step) if bias is not None else None
    if out is None or (bias is not None and beta is None):
        return "(values not stored: the per-rank normalisation was not checked)"
    if beta is None:  # affine=False: the normalised batch has mean 0
        beta = np.zeros(out.shape[1] if out.ndim >= 2 else 0)
    mine = _part_mean_gap(out, beta, k)
    if mine is None:
        return (
            "(the ranks' micro-batches differ in size: the per-rank normalisation was not checked)"
        )
    other_side = "b" if side == "a" else "a"
    other = x.v(other_side, x.slot, x.step)
    theirs = _part_mean_gap(other, beta, k) if other is not None else None
    text = (
        f"on {side.upper()}, each rank's part of the output has the per-channel mean of the "
        f"BatchNorm's bias (max deviation {fmt(mine)} of the output's RMS)"
    )
    if theirs is not None:
        text += f"; on {other_side.upper()} the same parts deviate by up to {fmt(theirs)}"
    return text

"""Do the ranks of one data-parallel run hold the same replicated state? A fingerprint vote.

Data flow: RankSet --> per-step passes and per-(step, record) fingerprints of every rank -->
majority vote --> Consistency (first disagreement, odd ranks, counts) --> causes --> report.

Data parallelism replicates parameters, buffers at the step's start (after DDP's broadcast) and
``.grad`` after the all-reduce, so those must be bitwise equal on every rank: they are compared
by their exact fingerprints (entries tables only, no tensor values: stats-mode traces work).
Inputs, activations, losses, output gradients and end-of-step buffers are each rank's own by
design and are not compared. Records marked as shards (FSDP) differ by design and are skipped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..kinds import CAUSAL_RANK, Kind
from ..reader import RecordKey, Run
from .files import RankSet
from .layout import SHARDED_KINDS, read_shards

#: What data parallelism makes identical on every rank (in causal order).
REPLICATED = (Kind.PARAM.value, Kind.BUFFER_START.value, Kind.GRAD.value)
#: What each rank computes from its own batch: never compared across ranks.
RANK_LOCAL = (
    Kind.INPUT.value,
    Kind.ACTIVATION.value,
    Kind.LOSS.value,
    Kind.GRAD_OUTPUT.value,
    Kind.AUTOGRAD_GRAD.value,
    Kind.BUFFER.value,
)
#: Steps read per block, and ranks x steps x records per block at most: memory stays bounded
#: (about 17 bytes per cell) whatever the run's length, rank count and model size.
BLOCK_STEPS = 256
MAX_CELLS = 4_000_000


@dataclass
class Disagreement:
    """One (step, record) whose fingerprint is not the same on every rank."""

    step: int
    key: RecordKey
    groups: list[list[int]]  # ranks with equal fingerprints, the majority first
    odd: list[int]  # ranks outside the majority
    majority: bool  # False when no group is larger than all others (e.g. 2 ranks)


@dataclass
class PassCount:
    """A step in which some ranks ran a different number of forward/backward passes."""

    step: int
    counts: list[int]  # per rank
    odd: list[int]


@dataclass
class Consistency:
    """Everything the vote found; ``first`` is None when the ranks agree."""

    steps: np.ndarray  # steps compared (complete on every rank)
    kinds: list[str]  # replicated kinds present and compared
    n_records: int
    first: Optional[Disagreement] = None
    first_passes: Optional[PassCount] = None
    step_counts: list[int] = field(default_factory=list)
    disagreements: list[Disagreement] = field(default_factory=list)  # up to MAX_KEPT, in order
    n_disagreements: int = 0
    steps_differing: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    by_rank: dict[int, int] = field(default_factory=dict)
    skipped_shards: int = 0

    @property
    def consistent(self) -> bool:
        return self.first is None and self.first_passes is None and not self.step_count_differs

    @property
    def step_count_differs(self) -> bool:
        return len(set(self.step_counts)) > 1


#: Disagreements kept in full for the causes (the counts are always exact).
MAX_KEPT = 4096


def vote(groups_of: dict[tuple[int, int], list[int]]) -> tuple[list[list[int]], list[int], bool]:
    """Groups of equal fingerprints (largest first, ties: the one with the lowest rank), the
    ranks outside the majority, and whether the majority is strict."""
    groups = sorted(groups_of.values(), key=lambda g: (-len(g), g[0]))
    strict = len(groups) == 1 or len(groups[0]) > len(groups[1])
    odd = sorted(r for g in groups[1:] for r in g)
    return groups, odd, strict


def _passes(run: Run, steps: np.ndarray) -> np.ndarray:
    """Forward/backward passes per step: loss records (or root inputs when no loss is recorded)."""
    loss = [i for i in range(run.n_records) if run.record_key(i).kind == Kind.LOSS.value]
    if not loss:
        loss = [i for i in range(run.n_records) if run.record_key(i).kind == Kind.INPUT.value]
        names = {run.record_key(i).name for i in loss}
        first = sorted(names)[:1]
        loss = [i for i in loss if run.record_key(i).name in first]
    out = np.zeros(len(steps), np.int64)
    if not loss or not len(steps):
        return out
    ids = np.array(loss)
    pos = {int(s): i for i, s in enumerate(steps)}
    for block in run.iter_step_blocks(BLOCK_STEPS):
        hit = block[np.isin(block["record"], ids)]
        for s, n in Counter(int(x) for x in hit["step"]).items():
            if s in pos:
                out[pos[s]] = n
    return out


def check_consistency(rs: RankSet) -> Consistency:
    """Vote on every replicated record of every step that all ranks completed."""
    runs = rs.runs
    steps = runs[0].steps
    for run in runs[1:]:
        steps = np.intersect1d(steps, run.steps)
    present = [k for k in REPLICATED if all(k in run.kinds for run in runs)]
    skipped = _shard_keys(runs)
    keys: list[RecordKey] = []
    index: dict[RecordKey, int] = {}
    for run in runs:
        for key in run.keys:
            if key.kind in present and key not in index and key not in skipped:
                index[key] = len(keys)
                keys.append(key)
    compared = [k for k in present if any(key.kind == k for key in keys)]
    out = Consistency(steps=steps, kinds=compared, n_records=len(keys))
    out.step_counts = [len(run.steps) for run in runs]
    out.skipped_shards = len({k for k in skipped if k.kind in present})
    _check_passes(runs, steps, out)
    if not len(steps) or not keys:
        return out
    order = np.array([CAUSAL_RANK.get(k.kind, 99) for k in keys])
    key_of = [_key_ids(run, index, skipped) for run in runs]
    per_block = max(1, min(BLOCK_STEPS, MAX_CELLS // (len(runs) * len(keys))))
    for lo in range(0, len(steps), per_block):
        block = steps[lo : lo + per_block]
        _vote_block(runs, block, keys, key_of, order, out)
    return out


def _shard_keys(runs: list[Run]) -> set[RecordKey]:
    """Records that hold a per-rank shard (FSDP, DTensor): different on every rank by design."""
    out: set[RecordKey] = set()
    for run in runs:
        for name in read_shards(run):
            out.update(RecordKey(k, name) for k in SHARDED_KINDS)
    return out


def _key_ids(run: Run, index: dict[RecordKey, int], skipped: set[RecordKey]) -> np.ndarray:
    ids = np.full(run.n_records, -1, np.int64)
    for rid in range(run.n_records):
        key = run.record_key(rid)
        if key not in skipped:
            ids[rid] = index.get(key, -1)
    return ids


def _check_passes(runs: list[Run], steps: np.ndarray, out: Consistency) -> None:
    counts = np.stack([_passes(run, steps) for run in runs])  # ranks x steps
    for j in range(counts.shape[1]):
        col = counts[:, j]
        if (col == col[0]).all():
            continue
        groups = {}
        for r, n in enumerate(col):
            groups.setdefault((int(n), 0), []).append(r)
        _, odd, _ = vote(groups)
        out.first_passes = PassCount(int(steps[j]), [int(n) for n in col], odd)
        return


def _vote_block(runs, block, keys, key_of, order, out: Consistency) -> None:
    n_ranks, n_keys = len(runs), len(keys)
    pos = {int(s): i for i, s in enumerate(block)}
    fs = np.zeros((n_ranks, len(block), n_keys), np.uint64)
    fp = np.zeros_like(fs)
    have = np.zeros(fs.shape, bool)
    for r, run in enumerate(runs):
        ent = run.entries(int(block[0]), int(block[-1]))
        kid = key_of[r][ent["record"]]
        keep = (kid >= 0) & np.isin(ent["step"], block)
        ent, kid = ent[keep], kid[keep]
        si = np.array([pos[int(s)] for s in ent["step"]], np.int64)
        fs[r, si, kid] = ent["fp_sum"]
        fp[r, si, kid] = ent["fp_pos"]
        have[r, si, kid] = True
    anywhere = have.any(axis=0)
    differ = ((fs != fs[0]) | (fp != fp[0]) | (have != have[0])).any(axis=0) & anywhere
    if not differ.any():
        return
    si, ki = np.nonzero(differ)
    for j in np.lexsort((ki, order[ki], si)):  # by step, causal kind, record order
        s, k = int(si[j]), int(ki[j])
        groups_of: dict[tuple[int, int], list[int]] = {}
        for r in range(n_ranks):
            sig = (int(fs[r, s, k]), int(fp[r, s, k])) if have[r, s, k] else (-1, -1)
            groups_of.setdefault(sig, []).append(r)
        groups, odd, strict = vote(groups_of)
        d = Disagreement(int(block[s]), keys[k], groups, odd, strict)
        if out.first is None:
            out.first = d
        out.n_disagreements += 1
        out.by_kind[d.key.kind] = out.by_kind.get(d.key.kind, 0) + 1
        for r in odd:
            out.by_rank[r] = out.by_rank.get(r, 0) + 1
        if len(out.disagreements) < MAX_KEPT:
            out.disagreements.append(d)
    out.steps_differing += int(differ.any(axis=1).sum())

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


def pass_records(run: Run) -> np.ndarray:
    """Record ids that count forward/backward passes: the loss records (or, when no loss is
    recorded, the first-named root input)."""
    loss = [i for i in range(run.n_records) if run.record_key(i).kind == Kind.LOSS.value]
    if not loss:
        loss = [i for i in range(run.n_records) if run.record_key(i).kind == Kind.INPUT.value]
        names = {run.record_key(i).name for i in loss}
        first = sorted(names)[:1]
        loss = [i for i in loss if run.record_key(i).name in first]
    return np.array(loss, np.int64)


def key_ids(run: Run, index: dict[RecordKey, int], skipped: set[RecordKey]) -> np.ndarray:
    """Record id of ``run`` -> position in the compared keys (-1: not compared)."""
    ids = np.full(run.n_records, -1, np.int64)
    for rid in range(run.n_records):
        key = run.record_key(rid)
        if key not in skipped:
            ids[rid] = index.get(key, -1)
    return ids


def read_block(
    run: Run, block: np.ndarray, key_of: np.ndarray, n_keys: int, pass_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One rank's fingerprints of the steps ``block`` (sorted): fp_sum, fp_pos and presence as
    steps x keys arrays, and its forward/backward passes per step. One read of the entries."""
    fs = np.zeros((len(block), n_keys), np.uint64)
    fp = np.zeros_like(fs)
    have = np.zeros(fs.shape, bool)
    passes = np.zeros(len(block), np.int64)
    if not len(block):
        return fs, fp, have, passes
    ent = run.entries(int(block[0]), int(block[-1]))
    si = np.searchsorted(block, ent["step"])
    inside = (si < len(block)) & (block[np.minimum(si, len(block) - 1)] == ent["step"])
    if len(pass_ids):
        hit = inside & np.isin(ent["record"], pass_ids)
        passes += np.bincount(si[hit], minlength=len(block))
    if n_keys:
        kid = key_of[ent["record"]]
        keep = inside & (kid >= 0)
        si, kid, ent = si[keep], kid[keep], ent[keep]
        fs[si, kid] = ent["fp_sum"]
        fp[si, kid] = ent["fp_pos"]
        have[si, kid] = True
    return fs, fp, have, passes


def block_steps(n_ranks: int, n_keys: int) -> int:
    """Steps per block: ranks x steps x keys stays under MAX_CELLS."""
    return max(1, min(BLOCK_STEPS, MAX_CELLS // max(1, n_ranks * n_keys)))


def check_consistency(rs: RankSet, workers: Optional[int] = None) -> Consistency:
    """Vote on every replicated record of every step that all ranks completed.

    ``workers``: None chooses (serial for small sets, worker processes for large ones: see
    graddiff.ranks.parallel); 0 or 1 reads the files one after another in this process; N > 1
    reads them in up to N worker processes. The result is the same either way."""
    from .parallel import choose_workers, parallel_reader

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
    if not len(steps):
        return out
    order = np.array([CAUSAL_RANK.get(k.kind, 99) for k in keys], np.int64)
    per_block = block_steps(len(runs), len(keys))
    n = choose_workers(runs, steps, workers)
    counts = np.zeros((len(runs), len(steps)), np.int64)  # passes per rank and step
    if n > 1:
        source = parallel_reader(runs, steps, keys, skipped, per_block, n)
    else:
        source = _serial_reader(runs, steps, keys, index, skipped, per_block)
    with source as blocks:
        for lo, per_rank in blocks:
            block = steps[lo : lo + per_block]
            for r, (_, _, _, passes) in enumerate(per_rank):
                counts[r, lo : lo + len(block)] = passes
            if keys:
                _vote_block(block, keys, per_rank, order, out)
    _check_passes(counts, steps, out)
    return out


class _serial_reader:
    """Blocks of every rank's fingerprints, read one file after another in this process."""

    def __init__(self, runs, steps, keys, index, skipped, per_block) -> None:
        self.runs, self.steps, self.n_keys, self.per_block = runs, steps, len(keys), per_block
        self.key_of = [key_ids(run, index, skipped) for run in runs]
        self.pass_ids = [pass_records(run) for run in runs]

    def __enter__(self):
        return self._blocks()

    def __exit__(self, *exc) -> None:
        return None

    def _blocks(self):
        for lo in range(0, len(self.steps), self.per_block):
            block = self.steps[lo : lo + self.per_block]
            yield (
                lo,
                [
                    read_block(run, block, self.key_of[r], self.n_keys, self.pass_ids[r])
                    for r, run in enumerate(self.runs)
                ],
            )


def _shard_keys(runs: list[Run]) -> set[RecordKey]:
    """Records that hold a per-rank shard (FSDP, DTensor): different on every rank by design."""
    out: set[RecordKey] = set()
    for run in runs:
        for name in read_shards(run):
            out.update(RecordKey(k, name) for k in SHARDED_KINDS)
    return out


def _check_passes(counts: np.ndarray, steps: np.ndarray, out: Consistency) -> None:
    """The first step whose passes (ranks x steps ``counts``) are not the same on every rank."""
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


def _vote_block(block, keys, per_rank, order, out: Consistency) -> None:
    n_ranks = len(per_rank)
    fs = np.stack([b[0] for b in per_rank])  # ranks x steps x keys
    fp = np.stack([b[1] for b in per_rank])
    have = np.stack([b[2] for b in per_rank])
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

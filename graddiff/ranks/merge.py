"""One trace of the global batch from the ranks of a data-parallel run, for ``compare``.

Data flow: RankSet --> per step: replicated records from rank 0 (parameters, step-start
buffers, all-reduced ``.grad``), per-rank records joined --> a merged trace file (the ordinary
format, written by TraceWriter) --> the ordinary differ against a single-process run or another
merged run. So ``graddiff compare "run_*.h5" single.h5`` compares what the single process of the
global batch would have recorded:

- inputs, activations and output gradients: call c of every rank joined along dim 0 in rank
  order (rank r's micro-batch is part r of the global batch);
- losses (and ``autograd_grad`` outputs, per rank before any all-reduce) combine by the loss
  reduction: ``mean`` (each rank weighted by its share of the global batch) or ``sum``;
- output gradients scale by the same weights (a mean over B samples gives each sample 1/B);
- parameters, step-start buffers and ``.grad``: rank 0's (the ranks hold equal copies; when
  they do not, a note says so and points at ``graddiff ranks``); end-of-step buffers: rank 0's;
- sharded parameters and their gradients (FSDP2, DTensor): the full tensor, every rank's
  shard placed at the offset its trace records (``ranks.layout``).

Records stored as statistics only are merged from their statistics (norm, mean, min, max,
NaN/Inf counts combine exactly up to rounding); their fingerprint is then a mix that never
claims bitwise equality. Never imports torch.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..entries import EntryData, array_stats
from ..errors import GraddiffError
from ..format import FLAG_VALUES, fingerprint_bytes
from ..kinds import Kind
from ..reader import RecordKey, Run, open_run
from ..writer import TraceWriter
from .consistency import REPLICATED, check_consistency
from .files import RankSet
from .layout import SHARDED_KINDS, assemble, empty_piece, read_shards

REDUCTIONS = ("mean", "sum")
_JOINED = frozenset({Kind.INPUT.value, Kind.ACTIVATION.value, Kind.GRAD_OUTPUT.value})
_SCALED = frozenset({Kind.GRAD_OUTPUT.value})
_SUMMED = frozenset({Kind.LOSS.value, Kind.AUTOGRAD_GRAD.value})

_tmpdir: Optional[str] = None


def _scratch() -> str:
    """A private directory for merged traces, removed at exit (HTML reports reread them)."""
    global _tmpdir
    if _tmpdir is None:
        _tmpdir = tempfile.mkdtemp(prefix="graddiff-merged-")
        atexit.register(shutil.rmtree, _tmpdir, True)
    return _tmpdir


@dataclass
class Merged:
    """A merged trace and what was done to build it."""

    run: Run
    label: str
    reduction: str
    notes: list[str]


def _to_storage(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Decoded values back to the bytes of the recorded dtype (bfloat16 is read as float32)."""
    if dtype == "bfloat16":
        return (np.ascontiguousarray(arr, np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return np.ascontiguousarray(arr)


def _values_entry(key: RecordKey, dtype: str, arr: np.ndarray, flags: int, seq: int) -> EntryData:
    stored = _to_storage(arr, dtype)
    stats_src = arr.astype(np.float32) if dtype == "bfloat16" else arr
    return EntryData(
        kind=key.kind,
        name=key.name,
        call=key.call,
        dtype=dtype,
        shape=tuple(arr.shape),
        stats=array_stats(stats_src),
        fingerprint=fingerprint_bytes(stored),
        values=stored,
        flags=flags & ~FLAG_VALUES,
        seq=seq,
    )


def _row_entry(run: Run, key: RecordKey, row: np.void) -> EntryData:
    """A record copied as it is (values when stored)."""
    dtype = run.record_dtype(int(row["record"]))
    ndim = int(row["ndim"])
    if row["flags"] & FLAG_VALUES:
        return _values_entry(key, dtype, run.values_of(row), int(row["flags"]), int(row["seq"]))
    return EntryData(
        kind=key.kind,
        name=key.name,
        call=key.call,
        dtype=dtype,
        shape=tuple(int(s) for s in row["shape"][:ndim]),
        stats=tuple(row[f] for f in ("norm", "mean", "min", "max", "nan", "inf")),
        fingerprint=(int(row["fp_sum"]), int(row["fp_pos"])),
        flags=int(row["flags"]) & ~FLAG_VALUES,
        seq=int(row["seq"]),
    )


def _stats_entry(
    key: RecordKey, dtype: str, rows: list[np.void], weights: list[float], joined: bool, seq: int
) -> EntryData:
    """Statistics of the joined (or weighted-summed) tensor from the parts' statistics."""
    numel = [int(r["numel"]) for r in rows]
    if joined:
        norm = float(np.sqrt(sum((w * float(r["norm"])) ** 2 for w, r in zip(weights, rows))))
        mean = sum(w * float(r["mean"]) * n for w, r, n in zip(weights, rows, numel)) / max(
            sum(numel), 1
        )
        lo = min(w * float(r["min"]) for w, r in zip(weights, rows))
        hi = max(w * float(r["max"]) for w, r in zip(weights, rows))
        shape = (
            sum(int(r["shape"][0]) for r in rows),
            *(int(s) for s in rows[0]["shape"][1 : int(rows[0]["ndim"])]),
        )
    else:  # a weighted sum of same-shaped tensors: only exact for scalars
        mean = sum(w * float(r["mean"]) for w, r in zip(weights, rows))
        norm, lo, hi = abs(mean) if numel[0] == 1 else float("nan"), mean, mean
        shape = tuple(int(s) for s in rows[0]["shape"][: int(rows[0]["ndim"])])
    fp_sum = sum(int(r["fp_sum"]) for r in rows) % 2**64
    fp_pos = (sum((i + 7) * int(r["fp_pos"]) for i, r in enumerate(rows)) ^ 0x5DEECE66D) % 2**64
    return EntryData(
        kind=key.kind,
        name=key.name,
        call=key.call,
        dtype=dtype,
        shape=shape,
        stats=(
            norm,
            mean,
            lo,
            hi,
            sum(int(r["nan"]) for r in rows),
            sum(int(r["inf"]) for r in rows),
        ),
        fingerprint=(fp_sum, fp_pos),
        flags=int(rows[0]["flags"]) & ~FLAG_VALUES,
        seq=seq,
    )


def _step_rows(run: Run, step: int) -> dict[RecordKey, np.void]:
    out = {}
    for row in run.entries(step, step):
        out[run.record_key(int(row["record"]))] = row
    return out


def _batch_sizes(rs: RankSet, rows: list[dict[RecordKey, np.void]]) -> Optional[list[int]]:
    """Each rank's batch size at a step: dim 0 of its first input record."""
    inputs = [k for k in rows[0] if k.kind == Kind.INPUT.value]
    for key in inputs:
        if all(key in r and int(r[key]["ndim"]) >= 1 for r in rows):
            return [int(r[key]["shape"][0]) for r in rows]
    return None


def _weights(reduction: str, sizes: Optional[list[int]], n: int) -> list[float]:
    if reduction == "sum":
        return [1.0] * n
    if sizes and sum(sizes) > 0:
        return [s / sum(sizes) for s in sizes]
    return [1.0 / n] * n


def merged_loss(rs: RankSet, step: int, reduction: str) -> Optional[float]:
    """The global batch's loss at ``step`` under ``reduction`` (None without loss values)."""
    rows = [_step_rows(run, step) for run in rs.runs]
    key = RecordKey(Kind.LOSS.value, "loss")
    if not all(key in r and r[key]["flags"] & FLAG_VALUES for r in rows):
        return None
    w = _weights(reduction, _batch_sizes(rs, rows), len(rows))
    return float(sum(wi * float(run.values_of(r[key])) for wi, run, r in zip(w, rs.runs, rows)))


def detect_reduction(rs: RankSet, other: Optional[Run]) -> tuple[str, str]:
    """``mean`` or ``sum``: whichever makes the merged loss closest to the single run's."""
    if other is None:
        return "mean", "loss reduction assumed 'mean' (pass --reduction sum if the loss sums)"
    steps = np.intersect1d(rs.runs[0].steps, other.steps)
    for step in steps[:1]:
        try:
            ref = float(other.get(Kind.LOSS.value, "loss", int(step)))
        except (KeyError, GraddiffError):
            break
        cands = {r: merged_loss(rs, int(step), r) for r in REDUCTIONS}
        if any(v is None for v in cands.values()):
            break
        best = min(REDUCTIONS, key=lambda r: abs(cands[r] - ref) / max(abs(ref), 1e-30))
        return best, (
            f"loss reduction detected as '{best}' (step {int(step)}: single-process loss "
            f"{ref:.6g}, merged {cands['mean']:.6g} if mean, {cands['sum']:.6g} if sum)"
        )
    return "mean", "loss reduction assumed 'mean' (no loss values to detect it; see --reduction)"


def merge_ranks(rs: RankSet, reduction: str, label: str) -> Merged:
    """Write the merged trace of ``rs`` and open it."""
    if reduction not in REDUCTIONS:
        raise GraddiffError(f"--reduction {reduction!r}: choose mean or sum")
    notes: list[str] = []
    consistency = check_consistency(rs)
    if not consistency.consistent:
        where = consistency.first
        at = f" (first: {where.key} at step {where.step})" if where else ""
        notes.append(
            f"{label}: the ranks disagree on replicated state{at}; rank 0's copy is compared "
            f"(run graddiff ranks on them)"
        )
    steps = rs.runs[0].steps
    for run in rs.runs[1:]:
        steps = np.intersect1d(steps, run.steps)
    if not len(steps):
        raise GraddiffError(f"{label}: no step that every rank completed")
    env = dict(rs.runs[0].environment)
    env["merged_ranks"] = len(rs.runs)
    env["merged_reduction"] = reduction
    fd, path = tempfile.mkstemp(suffix=".h5", prefix="merged-", dir=_scratch())
    os.close(fd)
    writer = TraceWriter(path, env, dict(rs.runs[0].options), ballast=False)
    skipped: dict[str, str] = {}
    layouts = [read_shards(run) for run in rs.runs]
    if layouts[0]:
        notes.append(
            f"{label}: {len(layouts[0])} sharded parameter(s) reassembled from every rank's shard"
        )
    try:
        for step in steps:
            rows = [_step_rows(run, int(step)) for run in rs.runs]
            sizes = _batch_sizes(rs, rows)
            w = _weights(reduction, sizes, len(rows))
            entries = [
                e
                for key in dict.fromkeys(k for r in rows for k in r)  # rank 0's order first
                if (e := _merge_key(rs, key, rows, w, skipped, layouts)) is not None
            ]
            writer.write_step(int(step), entries)
    except BaseException:
        writer.close("stopped: merging failed")
        raise
    statuses = {run.status for run in rs.runs}
    writer.close("complete" if statuses == {"complete"} else "stopped: a rank did not complete")
    _copy_settings(rs, path, label, notes)
    for what, why in skipped.items():
        notes.append(f"{label}: {what} not merged ({why})")
    return Merged(open_run(path), label, reduction, notes)


def _copy_settings(rs: RankSet, path: str, label: str, notes: list[str]) -> None:
    """Rank 0's recorded optimizer settings into the merged trace (every rank's optimizer has
    the same settings in data parallelism; compare's diagnoses read them)."""
    import h5py

    from ..diff.optcopy import copy_settings  # (lazily: diff imports ranks)

    try:
        with h5py.File(path, "r+") as f:
            copy_settings(rs.runs[0], f, 0, {})
    except GraddiffError as exc:
        notes.append(f"{label}: rank 0's optimizer settings not used ({exc})")


def _merge_shards(rs, key, rows, layouts, skipped) -> Optional[EntryData]:
    """A sharded parameter or gradient: the full tensor from every rank's shard."""
    parts = [r.get(key) for r in rows]
    first = next(i for i, p in enumerate(parts) if p is not None)
    run0, row0 = rs.runs[first], parts[first]
    lays = [lay.get(key.name) for lay in layouts]
    if any(lay is None for lay in lays) or any(
        p is None and not empty_piece(lay) for p, lay in zip(parts, lays)
    ):
        skipped.setdefault(str(key), "sharded on some ranks only")
        return None
    dtype = run0.record_dtype(int(row0["record"]))
    held = [p for p in parts if p is not None]
    if all(p["flags"] & FLAG_VALUES for p in held):
        arrs = [None if p is None else run.values_of(p) for run, p in zip(rs.runs, parts)]
        try:
            full = assemble(arrs, lays)
        except ValueError as exc:
            skipped.setdefault(str(key), str(exc))
            return None
        return _values_entry(key, dtype, full, int(row0["flags"]), int(row0["seq"]))
    entry = _stats_entry(key, dtype, held, [1.0] * len(held), True, int(row0["seq"]))
    entry.shape = tuple(lays[0]["global_shape"])
    return entry


def _merge_key(rs, key, rows, w, skipped, layouts) -> Optional[EntryData]:
    if key.kind in SHARDED_KINDS and key.name in layouts[0]:
        return _merge_shards(rs, key, rows, layouts, skipped)
    if key not in rows[0]:
        skipped.setdefault(str(key), "not recorded on rank 0 at a step")
        return None
    run0, row0 = rs.runs[0], rows[0][key]
    if key.kind in REPLICATED or key.kind == Kind.BUFFER.value:
        return _row_entry(run0, key, row0)
    parts = [r.get(key) for r in rows]
    if any(p is None for p in parts):
        skipped.setdefault(str(key), "recorded on some ranks only at a step")
        return None
    dtype = run0.record_dtype(int(row0["record"]))
    joined = key.kind in _JOINED
    scale = w if (key.kind in _SCALED or key.kind in _SUMMED) else [1.0] * len(parts)
    if joined and any(int(p["ndim"]) == 0 for p in parts):
        skipped.setdefault(str(key), "a 0-d tensor has no batch dimension to join")
        return None
    if all(p["flags"] & FLAG_VALUES for p in parts):
        arrs = [run.values_of(p) for run, p in zip(rs.runs, parts)]
        if joined:
            if len({a.shape[1:] for a in arrs}) > 1:
                skipped.setdefault(str(key), "shapes beyond dim 0 differ across ranks")
                return None
            if scale != [1.0] * len(parts):
                arrs = [(a.astype(np.float64) * s).astype(a.dtype) for a, s in zip(arrs, scale)]
            arr = np.concatenate(arrs, axis=0)
        else:
            if len({a.shape for a in arrs}) > 1:
                skipped.setdefault(str(key), "shapes differ across ranks")
                return None
            total = sum(a.astype(np.float64) * s for a, s in zip(arrs, scale))
            arr = np.asarray(total).astype(arrs[0].dtype)
        return _values_entry(key, dtype, arr, int(row0["flags"]), int(row0["seq"]))
    return _stats_entry(key, dtype, parts, scale, joined, int(row0["seq"]))

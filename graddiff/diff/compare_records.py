"""Classify every (step, slot) cell of two runs from fingerprints and statistics, vectorized.

Second stage of the differ: align --> cells --> first divergence. One call handles a block of
steps with numpy only (no per-record Python loop), so locating the divergence costs one pass
over the entries tables; full values are read later, and only for the cells that need them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..format import FLAG_TRAINING, FLAG_VALUES, MAX_NDIM, storage_dtype
from ..reader import Run
from .align import MODE_CONCAT, Alignment, RunMap
from .noise import ROUNDING_ULPS, eps_of, floor_factor

#: Cell codes. DIFF: bitwise different (or not provably equal) with full values on both sides;
#: STATS: different, statistics only on at least one side.
EQUAL, DIFF, STATS, MISSING_A, MISSING_B, SHAPE, NONFINITE = range(7)
CODE_NAMES = ("equal", "values", "stats", "missing_in_a", "missing_in_b", "shape", "nonfinite")
#: Codes that are a divergence whatever the tolerance.
DEFINITE = (MISSING_A, MISSING_B, SHAPE, NONFINITE)

_U64 = np.uint64
_MIX = (_U64(0x9E3779B97F4A7C15), _U64(0xC2B2AE3D27D4EB4F), _U64(0x165667B19E3779F9))


class DtypeTable:
    """Shared ids for dtype names of both runs, and the record id -> dtype id of each run."""

    def __init__(self, a: Run, b: Run) -> None:
        self.names: list[str] = []
        self._ids: dict[str, int] = {}
        self.of_a = np.array(
            [self._id(a.record_dtype(r)) for r in range(a.n_records)] or [0], np.int64
        )
        self.of_b = np.array(
            [self._id(b.record_dtype(r)) for r in range(b.n_records)] or [0], np.int64
        )
        sizes = []
        for name in self.names:
            try:
                sizes.append(storage_dtype(name).itemsize)
            except ValueError:
                sizes.append(1)
        self.itemsize = np.array(sizes or [1], np.int64)
        self.floor = np.array([floor_factor(n) for n in self.names] or [0.0], np.float64)
        # roundoff of a dtype's arithmetic (0: integers), and of its statistics (computed in
        # float32 for float32 and narrower floats, in float64 for float64 and integers)
        self.eps = np.array([eps_of(n) for n in self.names] or [0.0], np.float64)
        f32, f64 = eps_of("float32"), eps_of("float64")
        self.eps_stats = np.where(self.eps >= f32, f32, f64)

    def _id(self, name: str) -> int:
        if name not in self._ids:
            self._ids[name] = len(self.names)
            self.names.append(name)
        return self._ids[name]


@dataclass
class Side:
    """One run's aggregate per cell (values undefined where ``present`` is False)."""

    present: np.ndarray
    count: np.ndarray
    numel: np.ndarray
    norm_lo: np.ndarray
    norm_hi: np.ndarray
    norm_parts: np.ndarray  # sum of the calls' norms (the scale of rounding in their stats)
    mean: np.ndarray
    min: np.ndarray
    max: np.ndarray
    nan: np.ndarray
    inf: np.ndarray
    values: np.ndarray
    training: np.ndarray
    seq: np.ndarray
    ndim: np.ndarray
    shape: np.ndarray
    dtype: np.ndarray
    fp_level: np.ndarray  # 2: exact fingerprint, 1: fp_sum only (joined calls), 0: none
    fp_sum: np.ndarray
    fp_pos: np.ndarray
    parts_hash: np.ndarray
    merged_sum: np.ndarray  # several calls summed: NaN/Inf known only as present/absent
    offset: np.ndarray  # first call's byte offset into the step's values (-1: stats only)
    nbytes: np.ndarray


@dataclass
class Cells:
    """Every (step, slot) present in either run for a block of steps, in causal order."""

    step: np.ndarray
    slot: np.ndarray
    rank: np.ndarray
    code: np.ndarray
    rel_lb: np.ndarray  # lower bound of the relative difference, from stats
    floor: np.ndarray  # noise floor of the denominator (see noise_floor)
    dtype_diff: np.ndarray
    proven: np.ndarray  # the fingerprints prove a bitwise difference
    loose: np.ndarray  # calls summed or joined, values not on both sides: stats within rounding
    a: Side
    b: Side

    def __len__(self) -> int:
        return len(self.step)


def _aggregate(
    e: np.ndarray, rmap: RunMap, dtype_of: np.ndarray, itemsize: np.ndarray, n_slots: int
):
    """Group one run's entry rows by (step, slot) and combine the calls of each slot."""
    slot = rmap.slot_of[e["record"]] if len(e) else np.zeros(0, np.int64)
    e, slot = e[slot >= 0], slot[slot >= 0]
    part = rmap.part_of[e["record"]]
    key = e["step"].astype(np.int64) * n_slots + slot
    order = np.lexsort((part, key))
    e, key, part, slot = e[order], key[order], part[order], slot[order]
    if not len(e):
        return np.zeros(0, np.int64), None
    uniq, start = np.unique(key, return_index=True)
    count = np.diff(np.append(start, len(key)))
    add = np.add.reduceat
    numel = e["numel"].astype(np.int64)
    dt = dtype_of[e["record"]]
    first = e[start]
    mode = rmap.mode_of_slot[slot[start]]
    merged = count > 1
    concat = merged & (mode == MODE_CONCAT)
    summed = merged & ~concat  # MODE_SUM (or a duplicate record of MODE_ONE)
    norms = e["norm"].astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        norm2 = np.sqrt(add(norms**2, start))
        normsum = add(norms, start)
        normmax = np.fmax.reduceat(norms, start)
        tot = add(numel, start)
        meanw = add(e["mean"] * numel, start) / np.maximum(tot, 1)
        means = add(e["mean"], start)
    norm = first["norm"].astype(np.float64)
    norm_lo, norm_hi = norm.copy(), norm.copy()
    norm_lo[concat] = norm_hi[concat] = norm2[concat]
    norm_lo[summed] = np.maximum(2 * normmax[summed] - normsum[summed], 0.0)
    norm_hi[summed] = normsum[summed]
    mean = first["mean"].astype(np.float64)
    mean[concat] = meanw[concat]
    mean[summed] = means[summed]
    mn = np.fmin.reduceat(e["min"], start)
    mx = np.fmax.reduceat(e["max"], start)
    mn[summed] = np.nan
    mx[summed] = np.nan
    out_numel = np.where(concat, tot, first["numel"])
    ndim = first["ndim"].astype(np.int64)
    shape = first["shape"].astype(np.int64)
    if concat.any():
        rows0 = np.where(e["ndim"] > 0, e["shape"][:, 0], 1)
        s0 = add(rows0, start)
        shape[concat, 0] = s0[concat]
        ndim[concat & (ndim == 0)] = 1
    aligned = np.minimum.reduceat(((numel * itemsize[dt]) % 8 == 0).astype(np.int8), start) > 0
    same_dtype = np.fmin.reduceat(dt, start) == np.fmax.reduceat(dt, start)
    fp_level = np.where(merged, np.where(concat & aligned & same_dtype, 1, 0), 2)
    flags = e["flags"].astype(np.int64)
    mixed = (
        e["fp_sum"].astype(_U64) * _MIX[0]
        + e["fp_pos"].astype(_U64) * _MIX[1]
        + (part.astype(_U64) + _U64(1)) * _MIX[2]
    )
    agg = dict(
        count=count,
        numel=out_numel,
        norm_lo=norm_lo,
        norm_hi=norm_hi,
        norm_parts=np.where(merged, normsum, norm),
        mean=mean,
        min=mn,
        max=mx,
        nan=add(e["nan"].astype(np.int64), start),
        inf=add(e["inf"].astype(np.int64), start),
        values=np.minimum.reduceat(((flags & FLAG_VALUES) > 0).astype(np.int8), start) > 0,
        training=np.maximum.reduceat(((flags & FLAG_TRAINING) > 0).astype(np.int8), start) > 0,
        seq=first["seq"].astype(np.int64),
        ndim=ndim,
        shape=shape,
        dtype=np.where(same_dtype, dt[start], -1),
        fp_level=fp_level,
        fp_sum=add(e["fp_sum"].astype(_U64), start),
        fp_pos=first["fp_pos"].astype(_U64),
        parts_hash=add(mixed, start),
        merged_sum=summed,
        offset=first["offset"].astype(np.int64),
        nbytes=first["nbytes"].astype(np.int64),
    )
    return uniq, agg


def _expand(keys: np.ndarray, agg, union: np.ndarray) -> Side:
    n = len(union)
    if agg is None:
        pos = np.zeros(n, np.int64)
        present = np.zeros(n, bool)
    else:
        pos = np.clip(np.searchsorted(keys, union), 0, max(len(keys) - 1, 0))
        present = keys[pos] == union
    fields = {}
    for name in Side.__dataclass_fields__:
        if name == "present":
            continue
        if agg is None:
            shape = (n, MAX_NDIM) if name == "shape" else (n,)
            fields[name] = np.zeros(
                shape, np.uint64 if name.startswith(("fp_", "parts")) else np.float64
            )
            if name in (
                "count",
                "ndim",
                "seq",
                "dtype",
                "nan",
                "inf",
                "numel",
                "fp_level",
                "offset",
                "nbytes",
            ):
                fields[name] = fields[name].astype(np.int64)
            if name in ("values", "training", "merged_sum"):
                fields[name] = fields[name].astype(bool)
        else:
            fields[name] = agg[name][pos]
    return Side(present=present, **fields)


def noise_floor(
    step: np.ndarray, rank: np.ndarray, a: Side, b: Side, factor: np.ndarray
) -> np.ndarray:
    """``noise.floor_factor`` x the largest norm of the same kind at the same step, in either run.

    A tensor that is tiny next to its peers (the bias gradient of a Linear before BatchNorm is
    zero up to rounding) would otherwise show rounding noise as a relative difference of ~1.
    """
    key = step * 16 + rank
    uniq, inv = np.unique(key, return_inverse=True)
    norms = np.fmax(np.where(a.present, a.norm_hi, 0.0), np.where(b.present, b.norm_hi, 0.0))
    norms = np.where(np.isfinite(norms), norms, 0.0)
    peak = np.zeros(len(uniq))
    np.maximum.at(peak, inv, norms)
    dt = np.where(a.present, a.dtype, b.dtype)
    return factor[np.clip(dt, 0, None)] * np.where(dt >= 0, 1.0, 0.0) * peak[inv]


def _rel_lower_bound(
    a: Side, b: Side, floor: np.ndarray, slack: np.ndarray | float = 0.0
) -> np.ndarray:
    """max(|d norm|, sqrt(n)|d mean|, |d max|, |d min|) / max(norm): <= the true relative diff.

    ``slack`` (absolute, per cell) is taken off the numerator first: the rounding that the
    statistics of summed or joined calls carry (see ``derived_slack``).
    """
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        terms = [
            np.maximum(a.norm_lo - b.norm_hi, b.norm_lo - a.norm_hi),
            np.sqrt(a.numel.astype(np.float64)) * np.abs(a.mean - b.mean),
            np.abs(a.max - b.max),
            np.abs(a.min - b.min),
        ]
        num = terms[0]
        for t in terms[1:]:
            num = np.fmax(num, t)
        num = np.where(np.isfinite(num), np.maximum(num - slack, 0.0), 0.0)
        den = np.fmax(np.fmax(a.norm_hi, b.norm_hi), floor)
        den = np.where(np.isfinite(den), den, 0.0)
        rel = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num > 0, np.inf, 0.0))
    return rel


def derived_slack(a: Side, b: Side, eps: np.ndarray, eps_stats: np.ndarray) -> np.ndarray:
    """How far the statistics of summed or joined calls may stray from the combined tensor's
    through rounding alone, as an absolute bound on the numerator of ``_rel_lower_bound``.

    Statistics do not combine exactly: the norm of a sum is only bracketed by the calls' norms;
    the sum itself rounds in the stored dtype (at most (calls - 1) x eps/2 x the sum of the
    calls' norms); each call's norm and mean were computed in float32 or float64 with an error
    growing like log2(numel), and are recombined in float64. The allowance, in units of the sum
    of both runs' calls' norms, is 2 x eps x calls (4x the sum's bound) + ROUNDING_ULPS x
    eps_stats x (calls + log2(numel)): about 5e-5 of the norm for a float32 .grad of 2,000
    elements vs the sum of 2 calls, so no rounding reads as a difference while real bugs (1e-3
    and more) still do.
    """
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        calls = (a.count + b.count).astype(np.float64)
        log_n = np.log2(np.maximum(np.maximum(a.numel, b.numel), 2))
        unit = 2 * eps * calls + ROUNDING_ULPS * eps_stats * (calls + log_n)
        scale = np.where(np.isfinite(a.norm_parts), a.norm_parts, 0.0) + np.where(
            np.isfinite(b.norm_parts), b.norm_parts, 0.0
        )
        return unit * scale


#: kinds whose absence means zero: PyTorch leaves .grad None (autograd.grad returns None with
#: allow_unused) where the gradient is zero because the parameter was not reached
ZERO_WHEN_ABSENT = ("grad", "autograd_grad")


def _all_zero(s: Side) -> np.ndarray:
    return s.present & (s.max == 0) & (s.min == 0) & (s.nan == 0) & (s.inf == 0)


#: Kinds named after a module output (``module:path`` when the module returns several).
OUTPUT_KINDS = ("activation", "grad_output")


@dataclass
class OutputSlots:
    """Per slot, for the one-sided output readings below (computed once per alignment)."""

    group: np.ndarray  # module of a ``module:path`` output record (index), -1 otherwise
    activation: np.ndarray  # the slot is an activation
    stateless: np.ndarray  # an output (or output gradient) of a stateless module


def output_slots(al: Alignment) -> OutputSlots:
    """The slots' modules and kinds for :func:`extra_outputs` and :func:`one_sided_stateless`."""
    n = max(len(al.slots), 1)
    groups: dict[str, int] = {}
    group = np.full(n, -1, np.int64)
    activation = np.zeros(n, bool)
    stateless = np.zeros(n, bool)
    free = stateless_modules(al)
    for s in al.slots:
        activation[s.index] = s.kind == "activation"
        if s.kind in OUTPUT_KINDS:
            module = s.name.split(":", 1)[0]
            stateless[s.index] = module in free
            if ":" in s.name:
                group[s.index] = groups.setdefault(module, len(groups))
    return OutputSlots(group, activation, stateless)


def extra_outputs(outs: OutputSlots, c: Cells) -> np.ndarray:
    """Cells of a module output recorded in one run only while another output of the same
    module is recorded in both (at that step): one run's module returns an extra value
    (eager attention's weights, a ``past_key_values`` entry) that the other returns as None.

    Such a cell is an interface difference, not a computation one: every value that the extra
    output feeds is itself recorded and compared.
    """
    if not len(c):
        return np.zeros(0, bool)
    g = outs.group[c.slot]
    one_sided = (g >= 0) & np.isin(c.code, (MISSING_A, MISSING_B))
    if not one_sided.any():
        return one_sided
    both = (g >= 0) & outs.activation[c.slot] & c.a.present & c.b.present
    key = c.step.astype(np.int64) * (int(outs.group.max()) + 2) + g
    return one_sided & np.isin(key, key[both])


#: Kinds that hold a module's state: a module owning none of them is stateless.
STATE_KINDS = ("param", "buffer", "buffer_start", "grad", "autograd_grad")


def stateless_modules(al: Alignment) -> set[str]:
    """Modules named by output records that own no parameter or buffer record (nor do their
    submodules), in either run: an activation, a dropout, a reshape written as a module."""
    named = {s.name.split(":", 1)[0] for s in al.slots if s.kind in OUTPUT_KINDS}
    owners = set()
    for s in al.slots:
        if s.kind in STATE_KINDS and "." in s.name:
            parts = s.name.split(".")[:-1]
            owners.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {m for m in named if m not in owners and m != "(root)"}


def one_sided_stateless(outs: OutputSlots, c: Cells) -> np.ndarray:
    """Cells of a stateless module's output (or output gradient) recorded in one run only: an
    op written as a module in one run and as a function (``F.relu``) in the other. Not a
    difference in itself: a module holding no state changes training only through the values
    it feeds, and those are recorded and compared downstream."""
    if not len(c):
        return np.zeros(0, bool)
    return outs.stateless[c.slot] & np.isin(c.code, (MISSING_A, MISSING_B))


def none_vs_zero(al: Alignment, slot: np.ndarray, a: Side, b: Side) -> np.ndarray:
    """Cells of gradient kinds absent (None) in one run and all zeros in the other."""
    grads = np.array([s.kind in ZERO_WHEN_ABSENT for s in al.slots] or [False])[slot]
    return grads & ((~a.present & _all_zero(b)) | (~b.present & _all_zero(a)))


def classify(
    run_a: Run,
    run_b: Run,
    al: Alignment,
    dtypes: DtypeTable,
    steps: np.ndarray,
    entries_a: np.ndarray | None = None,
    entries_b: np.ndarray | None = None,
) -> Cells:
    """Cells of the given (sorted) steps, ordered by step, then causal order within the step."""
    n_slots = max(len(al.slots), 1)
    lo, hi = int(steps[0]), int(steps[-1])
    ea = run_a.entries(lo, hi) if entries_a is None else entries_a
    eb = run_b.entries(lo, hi) if entries_b is None else entries_b
    ea = ea[np.isin(ea["step"], steps)]
    eb = eb[np.isin(eb["step"], steps)]
    ka, agg_a = _aggregate(ea, al.map_a, dtypes.of_a, dtypes.itemsize, n_slots)
    kb, agg_b = _aggregate(eb, al.map_b, dtypes.of_b, dtypes.itemsize, n_slots)
    union = np.union1d(ka, kb)
    a, b = _expand(ka, agg_a, union), _expand(kb, agg_b, union)
    step, slot = union // n_slots, union % n_slots
    ranks = np.array([s.rank for s in al.slots] or [0], np.int64)
    rank = ranks[slot]
    both = a.present & b.present
    shape_eq = (a.ndim == b.ndim) & np.all(a.shape == b.shape, axis=1)
    dtype_eq = (a.dtype == b.dtype) & (a.dtype >= 0)
    same = shape_eq & dtype_eq & (a.numel == b.numel)
    eq_parts = same & (a.count == b.count) & (a.parts_hash == b.parts_hash)
    eq_fp = same & (a.fp_level >= 1) & (b.fp_level >= 1) & (a.fp_sum == b.fp_sum)
    eq_fp &= ~((a.fp_level == 2) & (b.fp_level == 2)) | (a.fp_pos == b.fp_pos)
    equal = both & (eq_parts | eq_fp)
    summed = a.merged_sum | b.merged_sum
    nonfinite = np.where(
        summed,
        ((a.nan > 0) != (b.nan > 0)) | ((a.inf > 0) != (b.inf > 0)),
        (a.nan != b.nan) | (a.inf != b.inf),
    )
    code = np.full(len(union), EQUAL, np.int8)
    diff = both & ~equal
    code[diff & a.values & b.values] = DIFF
    code[diff & ~(a.values & b.values)] = STATS
    code[diff & nonfinite] = NONFINITE
    code[diff & ~shape_eq] = SHAPE
    code[~a.present] = MISSING_A
    code[~b.present] = MISSING_B
    # A gradient that is None in one run and all zeros in the other is the same gradient
    # (zero_grad(set_to_none=True) vs False on a parameter unused at that step): equal.
    code[none_vs_zero(al, slot, a, b)] = EQUAL
    floor = noise_floor(step, rank, a, b, dtypes.floor)
    # Calls summed or joined without full values on both sides: their statistics are compared
    # within a rounding allowance, and only the fingerprints of joined aligned calls are exact.
    loose = diff & ((a.count > 1) | (b.count > 1)) & ~(a.values & b.values)
    dt = np.where(a.dtype >= 0, a.dtype, b.dtype)
    known = dt >= 0  # mixed dtypes among the calls: float32's roundoff
    eps = np.where(known, dtypes.eps[np.clip(dt, 0, None)], eps_of("float32"))
    eps_stats = np.where(known, dtypes.eps_stats[np.clip(dt, 0, None)], eps_of("float32"))
    slack = np.where(loose, derived_slack(a, b, eps, eps_stats), 0.0)
    rel = np.where(diff & shape_eq, _rel_lower_bound(a, b, floor, slack), 0.0)
    # fp_sum is additive over 8-byte aligned calls: different sums prove different bytes
    sums_differ = same & (a.fp_level >= 1) & (b.fp_level >= 1) & (a.fp_sum != b.fp_sum)
    proven = (code != EQUAL) & (
        (code != DIFF) & (code != STATS) | ((a.fp_level == 2) & (b.fp_level == 2)) | sums_differ
    )
    seq = np.where(a.present, a.seq, b.seq)
    order = np.lexsort((slot, seq, rank, step))
    take = lambda x: x[order]  # noqa: E731
    side = lambda s: Side(**{k: take(getattr(s, k)) for k in Side.__dataclass_fields__})  # noqa: E731
    return Cells(
        step=take(step),
        slot=take(slot),
        rank=take(rank),
        code=take(code),
        rel_lb=take(rel),
        floor=take(floor),
        dtype_diff=take(both & ~dtype_eq),
        proven=take(proven),
        loose=take(loose),
        a=side(a),
        b=side(b),
    )

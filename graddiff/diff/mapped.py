"""Write run B again under A's names and steps: the mapping stage before pairing.

Input: run B, a NameMap (namemap.py), a step offset and window (stepalign.py). Output: a trace
file in the same format whose records carry A's names (values transposed, reshaped, split or
joined as the rules say; statistics combined where the values were not stored) and whose step
numbers are A's. The differ then pairs it with A unchanged. Costs one pass over B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import h5py
import numpy as np

from ..entries import EntryData, array_stats
from ..format import FLAG_NDIM_CLIPPED, FLAG_VALUES, fingerprint_bytes, storage_dtype
from ..reader import RecordKey, Run
from ..writer import TraceWriter
from .namemap import OUTPUT_KINDS, MapError, Match, NameMap, Rule
from .optcopy import copy_settings, param_renames
from .reachcopy import copy_reach
from .renamecopy import copy_renamed
from .stepvalues import StepValues


@dataclass
class MappingResult:
    """What the mapping stage did, for the report."""

    path: str
    renamed: int = 0  # B record names changed by a rule
    transformed: int = 0  # B record names whose values a rule transforms
    unmapped_b: list[str] = field(default_factory=list)  # B names no rule touched, absent in A
    notes: list[str] = field(default_factory=list)
    steps_written: int = 0


def _first_shapes(run: Run) -> dict[tuple[str, str], tuple[int, ...]]:
    """(kind, name) -> shape at the first step where the record appears (first call)."""
    out: dict[tuple[str, str], tuple[int, ...]] = {}
    for block in run.iter_step_blocks(64):
        for row in block:
            key = run.record_key(int(row["record"]))
            if (key.kind, key.name) not in out:
                out[(key.kind, key.name)] = tuple(int(s) for s in row["shape"][: int(row["ndim"])])
        if len(out) >= len({(k.kind, k.name) for k in run.keys}):
            break
    return out


def check_map(nm: NameMap, a: Run, b: Run) -> dict[RecordKey, Match]:
    """Resolve every B record; refuse rules that match nothing, or map onto names A lacks."""
    names_a = {(k.kind, k.name) for k in a.keys}
    used: dict[int, int] = {}
    hits: dict[int, set[str]] = {}
    out: dict[RecordKey, Match] = {}
    owner: dict[tuple[str, str, int, int], tuple[str, Optional[Rule]]] = {}
    for key in b.keys:
        m = nm.match(key.kind, key.name)
        out[key] = m
        if m.rule is not None:
            used[m.rule.index] = used.get(m.rule.index, 0) + 1
            if any((key.kind, t) in names_a for t in m.targets):
                hits.setdefault(m.rule.index, set()).add(key.name)
        for t in m.targets:
            slot = (key.kind, t, key.call, m.part)
            prev = owner.get(slot)
            if prev is not None and prev[0] != key.name:
                who = [prev[1].text if prev[1] else f"B's own name '{prev[0]}'"]
                who.append(m.rule.text if m.rule else f"B's own name '{key.name}'")
                raise MapError(
                    f"{nm.origin}: {who[0]} and {who[1]} both map onto {key.kind} '{t}' "
                    f"(from '{prev[0]}' and '{key.name}'; overlapping rules)"
                )
            owner[slot] = (key.name, m.rule)
    for rule in nm.rules:
        if rule.index not in used:
            in_a = any(p.fullmatch(k.name) for p in rule._compiled[0] for k in a.keys)
            hint = (
                "; it matches names of A: rules map B's names (left) to A's (right)"
                if in_a
                else f"; B's names include {_sample(b)}"
            )
            raise MapError(f"{nm.origin}: {rule.text} matches no record of B ({b.path}){hint}")
        if rule.index not in hits:
            raise MapError(
                f"{nm.origin}: {rule.text} maps onto names that A ({a.path}) does not record; "
                f"A's names include {_sample(a)}"
            )
    return out


def _sample(run: Run) -> str:
    names = run.names()
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


def _encode(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Decoded values back to their stored bytes' dtype (bfloat16: the top 16 bits, exact)."""
    if dtype == "bfloat16":
        return np.ascontiguousarray((arr.astype(np.float32).view(np.uint32) >> 16).astype("<u2"))
    return np.ascontiguousarray(arr.astype(storage_dtype(dtype), copy=False))


def _entry(kind, name, call, dtype, arr, seq, flags) -> EntryData:
    raw = _encode(arr, dtype)
    return EntryData(
        kind=kind,
        name=name,
        call=call,
        dtype=dtype,
        shape=tuple(arr.shape),
        stats=array_stats(arr),
        fingerprint=fingerprint_bytes(raw),
        values=raw,
        flags=flags,
        seq=seq,
    )


def _row_stats(row) -> tuple:
    return (
        float(row["norm"]),
        float(row["mean"]),
        float(row["min"]),
        float(row["max"]),
        int(row["nan"]),
        int(row["inf"]),
    )


class _Mapper:
    def __init__(self, nm, a_shapes, b: Run, matches) -> None:
        self.nm, self.a_shapes, self.b, self.matches = nm, a_shapes, b, matches
        self.sv = StepValues(b)
        self.checked: set[tuple[int, str, str]] = set()
        self.stats_only_transforms: set[str] = set()

    def values(self, row) -> Optional[np.ndarray]:
        if not int(row["flags"]) & FLAG_VALUES:
            return None
        return self.sv.get(row)

    def raw(self, row, dtype) -> Optional[np.ndarray]:
        if not int(row["flags"]) & FLAG_VALUES:
            return None
        got = self.sv.raw(int(row["step"]), int(row["offset"]), int(row["nbytes"]))
        return got if got is not None else _encode(self.b.values_of(row), dtype)

    def fail(self, rule: Rule, kind: str, name: str, problem: str) -> MapError:
        return MapError(f"{self.nm.origin}: {rule.text}: {kind} '{name}' {problem}")

    def out_shape(self, rule: Rule, kind: str, name: str, shape: tuple[int, ...], target: str):
        """Shape after a transpose/reshape, checked against A's."""
        if rule.transpose is not None:
            perm = rule.transpose or tuple(range(len(shape) - 2)) + (
                len(shape) - 1,
                len(shape) - 2,
            )
            if len(shape) < 2 or len(perm) != len(shape):
                raise self.fail(
                    rule, kind, name, f"has shape {shape}: transpose {list(perm)} does not fit"
                )
            new = tuple(shape[p] for p in perm)
            what = "transpose"
        else:
            assert rule.reshape is not None
            if math.prod(rule.reshape) != math.prod(shape):
                raise self.fail(
                    rule, kind, name, f"has shape {shape}: cannot reshape to {list(rule.reshape)}"
                )
            new, what = tuple(rule.reshape), "reshape"
            perm = ()
        want = self.a_shapes.get((kind, target))
        if want is not None and kind not in OUTPUT_KINDS and want != new:
            raise self.fail(
                rule,
                kind,
                name,
                f"has shape {shape}, {new} after {what}, but A's '{target}' is {want}",
            )
        return new, perm

    def split_sizes(self, rule: Rule, kind: str, name: str, shape, targets) -> list[int]:
        dim = rule.dim_for(kind)
        if not -len(shape) <= dim < len(shape):
            raise self.fail(rule, kind, name, f"has shape {shape}: no dim {dim} to split")
        total = shape[dim]
        wants = [self.a_shapes.get((kind, t)) for t in targets]
        if all(w is not None and len(w) == len(shape) for w in wants):
            sizes = [w[dim] for w in wants]  # type: ignore[index]
            if sum(sizes) != total:
                raise self.fail(
                    rule,
                    kind,
                    name,
                    f"has {total} along dim {dim}, but A's parts have {'+'.join(map(str, sizes))}",
                )
            return sizes
        if total % len(targets):
            raise self.fail(
                rule,
                kind,
                name,
                f"has {total} along dim {dim}: not divisible into {len(targets)} parts",
            )
        return [total // len(targets)] * len(targets)

    def step(self, rows: np.ndarray) -> Optional[list[EntryData]]:
        """B's entries of one step under A's names; None when a split lacks values."""
        self.sv.prefetch(rows)
        out: list[EntryData] = []
        joins: dict[tuple[str, str, int], list] = {}
        for row in rows:
            rid = int(row["record"])
            key, dtype = self.b.record_key(rid), self.b.record_dtype(rid)
            m = self.matches.get(key) or self.nm.match(key.kind, key.name)
            rule, seq = m.rule, int(row["seq"])
            flags = int(row["flags"]) & ~FLAG_VALUES
            shape = tuple(int(s) for s in row["shape"][: int(row["ndim"])])
            if rule is not None and rule.transforms and flags & FLAG_NDIM_CLIPPED:
                raise self.fail(rule, key.kind, key.name, "has more than 8 dims (stored flattened)")
            if rule is None or not rule.transforms:
                out.append(
                    EntryData(
                        key.kind,
                        m.targets[0],
                        key.call,
                        dtype,
                        shape,
                        _row_stats(row),
                        (int(row["fp_sum"]), int(row["fp_pos"])),
                        self.raw(row, dtype),
                        flags,
                        seq,
                    )
                )
            elif rule.join:
                joins.setdefault((key.kind, m.targets[0], key.call), []).append(
                    (m.part, row, key, dtype)
                )
            elif rule.split:
                sizes = self.split_sizes(rule, key.kind, key.name, shape, m.targets)
                arr = self.values(row)
                if arr is None:
                    self.stats_only_transforms.add(rule.text)
                    return None
                dim = rule.dim_for(key.kind)
                cuts = np.cumsum(sizes)[:-1]
                for t, part in zip(m.targets, np.split(arr, cuts, axis=dim)):
                    out.append(_entry(key.kind, t, key.call, dtype, part, seq, flags))
            else:
                new, perm = self.out_shape(rule, key.kind, key.name, shape, m.targets[0])
                arr = self.values(row)
                if arr is None:  # statistics survive a transpose/reshape; fingerprints do not
                    self.stats_only_transforms.add(rule.text)
                    out.append(
                        EntryData(
                            key.kind,
                            m.targets[0],
                            key.call,
                            dtype,
                            new,
                            _row_stats(row),
                            (int(row["fp_sum"]), int(row["fp_pos"])),
                            None,
                            flags,
                            seq,
                        )
                    )
                    continue
                arr = np.transpose(arr, perm) if rule.transpose is not None else arr.reshape(new)
                out.append(_entry(key.kind, m.targets[0], key.call, dtype, arr, seq, flags))
        for (kind, target, call), parts in joins.items():
            out.append(self.join(kind, target, call, parts))
        return out

    def join(self, kind, target, call, parts) -> EntryData:
        parts.sort(key=lambda p: p[0])
        rule = self.matches[parts[0][2]].rule
        assert rule is not None
        if [p[0] for p in parts] != list(range(len(rule.sources))):
            names = ", ".join(p[2].name for p in parts)
            raise self.fail(
                rule, kind, target, f"gets only {names} of its {len(rule.sources)} parts"
            )
        dim = rule.dim_for(kind)
        shapes = [tuple(int(s) for s in r["shape"][: int(r["ndim"])]) for _, r, _, _ in parts]
        base = shapes[0]
        ok = all(
            len(s) == len(base)
            and -len(s) <= dim < len(s)
            and all(x == y for i, (x, y) in enumerate(zip(s, base)) if i != dim % len(s))
            for s in shapes
        )
        if not ok:
            raise self.fail(
                rule, kind, target, f"cannot join parts of shapes {shapes} along dim {dim}"
            )
        new = list(base)
        new[dim] = sum(s[dim] for s in shapes)
        want = self.a_shapes.get((kind, target))
        if want is not None and kind not in OUTPUT_KINDS and tuple(new) != want:
            raise self.fail(rule, kind, target, f"joins to {tuple(new)}, but A's is {want}")
        dtype, seq = parts[0][3], int(parts[0][1]["seq"])
        flags = int(parts[0][1]["flags"]) & ~FLAG_VALUES
        arrs = [self.values(r) for _, r, _, _ in parts]
        if all(a is not None for a in arrs):
            return _entry(kind, target, call, dtype, np.concatenate(arrs, axis=dim), seq, flags)
        # statistics of a concatenation follow from its parts' (not its fingerprint)
        self.stats_only_transforms.add(rule.text)
        rows = [r for _, r, _, _ in parts]
        numel = np.array([max(int(r["numel"]), 1) for r in rows], np.float64)
        stats = (
            float(np.sqrt(sum(float(r["norm"]) ** 2 for r in rows))),
            float(sum(float(r["mean"]) * n for r, n in zip(rows, numel)) / numel.sum()),
            float(np.nanmin([float(r["min"]) for r in rows])),
            float(np.nanmax([float(r["max"]) for r in rows])),
            sum(int(r["nan"]) for r in rows),
            sum(int(r["inf"]) for r in rows),
        )
        fp = (
            sum(int(r["fp_sum"]) for r in rows) % 2**64,
            sum(int(r["fp_pos"]) * (i + 1) for i, r in enumerate(rows)) % 2**64,
        )
        return EntryData(kind, target, call, dtype, tuple(new), stats, fp, None, flags, seq)


def write_mapped(
    a: Run,
    b: Run,
    nm: Optional[NameMap],
    path: str,
    offset: int = 0,
    window_b: Optional[tuple[Optional[int], Optional[int]]] = None,
) -> MappingResult:
    """Write B under A's names (``nm``) with its steps shifted by ``offset`` into ``path``."""
    matches = check_map(nm, a, b) if nm is not None else {}
    ident = NameMap([], "identity")
    mapper = _Mapper(nm or ident, _first_shapes(a) if nm is not None else {}, b, matches)
    res = MappingResult(path)
    if nm is not None:
        names_a = {(k.kind, k.name) for k in a.keys}
        seen: set[tuple[str, str]] = set()
        for key, m in matches.items():
            if (key.kind, key.name) in seen:
                continue
            seen.add((key.kind, key.name))
            if m.rule is None:
                if (key.kind, key.name) not in names_a:
                    res.unmapped_b.append(f"{key.kind} {key.name}")
            else:
                res.renamed += 1
                res.transformed += int(m.rule.transforms)
    options = dict(b.options)
    options["mapped_from"] = {"path": b.path, "offset": offset, "map": nm.origin if nm else None}
    if not any(m.rule is not None and m.rule.transforms for m in matches.values()):
        res.steps_written = copy_renamed(b, matches, path, offset, window_b, options)
        return res
    w = TraceWriter(path, b.environment, options, ballast=False)
    dropped = 0
    try:
        w.set_attr("values_note", b.values_note)
        lo, hi = window_b if window_b is not None else (None, None)
        for block in b.iter_step_blocks(16):
            if not len(block):
                continue
            for s in np.unique(block["step"]):
                s = int(s)
                if (lo is not None and s < lo) or (hi is not None and s > hi):
                    continue
                entries = mapper.step(block[block["step"] == s])
                if entries is None:
                    dropped += 1
                    continue
                w.write_step(s + offset, entries)
                res.steps_written += 1
    finally:
        mapper.sv.close()
        w.close(b.status)
    rename = param_renames(matches)
    with h5py.File(path, "r+") as f:
        copy_settings(b, f, offset, rename)
        copy_reach(b, f, offset, rename)
    if dropped:
        res.notes.append(
            f"{dropped} step(s) of B not compared: {', '.join(sorted(mapper.stats_only_transforms))} "
            f"splits a record whose values were not stored (statistics only); re-record B with "
            f"values='full' or full_steps=[...]"
        )
    elif mapper.stats_only_transforms:
        res.notes.append(
            f"{', '.join(sorted(mapper.stats_only_transforms))}: values not stored at some steps; "
            f"those records are judged on transformed statistics, whose fingerprints cannot follow"
        )
    return res


def describe(res: MappingResult, nm: Optional[NameMap]) -> str:
    """One line for the report's notes."""
    if nm is None:
        return ""
    return (
        f"B's names mapped onto A's by {nm.origin}: {len(nm)} rule(s), {res.renamed} record "
        f"name(s) renamed ({res.transformed} transformed)"
    )


__all__ = ["MappingResult", "check_map", "describe", "drop_unpaired", "write_mapped"]


def drop_unpaired(al):
    """The alignment without slots that one run lacks: with a map they are listed, not compared."""
    import dataclasses

    from .align import Alignment, RunMap

    keep = [s for s in al.slots if s.keys_a and s.keys_b]
    new_index = np.full(len(al.slots) + 1, -1, np.int64)
    for i, s in enumerate(keep):
        new_index[s.index] = i
    slots = [dataclasses.replace(s, index=i) for i, s in enumerate(keep)]

    def remap(rm: RunMap, which: str) -> RunMap:
        slot_of = np.where(rm.slot_of >= 0, new_index[rm.slot_of], -1)
        modes = np.array([s.mode_a if which == "a" else s.mode_b for s in slots] or [0], np.int64)
        return RunMap(slot_of, rm.part_of, modes)

    return Alignment(
        slots,
        remap(al.map_a, "a"),
        remap(al.map_b, "b"),
        al.only_a,
        al.only_b,
        al.notes,
        al.kinds,
    )

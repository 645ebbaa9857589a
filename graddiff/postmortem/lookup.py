"""Find records in a run by kind, name pattern and call, with one-line errors that hint.

Data flow: user's ``--step/--kind/--name/--call`` --> :func:`resolve` --> record keys -->
:func:`describe_record` (lines of text) for ``graddiff inspect``. Name patterns are fnmatch
globs (``fc*.weight``); a plain name matches itself only.
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Optional

import numpy as np

from ..errors import GraddiffError
from ..kinds import ALL_KINDS
from ..modclass import with_class
from ..reader import RecordKey, Run
from .series import Series, collect_series
from .summary import describe_ranges

_GLOB = set("*?[")


def _near(word: str, choices: list[str], n: int = 3) -> list[str]:
    near = difflib.get_close_matches(word, choices, n=n, cutoff=0.5)
    if not near:  # a substring is a hint too: "weight" -> "fc1.weight"
        near = [c for c in choices if word.strip("*?") and word.strip("*?") in c][:n]
    return near


def check_kind(run: Run, kind: Optional[str]) -> Optional[str]:
    """The kind, validated against the vocabulary and the run."""
    if kind is None:
        return None
    if kind not in ALL_KINDS:
        near = _near(kind, list(ALL_KINDS))
        hint = f"did you mean {near[0]}? " if near else ""
        raise GraddiffError(f"unknown kind {kind!r}; {hint}(kinds: {', '.join(ALL_KINDS)})")
    if kind not in run.kinds:
        raise GraddiffError(
            f"{run.path}: no {kind} records (it has {', '.join(run.kinds) or 'none'}); "
            f"record them with graddiff.trace(..., kinds=...)"
        )
    return kind


def resolve(
    run: Run, kind: Optional[str], pattern: Optional[str], call: Optional[int] = None
) -> list[RecordKey]:
    """Record keys matching kind, name glob and call, in causal order; never empty."""
    kind = check_kind(run, kind)
    keys = [k for k in run.keys if kind is None or k.kind == kind]
    if pattern is not None:
        glob = bool(_GLOB & set(pattern))
        keys = [
            k for k in keys if (fnmatch.fnmatchcase(k.name, pattern) if glob else k.name == pattern)
        ]
        if not keys:
            names = run.names(kind)
            near = _near(pattern, names)
            what = f"{kind} record" if kind else "record"
            hint = f"did you mean {', '.join(near)}? " if near else ""
            raise GraddiffError(
                f"{run.path}: no {what} named {pattern!r}; {hint}"
                f"(list them: graddiff inspect {run.path} --list{' --kind ' + kind if kind else ''})"
            )
    if call is not None:
        calls = sorted({k.call for k in keys})
        keys = [k for k in keys if k.call == call]
        if not keys:
            raise GraddiffError(
                f"{run.path}: no call {call} of {pattern or kind or 'these records'} "
                f"(calls: {', '.join(map(str, calls))})"
            )
    return keys


def check_step(run: Run, step: Optional[int]) -> int:
    """The step, validated; the first complete step when None."""
    steps = [int(s) for s in run.steps]
    if not steps:
        raise GraddiffError(f"{run.path}: no complete step recorded")
    if step is None:
        return steps[0]
    if step not in steps:
        raise GraddiffError(
            f"{run.path}: step {step} is not a complete step (steps {describe_ranges(steps)})"
        )
    return step


def list_records(run: Run, keys: list[RecordKey]) -> list[dict[str, Any]]:
    """One dict per key: kind, name, call, dtype, last shape, steps recorded."""
    series = collect_series(run, kinds={k.kind for k in keys})
    out = []
    for k in keys:
        s: Optional[Series] = series.get(k)
        if s is None:
            continue
        last = s.rows[-1]
        out.append(
            {
                "kind": k.kind,
                "name": k.name,
                "module_class": run.module_class(k.kind, k.name),
                "call": k.call,
                "dtype": run.record_dtype(int(last["record"])),
                "shape": [int(x) for x in last["shape"][: int(last["ndim"])]],
                "steps": len(s.rows),
                "values_steps": int(s.has_values.sum()),
            }
        )
    return out


def format_listing(rows: list[dict[str, Any]]) -> list[str]:
    names = [with_class(r["name"], r.get("module_class")) for r in rows]
    width = max([len(n) for n in names] + [4])
    lines = [f"{'kind':<14}{'name':<{width}}  call  {'shape':<18}{'dtype':<10}steps  values"]
    for r, name in zip(rows, names):
        shape = "(" + ", ".join(map(str, r["shape"])) + ("," if len(r["shape"]) == 1 else "") + ")"
        lines.append(
            f"{r['kind']:<14}{name:<{width}}  {r['call']:>4}  {shape:<18}{r['dtype']:<10}"
            f"{r['steps']:>5}  {r['values_steps']:>6}"
        )
    return lines


def record_at(run: Run, key: RecordKey, step: int) -> dict[str, Any]:
    """Stats of ``key`` at ``step``, or a one-line error saying where it was recorded."""
    try:
        st = run.stats(key.kind, key.name, step, key.call)
    except KeyError:
        s = collect_series(run, kinds=[key.kind]).get(key)
        where = describe_ranges([int(x) for x in s.steps]) if s is not None else "none"
        raise GraddiffError(
            f"{run.path}: {key} was not recorded at step {step} (recorded at steps {where})"
        ) from None
    cls = run.module_class(key.kind, key.name)
    return dict(kind=key.kind, name=key.name, module_class=cls, call=key.call, **st)


def format_record(
    st: dict[str, Any], values: Optional[np.ndarray] = None, threshold: int = 200
) -> list[str]:
    """The text of one record for ``graddiff inspect``."""
    call = f" (call {st['call']})" if st["call"] else ""
    shape = "(" + ", ".join(map(str, st["shape"])) + ("," if len(st["shape"]) == 1 else "") + ")"
    lines = [
        f"{st['kind']} {with_class(st['name'], st.get('module_class'))}{call} at step {st['step']}",
        f"  shape        {shape}  {st['dtype']}  {st['numel']} values",
        f"  fingerprint  {st['fingerprint']}",
        f"  norm {st['norm']:.6g}  mean {st['mean']:.6g}  min {st['min']:.6g}  max {st['max']:.6g}",
        f"  nan {st['nan']}  inf {st['inf']}",
        f"  values       {'stored' if st['values_stored'] else 'statistics only'}",
    ]
    if values is not None:
        text = np.array2string(
            np.asarray(values), threshold=threshold, edgeitems=3, max_line_width=100, precision=6
        )
        lines += ["    " + line for line in text.splitlines()]
    return lines

"""The optimizer settings of a run over its steps, rebuilt from ``/optimizer``'s change rows.

Data flow: HDF5 ``/optimizer`` (``graddiff.format``) --> :class:`OptimizerSettings` (here,
via ``Run.optimizer_settings``) --> ``compare``'s diagnoses, ``graddiff show``, users. The
settings at step ``s`` are those the step pre-hook saw right before the update of step ``s``
(they made the parameters of step ``s + 1``). Never imports torch.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

#: Entries that say how the update is computed, not what it computes: never a cause.
IMPLEMENTATION_KEYS = frozenset(
    {"foreach", "fused", "capturable", "differentiable", "decoupled_weight_decay_impl"}
)


class SettingsError(ValueError):
    """A malformed ``/optimizer`` row (the reader turns it into a TraceFileError)."""


@dataclass(frozen=True)
class GroupSettings:
    """One param group at one step."""

    index: int
    hyper: dict[str, Any]  # name -> number, bool, string, None or list of those
    params: tuple[str, ...]  # record names of the traced parameters in the group
    untraced: int = 0  # parameters of the group that are not traced
    state_step: Optional[int] = None  # the first parameter's state step count (None: not read)
    # per parameter, when they differ (0: no state yet; such a count does not advance)
    state_steps: dict[str, int] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.hyper.get(key, default)


@dataclass(frozen=True)
class StateFingerprint:
    """The optimizer state's fingerprint where it was last taken: at the optimizer's first
    step (``how`` "first": the state it starts from, loaded before it when not empty) or at
    the first step after ``load_state_dict`` ("load")."""

    step: int
    how: str  # "first" or "load"
    fp: Optional[str]  # hex; None: the state was empty
    changed: Optional[bool] = None  # "load": the loads changed the state (None: not known)
    count: int = 0  # "load": load_state_dict calls since the step before


@dataclass(frozen=True)
class OptimizerAt:
    """One optimizer's settings at one step."""

    index: int
    class_name: str  # qualified: torch.optim.adamw.AdamW
    groups: tuple[GroupSettings, ...]
    notes: tuple[str, ...] = ()
    since: int = 0  # the step of the last change applied
    state_entries: Optional[int] = None  # len(optimizer.state) (None: an older trace)
    born: int = 0  # the step of its first row: the first update it made in the trace
    state_fp: Optional[StateFingerprint] = None  # None: not recorded (older trace) or unread

    @property
    def short_class(self) -> str:
        return self.class_name.rsplit(".", 1)[-1]

    def group_of(self, name: str) -> Optional[GroupSettings]:
        for g in self.groups:
            if name in g.params:
                return g
        return None


def _num(v: Any, what: str) -> Optional[int]:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise SettingsError(f"{what} is not a count")
    return int(v)


def _hex(v: Any, what: str) -> Optional[str]:
    if v is None:
        return None
    if not isinstance(v, str) or not v or len(v) > 128:
        raise SettingsError(f"{what} is not a fingerprint")
    return v


def _gidx(k: Any, n: int, what: str) -> int:
    try:
        i = int(k)
    except (TypeError, ValueError):
        raise SettingsError(f"{what}: bad group index {k!r}") from None
    if not 0 <= i < n:
        raise SettingsError(f"{what}: group {i} out of range")
    return i


class _Live:
    """An optimizer's settings while the rows are applied."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.class_name = "?"
        self.hyper: list[dict[str, Any]] = []
        self.params: list[tuple[str, ...]] = []
        self.untraced: list[int] = []
        self.count: list[tuple[Optional[int], int]] = []  # (count, at step)
        self.per: list[tuple[dict[str, int], int]] = []  # (counts, at step)
        self.notes: tuple[str, ...] = ()
        self.since = 0
        self.entries: Optional[int] = None
        self.born: Optional[int] = None
        self.fp: Optional[StateFingerprint] = None

    def resize(self, n: int) -> None:
        self.hyper = [{} for _ in range(n)]
        self.params = [() for _ in range(n)]
        self.untraced = [0] * n
        self.count = [(None, 0)] * n
        self.per = [({}, 0) for _ in range(n)]

    def apply(self, step: int, ch: dict[str, Any]) -> None:
        if "class" in ch:
            if not isinstance(ch["class"], str):
                raise SettingsError("class is not a string")
            self.class_name = ch["class"]
        if "groups" in ch:
            n = _num(ch["groups"], "groups")
            if n is None or not 0 <= n <= 100_000:
                raise SettingsError("bad number of groups")
            self.resize(n)
        n = len(self.hyper)
        for key in ("hyper", "removed", "params", "untraced", "state_step", "state_steps"):
            part = ch.get(key)
            if part is None:
                continue
            if not isinstance(part, dict):
                raise SettingsError(f"{key} is not an object")
            for k, v in part.items():
                gi = _gidx(k, n, key)
                if key == "hyper":
                    if not isinstance(v, dict):
                        raise SettingsError("hyper of a group is not an object")
                    self.hyper[gi] = {**self.hyper[gi], **{str(a): b for a, b in v.items()}}
                elif key == "removed":
                    if not isinstance(v, list):
                        raise SettingsError("removed of a group is not a list")
                    self.hyper[gi] = {a: b for a, b in self.hyper[gi].items() if a not in v}
                elif key == "params":
                    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                        raise SettingsError("params of a group is not a list of names")
                    self.params[gi] = tuple(v)
                elif key == "untraced":
                    self.untraced[gi] = _num(v, "untraced") or 0
                elif key == "state_step":
                    self.count[gi] = (_num(v, "state_step"), step)
                    self.per[gi] = ({}, step)  # a state_steps entry that follows overrides
                else:
                    if not isinstance(v, dict):
                        raise SettingsError("state_steps of a group is not an object")
                    self.per[gi] = (
                        {
                            str(a): c
                            for a, b in v.items()
                            if (c := _num(b, "state_steps")) is not None
                        },
                        step,
                    )
        if "state_entries" in ch:
            self.entries = _num(ch["state_entries"], "state_entries")
        first = self.born is None
        if first:
            self.born = step
        if "state_fp" in ch:
            self.fp = StateFingerprint(step, "first", _hex(ch["state_fp"], "state_fp"))
        elif first and self.entries == 0:
            self.fp = StateFingerprint(step, "first", None)  # it starts from empty state
        loaded = ch.get("loaded")
        if loaded is not None:
            if not isinstance(loaded, dict):
                raise SettingsError("loaded is not an object")
            changed = loaded.get("changed")
            if changed is not None and not isinstance(changed, bool):
                raise SettingsError("loaded.changed is not a boolean")
            count = _num(loaded.get("count"), "loaded.count") or 1
            self.fp = (
                StateFingerprint(step, "load", _hex(loaded["fp"], "loaded.fp"), changed, count)
                if "fp" in loaded
                else None  # loaded, fingerprint not taken: nothing known about the state
            )
        notes = ch.get("notes")
        if notes is not None:
            if not isinstance(notes, list):
                raise SettingsError("notes is not a list")
            self.notes = tuple(str(x) for x in notes)
        self.since = step

    def at(self, step: int) -> OptimizerAt:
        groups = []
        for gi in range(len(self.hyper)):
            count, at = self.count[gi]
            per, per_at = self.per[gi]
            groups.append(
                GroupSettings(
                    gi,
                    dict(self.hyper[gi]),
                    self.params[gi],
                    self.untraced[gi],
                    None if count is None else count + step - at,
                    {k: v + step - per_at if v else 0 for k, v in per.items()},
                )
            )
        return OptimizerAt(
            self.index,
            self.class_name,
            tuple(groups),
            self.notes,
            self.since,
            self.entries,
            self.born if self.born is not None else step,
            self.fp,
        )


class OptimizerSettings:
    """A run's optimizer settings over its steps (empty when none were recorded)."""

    def __init__(self, rows: list[tuple[int, str]]) -> None:
        """``rows``: (step, changes JSON) of the committed steps, in step order."""
        self.rows = list(rows)  # as read: (step, changes JSON)
        self._steps: list[int] = []
        self._snaps: list[dict[int, OptimizerAt]] = []
        live: dict[int, _Live] = {}
        for step, text in rows:
            try:
                changes = json.loads(text)
            except (ValueError, RecursionError):
                raise SettingsError(f"the row of step {step} is not JSON") from None
            if not isinstance(changes, list):
                raise SettingsError(f"the row of step {step} is not a list")
            for ch in changes:
                if not isinstance(ch, dict):
                    raise SettingsError(f"the row of step {step} holds a non-object")
                i = _num(ch.get("optimizer"), "optimizer")
                if i is None or i < 0:
                    raise SettingsError(f"the row of step {step} names no optimizer")
                cur = live.get(i)
                if cur is None:
                    cur = live[i] = _Live(i)
                cur.apply(step, ch)
            self._steps.append(step)
            self._snaps.append({i: live[i].at(step) for i in sorted(live)})

    def __bool__(self) -> bool:
        return bool(self._steps)

    @property
    def change_steps(self) -> list[int]:
        """The steps at which some setting changed (rows of ``/optimizer``)."""
        return list(self._steps)

    def at(self, step: int) -> list[OptimizerAt]:
        """Every optimizer's settings as of step ``step`` (the update of that step)."""
        pos = bisect.bisect_right(self._steps, int(step)) - 1
        if pos < 0:
            return []
        snap = self._snaps[pos]
        base = self._steps[pos]
        out = []
        for o in snap.values():
            gone = int(step) - base
            groups = tuple(
                GroupSettings(
                    g.index,
                    g.hyper,
                    g.params,
                    g.untraced,
                    None if g.state_step is None else g.state_step + gone,
                    {k: v + gone if v else 0 for k, v in g.state_steps.items()},
                )
                for g in o.groups
            )
            out.append(
                OptimizerAt(
                    o.index,
                    o.class_name,
                    groups,
                    o.notes,
                    o.since,
                    o.state_entries,
                    o.born,
                    o.state_fp,
                )
            )
        return out

    def for_param(self, step: int, name: str) -> Optional[tuple[OptimizerAt, GroupSettings]]:
        """The optimizer and group that updated parameter ``name`` at ``step`` (the last
        optimizer, in order of first use, whose groups hold it)."""
        hit = None
        for o in self.at(step):
            g = o.group_of(name)
            if g is not None:
                hit = (o, g)
        return hit

    def series(self, key: str, steps: list[int], optimizer: int = 0, group: int = 0) -> list[Any]:
        """``key``'s value at each of ``steps`` (None where unknown)."""
        out = []
        for s in steps:
            opts = {o.index: o for o in self.at(s)}
            o = opts.get(optimizer)
            g = o.groups[group] if o is not None and group < len(o.groups) else None
            out.append(None if g is None else g.hyper.get(key))
        return out

    def changes(self) -> list[tuple[int, list[str]]]:
        """Per change step, one short line per change (what ``graddiff show`` prints)."""
        out: list[tuple[int, list[str]]] = []
        prev: dict[int, OptimizerAt] = {}
        prev_step = 0
        for step, snap in zip(self._steps, self._snaps):
            lines: list[str] = []
            for i, o in snap.items():
                if o.since != step:
                    continue
                lines += describe_change(prev.get(i), o, step - prev_step)
            out.append((step, lines))
            prev, prev_step = snap, step
        return out

    def to_list(self) -> list[dict[str, Any]]:
        """Every change step's settings as plain data (``show --json``)."""
        return [
            {"step": s, "optimizers": [optimizer_dict(o) for o in snap.values() if o.since == s]}
            for s, snap in zip(self._steps, self._snaps)
        ]


def optimizer_dict(o: OptimizerAt) -> dict[str, Any]:
    return {
        "optimizer": o.index,
        "class": o.class_name,
        "groups": [
            {
                "index": g.index,
                "hyper": g.hyper,
                "params": list(g.params),
                "untraced": g.untraced,
                "state_step": g.state_step,
                **({"state_steps": g.state_steps} if g.state_steps else {}),
            }
            for g in o.groups
        ],
        **({"state_entries": o.state_entries} if o.state_entries is not None else {}),
        "first_step": o.born,
        **(
            {
                "state_fingerprint": {
                    "step": o.state_fp.step,
                    "how": o.state_fp.how,
                    "fingerprint": o.state_fp.fp,
                    **({"changed": o.state_fp.changed} if o.state_fp.changed is not None else {}),
                    **({"loads": o.state_fp.count} if o.state_fp.how == "load" else {}),
                }
            }
            if o.state_fp is not None
            else {}
        ),
        "notes": list(o.notes),
    }


def fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list):
        return "(" + ", ".join(fmt_value(x) for x in v) + ")"
    return str(v)


def _hyper_text(h: dict[str, Any]) -> str:
    return " ".join(f"{k}={fmt_value(v)}" for k, v in sorted(h.items()))


def describe_change(old: Optional[OptimizerAt], new: OptimizerAt, gap: int = 0) -> list[str]:
    """Lines naming what differs from ``old``, ``gap`` steps earlier (everything when ``old``
    is None); a state step count is a change when it is not ``gap`` more."""
    head = f"optimizer {new.index} ({new.short_class})"
    if old is None or len(old.groups) != len(new.groups) or old.class_name != new.class_name:
        lines = [f"{head}: {len(new.groups)} param group(s)"]
        for g in new.groups:
            first = new.groups[0].hyper
            own = {k: v for k, v in g.hyper.items() if g.index == 0 or first.get(k) != v}
            same = "" if g.index == 0 else " as group 0 except" if own else " as group 0"
            lines.append(
                f"  group {g.index}: {len(g.params)} traced parameter(s)"
                + (f" (+{g.untraced} untraced)" if g.untraced else "")
                + f",{same} {_hyper_text(own)}".rstrip()
                + (f", state step {g.state_step}" if g.state_step is not None else "")
            )
        if new.state_fp is not None and new.state_fp.fp is not None:
            lines.append(f"  starts from a state it already holds ({_fp_text(new.state_fp)})")
        return lines + [f"  note: {n}" for n in new.notes]
    lines = []
    for go, gn in zip(old.groups, new.groups):
        diff = [
            f"{k} {fmt_value(go.hyper.get(k))} -> {fmt_value(gn.hyper.get(k))}"
            for k in sorted(set(go.hyper) | set(gn.hyper))
            if go.hyper.get(k) != gn.hyper.get(k)
        ]
        if go.params != gn.params:
            diff.append(f"parameters {len(go.params)} -> {len(gn.params)}")
        expect = None if go.state_step is None else go.state_step + gap
        if gn.state_step != expect:
            diff.append(f"state step {gn.state_step} (not {expect})")
        if diff:
            lines.append(f"{head} group {gn.index}: " + ", ".join(diff))
    f = new.state_fp
    if (
        f is not None
        and f.how == "load"
        and f.step != (old.state_fp.step if old.state_fp else None)
    ):
        what = {True: "changed the state", False: "restored the same state"}.get(
            f.changed, "effect not known"
        )
        lines.append(f"{head}: state loaded (load_state_dict x{f.count}: {what}; {_fp_text(f)})")
    if (
        old.state_entries
        and new.state_entries is not None
        and new.state_entries < old.state_entries
    ):
        lines.append(
            f"{head}: state {'emptied' if not new.state_entries else 'shrank'} "
            f"({old.state_entries} -> {new.state_entries} parameter entries)"
        )
    return lines


def _fp_text(f: StateFingerprint) -> str:
    return "empty" if f.fp is None else f"fingerprint {f.fp[:12]}"


__all__ = [
    "IMPLEMENTATION_KEYS",
    "StateFingerprint",
    "GroupSettings",
    "OptimizerAt",
    "OptimizerSettings",
    "SettingsError",
    "describe_change",
    "fmt_value",
    "optimizer_dict",
]

"""The optimizer's settings at each ``optimizer.step()``, recorded as changes only.

The step pre-hook hands every optimizer that updates traced parameters to
:meth:`SettingsWatch.observe` right before its update. What is kept per optimizer: its class
(qualified name), per param group the scalar hyperparameters (``lr``, ``weight_decay``,
``betas``, ``eps``, ``momentum``, ``nesterov``, ``foreach``, ...: every entry that is a number,
bool, string, None or a tuple of those; a one-element tensor such as a tensor ``lr`` as a float
when it is on the CPU, skipped with a note on an accelerator, where reading it would sync), the
traced parameters of the group (record names) and the optimizer state's step count (Adam's
``state[p]['step']``, read off the group's first parameter: 0 when it has no state yet).

Cost: a step compares one tuple per group (``operator.itemgetter``) with the last one seen and
reads one step count per group; only what changed becomes a row (``changes``), so a constant
setting costs nothing to store. The step count is stored when it is not the last stored count
plus the steps since (a reset, a restore, an optimizer that skips steps); with it, when the
count did not advance by one since the last call (first sight, a reset, a restore), the count of
every parameter of the group (these reads are per parameter, and rare).
"""

from __future__ import annotations

import operator
import weakref
from typing import Any, Optional

import torch

#: Group entries that are not hyperparameters.
_SKIP = frozenset({"params", "param_names"})
_SCALARS = (bool, int, float, str, type(None))


def _plain(v: Any) -> tuple[bool, Any]:
    """(storable, value as plain JSON data); tensors are handled by the caller."""
    if isinstance(v, _SCALARS):
        return True, v
    if isinstance(v, (tuple, list)) and all(isinstance(x, _SCALARS) for x in v):
        return True, list(v)
    return False, None


def _tensor_value(t: torch.Tensor) -> tuple[bool, Any]:
    """A one-element CPU tensor as a number; (False, why) otherwise."""
    if t.numel() != 1:
        return False, "a tensor of several elements"
    if t.device.type != "cpu":
        return False, f"a tensor on {t.device.type} (not read: it would sync)"
    v = t.item()
    return True, v


def _count_of(state: Any, p: Any) -> Optional[int]:
    """The state step count of ``p`` (0 without state); None when there is none (state without
    a count) or it is not read (a tensor on an accelerator)."""
    st = state.get(p)  # state is a defaultdict: get() does not create an entry
    if not st:
        return 0
    v = st.get("step")
    if v is None:
        return None  # state without a step count (SGD's momentum buffer)
    if isinstance(v, torch.Tensor):
        if not v.is_cpu or v.numel() != 1:  # (is_cpu: no torch.device object per call)
            return None
        return int(v.item())
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _on_device(state: Any, p: Any) -> bool:
    v = (state.get(p) or {}).get("step")
    return isinstance(v, torch.Tensor) and not v.is_cpu


class _Group:
    """What was last stored for one param group."""

    __slots__ = (
        "keys",
        "get",
        "tensor_keys",
        "values",
        "stored",
        "params_sig",
        "count",
        "count_step",
        "seen",
        "size",
    )

    def __init__(self) -> None:
        self.keys: tuple = ()
        self.get: Any = None
        self.tensor_keys: tuple = ()
        self.values: Any = object()
        self.stored: dict[str, Any] = {}  # the hyperparameters as last stored
        self.params_sig: Any = None
        self.count: Optional[int] = -1
        self.count_step = -1
        self.seen: Any = None  # the count at the last call (None: not seen yet)
        self.size = -1  # len() of the group dict when its keys were split (_keys)


class _Optimizer:
    __slots__ = ("index", "ref", "groups", "notes")

    def __init__(self, index: int, optimizer: Any) -> None:
        self.index = index
        self.ref = weakref.ref(optimizer)
        self.groups: list[_Group] = []
        self.notes: set[str] = set()


class SettingsWatch:
    """Per-optimizer settings, kept as the changes since the last step."""

    def __init__(self, param_names: dict[int, tuple[str, Any]]) -> None:
        self._names = param_names  # id(param) -> (record name, param)
        self._opts: dict[int, _Optimizer] = {}
        self._changes: list[dict[str, Any]] = []

    def observe(self, optimizer: Any, step: int) -> None:
        """Compare ``optimizer``'s settings with the last ones stored; keep what changed."""
        st = self._opts.get(id(optimizer))
        if st is None or st.ref() is not optimizer:
            st = self._opts[id(optimizer)] = _Optimizer(len(self._opts), optimizer)
            change: dict[str, Any] = {
                "optimizer": st.index,
                "class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
            }
        else:
            change = {"optimizer": st.index}
        groups = optimizer.param_groups
        if len(groups) != len(st.groups):
            st.groups = [_Group() for _ in groups]
            change["groups"] = len(groups)
        state = optimizer.state
        for gi, g in enumerate(groups):
            c = st.groups[gi]
            if len(g) != c.size:
                self._keys(g, c)
            values = c.get(g) if c.get is not None else ()
            if c.tensor_keys:
                values = (
                    values,
                    tuple(g[k].item() if self._readable(g[k]) else None for k in c.tensor_keys),
                )
            if values != c.values:
                delta, gone = self._changes_of(g, c, st, values)
                if delta:
                    change.setdefault("hyper", {})[str(gi)] = delta
                if gone:
                    change.setdefault("removed", {})[str(gi)] = gone
            params = g["params"]
            sig = (id(params), len(params))
            if sig != c.params_sig:
                c.params_sig = sig
                names = [self._names[id(p)][0] for p in params if id(p) in self._names]
                change.setdefault("params", {})[str(gi)] = names
                change.setdefault("untraced", {})[str(gi)] = len(params) - len(names)
            count = _count_of(state, params[0]) if params else None
            seen, c.seen = c.seen, count
            if count == 0 and seen == 0:
                count = None  # no state kept across updates (SGD without momentum): no count
            if c.count_step < 0 or (
                count != (None if c.count is None else c.count + (step - c.count_step))
            ):
                c.count, c.count_step = count, step
                change.setdefault("state_step", {})[str(gi)] = count
                # per parameter only at first sight or when the count did not advance by one
                # update since the last call (a reset, a restore): reads are per parameter
                if count is not None and (not isinstance(seen, int) or count != seen + 1):
                    per = {
                        self._names[id(p)][0]: _count_of(state, p)
                        for p in params
                        if id(p) in self._names
                    }
                    if len(set(per.values())) > 1:
                        change.setdefault("state_steps", {})[str(gi)] = per
                if count is None and _on_device(state, params[0]):
                    st.notes.add("state step on an accelerator: not read (it would sync)")
        if st.notes:
            change["notes"] = sorted(st.notes)
            st.notes = set()
        if len(change) > 1:
            self._changes.append(change)

    @staticmethod
    def _readable(t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.numel() == 1 and t.is_cpu

    @staticmethod
    def _keys(g: dict, c: _Group) -> None:
        """Split a group's entries into plain ones (read with one itemgetter) and tensors."""
        keys, tensor_keys = [], []
        for k, v in g.items():
            if k in _SKIP:
                continue
            (tensor_keys if isinstance(v, torch.Tensor) else keys).append(k)
        c.keys, c.tensor_keys = tuple(keys), tuple(tensor_keys)
        c.size = len(g)
        if not keys:
            c.get = None
        elif len(keys) == 1:
            one = operator.itemgetter(keys[0])
            c.get = lambda d: (one(d),)
        else:
            c.get = operator.itemgetter(*keys)
        c.values = object()

    @classmethod
    def _changes_of(
        cls, g: dict, c: _Group, st: _Optimizer, values: Any
    ) -> tuple[dict[str, Any], list[str]]:
        """The entries that changed since the last stored ones, and those now gone. With the
        same keys, only the entries whose values changed are converted (a scheduler's lr)."""
        old, c.values = c.values, values
        if not c.tensor_keys and isinstance(old, tuple) and len(old) == len(values):
            delta = {}
            for k, v, was in zip(c.keys, values, old):
                if v is not was and v != was:
                    ok, plain = cls._convert(k, v, st)
                    if ok:
                        delta[str(k)] = c.stored[str(k)] = plain
            return delta, []
        new: dict[str, Any] = {}
        for k in (*c.keys, *c.tensor_keys):
            ok, plain = cls._convert(k, g[k], st)
            if ok:
                new[str(k)] = plain
        delta = {k: v for k, v in new.items() if k not in c.stored or c.stored[k] != v}
        gone = [k for k in c.stored if k not in new]
        c.stored = new
        return delta, gone

    @staticmethod
    def _convert(k: Any, v: Any, st: _Optimizer) -> tuple[bool, Any]:
        """One group entry as plain data; (False, None) with a note when it cannot be."""
        if isinstance(v, torch.Tensor):
            ok, got = _tensor_value(v)
            if not ok:
                st.notes.add(f"{k}: {got}")
                return False, None
            return True, got
        ok, plain = _plain(v)
        if ok:
            return True, plain
        if isinstance(v, (tuple, list)) and all(
            isinstance(x, (torch.Tensor, *_SCALARS)) for x in v
        ):
            vals = [_tensor_value(x) if isinstance(x, torch.Tensor) else (True, x) for x in v]
            if all(ok for ok, _ in vals):
                return True, [x for _, x in vals]
            st.notes.add(f"{k}: {next(x for ok, x in vals if not ok)}")
        return False, None  # other objects (callables, custom types) are not settings data

    def take(self) -> Optional[list[dict[str, Any]]]:
        """The changes since the last call (None when nothing changed)."""
        if not self._changes:
            return None
        out, self._changes = self._changes, []
        return out

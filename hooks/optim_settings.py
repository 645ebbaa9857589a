"""The optimizer's settings at each ``optimizer.step()``, recorded as changes only.

The step pre-hook hands every optimizer that updates traced parameters to
:meth:`SettingsWatch.observe` right before its update. What is kept per optimizer: its class
(qualified name), per param group the scalar hyperparameters (``lr``, ``weight_decay``,
``betas``, ``eps``, ``momentum``, ``nesterov``, ``foreach``, ...: every entry that is a number,
bool, string, None or a tuple of those; a one-element tensor such as a tensor ``lr`` as a float
when it is on the CPU, skipped with a note on an accelerator, where reading it would sync), the
traced parameters of the group (record names; with several groups compared by identity at
every step, so a parameter moved between groups of the same sizes shows), the optimizer state's step count (Adam's
``state[p]['step']``, read off the group's first parameter: 0 when it has no state yet) and the
number of parameters with state (``len(optimizer.state)``: the signal of a state emptied or an
optimizer re-created, also for step-less state such as SGD's momentum buffer).

Cost: a step compares one tuple per group (``operator.itemgetter``) with the last one seen, with
several groups the groups' parameters by identity (about 25 ns each), reads one step count per group and
``len(optimizer.state)``; only what changed becomes a row (``changes``), so a constant setting
costs nothing to store. The step count is stored when it is not the last stored count plus the
steps since (a reset, a restore, an optimizer that skips steps). Every parameter's count is read
(``state_steps``, stored when they are not all the same and not what the last stored ones
imply) only when they may have parted: first sight, a count that did not advance by one since
the last call, parameters joining or leaving the state (``len(optimizer.state)`` changed), or a
traced parameter without a gradient at the last update (the recorder's gradient capture tells
:meth:`SettingsWatch.skipped`; Adam does not count a parameter it skips).
"""

from __future__ import annotations

import functools
import hashlib
import operator
import weakref
from typing import Any, Optional

import torch

from .shards import local_tensor
from .snapshot import fingerprint_cpu, fingerprint_parts

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


def _advanced(per: dict[str, int], gone: int) -> dict[str, int]:
    """Per-parameter counts ``gone`` updates later: a count of 0 (no state) stays 0 (joining
    the state changes ``len(optimizer.state)``, which is stored); the reader does the same."""
    return {k: v + gone if v else 0 for k, v in per.items()}


def _on_device(state: Any, p: Any) -> bool:
    v = (state.get(p) or {}).get("step")
    return isinstance(v, torch.Tensor) and not v.is_cpu


def state_fingerprint(optimizer: Any) -> Optional[str]:
    """A fingerprint of everything ``optimizer.state`` holds (None when it is empty): per
    parameter, in param-group order (the order ``load_state_dict`` maps by), each entry's name
    and, for a tensor, its dtype, shape and exact fingerprint (``graddiff.format``: integer sums
    of its bytes, equal on any device and thread count), for a number its value; hashed
    (BLAKE2b, 16 bytes, hex). Equal states give equal fingerprints in any run. One read of the
    state (taken at first sight and at a ``load_state_dict``, never per step); accelerator
    tensors' sums come back in one transfer."""
    state = optimizer.state
    if not state:
        return None
    h = hashlib.blake2b(digest_size=16)
    on_device: list = []
    i = 0
    for g in optimizer.param_groups:
        for p in g["params"]:
            i += 1
            st = state.get(p)
            if not st:
                continue
            h.update(f"#{i}".encode())
            for k in sorted(st, key=str):
                _fold(h, str(k), st[k], on_device)
    devices: dict = {}
    for i, parts in on_device:  # one transfer per device (state may span several)
        devices.setdefault(parts.device, []).append((i, parts))
    sums: list = []
    for items in devices.values():
        values = torch.stack([parts for _, parts in items]).tolist()
        sums += [(i, v) for (i, _), v in zip(items, values)]
    for _, v in sorted(sums):
        h.update(repr(v).encode())
    return h.hexdigest()


def _fold(h: Any, key: str, v: Any, on_device: list) -> None:
    """One state entry into the hash (a list or tuple of tensors entry by entry: LBFGS)."""
    if isinstance(v, torch.Tensor):
        t = local_tensor(v).detach()
        h.update(f"{key}:{str(t.dtype)}:{tuple(t.shape)}".encode())
        if t.layout != torch.strided:
            t = t.to_dense()
        if t.is_cpu:
            h.update(repr(fingerprint_cpu(t)).encode())
        else:  # summed on its device; read back with the others (state_fingerprint)
            on_device.append((len(on_device), torch.stack(fingerprint_parts(t))))
    elif isinstance(v, (list, tuple)):
        h.update(f"{key}:[{len(v)}]".encode())
        for j, x in enumerate(v):
            _fold(h, f"{key}.{j}", x, on_device)
    elif isinstance(v, _SCALARS):
        h.update(f"{key}={v!r}".encode())
    else:  # another object: its type only (its repr may hold an address)
        h.update(f"{key}:{type(v).__qualname__}".encode())


#: The watches that load hooks report to, by key: the hooks are partials of module-level
#: functions (an optimizer pickled while traced still pickles; elsewhere they do nothing).
_WATCHES: dict[int, Any] = {}


def _load_pre_hook(key: int, optimizer: Any, state_dict: Any) -> None:
    ref = _WATCHES.get(key)
    watch = ref() if ref is not None else None
    if watch is not None:
        watch.before_load(optimizer)
    return None  # a returned dict would replace what is loaded


def _load_post_hook(key: int, optimizer: Any) -> None:
    ref = _WATCHES.get(key)
    watch = ref() if ref is not None else None
    if watch is not None:
        watch.after_load(optimizer)


class _Group:
    """What was last stored for one param group."""

    __slots__ = (
        "keys",
        "get",
        "tensor_keys",
        "values",
        "stored",
        "members",
        "members_list",
        "count",
        "count_step",
        "per",
        "per_step",
        "seen",
        "size",
        "probe",
        "parted",
    )

    def __init__(self) -> None:
        self.keys: tuple = ()
        self.get: Any = None
        self.tensor_keys: tuple = ()
        self.values: Any = object()
        self.stored: dict[str, Any] = {}  # the hyperparameters as last stored
        self.members: tuple = ()  # the group's parameters as last stored (compared by identity)
        self.members_list: Any = None  # the group's list object itself
        self.count: Optional[int] = -1
        self.count_step = -1
        self.per: dict[str, int] = {}  # per-parameter counts as last stored ({}: all the same)
        self.per_step = -1
        self.seen: Any = None  # the count at the last call (None: not seen yet)
        self.size = -1  # len() of the group dict when its keys were split (_keys)
        self.probe = 0  # the parameter whose count was read last in turn (_probe)
        self.parted = False  # counts parted in a way the per-update checks do not see


class _Optimizer:
    __slots__ = ("index", "ref", "groups", "notes", "entries", "skipped", "loads", "before")

    def __init__(self, index: int, optimizer: Any) -> None:
        self.index = index
        self.ref = weakref.ref(optimizer)
        self.groups: list[_Group] = []
        self.notes: set[str] = set()
        self.entries = -1  # len(optimizer.state) at the last call
        self.skipped: list = []  # traced parameters without a gradient at the last update
        self.loads = 0  # load_state_dict calls since the last call
        self.before: Any = None  # the state's fingerprint before the first of them


class SettingsWatch:
    """Per-optimizer settings, kept as the changes since the last step."""

    def __init__(self, param_names: dict[int, tuple[str, Any]]) -> None:
        self._names = param_names  # id(param) -> (record name, param)
        self._opts: dict[int, _Optimizer] = {}
        self._changes: list[dict[str, Any]] = []
        self._handles: list = []  # the optimizers' load_state_dict hooks
        self._key = id(self)
        _WATCHES[self._key] = weakref.ref(self)

    def observe(self, optimizer: Any, step: int) -> bool:
        """Compare ``optimizer``'s settings with the last ones stored; keep what changed.
        True when a param group's membership changed since the last call (the caller's
        cached parameter list of this optimizer is stale)."""
        st = self._opts.get(id(optimizer))
        first = st is None or st.ref() is not optimizer
        if first:
            st = self._opts[id(optimizer)] = _Optimizer(len(self._opts), optimizer)
            change: dict[str, Any] = {
                "optimizer": st.index,
                "class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
            }
            self._first_sight(optimizer, st, change)
        else:
            change = {"optimizer": st.index}
            if st.loads:
                self._loaded(optimizer, st, change)
        groups = optimizer.param_groups
        if len(groups) != len(st.groups):
            st.groups = [_Group() for _ in groups]
            change["groups"] = len(groups)
        moved = False  # a group's membership changed (not at first sight)
        state = optimizer.state
        entries = len(state)
        joined = entries != st.entries
        if joined:
            st.entries = change["state_entries"] = entries
        # a parameter skipped at the last update lags only if it has state (one never used
        # has none, and joins the state when first used: the entry count changes then)
        skipped = bool(st.skipped) and any(map(state.get, st.skipped))
        st.skipped = []
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
            if (
                params is not c.members_list
                or len(params) != len(c.members)
                or not all(map(operator.is_, params, c.members))
            ):
                # exact per parameter (by identity, ~25 ns each): a parameter swapped between
                # groups of the same sizes, or replaced in place in a group, shows
                c.members, c.members_list = tuple(params), params
                moved = True
                names = [self._names[id(p)][0] for p in params if id(p) in self._names]
                change.setdefault("params", {})[str(gi)] = names
                change.setdefault("untraced", {})[str(gi)] = len(params) - len(names)
            count = _count_of(state, params[0]) if params else None
            seen, c.seen = c.seen, count
            if count == 0 and seen == 0:
                count = None  # no state kept across updates (SGD without momentum): no count
            expect = None if c.count is None else c.count + (step - c.count_step)
            stored = c.count_step < 0 or count != expect
            if stored:
                c.count, c.count_step = count, step
                change.setdefault("state_step", {})[str(gi)] = count
                if count is None and _on_device(state, params[0]):
                    st.notes.add("state step on an accelerator: not read (it would sync)")
            # per parameter only when the counts may have parted: first sight, a count that
            # did not advance by one update (a reset, a restore), parameters that joined or
            # left the state, or a parameter without a gradient at the last update (skipped)
            irregular = count is not None and (not isinstance(seen, int) or count != seen + 1)
            if irregular or joined or skipped or (stored and c.per) or c.parted:
                self._per_param(change, gi, c, state, params, step, stored)
            elif count is not None and len(params) > 1 and self._probe(c, state, params, step):
                # one other parameter per update, in turn: a count that parts another way (a
                # custom optimizer advancing some counts by more than one) is found within
                # len(params) updates, then every count is read at every update until they
                # agree again
                c.parted = True
                self._per_param(change, gi, c, state, params, step, stored)
        if st.notes:
            change["notes"] = sorted(st.notes)
            st.notes = set()
        if len(change) > 1:
            self._changes.append(change)
        return moved and not first

    # -- the state as loaded -----------------------------------------------------------------
    def _first_sight(self, optimizer: Any, st: _Optimizer, change: dict) -> None:
        """A new optimizer: the fingerprint of the state it starts from when it has one (loaded
        before its first step: a resume), and hooks that report its later loads."""
        try:
            if optimizer.state:
                change["state_fp"] = state_fingerprint(optimizer)
        except Exception as exc:  # never into training: the fingerprint is optional
            st.notes.add(f"state fingerprint not taken ({type(exc).__name__}: {exc})")
        pre = getattr(optimizer, "register_load_state_dict_pre_hook", None)
        post = getattr(optimizer, "register_load_state_dict_post_hook", None)
        if pre is None or post is None:  # torch < 2.1
            st.notes.add("state loads not recorded (torch has no load_state_dict hooks)")
            return
        self._handles.append(pre(functools.partial(_load_pre_hook, self._key)))
        self._handles.append(post(functools.partial(_load_post_hook, self._key)))

    def before_load(self, optimizer: Any) -> None:
        """``optimizer.load_state_dict`` begins: the state before the first load since the last
        step, to tell a load that changes the state from one that restores it as it was."""
        st = self._opts.get(id(optimizer))
        if st is None or st.ref() is not optimizer or st.loads:
            return
        try:
            st.before = state_fingerprint(optimizer)
        except Exception as exc:
            st.before = exc

    def after_load(self, optimizer: Any) -> None:
        st = self._opts.get(id(optimizer))
        if st is not None and st.ref() is optimizer:
            st.loads += 1

    def _loaded(self, optimizer: Any, st: _Optimizer, change: dict) -> None:
        """The loads since the last step, as a ``loaded`` change: the state's fingerprint now
        (as loaded: nothing updated it since), whether it differs from before the loads."""
        count, before = st.loads, st.before
        st.loads, st.before = 0, None
        try:
            after = state_fingerprint(optimizer)
        except Exception as exc:
            st.notes.add(f"state fingerprint not taken ({type(exc).__name__}: {exc})")
            change["loaded"] = {"count": count}
            return
        out: dict[str, Any] = {"count": count, "fp": after}
        if not isinstance(before, Exception):
            out["changed"] = after != before
        change["loaded"] = out

    def close(self) -> None:
        """Remove the load hooks (trace exit)."""
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()
        _WATCHES.pop(self._key, None)

    def skipped(self, optimizer: Any, params: list) -> None:
        """Traced parameters of ``optimizer`` without a gradient at this update (the recorder
        knows them from its gradient capture): a count of theirs may lag from the next call on
        (Adam does not count a parameter it skips)."""
        st = self._opts.get(id(optimizer))
        if st is not None:
            st.skipped = params

    def _probe(self, c: _Group, state: Any, params: Any, step: int) -> bool:
        """Read the next parameter's count in turn (never the first: the group's count is
        its); True when it is not what the stored counts imply."""
        i = c.probe + 1
        if i >= len(params):
            i = 1
        c.probe = i
        p = params[i]
        hit = self._names.get(id(p))
        if hit is None or hit[1] is not p:
            return False
        got = _count_of(state, p)
        if got is None:
            return False
        was = c.per.get(hit[0])
        want = c.seen if was is None else (was + step - c.per_step if was else 0)
        return got != want

    def _per_param(
        self, change: dict, gi: int, c: _Group, state: Any, params: Any, step: int, stored: bool
    ) -> None:
        """Read every traced parameter's count; store them when they are not what the last
        stored ones (or, after a new ``state_step``, the group's count) imply."""
        names = self._names
        read = {names[id(p)][0]: _count_of(state, p) for p in params if id(p) in names}
        counts = [v for v in read.values() if isinstance(v, int)]
        per = {k: v for k, v in read.items() if isinstance(v, int)}
        if len(set(counts)) <= 1:
            per = {}  # one count for the group (or none: step-less state)
            c.parted = False
        # a new state_step clears the per-parameter counts on the reading side
        changed = bool(per) if stored else per != _advanced(c.per, step - c.per_step)
        if changed:
            change.setdefault("state_steps", {})[str(gi)] = per
        c.per, c.per_step = per, step

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

"""Diagnosis from the recorded optimizer settings (``/optimizer``, Run.optimizer_settings).

At the update where the parameters part (the previous step's parameters and gradients agree),
the two runs' settings are compared parameter by parameter: the optimizer class, each
hyperparameter of the parameter's group, the group membership (a parameter in another group
whose settings differ, while the groups' own settings agree, is a membership difference), the
optimizer state's step count (per parameter where recorded) and the number of parameters with
state (a state emptied or an optimizer re-created in one run, also for SGD's step-less momentum
buffer). A difference there is direct evidence; the value fits of rules_update.py confirm it or
disagree, and both are said. Where the settings agree, that is evidence too: the update itself
differs. A setting difference is never named as the cause of a divergence that starts before
any update (it is listed as "also differs").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import GraddiffError
from ..optimizer_settings import IMPLEMENTATION_KEYS, OptimizerSettings, fmt_value
from .context import Cause, Context
from .rules_schedule import schedule_relation

#: Entries a learning-rate scheduler keeps in the group for itself (not settings of the update).
SCHEDULER_KEYS = frozenset(
    {"initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum", "base_lr", "last_lr"}
)
#: The value-based causes (rules_update.py) each settings cause is consistent with: the value
#: fit then confirms it. A different optimizer class changes the whole update.
CONFIRMED_BY = {
    "optimizer_class": {"weight_decay", "learning_rate", "optimizer_state", "update_rule"},
    "learning_rate": {"learning_rate"},
    "weight_decay": {"weight_decay", "learning_rate"},
    "optimizer_state": {"optimizer_state", "learning_rate", "update_rule"},
    "optimizer_settings": {"optimizer_state", "learning_rate", "update_rule", "weight_decay"},
}
#: Value-based causes about the update (the ones settings can confirm or contradict).
UPDATE_CAUSES = frozenset({"learning_rate", "weight_decay", "optimizer_state", "update_rule"})
#: Order of the settings causes when several differ (the class explains the others).
PRIORITY = ("optimizer_class", "optimizer_state", "learning_rate", "weight_decay")
#: Updates of the recorded learning-rate series related by the schedule relations.
SERIES_STEPS = 256


@dataclass
class Difference:
    """One setting that differs, and the parameters it differs for."""

    what: str  # "class", "membership", "group", "state_step", "state_entries" or a setting
    a: Any
    b: Any
    params: list = field(default_factory=list)  # parameter names
    groups: set = field(default_factory=set)  # (group in A, group in B)
    optimizers: set = field(default_factory=set)  # (optimizer in A, optimizer in B)
    born: tuple = ()  # (A's, B's) optimizer's first step (state_entries)


def _settings(x: Context) -> tuple[Optional[OptimizerSettings], Optional[OptimizerSettings]]:
    out = []
    for run in (x.pair.a, x.pair.b):
        try:
            s = run.optimizer_settings
        except (GraddiffError, AttributeError):
            s = None
        out.append(s if s else None)
    return out[0], out[1]


def compare_at(x: Context, t: int) -> tuple[list[Difference], list[Difference], bool]:
    """(differences that change the update, differences in how it is computed, whether any
    parameter was compared) at the update of step ``t``."""
    sa, sb = _settings(x)
    if sa is None or sb is None:
        return [], [], False
    found: dict[tuple, Difference] = {}
    impl: dict[tuple, Difference] = {}
    states: set[tuple[int, int]] = set()  # optimizer pairs whose state sizes were compared
    compared = False
    for slot, _ in x.slots_of(t, ("param",)) if x.pair.has_step(t) else []:
        ha, hb = sa.for_param(t, slot.name), sb.for_param(t, slot.name)
        if ha is None and hb is None:
            continue
        compared = True
        if ha is None or hb is None:
            _add(found, "membership", ha is not None, hb is not None, slot, ha, hb)
            continue
        (oa, ga), (ob, gb) = ha, hb
        if oa.class_name != ob.class_name:
            _add(found, "class", oa.class_name, ob.class_name, slot, ha, hb)
        if (oa.index, ob.index) not in states:
            states.add((oa.index, ob.index))
            ea, eb = oa.state_entries, ob.state_entries
            if ea is not None and eb is not None and ea != eb:
                _add(found, "state_entries", ea, eb, slot, ha, hb)
                found[("state_entries", ea, eb)].born = (oa.born, ob.born)
            loaded = _loaded_difference(oa, ob, t)
            if loaded is not None:
                _add(found, "loaded_state", *loaded, slot, ha, hb)
        elif any(d.what in PER_OPTIMIZER for d in found.values()):
            for d in found.values():
                if d.what in PER_OPTIMIZER and (oa.index, ob.index) in d.optimizers:
                    d.params.append(slot)
        if oa.class_name == ob.class_name and _moved(oa, ga, ob, gb):
            _add(found, "group", ga.index, gb.index, slot, ha, hb)
            continue  # its settings are its groups': the groups agree, the membership differs
        for k in sorted(set(ga.hyper) | set(gb.hyper)):
            va, vb = ga.hyper.get(k), gb.hyper.get(k)
            if k in SCHEDULER_KEYS or va == vb:
                continue
            if oa.class_name != ob.class_name and k == "decoupled_weight_decay":
                continue  # said by the class
            target = impl if k in IMPLEMENTATION_KEYS else found
            _add(target, k, _key(va), _key(vb), slot, ha, hb)
        if ga.state_step is not None and gb.state_step is not None:
            ca = ga.state_steps.get(slot.name, ga.state_step)
            cb = gb.state_steps.get(slot.name, gb.state_step)
            if ca != cb:
                _add(found, "state_step", ca, cb, slot, ha, hb)
    return list(found.values()), list(impl.values()), compared


#: Differences of a whole optimizer (its state), not of one parameter's group.
PER_OPTIMIZER = frozenset({"state_entries", "loaded_state"})


def _loaded_difference(oa, ob, t: int) -> Optional[tuple]:
    """(A's, B's) state fingerprint events when they say the states differ at the update of
    step ``t``: both taken at one step s <= t (both optimizers' first step, or a load in
    both) with different fingerprints; or a load (or a new optimizer starting from a state
    it holds) at step t in one run only, that changed the state, while the other run's
    optimizer goes on from an earlier step. A state empty in one run at the first step is
    the state size's difference (state_entries), not this."""
    fa, fb = oa.state_fp, ob.state_fp
    if fa is None or fb is None:
        return None
    if fa.step == fb.step:
        if fa.step > t or fa.fp == fb.fp:
            return None
        if fa.how == fb.how == "first" and None in (fa.fp, fb.fp):
            return None
        return fa, fb
    late, early = (fa, fb) if fa.step > fb.step else (fb, fa)
    if late.step != t or late.fp is None:
        return None
    if late.how == "load" and late.changed is not True:
        return None  # a load that restored the state as it was (or not known)
    return (fa, None) if late is fa else (None, fb)


def _settings_of(g) -> dict[str, Any]:
    return {k: v for k, v in g.hyper.items() if k not in SCHEDULER_KEYS}


def _moved(oa, ga, ob, gb) -> bool:
    """The parameter is in another group in B, its settings differ with the group, and the
    groups themselves agree (group i of A has the settings of group i of B, for both groups
    involved): the membership differs, not a setting."""
    if ga.index == gb.index or len(oa.groups) != len(ob.groups):
        return False
    if _settings_of(ga) == _settings_of(gb):
        return False  # the same settings either way: nothing differs for this parameter
    return _settings_of(ga) == _settings_of(ob.groups[ga.index]) and _settings_of(
        gb
    ) == _settings_of(oa.groups[gb.index])


def _key(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _add(found: dict, what: str, a: Any, b: Any, slot, ha, hb) -> None:
    d = found.setdefault((what, a, b), Difference(what, a, b))
    d.params.append(slot)
    d.groups.add((ha[1].index if ha else None, hb[1].index if hb else None))
    if ha and hb:
        d.optimizers.add((ha[0].index, hb[0].index))


def update_steps(x: Context) -> list[int]:
    """The updates (their steps) that made the first differing parameters, when the
    parameters and gradients before them agree: the origin's, then the divergence's."""
    from .rules_update import _after_agreeing_step

    o = x.walk.first_bitwise
    steps = []
    if o is not None and x.pair.al.slots[o.slot].kind == "param" and o.step < x.step:
        steps.append(o.step)
    steps.append(x.step)
    out = []
    for s in steps:
        if _after_agreeing_step(x, s):
            prev = x.prev(s)
            if prev is not None and prev not in out:
                out.append(prev)
    return out


def _first(run) -> int:
    return int(run.steps[0]) if len(run.steps) else 0


def _v(v: Any) -> str:
    return fmt_value(list(v) if isinstance(v, tuple) else v)


def _groups(d: Difference) -> str:
    ga = sorted({a for a, _ in d.groups if a is not None})
    gb = sorted({b for _, b in d.groups if b is not None})
    if ga == gb:
        return f"param group {', '.join(map(str, ga))}"
    return (
        f"param group {', '.join(map(str, ga)) or '-'} in A, {', '.join(map(str, gb)) or '-'} in B"
    )


def _who(x: Context, d: Difference, total: int) -> str:
    if len(d.params) == total:
        return f"every parameter ({_groups(d)})"
    return f"{len(d.params)} of {total} parameters: {x.names(d.params)} ({_groups(d)})"


def _series(s: OptimizerSettings, run_steps: list[int], name: str, until: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for t in run_steps:
        if t > until:
            break
        hit = s.for_param(t, name)
        lr = hit[1].hyper.get("lr") if hit else None
        if isinstance(lr, (int, float)) and not isinstance(lr, bool):
            out[t] = float(lr)
    return out


def _schedule(x: Context, d: Difference, t: int) -> tuple[Optional[str], list[str], str]:
    """The schedule relation behind a learning-rate difference, read off the recorded rates."""
    sa, sb = _settings(x)
    name = d.params[0].name
    until = t + SERIES_STEPS
    steps_a = [int(s) for s in x.pair.a.steps]
    steps_b = [int(s) for s in x.pair.b.steps]
    la, lb = _series(sa, steps_a, name, until), _series(sb, steps_b, name, until)
    ev = [
        f"recorded learning rate of {x.record('param', name)}: A {_listing(la)}; B {_listing(lb)}"
    ]
    found = schedule_relation(la, lb, t, "recorded rate", "s")
    if found is not None:
        title, more, fix = found
        return title, ev + more, fix
    return None, ev, ""


def _listing(lr: dict) -> str:
    ts = sorted(lr)
    if not ts:
        return "not recorded"
    # the steps where the rate changes, and its value there
    changes = [t for i, t in enumerate(ts) if i == 0 or lr[t] != lr[ts[i - 1]]]
    shown = ", ".join(f"{_v(lr[t])} from step {t}" for t in changes[:6])
    more = f", ... ({len(changes)} changes)" if len(changes) > 6 else ""
    return shown + more


def _classes(a: str, b: str) -> tuple[str, str]:
    sa, sb = a.rsplit(".", 1)[-1], b.rsplit(".", 1)[-1]
    return (a, b) if sa == sb else (sa, sb)


def settings_causes(x: Context, t: int, diffs: list[Difference], total: int) -> list[Cause]:
    """One cause per kind of difference at the update of step ``t``, most explanatory first."""
    head = f"recorded optimizer settings at the update of step {t}"
    by_cause: dict[str, Cause] = {}
    # a state size that differs without being empty in one run says nothing about which
    # parameters (an unused parameter with a zero gradient gets state in one run only): a
    # cause only when nothing else differs, otherwise said next to the cause
    partial = [d for d in diffs if d.what == "state_entries" and 0 not in (d.a, d.b)]
    aside = partial if len(partial) < len(diffs) else []
    for d in sorted(diffs, key=lambda d: (d.what != "class", d.what)):
        if d in aside:
            continue
        who = _who(x, d, total)
        if d.what == "class":
            ca, cb = _classes(d.a, d.b)
            decay = _decay_at(x, t, d.params[0].name)
            if decay and (decay[0] or decay[1]) and decay[2] != decay[3] and _same_family(d):
                c = _decay_cause(x, t, d, diffs, total, head)  # Adam vs AdamW: the coupling
            else:
                c = Cause(
                    "optimizer_class",
                    f"optimizer class differs: {ca} in A vs {cb} in B (recorded optimizer "
                    "settings)",
                    [f"{head}: optimizer {ca} in A, {cb} in B for {who}"],
                    "use the same optimizer class in both runs",
                )
        elif d.what == "membership":
            side = "A" if d.a else "B"
            c = Cause(
                "optimizer_settings",
                f"parameters updated by the optimizer in {side} only (recorded param groups)",
                [
                    f"{head}: {x.names(d.params)} are in {side}'s optimizer and in no param group "
                    f"of the other run's"
                ],
                "give both optimizers the same parameters (frozen parameters, "
                "requires_grad, or a parameter left out of the param groups)",
            )
        elif d.what == "state_step":
            c = _state_cause(x, t, d, who, head)
        elif d.what == "state_entries":
            c = _entries_cause(t, d, head)
        elif d.what == "loaded_state":
            c = _loaded_cause(t, d, head)
        elif d.what == "group":
            c = _group_cause(x, t, d, head)
        elif d.what == "lr":
            first = min(_first(x.pair.a), _first(x.pair.b), int(x.pair.steps[0]))
            title, sched_ev, fix = _schedule(x, d, t) if t > first else (None, [], "")
            ev = [f"{head}: lr {_v(d.a)} in A vs {_v(d.b)} in B for {who}"] + sched_ev
            c = Cause(
                "learning_rate",
                title
                or f"learning rate differs: {_v(d.a)} in A vs {_v(d.b)} in B at step {t} "
                f"(recorded optimizer settings, {_groups(d)})",
                ev,
                fix
                or "use the same learning rate and scheduler; step the scheduler at the same "
                "place (per step vs per epoch) and restore it (scheduler.load_state_dict) when "
                "resuming",
            )
        elif d.what in ("weight_decay", "decoupled_weight_decay"):
            c = _decay_cause(x, t, d, diffs, total, head)
        elif d.what == "momentum":
            c = Cause(
                "optimizer_state",
                f"momentum differs: {_v(d.a)} in A vs {_v(d.b)} in B at step {t} (recorded "
                "optimizer settings)",
                [f"{head}: momentum {_v(d.a)} in A vs {_v(d.b)} in B for {who}"],
                "use the same momentum in both optimizers",
            )
        else:
            c = Cause(
                "optimizer_settings",
                f"optimizer settings differ: {d.what} {_v(d.a)} in A vs {_v(d.b)} in B at step "
                f"{t} (recorded optimizer settings)",
                [f"{head}: {d.what} {_v(d.a)} in A vs {_v(d.b)} in B for {who}"],
                f"use the same {d.what} in both optimizers",
            )
        if c.cause in by_cause:
            by_cause[c.cause].evidence.extend("also: " + e for e in c.evidence)
        else:
            by_cause[c.cause] = c
    rank = {cid: i for i, cid in enumerate(PRIORITY)}
    out = sorted(by_cause.values(), key=lambda c: rank.get(c.cause, len(PRIORITY)))
    for d in aside:
        out[0].evidence.append(
            f"also differs: the optimizer holds state for {d.a} parameter(s) in A vs {d.b} in B"
        )
    return out


#: Optimizer classes whose weight_decay is decoupled (when the group does not say).
DECOUPLED_CLASSES = frozenset({"AdamW", "AdamWScheduleFree", "Lion"})
#: Classes that differ only in how they apply weight_decay.
ADAM_FAMILY = frozenset({"Adam", "AdamW"})


def _same_family(d: Difference) -> bool:
    return {d.a.rsplit(".", 1)[-1], d.b.rsplit(".", 1)[-1]} <= ADAM_FAMILY


def _decay_kind(o, g) -> str:
    """How an optimizer applies weight_decay: decoupled (AdamW), coupled L2 inside Adam's
    normalisation, or coupled L2 added to the gradient (SGD and others)."""
    dec = g.hyper.get("decoupled_weight_decay")
    if dec is None:
        dec = o.short_class in DECOUPLED_CLASSES
    if dec:
        return "decoupled (AdamW-style)"
    if "betas" in g.hyper:
        return "coupled L2 inside Adam"
    return "coupled L2 (g + wd * p)"


def _decay_at(x: Context, t: int, name: str) -> Optional[tuple]:
    sa, sb = _settings(x)
    ha, hb = sa.for_param(t, name), sb.for_param(t, name)
    if ha is None or hb is None:
        return None
    wa, wb = ha[1].hyper.get("weight_decay"), hb[1].hyper.get("weight_decay")
    return wa, wb, _decay_kind(*ha), _decay_kind(*hb)


def _decay_title(wa: Any, wb: Any, ka: str, kb: str) -> str:
    if not wa and wb:
        return f"weight decay differs: {kb} in B only"
    if wa and not wb:
        return f"weight decay differs: {ka} in A only"
    if ka != kb:
        return f"weight decay differs: {ka} in A vs {kb} in B"
    return f"weight decay differs: {ka}, {_v(wa)} in A vs {_v(wb)} in B"


def _decay_cause(
    x: Context, t: int, d: Difference, diffs: list[Difference], total: int, head: str
) -> Cause:
    """weight_decay (or the coupling) differs; ``d.what == "class"``: Adam vs AdamW with a
    decay, where the class decides the coupling."""
    who = _who(x, d, total)
    name = d.params[0].name
    wa, wb, ka, kb = _decay_at(x, t, name) or (None, None, "", "")
    if d.what == "class":
        ca, cb = _classes(d.a, d.b)
        what = f"optimizer {ca} in A vs {cb} in B, weight_decay {_v(wa)} vs {_v(wb)}"
    elif d.what == "decoupled_weight_decay":
        what = f"decoupled_weight_decay {_v(d.a)} in A vs {_v(d.b)} in B"
    else:
        what = f"weight_decay {_v(d.a)} in A vs {_v(d.b)} in B"
    ev = [f"{head}: {what} for {who}"]
    title = _decay_title(wa, wb, ka, kb)
    if "Adam" in ka + kb and ka != kb:
        ev.append(
            "coupled L2 enters Adam's normalisation (normalised away where gradients are "
            "large); decoupled decay moves the weights by -lr * wd * p outside it"
        )
    if len(d.params) < total and d.what == "weight_decay":
        off = "B" if not d.b else "A" if not d.a else None
        if off is not None:
            ev.append(
                f"{x.names(d.params)} are decayed in {'A' if off == 'B' else 'B'} and excluded "
                f"from decay in {off}; the other parameters have the same decay in both runs: "
                "the parameter groups differ"
            )
            title = (
                f"weight decay differs on parameter groups: {x.names(d.params, limit=3)} "
                f"excluded from decay in {off}"
            )
    return Cause(
        "weight_decay",
        f"{title} (recorded optimizer settings at step {t}: {what})",
        ev,
        "use the same optimizer class, weight_decay and parameter groups in both runs: "
        "Adam(weight_decay=wd) and SGD add wd * p to the gradient (coupled L2), "
        "AdamW(weight_decay=wd) decays the weights directly; e.g. no decay on biases and norm "
        "weights in both",
    )


def _state_cause(x: Context, t: int, d: Difference, who: str, head: str) -> Cause:
    fix = (
        "save optimizer.state_dict() in the checkpoint and call optimizer.load_state_dict() "
        "after creating the optimizer when resuming"
    )
    if 0 in (d.a, d.b) and d.a != d.b:
        side, other = ("A", d.b) if d.a == 0 else ("B", d.a)
        return Cause(
            "optimizer_state",
            f"optimizer state reset in {side} at step {t}: its state step count is 0 where the "
            f"other run's is {other} (optimizer state not restored on resume?)",
            [
                f"{head}: state step count {d.a} in A vs {d.b} in B for {who}: {side}'s "
                "optimizer starts from empty state (Adam's moments at zero, no momentum)"
            ],
            fix,
        )
    return Cause(
        "optimizer_state",
        f"optimizer state differs: state step count {d.a} in A vs {d.b} in B at step {t} "
        "(restored from a different checkpoint?)",
        [f"{head}: state step count {d.a} in A vs {d.b} in B for {who}"],
        fix,
    )


def _entries_cause(t: int, d: Difference, head: str) -> Cause:
    """The number of parameters with optimizer state differs (len(optimizer.state))."""
    fix = (
        "save optimizer.state_dict() in the checkpoint and call optimizer.load_state_dict() "
        "after creating the optimizer when resuming; do not re-create or clear the optimizer "
        "during training"
    )
    ev = f"{head}: the optimizer holds state for {d.a} parameter(s) in A vs {d.b} in B"
    if 0 in (d.a, d.b):
        side, other = ("A", d.b) if d.a == 0 else ("B", d.a)
        born = dict(zip("AB", d.born)) if d.born else {}
        if born and born[side] == t and born["B" if side == "A" else "A"] < t:
            return Cause(
                "optimizer_state",
                f"optimizer state reset in {side} at step {t}: {side}'s optimizer is re-created "
                f"there (a new optimizer, no state) where the other run's holds state for "
                f"{other} parameter(s) (optimizer state not restored on resume?)",
                [
                    ev + f": {side}'s optimizer makes its first update at step {t}, the other "
                    f"run's has updated since step {born['B' if side == 'A' else 'A']}; "
                    f"{side}'s update starts from empty state (no momentum buffer, Adam's "
                    "moments at zero)"
                ],
                fix,
            )
        return Cause(
            "optimizer_state",
            f"optimizer state reset in {side} at step {t}: its optimizer holds no state where "
            f"the other run's holds state for {other} parameter(s) (a re-created optimizer or "
            "cleared state: optimizer state not restored on resume?)",
            [
                ev + f": {side}'s update starts from empty state (no momentum buffer, Adam's "
                "moments at zero)"
            ],
            fix,
        )
    return Cause(
        "optimizer_state",
        f"optimizer state differs at step {t}: it holds state for {d.a} parameter(s) in A vs "
        f"{d.b} in B (state restored or cleared for some parameters only?)",
        [
            ev,
            "a parameter without a gradient gets state in one run only when its gradient is "
            "zeros there and None in the other (zero_grad(set_to_none=False) vs True), or when "
            "the optimizers hold different parameters",
        ],
        fix,
    )


def _fp_short(f) -> str:
    return "empty" if f.fp is None else f.fp[:12]


def _load_event(f, side: str) -> str:
    if f.how == "load":
        what = {True: "it changed the state", False: "it restored the same state"}.get(
            f.changed, "its effect not known"
        )
        return (
            f"{side}'s optimizer.load_state_dict() ran before the update of step {f.step} "
            f"({what}; loaded state fingerprint {_fp_short(f)})"
        )
    return (
        f"{side}'s optimizer made its first update at step {f.step}, from a state it already "
        f"held (loaded before it; fingerprint {_fp_short(f)})"
        if f.fp is not None
        else f"{side}'s optimizer made its first update at step {f.step}, from empty state"
    )


def _loaded_cause(t: int, d: Difference, head: str) -> Cause:
    """The optimizer state as loaded differs (fingerprints of everything the state holds,
    taken at the load or at the optimizer's first update), or was loaded in one run only."""
    fix = (
        "load the optimizer state from the same checkpoint as the model (saved at the same "
        "step) in both runs; load it once, after creating the optimizer"
    )
    fa, fb = d.a, d.b
    if fa is not None and fb is not None:
        s = fa.step
        how = "loaded" if "load" in (fa.how, fb.how) else "held at the optimizers' first update"
        ev = [
            f"{head}: " + _load_event(fa, "A"),
            _load_event(fb, "B"),
            "the fingerprints cover every tensor and number of the optimizer state (Adam's "
            "moments and step counts, SGD's momentum buffers): the states differ",
        ]
        return Cause(
            "optimizer_state",
            f"optimizer state differs: the state {how} at step {s} is not the same in A and B "
            "(restored from a different checkpoint?)",
            ev,
            fix,
        )
    side, f = ("A", fa) if fa is not None else ("B", fb)
    other = "B" if side == "A" else "A"
    if f.how == "load":
        title = (
            f"optimizer state loaded in {side} at step {t}, not in {other}: {side}'s "
            "load_state_dict() changed its state before this update"
        )
    else:
        title = (
            f"optimizer re-created in {side} at step {t} with a loaded state, not in {other}: "
            f"{side}'s new optimizer starts from a state it already holds"
        )
    return Cause(
        "optimizer_state",
        title,
        [
            f"{head}: " + _load_event(f, side),
            f"{other}'s optimizer state was neither loaded nor re-created at step {t}",
        ],
        fix,
    )


def _group_cause(x: Context, t: int, d: Difference, head: str) -> Cause:
    """A parameter in another param group, the groups' own settings the same in both runs."""
    sa, sb = _settings(x)
    name = d.params[0].name
    ga, gb = sa.for_param(t, name)[1], sb.for_param(t, name)[1]
    keys = sorted(
        k
        for k in set(_settings_of(ga)) | set(_settings_of(gb))
        if ga.hyper.get(k) != gb.hyper.get(k)
    )
    what = ", ".join(f"{k} {_v(ga.hyper.get(k))} in A vs {_v(gb.hyper.get(k))} in B" for k in keys)
    return Cause(
        "optimizer_settings",
        f"parameter groups differ: {x.names(d.params, limit=3)} in param group {d.a} in A and "
        f"{d.b} in B at step {t}, so {what} (recorded optimizer settings; the groups' own "
        "settings agree)",
        [
            f"{head}: {x.names(d.params)} in param group {d.a} in A and {d.b} in B; param "
            f"groups {d.a} and {d.b} have the same settings in both runs"
        ],
        "build the param groups from the same rule in both runs (e.g. the same name filter "
        "for no-decay or per-layer learning rates)",
    )


def _agree_text(x: Context, t: int) -> str:
    sa, _ = _settings(x)
    opts = sa.at(t) if sa is not None else []
    parts = []
    for o in opts[:2]:
        g = o.groups[0] if o.groups else None
        keys = ("lr", "weight_decay", "momentum", "betas", "eps")
        hyper = ", ".join(f"{k} {_v(g.hyper[k])}" for k in keys if g and k in g.hyper)
        parts.append(
            f"{o.short_class}"
            + (f" ({hyper}{', ...' if len(o.groups) > 1 else ''})" if hyper else "")
        )
    return "; ".join(parts)


def _impl_text(impl: list[Difference]) -> str:
    return ", ".join(f"{d.what} {_v(d.a)} vs {_v(d.b)}" for d in impl)


def apply_settings(x: Context, causes: list[Cause]) -> list[Cause]:
    """Add what the recorded optimizer settings say to ``causes`` (the value-based ones)."""
    sa, sb = _settings(x)
    if sa is None and sb is None:
        return causes
    if sa is None or sb is None:
        if causes and update_steps(x):
            side = "A" if sa is None else "B"
            causes[0].evidence.append(
                f"optimizer settings were recorded in one run only (not in {side}: no optimizer "
                "stepped there, or an older trace)"
            )
        return causes
    total = len(x.slots_of(x.step, ("param",)))
    diverged = x.walk.first is not None
    member = _membership_of_grad(x, total)
    if member is not None:
        return [member, *causes]
    for t in update_steps(x):
        diffs, impl, compared = compare_at(x, t)
        if not compared:
            continue
        if diffs:
            return _merge(x, t, settings_causes(x, t, diffs, total), causes, impl, diverged)
        # the settings agree at the update: the update itself differs
        text = (
            f"the recorded optimizer settings agree at the update of step {t} "
            f"({_agree_text(x, t)}): the update itself differs"
        )
        if impl and diverged:
            text += f"; they differ only in how it is computed ({_impl_text(impl)})"
        target = next((c for c in causes if c.cause in UPDATE_CAUSES), None)
        if target is not None:
            target.evidence.append(
                text + " (not a setting: a manual change of the parameters "
                "or gradients, or a custom step?)"
            )
        elif causes:
            causes[0].evidence.append(text)
        return causes
    # not an update divergence: a setting difference is not the cause, at most also differs
    first = int(x.pair.steps[0])
    diffs, impl, _ = compare_at(x, first)
    if diffs and causes:
        texts = []
        for d in diffs[:3]:
            if d.what == "class":
                texts.append("optimizer class {} vs {}".format(*_classes(d.a, d.b)))
            elif d.what == "membership":
                texts.append(f"param groups ({x.names(d.params, limit=2)} in one run only)")
            elif d.what == "group":
                texts.append(f"param groups ({x.names(d.params, limit=2)} in group {d.a} vs {d.b})")
            elif d.what == "state_entries":
                texts.append(f"optimizer state for {d.a} vs {d.b} parameter(s)")
            elif d.what == "loaded_state":
                texts.append("optimizer state as loaded (fingerprints)")
            else:
                texts.append(f"{d.what} {_v(d.a)} vs {_v(d.b)}")
        causes[0].evidence.append(
            "also differs (not the cause: the divergence does not start in an update): "
            f"recorded optimizer settings at step {first}: " + "; ".join(texts)
        )
    return causes


def _membership_of_grad(x: Context, total: int) -> Optional[Cause]:
    """The first divergence is the gradient of a parameter that the recorded param groups at
    that step hold in one run's optimizer only (a parameter replaced in, or removed from, a
    group mid-run): the optimizers' parameters differ. ``optimizer.zero_grad()`` no longer
    reaches a parameter outside the optimizer, so its gradient accumulates there: a reading
    of the values (a missing ``zero_grad``) follows from this and is kept after it. A gradient
    missing in one run is left to the frozen-parameter reading."""
    hit = x.hit
    slot = x.pair.al.slots[hit.slot]
    if slot.kind != "grad" or hit.status not in ("values", "stats"):
        return None
    diffs, _, _ = compare_at(x, hit.step)
    for d in diffs:
        if d.what == "membership" and any(p.name == slot.name for p in d.params):
            c = settings_causes(x, hit.step, [d], total)[0]
            others = [o for o in diffs if o is not d and o.what == "membership"]
            for o in others:
                c.evidence.append(
                    f"also: {x.names(o.params)} in {'A' if o.a else 'B'}'s optimizer only"
                )
            c.evidence.append(
                f"{x.label(slot)} differs at step {hit.step}: the optimizer's zero_grad() does "
                "not reach a parameter outside it, and its update does not use its gradient"
            )
            return c
    return None


def _merge(
    x: Context,
    t: int,
    found: list[Cause],
    causes: list[Cause],
    impl: list[Difference],
    diverged: bool,
) -> list[Cause]:
    """Settings causes first, each with the value fit that confirms it; a value cause that no
    settings difference explains is kept after them, saying so."""
    value = [c for c in causes if c.cause in UPDATE_CAUSES]
    rest = [c for c in causes if c.cause not in UPDATE_CAUSES]
    used: set[int] = set()
    confirmed: list[Cause] = []
    unconfirmed: list[Cause] = []
    for c in found:
        match = [i for i, v in enumerate(value) if v.cause in CONFIRMED_BY.get(c.cause, ())]
        if match:
            for i in match:
                if i not in used:
                    used.add(i)
                    v = value[i]
                    c.evidence.append(f"the values agree: {v.title}")
                    c.evidence.extend("values: " + e for e in v.evidence[1:])
            confirmed.append(c)
        else:
            if value:
                c.evidence.append(
                    "the value fit of the update reads something else: "
                    + "; ".join(v.title for v in value)
                )
            unconfirmed.append(c)
    left = [v for i, v in enumerate(value) if i not in used]
    for v in left:
        v.evidence.append(
            "the recorded optimizer settings do not show this: they differ in "
            + ", ".join(sorted({c.cause for c in found}))
        )
    out = confirmed + unconfirmed + left + rest
    if impl and diverged and out:
        out[0].evidence.append(
            f"also differs, in how the update is computed (not a cause): {_impl_text(impl)}"
        )
    return out


__all__ = ["apply_settings", "compare_at", "settings_causes", "update_steps"]

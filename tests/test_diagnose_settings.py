"""Causes read off the recorded optimizer settings (``/optimizer``) on pairs of real (tiny)
training loops: schedules under Adam/AdamW, weight decay (its coupling, its parameter groups,
one too small to turn a direction), the optimizer class, betas/eps/momentum/nesterov, state
reset on resume; settings that agree as evidence; settings never named as the cause of a
divergence that starts before any update; equivalent pairs never DIVERGED.

The oracle is each test's own: it knows the change it made, the first update it acts on (the
first differing parameter is that update's result) and the cause and numbers to expect.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from classcheck import diagnosis_unlabelled
from torch import nn

import graddiff


def _net(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list = [nn.Linear(8, 16), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(16, 4))


def _groups(net: nn.Module, wd: float, bias_decay: bool = True) -> list:
    named = list(net.named_parameters())
    if bias_decay:
        return [{"params": [p for _, p in named], "weight_decay": wd}]
    return [
        {"params": [p for n, p in named if not n.endswith("bias")], "weight_decay": wd},
        {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0},
    ]


class _Spare(nn.Module):
    """A network with a layer it never uses."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body, self.spare = body, nn.Linear(4, 4)

    def forward(self, x):
        return self.body(x)


def _loop(
    path,
    make_opt: Callable[[nn.Module], torch.optim.Optimizer],
    *,
    steps: int = 6,
    sched: Optional[Callable[[Any], Any]] = None,
    sched_every: int = 1,
    restart_sched_at: Optional[int] = None,
    fresh_opt_at: Optional[int] = None,
    clear_state_at: Optional[int] = None,
    drop_state: Optional[tuple[int, str]] = None,
    spare: bool = False,
    set_to_none: bool = True,
    manual_shrink: bool = False,
    dropout_seed: Optional[int] = None,
    start: int = 0,
    net: Optional[nn.Module] = None,
    **trace_options: Any,
) -> str:
    """A plain training loop. ``restart_sched_at``: a resumed run builds a fresh scheduler
    there (state not loaded); ``fresh_opt_at``: a fresh optimizer (state not loaded);
    ``clear_state_at``: the same optimizer, its state dropped (``optimizer.state.clear()``);
    ``drop_state``: (step, parameter name) whose state alone is dropped there; ``spare``: the
    model holds a layer it never uses (no gradient); ``set_to_none=False``: every ``.grad``
    starts as zeros and is zeroed in place (an unused layer's gradient stays zeros, not None);
    ``manual_shrink``: B-style bug outside the optimizer (the weights scaled after step());
    ``start``: the first batch (a run resumed from a checkpoint at that step)."""
    net = net if net is not None else _net(dropout=0.5 if dropout_seed is not None else 0.0)
    if spare:
        net = _Spare(net)
    opt = make_opt(net)
    sch = sched(opt) if sched else None
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g))]
    for _ in range(start + steps):
        batches.append((torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)))
    if dropout_seed is not None:
        torch.manual_seed(dropout_seed)
    if not set_to_none:
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
    with graddiff.trace(net, path, **{"values": "full", **trace_options}):
        for step in range(start, start + steps):
            if step == fresh_opt_at:
                opt = make_opt(net)
                if sch is not None:
                    sch = sched(opt)
            elif step == restart_sched_at:
                sch = sched(opt)
            if step == clear_state_at:
                opt.state.clear()
            if drop_state is not None and step == drop_state[0]:
                del opt.state[dict(net.named_parameters())[drop_state[1]]]
            x, y = batches[step]
            opt.zero_grad(set_to_none=set_to_none)
            F.cross_entropy(net(x), y).backward()
            opt.step()
            if manual_shrink:
                with torch.no_grad():
                    for p in net.parameters():
                        p.mul_(0.999)
            if sch is not None and (step + 1) % sched_every == 0:
                sch.step()
    return str(path)


def _ids(r) -> list[str]:
    return [c.cause for c in r.diagnosis]


def _text(c) -> str:
    return c.title + " " + " ".join(c.evidence)


def _warmup(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))


def _adam(lr=1e-2, **kw):
    return lambda net: torch.optim.Adam(net.parameters(), lr=lr, **kw)


def _adamw(lr=1e-2, wd=0.01, bias_decay=True, **kw):
    return lambda net: torch.optim.AdamW(_groups(net, wd, bias_decay), lr=lr, **kw)


def _lr_groups(first: tuple, second: tuple):
    """Two Adam param groups by parameter name: lr 1e-2 and 1e-3."""

    def make(net):
        named = dict(net.named_parameters())
        return torch.optim.Adam(
            [
                {"params": [named[n] for n in first], "lr": 1e-2},
                {"params": [named[n] for n in second], "lr": 1e-3},
            ]
        )

    return make


def _sgd(lr=0.1, **kw):
    return lambda net: torch.optim.SGD(net.parameters(), lr=lr, **kw)


def _step_lr(gamma: float):
    return lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=gamma)


# (id, A's loop, B's loop, first step, cause ids in rank order (a prefix), title text, text)
CASES = [
    (
        "Adam: warmup restarted on resume (scheduler state not loaded)",
        dict(make_opt=_adam(), sched=_warmup, steps=8),
        dict(make_opt=_adam(), sched=_warmup, steps=8, restart_sched_at=4),
        5,
        ["learning_rate"],
        "schedule restarted in B at step 4",
        "B's recorded rate at step s is A's at step s - 4",
    ),
    (
        "AdamW: cosine schedule stepped per epoch (3 steps) vs per step",
        dict(
            make_opt=_adamw(),
            sched=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=8),
            sched_every=3,
            steps=8,
        ),
        dict(
            make_opt=_adamw(),
            sched=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=8),
            steps=8,
        ),
        2,
        ["learning_rate"],
        "stepped once every 3 steps in A and at every step in B",
        "A's recorded rate at step s is B's at step s // 3",
    ),
    (
        "AdamW: StepLR gamma 0.5 vs 0.1, parting at step 3",
        dict(
            make_opt=_adamw(),
            sched=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
        ),
        dict(
            make_opt=_adamw(),
            sched=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.1),
        ),
        4,
        ["learning_rate"],
        "learning rate differs: 0.005 in A vs 0.001 in B at step 3",
        "recorded optimizer settings at the update of step 3: lr 0.005 in A vs 0.001 in B",
    ),
    (
        "AdamW: OneCycleLR with another max_lr (its own max_lr, min_lr entries are not settings)",
        dict(
            make_opt=_adamw(),
            sched=lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=6),
        ),
        dict(
            make_opt=_adamw(),
            sched=lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.02, total_steps=6),
        ),
        1,
        ["learning_rate"],
        "learning rate differs: 0.002 in A vs 0.0008 in B at step 0",
        "lr 0.002 in A vs 0.0008 in B for every parameter",
    ),
    (
        "Adam: a coupled L2 decay too small to turn a direction",
        dict(make_opt=_adam()),
        dict(make_opt=_adam(weight_decay=1e-6)),
        1,
        ["weight_decay"],
        "coupled L2 inside Adam in B only",
        "weight_decay 0 in A vs 1e-06 in B",
    ),
    (
        "AdamW: biases excluded from decay in B (parameter groups)",
        dict(make_opt=_adamw(wd=0.1)),
        dict(make_opt=_adamw(wd=0.1, bias_decay=False)),
        1,
        ["weight_decay"],
        "excluded from decay in B",
        "0.bias, 2.bias (both Linear) are decayed in A and excluded from decay in B",
    ),
    (
        "Adam(weight_decay) vs AdamW(weight_decay): coupled vs decoupled",
        dict(make_opt=lambda net: torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=0.01)),
        dict(make_opt=lambda net: torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.01)),
        1,
        ["weight_decay"],
        "coupled L2 inside Adam in A vs decoupled (AdamW-style) in B",
        "optimizer Adam in A vs AdamW in B",
    ),
    (
        "SGD vs Adam",
        dict(make_opt=_sgd(lr=1e-2)),
        dict(make_opt=_adam(lr=1e-2)),
        1,
        ["optimizer_class"],
        "optimizer class differs: SGD in A vs Adam in B",
        "recorded optimizer settings at the update of step 0",
    ),
    (
        "Adam betas: the first update differs by the bias correction's rounding only",
        dict(make_opt=_adam()),
        dict(make_opt=_adam(betas=(0.5, 0.999))),
        1,
        ["optimizer_settings"],
        "betas (0.9, 0.999) in A vs (0.5, 0.999) in B at step 0",
        "for every parameter",
    ),
    (
        "Adam eps",
        dict(make_opt=_adam()),
        dict(make_opt=_adam(eps=1e-3)),
        1,
        ["optimizer_settings"],
        "eps 1e-08 in A vs 0.001 in B",
        "",
    ),
    (
        "SGD momentum: the first update is the same (buffer = gradient)",
        dict(make_opt=_sgd(momentum=0.9)),
        dict(make_opt=_sgd(momentum=0.5)),
        2,
        ["optimizer_state"],
        "momentum differs: 0.9 in A vs 0.5 in B",
        "",
    ),
    (
        "SGD nesterov",
        dict(make_opt=_sgd(momentum=0.9)),
        dict(make_opt=_sgd(momentum=0.9, nesterov=True)),
        1,
        ["optimizer_settings"],
        "nesterov False in A vs True in B",
        "",
    ),
    (
        "SGD momentum resumed without its state (a fresh optimizer): no count to read",
        dict(make_opt=_sgd(momentum=0.9)),
        dict(make_opt=_sgd(momentum=0.9), fresh_opt_at=3),
        4,
        ["optimizer_state"],
        "optimizer state reset in B at step 3",
        "holds state for 4 parameter(s) in A vs 0 in B",
    ),
    (
        "SGD momentum buffers cleared in A (optimizer.state.clear())",
        dict(make_opt=_sgd(momentum=0.9), clear_state_at=2),
        dict(make_opt=_sgd(momentum=0.9)),
        3,
        ["optimizer_state"],
        "optimizer state reset in A at step 2",
        "holds state for 0 parameter(s) in A vs 4 in B",
    ),
    (
        "Adam moments cleared in B: the counts and the state size both say it",
        dict(make_opt=_adam()),
        dict(make_opt=_adam(), clear_state_at=4),
        5,
        ["optimizer_state"],
        "optimizer state reset in B at step 4",
        "state step count 4 in A vs 0 in B",
    ),
    (
        "Adam state of one parameter dropped in B: its own count (not the group's first) shows",
        dict(make_opt=_adam()),
        dict(make_opt=_adam(), drop_state=(3, "2.weight")),
        4,
        ["optimizer_state"],
        "optimizer state reset in B at step 3: its state step count is 0 where the other "
        "run's is 3",
        "state step count 3 in A vs 0 in B for 1 of 4 parameters: 2.weight (Linear)",
    ),
    (
        "SGD momentum buffer of one parameter dropped in B: the state size alone says it",
        dict(make_opt=_sgd(momentum=0.9)),
        dict(make_opt=_sgd(momentum=0.9), drop_state=(3, "2.weight")),
        4,
        ["optimizer_state"],
        "optimizer state differs at step 3: it holds state for 4 parameter(s) in A vs 3 in B",
        "zero_grad(set_to_none=False) vs True",
    ),
    (
        "a state size parted by an unused layer (zeros vs None) is not the cause of an lr change",
        dict(make_opt=_sgd(momentum=0.9), spare=True, sched=_step_lr(0.5)),
        dict(make_opt=_sgd(momentum=0.9), spare=True, sched=_step_lr(0.1), set_to_none=False),
        3,
        ["learning_rate"],
        "learning rate differs: 0.05 in A vs 0.01 in B at step 2",
        "also differs: the optimizer holds state for 4 parameter(s) in A vs 6 in B",
    ),
    (
        "a parameter in another param group (same group sizes, the groups' settings agree)",
        dict(make_opt=_lr_groups(("0.weight", "2.weight"), ("0.bias", "2.bias"))),
        dict(make_opt=_lr_groups(("0.bias", "2.weight"), ("0.weight", "2.bias"))),
        1,
        ["optimizer_settings"],
        "parameter groups differ: 0.weight (Linear) in param group 0 in A and 1 in B at step 0, "
        "so lr 0.01 in A vs 0.001 in B",
        "param groups 0 and 1 have the same settings in both runs",
    ),
    (
        "Adam resumed without its state: moments reset in B at step 3",
        dict(make_opt=_adam()),
        dict(make_opt=_adam(), fresh_opt_at=3),
        4,
        ["optimizer_state"],
        "optimizer state reset in B at step 3",
        "state step count 3 in A vs 0 in B",
    ),
]


@pytest.mark.parametrize(
    ("va", "vb", "step", "causes", "title", "text"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_settings_name_the_cause(tmp_path, va, vb, step, causes, title, text):
    a, b = _loop(tmp_path / "a.h5", **va), _loop(tmp_path / "b.h5", **vb)
    r = graddiff.compare(a, b, exact=True)
    assert r.exit_code == 1
    assert (r.first.step, r.first.kind) == (step, "param"), r.headline()
    assert _ids(r)[: len(causes)] == causes, [(c.cause, c.title) for c in r.diagnosis]
    assert title in r.cause.title, r.cause
    assert text in _text(r.cause), r.cause
    assert "recorded optimizer settings" in _text(r.cause)
    assert not diagnosis_unlabelled(r)  # every record named with its module class
    assert "max_lr" not in str(r) and "initial_lr" not in str(r)  # a scheduler's own entries


def test_resume_in_a_new_process_names_state_and_schedule(tmp_path):
    """A resumed run (model restored, optimizer and scheduler fresh) traced on its own and
    compared with --offset: both the moments and the schedule restart; both are said."""
    net = _net()
    a = _loop(tmp_path / "a.h5", _adam(), sched=_warmup, steps=8)
    # B: the model as A had it at step 4 (the same updates), then a fresh optimizer/scheduler
    ref = _net()
    opt = _adam()(ref)
    sch = _warmup(opt)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g))]
    for _ in range(8):
        batches.append((torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)))
    for step in range(4):
        opt.zero_grad()
        F.cross_entropy(ref(batches[step][0]), batches[step][1]).backward()
        opt.step()
        sch.step()
    net.load_state_dict(ref.state_dict())
    b = _loop(tmp_path / "b.h5", _adam(), sched=_warmup, steps=4, start=4, net=net)
    r = graddiff.compare(a, b, exact=True, offset=4)
    assert r.exit_code == 1 and (r.first.step, r.first.kind) == (5, "param"), r.headline()
    ids = _ids(r)
    assert ids[:2] == ["optimizer_state", "learning_rate"], [
        (c.cause, c.title) for c in r.diagnosis
    ]
    assert "optimizer state reset in B at step 4" in r.diagnosis[0].title
    assert "schedule restarted in B at step 4" in r.diagnosis[1].title


def test_settings_agree_the_update_itself_differs(tmp_path):
    """A manual change of the weights after step(): the settings agree, and that is said."""
    a = _loop(tmp_path / "a.h5", _sgd(momentum=0.9))
    b = _loop(tmp_path / "b.h5", _sgd(momentum=0.9), manual_shrink=True)
    r = graddiff.compare(a, b, exact=True)
    assert r.exit_code == 1 and (r.first.step, r.first.kind) == (1, "param"), r.headline()
    assert "recorded optimizer settings agree at the update of step 0" in _text(r.cause), r.cause
    assert "the update itself differs" in _text(r.cause)


def test_a_setting_is_not_the_cause_of_a_forward_divergence(tmp_path):
    """Dropout masks differ at step 0 (before any update) while the rates differ too: the rate
    is listed as also differing, never as the cause."""
    a = _loop(tmp_path / "a.h5", _sgd(lr=0.1), dropout_seed=1)
    b = _loop(tmp_path / "b.h5", _sgd(lr=0.05), dropout_seed=2)
    r = graddiff.compare(a, b)
    assert r.exit_code == 1 and r.first.step == 0 and r.first.kind != "param", r.headline()
    assert "learning_rate" not in _ids(r), [(c.cause, c.title) for c in r.diagnosis]
    assert "also differs (not the cause" in _text(r.cause) and "lr 0.1 vs 0.05" in _text(r.cause)


@pytest.mark.parametrize(
    "impl_b", [{"foreach": True}, {"fused": True}, {"foreach": False}], ids=str
)
def test_equivalent_adamw_implementations_are_not_diverged(tmp_path, impl_b):
    """foreach / fused / for-loop AdamW compute the same update: never DIVERGED, and the
    settings that differ only in how the update is computed are never named as a cause."""
    a = _loop(tmp_path / "a.h5", _adamw(foreach=None), steps=4)
    b = _loop(tmp_path / "b.h5", _adamw(**impl_b), steps=4)
    r = graddiff.compare(a, b)
    assert r.exit_code == 0 and r.verdict != "diverged", r.headline()
    for c in r.diagnosis:  # (a rounding-level first difference may still be described)
        assert c.cause not in ("optimizer_settings", "optimizer_class"), c
        assert "how it is computed" not in _text(c) and "fused" not in c.title, c
        assert "foreach None" not in _text(c) and "foreach True" not in _text(c), c


def test_same_settings_say_nothing(tmp_path):
    a = _loop(tmp_path / "a.h5", _adamw(), sched=_warmup)
    b = _loop(tmp_path / "b.h5", _adamw(), sched=_warmup)
    r = graddiff.compare(a, b, exact=True)
    assert r.exit_code == 0 and r.first is None and not r.diagnosis, r.headline()


def test_settings_and_value_fit_that_disagree_are_both_said():
    """The merge of the two kinds of evidence, on causes alone: a settings cause the value fit
    does not confirm is said to be unconfirmed, and the value cause is kept after it, saying
    the settings do not show it (never one picked silently)."""
    from graddiff.diff.context import Cause
    from graddiff.diff.rules_settings import _merge

    found = [Cause("learning_rate", "learning rate differs: 0.1 in A vs 0.05 in B", ["ev"], "")]
    value = [Cause("weight_decay", "weight decay differs: coupled L2", ["head", "fit"], "")]
    rounding = Cause("rounding", "float-rounding-level difference", [], "")
    out = _merge(None, 3, found, [*value, rounding], [], True)
    assert [c.cause for c in out] == ["learning_rate", "weight_decay", "rounding"]
    assert "the value fit of the update reads something else: weight decay differs" in " ".join(
        out[0].evidence
    )
    assert "the recorded optimizer settings do not show this" in out[1].evidence[-1]
    # a value cause that reads the same confirms it, with its numbers
    found = [Cause("learning_rate", "learning rate differs: 0.1 in A vs 0.05 in B", ["ev"], "")]
    value = [Cause("learning_rate", "learning rate differs", ["head", "A's update is B's x 2"], "")]
    out = _merge(None, 3, found, value, [], True)
    assert [c.cause for c in out] == ["learning_rate"]
    assert out[0].evidence[1:] == [
        "the values agree: learning rate differs",
        "values: A's update is B's x 2",
    ]


@pytest.mark.parametrize(
    ("vb", "step", "cause", "title"),
    [
        (dict(sched=_step_lr(0.1)), 3, "learning_rate", "learning rate differs: 0.005 in A vs "),
        (
            dict(sched=_step_lr(0.5), fresh_opt_at=2),
            3,
            "optimizer_state",
            "optimizer state reset in B at step 2",
        ),
    ],
    ids=["a changed lr schedule", "optimizer re-created"],
)
def test_a_golden_run_check_names_the_settings_cause(tmp_path, vb, step, cause, title):
    """A golden file (full values at step 0 only, compacted as the fixture writes it) keeps the
    /optimizer table: a later divergence, judged on statistics, is still named from the
    recorded settings."""
    from graddiff.testing import GOLDEN_TRACE_OPTIONS, assert_runs_match, compact_copy

    assert GOLDEN_TRACE_OPTIONS == {"full_steps": [0]}  # what the fixture records
    make = _sgd(lr=0.01, momentum=0.9)
    ref = _loop(tmp_path / "g.h5", make, sched=_step_lr(0.5), values="stats", full_steps=[0])
    compact_copy(ref, tmp_path / "golden.h5")
    actual = _loop(tmp_path / "b.h5", make, values="stats", full_steps=[0], **vb)
    with pytest.raises(AssertionError) as info:
        assert_runs_match(actual, tmp_path / "golden.h5")
    message = str(info.value)
    assert f"DIVERGED at step {step}: param" in message, message
    assert f"Likely cause: {title}" in message, message
    r = graddiff.compare(str(tmp_path / "golden.h5"), actual)
    assert r.cause.cause == cause and r.first.step == step, r.cause


def test_the_noise_twin_keeps_the_settings_causes_and_adds_no_false_one(tmp_path):
    """compare --noise: the twin (parameters nudged by one ulp, the same optimizer and
    schedule) records the same /optimizer table; a changed schedule in B is still named from
    the settings, and an equivalent B (foreach vs not) is within the noise, no setting named
    (the implementation entry that differs is not a cause)."""
    sched = _step_lr(0.5)
    a = _loop(tmp_path / "a.h5", _adam(), sched=sched)
    tw = _loop(tmp_path / "tw.h5", _adam(), sched=sched, perturb="ulp")
    with graddiff.open(a) as ra, graddiff.open(tw) as rt:
        assert ra.optimizer_settings.rows == rt.optimizer_settings.rows  # the same table
    b = _loop(tmp_path / "b.h5", _adam(), sched=_step_lr(0.1))
    r = graddiff.compare(a, b, noise=tw)
    assert r.exit_code == 1 and (r.first.kind, r.first.step) == ("param", 3), r.headline()
    assert r.cause.cause == "learning_rate", r.cause
    assert "recorded optimizer settings at the update of step 2" in _text(r.cause)
    eq = _loop(tmp_path / "e.h5", _adam(foreach=True), sched=sched)
    r = graddiff.compare(a, eq, noise=tw)
    assert r.exit_code == 0, r.headline()
    assert "settings differ" not in str(r.to_dict()) and "optimizer_" not in str(r.to_dict())
    # the twin against its own run, bitwise: the nudge is found, no setting is blamed
    r = graddiff.compare(a, tw, exact=True)
    assert r.exit_code == 1 and (r.first.kind, r.first.step) == ("param", 0), r.headline()
    assert not any(c.cause.startswith("optimizer") for c in r.diagnosis), r.diagnosis
    assert "differ in the recorded optimizer settings" not in str(r.to_dict())
    assert "also differs (not the cause" not in str(r.to_dict())

"""Optimizer-side causes on pairs of real (tiny) training runs: AMP GradScaler misuse, loss
weights, coupled L2 inside Adam, learning-rate schedules not restored on resume or stepped per
epoch instead of per step, and small parameters (biases) as evidence.

The oracle is the test itself: it knows which change it made, at which update it first acts and
what the differ must then say (step, record kind, cause id, the numbers it recovers).
"""

from __future__ import annotations

import re
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graddiff


def _run(
    path,
    *,
    opt: str = "sgd",
    lr: float = 0.1,
    wd: float = 0.0,
    momentum: float = 0.0,
    scaler: Optional[str] = None,
    clip: Optional[float] = None,
    loss_weight: float = 1.0,
    sched: Optional[str] = None,
    sched_restart_at: Optional[int] = None,
    sched_every: int = 1,
    no_decay_bias: bool = False,
    bn: bool = False,
    width: int = 16,
    steps: int = 4,
) -> str:
    """``sched``: None, "warmup" (linear over 6 steps) or "decay" (x0.5 per scheduler step);
    ``sched_restart_at``: the step where a resumed run builds a fresh scheduler without
    loading its state; ``sched_every``: scheduler.step() once every that many steps (an epoch).

    ``scaler``: None (fp32), "ok" (scale, unscale_, clip, scaler.step), "clip_scaled"
    (clip before unscale_), "bypass" (optimizer.step() on the scaled gradients)."""
    torch.manual_seed(0)
    if bn:  # 0.bias (4 elements) feeds BatchNorm: its gradient is rounding residue
        net = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 4))
    else:
        net = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 4))
    groups: list = list(net.parameters())
    if no_decay_bias:
        named = list(net.named_parameters())
        groups = [
            {"params": [p for n, p in named if not n.endswith("bias")]},
            {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0},
        ]
    if opt == "sgd":
        o = torch.optim.SGD(groups, lr=lr, weight_decay=wd, momentum=momentum)
    else:
        cls = torch.optim.AdamW if opt == "adamw" else torch.optim.Adam
        o = cls(groups, lr=lr, weight_decay=wd)
    sc = torch.amp.GradScaler("cpu", init_scale=2.0**16) if scaler else None

    def schedule():
        if sched == "warmup":
            return torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / 6))
        return torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)

    sch = schedule() if sched else None
    g = torch.Generator().manual_seed(0)
    with graddiff.trace(net, path, values="full"):
        for step in range(steps):
            if step == sched_restart_at:  # model and optimizer restored, the scheduler not
                sch = schedule()
            elif sch is not None and step > 0 and step % sched_every == 0:
                sch.step()
            x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
            o.zero_grad()
            loss = F.cross_entropy(net(x), y) * loss_weight
            if sc is None:
                loss.backward()
                if clip:
                    nn.utils.clip_grad_norm_(net.parameters(), clip)
                o.step()
                continue
            sc.scale(loss).backward()
            if scaler == "bypass":  # the scaled gradients reach the optimizer
                o.step()
                continue
            if scaler == "ok":
                sc.unscale_(o)
            if clip:
                nn.utils.clip_grad_norm_(net.parameters(), clip)
            sc.step(o)
            sc.update()
    return str(path)


def _compare(tmp_path, va: dict, vb: dict):
    return graddiff.compare(
        _run(tmp_path / "a.h5", **va), _run(tmp_path / "b.h5", **vb), exact=True
    )


def _text(c) -> str:
    return c.title + " " + " ".join(c.evidence)


# (id, A, B, first step, first kind, cause ids in rank order, text of the first cause)
SCALING = [
    (
        "optimizer.step() bypasses scaler.step(): gradients 2^16 too large",
        {"scaler": "ok"},
        {"scaler": "bypass"},
        0,
        "grad",
        ["scaled_gradients"],
        "B's gradients are 2^16 x A's",
    ),
    (
        "clipped before unscale_, both runs clip",
        {"scaler": "ok", "clip": 0.05},
        {"scaler": "clip_scaled", "clip": 0.05},
        0,
        "grad",
        ["clip_before_unscale"],
        "B clips its gradients while they are still scaled by the GradScaler",
    ),
    (
        "GradScaler clipped before unscale_ vs fp32",
        {"clip": 1.0},
        {"scaler": "clip_scaled", "clip": 1.0},
        0,
        "loss",
        ["loss_scaling"],
        "clipped while still scaled",
    ),
    ("loss weight 3", {}, {"loss_weight": 3.0}, 0, "loss", ["loss_scale"], "B's loss is 3x"),
    (
        "loss weight 1/8",
        {},
        {"loss_weight": 0.125},
        0,
        "loss",
        ["loss_scale"],
        "A's loss is 8x",
    ),
    (
        "loss weight 32: a GradScaler left unscaled fits too, both are said",
        {},
        {"loss_weight": 32.0},
        0,
        "loss",
        ["loss_scaling", "loss_scale"],
        "not unscaled",
    ),
]


@pytest.mark.parametrize(
    ("va", "vb", "step", "kind", "causes", "text"),
    [c[1:] for c in SCALING],
    ids=[c[0] for c in SCALING],
)
def test_scaling_cause(tmp_path, va, vb, step, kind, causes, text):
    r = _compare(tmp_path, va, vb)
    assert r.exit_code == 1
    assert (r.first.step, r.first.kind) == (step, kind), r.headline()
    got = [c.cause for c in r.diagnosis if c.cause != "rounding"]
    assert got[: len(causes)] == causes, [(c.cause, c.title) for c in r.diagnosis]
    assert text in _text(r.cause), r.cause


def test_correct_grad_scaler_leaves_the_updates_bitwise_equal(tmp_path):
    """The oracle for the GradScaler-vs-fp32 case: a power-of-two scale is removed exactly, so
    everything but the recorded (scaled) loss agrees bitwise."""
    a, b = _run(tmp_path / "a.h5"), _run(tmp_path / "b.h5", scaler="ok")
    kinds = "param,input,activation,grad"  # output gradients are scaled, as the loss
    r = graddiff.compare(a, b, exact=True, kinds=kinds)
    assert r.exit_code == 0 and r.first is None, r.headline()
    # every kind: the loss and output gradients are judged up to B's exact loss scale, so the
    # same training is not a divergence, and the report says why (lossscale.py)
    for ex in (False, True):
        r = graddiff.compare(a, b, exact=ex)
        assert r.exit_code == 0 and r.verdict == "identical", r.headline()
        assert r.loss_scale == {"run": "B", "log2": [16]}
        assert "loss" in r.compared_kinds and "grad_output" in r.compared_kinds
        assert "B's are 2^16 x the other's" in r.headline()
        assert r.cause.cause == "loss_scaling" and "the same training" in r.cause.title
    # A and B swapped: A is the scaled run
    r = graddiff.compare(b, a)
    assert r.exit_code == 0 and r.loss_scale == {"run": "A", "log2": [16]}


def test_grad_scaler_clipping_while_scaled_is_still_diverged(tmp_path):
    """The loss scale explains the loss and output gradients only: clipping before unscale_
    changes the gradients the update uses, and that stays a divergence."""
    a = _run(tmp_path / "a.h5", clip=1.0)
    b = _run(tmp_path / "b.h5", scaler="clip_scaled", clip=1.0)
    r = graddiff.compare(a, b)
    assert r.exit_code == 1 and r.loss_scale is None, r.headline()


# (id, A, B, cause id, text of the first cause, text it must not contain)
ADAM = [
    (
        "coupled L2 inside Adam vs none",
        {"opt": "adam", "lr": 0.01},
        {"opt": "adam", "lr": 0.01, "wd": 0.5},
        "weight_decay",
        "coupled L2 inside Adam in B only",
        "decoupled",
    ),
    (
        "coupled L2 inside Adam, a common setting",
        {"opt": "adam", "lr": 0.01},
        {"opt": "adam", "lr": 0.01, "wd": 0.01},
        "weight_decay",
        "coupled L2 inside Adam in B only",
        "learning rate",
    ),
    (
        "Adam(weight_decay) vs AdamW(weight_decay)",
        {"opt": "adam", "lr": 0.01, "wd": 0.05},
        {"opt": "adamw", "lr": 0.01, "wd": 0.05},
        "weight_decay",
        "coupled L2 inside Adam in A vs decoupled (AdamW-style) in B",
        "learning rate",
    ),
    (
        "AdamW decay vs none",
        {"opt": "adamw", "lr": 0.01},
        {"opt": "adamw", "lr": 0.01, "wd": 0.5},
        "weight_decay",
        "decoupled (AdamW-style) in B only",
        "inside Adam",
    ),
    (
        "Adam learning rate",
        {"opt": "adam", "lr": 0.01},
        {"opt": "adam", "lr": 0.02},
        "learning_rate",
        "0.01 in A vs 0.02 in B",
        "decay",
    ),
]


@pytest.mark.parametrize(
    ("va", "vb", "cause", "text", "absent"), [c[1:] for c in ADAM], ids=[c[0] for c in ADAM]
)
def test_adam_decay_and_rate_are_told_apart(tmp_path, va, vb, cause, text, absent):
    """Adam's first update (empty moments) moves every element by lr: a coupled L2 decay turns
    directions (-sign(g + wd * p)) without changing sizes, a decoupled decay adds -lr * wd * p,
    a rate changes every size. The oracle: the change made, acting from the first update."""
    r = _compare(tmp_path, va, vb)
    assert r.exit_code == 1 and (r.first.step, r.first.kind) == (1, "param"), r.headline()
    assert [c.cause for c in r.diagnosis] == [cause], [(c.cause, c.title) for c in r.diagnosis]
    assert text in r.cause.title, r.cause
    assert absent not in r.cause.title, r.cause


def test_coupled_decay_recovers_the_setting(tmp_path):
    """The directions bound weight_decay: the interval must hold the true setting."""
    r = _compare(tmp_path, {"opt": "adam", "lr": 0.01}, {"opt": "adam", "lr": 0.01, "wd": 0.5})
    m = re.search(r"weight_decay between ([0-9.e+-]+) and ([0-9.e+-]+)", _text(r.cause))
    assert m, r.cause
    lo, hi = float(m.group(1)), float(m.group(2))
    assert lo <= 0.5 <= hi and hi - lo < 0.2, (lo, hi)


# (id, A, B, first step, title text, evidence text)
SCHEDULES = [
    (
        "warmup restarted on resume (scheduler state not loaded)",
        {"sched": "warmup", "momentum": 0.9, "steps": 8},
        {"sched": "warmup", "momentum": 0.9, "steps": 8, "sched_restart_at": 4},
        5,
        "schedule restarted in B at step 4",
        "B's rate at step t is A's at step t - 4",
    ),
    (
        "StepLR rebuilt on resume: its step count resets",
        {"sched": "decay", "steps": 8},
        {"sched": "decay", "steps": 8, "sched_restart_at": 3},
        4,
        "set back by 1 step in B at step 3",
        "B's rate at step t is A's at step t - 1",
    ),
    (
        "stepped per epoch (3 steps) vs per step",
        {"sched": "decay", "steps": 8, "sched_every": 3},
        {"sched": "decay", "steps": 8},
        2,
        "stepped once every 3 steps in A and at every step in B",
        "A's rate at step t is B's at step t // 3",
    ),
    (
        "warmup stepped per epoch (2 steps) vs per step, with momentum",
        {"sched": "warmup", "momentum": 0.9, "steps": 8},
        {"sched": "warmup", "momentum": 0.9, "steps": 8, "sched_every": 2},
        2,
        "stepped once every 2 steps in B and at every step in A",
        "B's rate at step t is A's at step t // 2",
    ),
]


@pytest.mark.parametrize(
    ("va", "vb", "step", "title", "evidence"),
    [c[1:] for c in SCHEDULES],
    ids=[c[0] for c in SCHEDULES],
)
def test_schedule_difference_is_named_with_its_offset(tmp_path, va, vb, step, title, evidence):
    """The oracle knows the schedule each run followed: where the rates part, and the relation
    between the two series of rates (a shift by the resume step, or a stride of an epoch)."""
    r = _compare(tmp_path, va, vb)
    assert r.exit_code == 1 and (r.first.step, r.first.kind) == (step, "param"), r.headline()
    assert r.cause.cause == "learning_rate", [(c.cause, c.title) for c in r.diagnosis]
    # a schedule moves the rate of a momentum SGD, not its momentum
    assert "optimizer_state" not in [c.cause for c in r.diagnosis]
    assert title in r.cause.title, r.cause
    assert evidence in _text(r.cause), r.cause
    assert "load_state_dict" in r.cause.fix or "scheduler.step()" in r.cause.fix


def test_a_constant_rate_change_is_not_called_a_schedule(tmp_path):
    r = _compare(tmp_path, {"steps": 6, "momentum": 0.9}, {"steps": 6, "momentum": 0.9, "lr": 0.05})
    assert r.cause.cause == "learning_rate" and "0.1 in A vs 0.05 in B" in r.cause.title
    assert "schedule" not in r.cause.title


def _all_names(monkeypatch):
    """List every parameter in evidence (no "and N more"), so the test sees which count."""
    from graddiff.diff import context

    names = context.Context.names
    monkeypatch.setattr(
        context.Context, "names", lambda self, slots, limit=4: names(self, slots, 99)
    )


# (id, A, B, parameters the evidence must name, parameters it must not name)
SMALL = [
    (
        "rate: the 4-element bias counts",
        {"momentum": 0.9},
        {"momentum": 0.9, "lr": 0.05},
        "for every parameter",
        [],
    ),
    (
        "no decay on biases: both biases carry it, the 4-element one too",
        {"wd": 0.05, "momentum": 0.9},
        {"wd": 0.05, "momentum": 0.9, "no_decay_bias": True},
        "2 of 4 parameters: 0.bias, 2.bias (both Linear); 0.weight, 2.weight (both Linear) are "
        "updated bitwise alike",
        [],
    ),
    (
        "rate: a bias before BatchNorm (rounding-residue gradient) proves nothing",
        {"bn": True},
        {"bn": True, "lr": 0.05},
        "5 of 6 parameters",
        ["0.bias"],
    ),
    (
        "decay: a zero-initialised BatchNorm bias proves nothing",
        {"bn": True},
        {"bn": True, "wd": 0.05},
        "4 of 6 parameters",
        ["0.bias", "1.bias"],
    ),
    (
        "AdamW, no decay on biases: the 4-element bias counts",
        {"opt": "adamw", "lr": 0.01, "wd": 0.5},
        {"opt": "adamw", "lr": 0.01, "wd": 0.5, "no_decay_bias": True},
        "2 of 4 parameters: 0.bias, 2.bias (both Linear)",
        [],
    ),
]


@pytest.mark.parametrize(
    ("va", "vb", "who", "not_named"), [c[1:] for c in SMALL], ids=[c[0] for c in SMALL]
)
def test_small_parameters_are_evidence_where_informative(
    tmp_path, monkeypatch, va, vb, who, not_named
):
    """A 4-element bias is too small to fit three coefficients, but is tested against its
    module's coefficients (and its own decay): it counts where its data reject the other run's
    value, and only there. The oracle knows which parameters the change touched and which
    could show it (a zero tensor shows no decay, a rounding-residue gradient no rate)."""
    _all_names(monkeypatch)
    r = _compare(tmp_path, va, vb)
    assert (r.first.step, r.first.kind) == (1, "param"), r.headline()
    assert r.cause.cause in ("learning_rate", "weight_decay"), r.cause
    text = _text(r.cause)
    assert who in text, text
    listed = text.split(" parameters: ", 1)[-1]
    for name in not_named:
        assert name not in listed, text


@pytest.mark.parametrize("wd", [1e-3, 1e-4])
def test_coupled_decay_too_small_to_turn_a_direction_is_read_from_the_sizes(tmp_path, wd):
    """No direction turns (wd * |p| < |g| everywhere), so the first update differs only at
    rounding level; elements whose gradient is near Adam's eps move by lr * |g~| / (|g~| + eps)
    and give wd. The oracle: the setting made, and the verdict is not "rounding"."""
    va = {"opt": "adam", "lr": 0.01, "width": 256, "steps": 2}
    r = _compare(tmp_path, va, {**va, "wd": wd})
    assert (r.first.step, r.first.kind) == (1, "param"), r.headline()
    assert r.cause.cause == "weight_decay", [(c.cause, c.title) for c in r.diagnosis]
    assert "coupled L2 inside Adam in B only" in r.cause.title
    # a parameter whose update such a decay leaves bitwise alike is no parameter-group evidence
    assert "parameter groups" not in _text(r.cause), r.cause
    m = re.search(r"weight_decay ([0-9.e+-]+) \(standard error ([0-9.e+-]+)", _text(r.cause))
    assert m, r.cause
    assert abs(float(m.group(1)) - wd) < max(6 * float(m.group(2)), 0.05 * wd), m.group(0)


def test_no_decay_reads_as_none_from_the_sizes(tmp_path):
    """The same reading on two runs without coupled decay finds none (Adam vs AdamW's
    decoupled decay: the sizes must not invent a coupled one)."""
    va = {"opt": "adam", "lr": 0.01, "width": 256, "steps": 2}
    r = _compare(tmp_path, va, {**va, "opt": "adamw", "wd": 0.01})
    assert r.cause.cause == "weight_decay", [(c.cause, c.title) for c in r.diagnosis]
    assert "decoupled (AdamW-style) in B only" in r.cause.title, r.cause

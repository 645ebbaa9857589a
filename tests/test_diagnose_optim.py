"""Optimizer-side causes on pairs of real (tiny) training runs: AMP GradScaler misuse, loss
weights, coupled L2 inside Adam, learning-rate schedules not restored on resume or stepped per
epoch instead of per step, and small parameters (biases) as evidence.

The oracle is the test itself: it knows which change it made, at which update it first acts and
what the differ must then say (step, record kind, cause id, the numbers it recovers).
"""

from __future__ import annotations

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
    steps: int = 4,
) -> str:
    """``scaler``: None (fp32), "ok" (scale, unscale_, clip, scaler.step), "clip_scaled"
    (clip before unscale_), "bypass" (optimizer.step() on the scaled gradients)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    if opt == "sgd":
        o = torch.optim.SGD(net.parameters(), lr=lr, weight_decay=wd, momentum=momentum)
    else:
        cls = torch.optim.AdamW if opt == "adamw" else torch.optim.Adam
        o = cls(net.parameters(), lr=lr, weight_decay=wd)
    sc = torch.amp.GradScaler("cpu", init_scale=2.0**16) if scaler else None
    g = torch.Generator().manual_seed(0)
    with graddiff.trace(net, path, values="full"):
        for _ in range(steps):
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
        ["scaled_gradients"],
        "A's gradients are 2^16 x B's",
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
    (
        "GradScaler used correctly vs fp32: only the recorded loss differs",
        {},
        {"scaler": "ok"},
        0,
        "loss",
        ["loss_scaling"],
        "its gradients are unscaled before the update",
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
    r = graddiff.compare(a, b, exact=True)
    assert "B's gradients are 1x" in _text(r.cause)

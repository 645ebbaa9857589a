"""Each update-rule, scaling and precision cause on a pair of real (tiny) training runs.

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
    no_decay_bias: bool = False,
    zero_bias: bool = False,
    micro: int = 1,
    divide: bool = True,
    autocast: Optional[torch.dtype] = None,
    resume_at: Optional[int] = None,
    gamma_at: Optional[int] = None,
    steps: int = 5,
) -> str:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    if zero_bias:  # zero-initialised biases, as in GPT-2 and most transformer inits
        with torch.no_grad():
            for n, p in net.named_parameters():
                if n.endswith("bias"):
                    p.zero_()
    if no_decay_bias:
        groups = [
            {"params": [p for n, p in net.named_parameters() if n.endswith("weight")]},
            {
                "params": [p for n, p in net.named_parameters() if n.endswith("bias")],
                "weight_decay": 0.0,
            },
        ]
    else:
        groups = list(net.parameters())

    def make():
        if opt == "sgd":
            return torch.optim.SGD(groups, lr=lr, weight_decay=wd, momentum=momentum)
        cls = torch.optim.AdamW if opt == "adamw" else torch.optim.Adam
        return cls(groups, lr=lr, weight_decay=wd)

    o = make()
    g = torch.Generator().manual_seed(0)
    with graddiff.trace(net, path, values="full"):
        for step in range(steps):
            x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
            if step == resume_at:
                o = make()  # a resumed run that did not restore the optimizer state
            if step == gamma_at:
                for group in o.param_groups:
                    group["lr"] *= 0.5
            o.zero_grad()
            for xm, ym in zip(x.chunk(micro), y.chunk(micro)):
                with torch.autocast(
                    "cpu", dtype=autocast or torch.bfloat16, enabled=bool(autocast)
                ):
                    loss = F.cross_entropy(net(xm), ym)
                (loss / micro if divide else loss).backward()
            o.step()
    return str(path)


# (id, A, B, first step, first kind, cause id, text the title or evidence must contain)
CASES = [
    ("sgd weight decay", {}, {"wd": 0.05}, 1, "param", "weight_decay", "0 in A vs 0.05 in B"),
    (
        "adamw weight decay",
        {"opt": "adamw", "lr": 0.01},
        {"opt": "adamw", "lr": 0.01, "wd": 0.5},
        1,
        "param",
        "weight_decay",
        "decoupled",
    ),
    (
        "decay on different parameter groups",
        {"opt": "adamw", "lr": 0.01, "wd": 0.5},
        {"opt": "adamw", "lr": 0.01, "wd": 0.5, "no_decay_bias": True},
        1,
        "param",
        "weight_decay",
        "0.weight, 2.weight are updated bitwise alike",
    ),
    ("learning rate", {}, {"lr": 0.05}, 1, "param", "learning_rate", "0.1 in A vs 0.05 in B"),
    (
        "schedule stepped at another step",
        {"gamma_at": 3},
        {"gamma_at": 2},
        3,
        "param",
        "learning_rate",
        "schedule",
    ),
    ("momentum", {}, {"momentum": 0.9}, 2, "param", "optimizer_state", "0 in A vs 0.9 in B"),
    (
        "sgd momentum buffer reset on resume",
        {"momentum": 0.9},
        {"momentum": 0.9, "resume_at": 3},
        4,
        "param",
        "optimizer_state",
        "momentum buffer reset in B",
    ),
    (
        "adam state reset on resume",
        {"opt": "adam", "lr": 0.01},
        {"opt": "adam", "lr": 0.01, "resume_at": 3},
        4,
        "param",
        "optimizer_state",
        "Adam's moments start from zero",
    ),
    (
        "accumulation not divided by k",
        {"micro": 4},
        {"micro": 4, "divide": False},
        0,
        "loss",
        "unscaled_micro_batches",
        "not divided by 4",
    ),
    (
        "bf16 autocast",
        {},
        {"autocast": torch.bfloat16},
        0,
        "activation",
        "precision",
        "B computes in bfloat16",
    ),
]


@pytest.mark.parametrize(
    ("va", "vb", "step", "kind", "cause", "text"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_cause_is_named_from_evidence(tmp_path, va, vb, step, kind, cause, text):
    r = graddiff.compare(_run(tmp_path / "a.h5", **va), _run(tmp_path / "b.h5", **vb), exact=True)
    assert r.exit_code == 1
    d = r.first
    assert (d.step, d.kind) == (step, kind), r.headline()
    assert r.cause.cause == cause, [(c.cause, c.title) for c in r.diagnosis]
    assert text in r.cause.title + " " + " ".join(r.cause.evidence), r.cause


def test_bf16_vs_fp32_is_within_bf16_precision(tmp_path):
    r = graddiff.compare(_run(tmp_path / "a.h5"), _run(tmp_path / "b.h5", autocast=torch.bfloat16))
    assert (r.verdict, r.exit_code) == ("within_tolerance", 0), r.headline()
    assert r.headline().startswith("Within bfloat16 precision: no difference beyond what")
    assert r.precision["dtype"] == "bfloat16" and r.precision["reduced"]
    assert (r.precision["a"], r.precision["b"]) == ("float32", "bfloat16")
    assert r.cause.cause == "precision" and "within what bfloat16" in " ".join(r.cause.evidence)
    # the flat tolerance would have called it diverged: the precision is what decides
    assert r.max_rel_diff > r.rtol


def test_a_real_bug_in_bf16_runs_is_still_found(tmp_path):
    a = _run(tmp_path / "a.h5", autocast=torch.bfloat16, micro=4)
    b = _run(tmp_path / "b.h5", autocast=torch.bfloat16, micro=4, divide=False)
    r = graddiff.compare(a, b)
    assert r.exit_code == 1 and (r.first.step, r.first.kind) == (0, "loss"), r.headline()
    assert "beyond what bfloat16 rounding explains" in r.headline()
    assert r.cause.cause == "unscaled_micro_batches"


def test_zero_initialised_biases_are_no_evidence_of_parameter_groups(tmp_path):
    """Decaying zeros gives zeros: zero-initialised biases update bitwise alike under any decay,
    so a decay difference on every parameter must not be called a parameter-group difference."""
    va = {"opt": "adamw", "lr": 0.01, "zero_bias": True, "steps": 2}
    vb = {**va, "wd": 0.5}
    r = graddiff.compare(_run(tmp_path / "a.h5", **va), _run(tmp_path / "b.h5", **vb), exact=True)
    assert r.cause.cause == "weight_decay", [(c.cause, c.title) for c in r.diagnosis]
    text = r.cause.title + " " + " ".join(r.cause.evidence)
    assert "parameter groups" not in text, r.cause


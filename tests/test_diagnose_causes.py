"""Each update-rule, scaling and precision cause on a pair of real (tiny) training runs.

The oracle is the test itself: it knows which change it made, at which update it first acts and
what the differ must then say (step, record kind, cause id, the numbers it recovers).
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from classcheck import diagnosis_unlabelled
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
        "0.weight, 2.weight (both Linear) are updated bitwise alike",
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
    assert not diagnosis_unlabelled(r)  # every record named carries its class


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


class _LM(nn.Module):
    """A tiny language model whose output projection starts equal to the embedding."""

    def __init__(self, tie: bool):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(self.emb.weight)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mix(self.emb(x))))


def _lm(path, tie: bool) -> str:
    torch.manual_seed(0)
    m = _LM(tie)
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with graddiff.trace(m, path, values="full"):
        for _ in range(3):
            x = torch.randint(0, 20, (4, 6), generator=g)
            o.zero_grad()
            F.cross_entropy(m(x).flatten(0, 1), x.roll(-1, 1).flatten()).backward()
            o.step()
    return str(path)


def test_tied_vs_untied_weights(tmp_path):
    a, b = _lm(tmp_path / "a.h5", tie=True), _lm(tmp_path / "b.h5", tie=False)
    with graddiff.open(a) as ra, graddiff.open(b) as rb:
        assert ra.tied_parameters == {"head.weight": "emb.weight"}
        assert rb.tied_parameters == {}
    r = graddiff.compare(a, b)
    assert r.exit_code == 1 and (r.first.step, r.first.kind, r.first.name) == (
        0,
        "param",
        "head.weight",
    )
    assert [c.cause for c in r.diagnosis] == ["tied_weights"], [
        (c.cause, c.title) for c in r.diagnosis
    ]
    text = " ".join(r.cause.evidence)
    assert "head.weight (Linear) shares emb.weight (Embedding) in A" in r.cause.title
    assert "aliasing recorded at trace time" in text and "starts bitwise equal" in text
    assert (
        "equals the sum of B's gradients of emb.weight (Embedding) and head.weight (Linear)" in text
    )
    assert not diagnosis_unlabelled(r)
    # reversed, and from traces written before the aliasing was recorded: the gradient sum
    import h5py

    with h5py.File(a, "a") as f:
        del f.attrs["tied_parameters"]
    r = graddiff.compare(b, a)
    assert r.cause.cause == "tied_weights" and "shares emb.weight (Embedding) in B" in r.cause.title
    assert "recorded at trace time" not in " ".join(r.cause.evidence)


class _GAN(nn.Module):
    def __init__(self):
        super().__init__()
        self.G = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6))
        self.D = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))


def _gan(path, detach: bool, two_optimizers: bool) -> str:
    """Discriminator step then generator step; ``detach=False`` is the bug: the discriminator's
    loss backpropagates into the generator, whose gradients then carry it."""
    torch.manual_seed(0)
    m = _GAN()
    if two_optimizers:  # each step() ends a graddiff step: D's and G's updates are two steps
        oD, oG = (torch.optim.SGD(p.parameters(), lr=0.1) for p in (m.D, m.G))
    else:
        oD = oG = torch.optim.SGD(m.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    bce = F.binary_cross_entropy_with_logits
    with graddiff.trace(m, path, values="full"):
        for _ in range(2):
            z, real = torch.randn(8, 4, generator=g), torch.randn(8, 6, generator=g)
            oD.zero_grad()
            oG.zero_grad()
            fake = m.G(z)
            dr, df = m.D(real), m.D(fake.detach() if detach else fake)
            d_loss = bce(dr, torch.ones_like(dr)) + bce(df, torch.zeros_like(df))
            d_loss.backward(retain_graph=not two_optimizers)
            if two_optimizers:
                oD.step()
                fake = m.G(z)
            out = m.D(fake)
            bce(out, torch.ones_like(out)).backward()
            oG.step()
    return str(path)


@pytest.mark.parametrize("two_optimizers", [True, False], ids=["two optimizers", "one step"])
def test_missing_detach_is_an_extra_gradient_path(tmp_path, two_optimizers):
    a = _gan(tmp_path / "a.h5", detach=True, two_optimizers=two_optimizers)
    b = _gan(tmp_path / "b.h5", detach=False, two_optimizers=two_optimizers)
    r = graddiff.compare(a, b)
    assert r.exit_code == 1 and (r.first.step, r.first.kind) == (0, "grad_output"), r.headline()
    assert r.first.name.startswith("G")
    assert [c.cause for c in r.diagnosis] == ["extra_grad_path"], [
        (c.cause, c.title) for c in r.diagnosis
    ]
    assert "reaches G (Sequential) in B " in r.cause.title, r.cause.title
    text = " ".join(r.cause.evidence)
    # the forward agrees; G is reached by one more backward pass; only G's gradients differ
    n = (1, 0) if two_optimizers else (2, 1)
    assert f"from {n[0]} backward pass(es) in B vs {n[1]} in A" in text
    assert "G.0.weight, G.0.bias, G.2.weight, G.2.bias (all Linear)" in text
    assert not diagnosis_unlabelled(r)
    assert "those of the other 4 parameter(s) agree" in text
    assert "detach" in r.cause.fix


def test_a_frozen_layer_is_not_an_extra_gradient_path(tmp_path):
    """A module the other run never backpropagates into is frozen there, not missing a detach."""

    def run(path, freeze):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        net[0].requires_grad_(not freeze)
        o = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
        g = torch.Generator().manual_seed(0)
        with graddiff.trace(net, path, values="full"):
            for _ in range(2):
                x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
                o.zero_grad()
                F.cross_entropy(net(x), y).backward()
                o.step()
        return str(path)

    r = graddiff.compare(run(tmp_path / "a.h5", False), run(tmp_path / "b.h5", True))
    assert r.cause.cause == "frozen_parameter", [(c.cause, c.title) for c in r.diagnosis]


class _Normalize(nn.Module):
    """Scale each sample to unit norm; ``eps=None`` is the bug (0 / 0 on an all-zero sample)."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return x / (
            x.norm(dim=1, keepdim=True)
            if self.eps is None
            else x.norm(dim=1, keepdim=True).clamp_min(self.eps)
        )


def _nan_run(path, *, eps, guard=False) -> str:
    """Step 2's batch holds an all-zero sample (padding); ``guard`` zeroes NaN logits."""
    torch.manual_seed(0)
    net = nn.Sequential(_Normalize(eps), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    o = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with graddiff.trace(net, path, values="full"):
        for step in range(4):
            x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
            if step == 2:
                x[5] = 0
            o.zero_grad()
            out = net(x)
            F.cross_entropy(torch.nan_to_num(out) if guard else out, y).backward()
            o.step()
    return str(path)


def test_nan_origin_in_one_run(tmp_path):
    a, b = _nan_run(tmp_path / "a.h5", eps=1e-12), _nan_run(tmp_path / "b.h5", eps=None)
    r = graddiff.compare(a, b)
    assert r.exit_code == 1 and (r.first.step, r.first.kind, r.first.name) == (2, "activation", "0")
    assert r.cause.cause == "nonfinite", [(c.cause, c.title) for c in r.diagnosis]
    assert (
        r.cause.title == "run B goes non-finite first: NaN in activation 0 (_Normalize) at step 2"
    )
    text = " ".join(r.cause.evidence)
    # the same story as `graddiff check` on B, what fed it, and the other run
    with graddiff.open(b) as rb:
        (nan,) = rb.check().of_kind("nan")
    assert (nan.step, nan.record_kind, nan.name) == (2, "activation", "0")
    assert f"B: {nan.message}" in text and "8 of 128 values in activation 0 (_Normalize)" in text
    assert "the record computed just before it, input" in text and "is finite" in text
    assert "A stays finite in all its 4 steps (at activation 0 (_Normalize) step 2" in text
    # kinds that were not compared are not told about
    r = graddiff.compare(a, b, kinds="param,loss")
    assert r.cause.cause == "nonfinite" and "B goes non-finite first: NaN in loss" in r.cause.title
    assert "activation" not in r.cause.title + " ".join(r.cause.evidence)


def test_both_runs_nonfinite_at_the_same_place(tmp_path):
    a = _nan_run(tmp_path / "a.h5", eps=None)
    b = _nan_run(tmp_path / "b.h5", eps=None, guard=True)  # B zeroes NaN logits: finite loss
    r = graddiff.compare(a, b)
    assert r.exit_code == 1 and (r.first.step, r.first.kind) == (2, "loss"), r.headline()
    assert r.cause.cause == "nonfinite"
    assert r.cause.title.startswith(
        "both runs go non-finite at the same place: the first NaN is in activation 0 "
        "(_Normalize) at step 2"
    ), r.cause.title

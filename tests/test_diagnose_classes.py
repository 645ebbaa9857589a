"""Every record a diagnosis sentence names carries its module class: ``fc1.weight (Linear)``.

Real (tiny) training runs are driven through several causes; every name of a recorded module
or tensor found in a cause's title, evidence or fix (and in the report's text) must be followed
by its class, either directly or as one of a group of neighbours that share it
(``fc1.weight, fc1.bias (both Linear)``). Old traces without classes get the bare names.
"""

from __future__ import annotations

import re

import h5py
import pytest
import torch
import torch.nn.functional as F
from classcheck import classed_names, diagnosis_unlabelled, unlabelled
from torch import nn

import graddiff
from graddiff.modclass import describe_list


class Net(nn.Module):
    def __init__(self, act: type = nn.ReLU, momentum: float = 0.1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8, momentum=momentum)
        self.drop = nn.Dropout(0.25)
        self.head = nn.Sequential(act(), nn.Linear(8, 3))

    def forward(self, x):
        return self.head(self.drop(self.bn(self.fc1(x))))


def _run(
    path,
    *,
    init_seed: int = 0,
    rng_seed: int = 1,
    act: type = nn.ReLU,
    momentum: float = 0.1,
    freeze: bool = False,
    evaluate: bool = False,
    zero_grad: bool = True,
    clip: float = 0.0,
    opt: str = "sgd",
    wd: float = 0.0,
    no_decay: bool = False,
    steps: int = 3,
) -> str:
    torch.manual_seed(init_seed)
    net = Net(act, momentum)
    if init_seed:  # only fc1 starts elsewhere: the rest of the model is the same
        torch.manual_seed(0)
        ref = Net(act, momentum)
        net.bn.load_state_dict(ref.bn.state_dict())
        net.head.load_state_dict(ref.head.state_dict())
    if freeze:
        net.fc1.requires_grad_(False)
    if evaluate:
        net.eval()
    decay = [p for n, p in net.named_parameters() if n.endswith("weight") and "bn" not in n]
    rest = [p for n, p in net.named_parameters() if not any(p is q for q in decay)]
    groups = (
        [{"params": decay}, {"params": rest, "weight_decay": 0.0}]
        if no_decay
        else [p for p in net.parameters() if p.requires_grad]
    )
    o = (
        torch.optim.AdamW(groups, lr=0.01, weight_decay=wd)
        if opt == "adamw"
        else torch.optim.SGD(groups, lr=0.1, weight_decay=wd)
    )
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(rng_seed)  # dropout's random numbers
    with graddiff.trace(net, path, values="full"):
        for _ in range(steps):
            x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
            if zero_grad:
                o.zero_grad()
            F.cross_entropy(net(x), y).backward()
            if clip:
                nn.utils.clip_grad_norm_(net.parameters(), clip)
            o.step()
    return str(path)


# (id, B's changes, the cause id the diagnosis must name first)
CASES = [
    ("different init", {"init_seed": 5}, "different_init"),
    ("frozen layer", {"freeze": True}, "frozen_parameter"),
    ("eval mode", {"evaluate": True}, "train_eval_mode"),
    ("dropout rng", {"rng_seed": 2}, "dropout_rng"),
    ("missing zero_grad", {"zero_grad": False}, "grad_accumulation"),
    ("clipped gradients", {"clip": 0.05}, "grad_clipping"),
    ("batchnorm momentum", {"momentum": 0.3}, "batchnorm_stats"),
    ("swapped activation", {"act": nn.GELU}, "module_swap"),
    ("learning rate groups", {"opt": "adamw", "wd": 0.5, "no_decay": True}, "weight_decay"),
]


@pytest.mark.parametrize(("vb", "cause"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_name_in_a_diagnosis_carries_its_class(tmp_path, vb, cause):
    va = {k: v for k, v in {"opt": vb.get("opt"), "wd": vb.get("wd")}.items() if v}
    r = graddiff.compare(_run(tmp_path / "a.h5", **va), _run(tmp_path / "b.h5", **vb), exact=True)
    assert r.cause is not None and r.cause.cause == cause, [(c.cause, c.title) for c in r.diagnosis]
    names = classed_names((r.run_a, r.run_b), r.module_classes)
    assert {"fc1.weight", "bn.running_mean", "head.0", "head.1.bias"} <= set(names)
    sentences = [s for c in r.diagnosis for s in (c.title, *c.evidence, c.fix)]
    mentioned = [
        n for n in names if any(re.search(rf"(?<![\w.]){re.escape(n)}", s) for s in sentences)
    ]
    assert mentioned or cause in ("scaled_gradients", "grad_clipping"), sentences  # (norms only)
    bad = diagnosis_unlabelled(r)
    assert not bad, bad
    # the same in the printed report and in --json
    assert not unlabelled(str(r), names), str(r)
    assert r.to_dict()["diagnosis"] == [c.to_dict() for c in r.diagnosis]


def test_old_traces_name_records_bare(tmp_path):
    a = _run(tmp_path / "a.h5")
    b = _run(tmp_path / "b.h5", freeze=True)
    for p in (a, b):
        with h5py.File(p, "a") as f:
            del f.attrs["module_classes"]
    r = graddiff.compare(a, b, exact=True)
    assert r.module_classes == {} and r.cause.cause == "frozen_parameter"
    text = " ".join(r.cause.evidence)
    assert "fc1.weight, fc1.bias at step 0" in text and "(Linear)" not in text, text


def test_the_checker_catches_a_bare_name():
    names = {"fc1.weight": "Linear", "fc1.bias": "Linear", "bn.weight": "BatchNorm1d"}
    assert unlabelled("for fc1.weight, fc1.bias (both Linear) at step 0", names) == []
    assert unlabelled("in param fc1.weight (Linear) #1", names) == []
    assert len(unlabelled("for fc1.weight, fc1.bias at step 0", names)) == 2
    assert len(unlabelled("fc1.weight (BatchNorm1d)", names)) == 1
    assert len(unlabelled("ends with bn.weight.", names)) == 1


def test_lists_group_neighbours_of_one_class():
    items = [("a.w", "Linear"), ("a.b", "Linear"), ("n.w", "LayerNorm"), ("x", None)]
    assert describe_list(items) == "a.w, a.b (both Linear), n.w (LayerNorm), x"
    three = [("a", "Linear"), ("b", "Linear"), ("c", "Linear"), ("d", "ReLU"), ("e", "ReLU")]
    assert describe_list(three, 4) == "a, b, c (all Linear), d (ReLU) and 1 more"
    assert describe_list([("p", None), ("q", None)]) == "p, q"


def test_structure_lists_carry_classes_in_text_and_json(tmp_path):
    r = graddiff.compare(_run(tmp_path / "a.h5"), _run(tmp_path / "b.h5", freeze=True))
    st = r.to_dict()["structure"]
    assert st["only_in_a"] and st["only_in_a_classes"] == ["Linear"] * len(st["only_in_a"])
    assert st["only_in_b_classes"] == []
    names = classed_names((r.run_a, r.run_b), r.module_classes)
    assert "only in A: grad_output fc1, grad fc1.weight, grad fc1.bias (all Linear)" in str(r)
    assert not unlabelled(str(r), names)
    assert all(line == line.rstrip() for line in str(r).splitlines())  # print(report): no padding


def test_check_findings_name_records_with_their_classes(tmp_path):
    """``graddiff check``: the finding's messages (first NaN, 'N more: ...') carry classes."""
    from graddiff.postmortem.findings import check_run

    torch.manual_seed(0)
    net = Net()
    o = torch.optim.SGD(net.parameters(), lr=1e6)  # diverges to Inf/NaN within a few steps
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "nan.h5"
    with graddiff.trace(net, path):
        for _ in range(6):
            x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
            o.zero_grad()
            F.cross_entropy(net(x), y).backward()
            o.step()
    with graddiff.open(path) as run:
        report = check_run(run)
        names = classed_names([str(path)], run.module_classes)
    assert report.findings and report.to_dict()["module_classes"]["bn"] == "BatchNorm1d"
    text = [f.message for f in report] + [str(f) for f in report]
    assert any("(Linear)" in t or "(BatchNorm1d)" in t for t in text), text
    assert not [b for t in text for b in unlabelled(t, names)]


def test_map_names_the_classes_it_pairs(tmp_path):
    """``graddiff map``: evidence names the classes paired; unmatched records carry theirs."""
    from click.testing import CliRunner

    from graddiff.cli import main

    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    b = nn.Sequential()
    for n, m in (("first", nn.Linear(4, 4)), ("act", nn.ReLU()), ("second", nn.Linear(4, 4))):
        b.add_module(n, m)
    b.add_module("extra", nn.Tanh())
    x = torch.randn(2, 4)
    for m, p in ((a, tmp_path / "a.h5"), (b, tmp_path / "b.h5")):
        with graddiff.trace(m, p):
            m(x).sum().backward()
            torch.optim.SGD(m.parameters(), lr=0.1).step()
    out = CliRunner().invoke(main, ["map", str(tmp_path / "a.h5"), str(tmp_path / "b.h5")])
    assert out.exit_code == 1, out.output
    assert "evidence: 'ReLU -> ReLU: forward order" in out.output
    assert "unmatched in B: 1 (activation extra (Tanh))" in out.output
    assert "- activation extra (Tanh)" in out.output  # the map file's list


def test_a_cut_evidence_list_says_how_many_more(tmp_path):
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = nn.Sequential(*[nn.Linear(3, 3) for _ in range(4)])  # 8 parameters
        paths.append(tmp_path / f"{seed}.h5")
        with graddiff.trace(net, paths[-1]):
            net(torch.ones(2, 3)).sum().backward()
            torch.optim.SGD(net.parameters(), lr=0.1).step()
    r = graddiff.compare(*paths)
    assert r.cause.cause == "different_init" and "8 of 8 parameters" in r.cause.title
    assert r.cause.evidence[0].startswith("0.weight (Linear): rel ")
    assert r.cause.evidence[5:] == ["and 3 more"]

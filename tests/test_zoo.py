"""A zoo of awkward models: each is recorded correctly and trains bitwise as untraced."""

from __future__ import annotations

import copy
import dataclasses
from collections import namedtuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import nn

import graddiff


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.relu(self.block(torch.relu(self.block(x)))))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(self.emb(idx).mean(1))


class Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        return self.head(self.backbone(x))


Pair = namedtuple("Pair", ["main", "aux"])


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    hidden: torch.Tensor


class Structured(nn.Module):
    """tuple, dict, namedtuple and dataclass outputs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        parts = {"h": h, "pair": Pair(h * 2, (h.sum(1), None))}
        return Output(logits=self.b(parts["pair"].main), hidden=parts["pair"].aux[0])


class DictBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        y = self.lin(x)
        return {"out": y, "aux": (y.mean(), y.std())}


class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = DictBlock()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.block(x)["out"])


class Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)
        self.reentrant = reentrant

    def forward(self, x):
        h = cp.checkpoint(lambda t: self.b(torch.relu(self.a(t))), x, use_reentrant=self.reentrant)
        return self.head(h)


class Residual(nn.Module):
    """`out += identity` after an in-place ReLU, as in resnet blocks."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        out = self.lin(x)
        out += x
        return self.head(self.relu(out))


def _loss(model, x, y):
    out = model(x)
    if isinstance(out, Output):
        out = out.logits
    return F.cross_entropy(out, y)


def _train(model, x, y, steps=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()


ZOO = {
    "called_twice": (CalledTwice, "float"),
    "tied": (Tied, "index"),
    "frozen": (Frozen, "float"),
    "structured": (Structured, "float"),
    "dict_output": (DictModel, "float"),
    "checkpoint_nonreentrant": (lambda: Checkpointed(False), "float"),
    "checkpoint_reentrant": (lambda: Checkpointed(True), "float"),
    "residual_inplace": (Residual, "float"),
}


def _inputs(kind):
    g = torch.Generator().manual_seed(0)
    if kind == "index":
        return torch.randint(0, 10, (5, 4), generator=g), torch.randint(0, 10, (5,), generator=g)
    return torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)


def _check_called_twice(run, twin):
    calls = sorted(k.call for k in run.keys if k.kind == "activation" and k.name == "block")
    assert calls == [0, 1]
    go = sorted(k.call for k in run.keys if k.kind == "grad_output" and k.name == "block")
    assert go == [0, 1]
    assert not np.array_equal(
        run.get("activation", "block", 0, 0), run.get("activation", "block", 0, 1)
    )


def _check_tied(run, twin):
    assert run.names("param") == ["emb.weight"]  # one tensor, one name
    assert run.names("grad") == ["emb.weight"]


def _check_frozen(run, twin):
    assert "backbone.weight" in run.names("param")
    assert "backbone.weight" not in run.names("grad")
    fps = {run.stats("param", "backbone.weight", s)["fingerprint"] for s in run.steps}
    assert len(fps) == 1


def _check_structured(run, twin):
    assert {"(root):logits", "(root):hidden"} <= set(run.names("activation"))
    assert "(root):logits" in run.names("grad_output")


def _check_dict_output(run, twin):
    assert {"block:out", "block:aux.0", "block:aux.1"} <= set(run.names("activation"))
    assert "block:out" in run.names("grad_output")


def _check_checkpoint(run, twin):
    for module in ("a", "b"):
        calls = {k.call for k in run.keys if k.kind == "activation" and k.name == module}
        assert calls == {0}, f"{module} recorded calls {calls} (recompute counted?)"


def _check_residual(run, twin):
    lin = run.get("activation", "lin", 0)
    assert lin.min() < 0  # copied before `out += x` and the in-place ReLU changed it
    assert "lin" in run.names("grad_output")


CHECKS = {
    "called_twice": _check_called_twice,
    "tied": _check_tied,
    "frozen": _check_frozen,
    "structured": _check_structured,
    "dict_output": _check_dict_output,
    "checkpoint_nonreentrant": _check_checkpoint,
    "checkpoint_reentrant": _check_checkpoint,
    "residual_inplace": _check_residual,
}


# torch itself warns about the reentrant checkpoint's input (untraced too): not ours.
@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad:UserWarning")
@pytest.mark.parametrize("name", list(ZOO), ids=list(ZOO))
def test_zoo(tmp_path, name):
    factory, input_kind = ZOO[name]
    torch.manual_seed(0)
    model = factory()
    twin = copy.deepcopy(model)
    x, y = _inputs(input_kind)
    _train(model, x, y)
    with graddiff.trace(twin, tmp_path / "z.h5", values="full"):
        _train(twin, x, y)
    for key, value in model.state_dict().items():
        assert torch.equal(value, twin.state_dict()[key]), f"{name}: {key} differs from untraced"
    run = graddiff.open(tmp_path / "z.h5")
    assert list(run.steps) == [0, 1, 2]
    assert {"param", "activation", "loss", "grad"} <= set(run.kinds)
    CHECKS[name](run, twin)

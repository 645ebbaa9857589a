"""A loss weight is claimed from corroborating evidence only (rules_backward.rule_loss_scale):
one ratio of two different losses exists for any two losses, so it needs the gradients
scaled by the same factor, several loss calls with the same ratio, or the same ratio at
another step.

The oracle is the loop: it knows whether the loss was weighted or given an extra term.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_thirdparty_pairs import _TinyVAE
from torch import nn

import graddiff

NO_GRADS = ["param", "input", "activation", "loss"]


def _run(path, change: str = "", opt: str = "sgd") -> str:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    if opt == "sgd":
        o = torch.optim.SGD(net.parameters(), lr=0.1)
    else:
        o = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    with graddiff.trace(net, path, values="full"):
        for _ in range(3):
            x, y = torch.randn(16, 8, generator=g), torch.randint(0, 5, (16,), generator=g)
            o.zero_grad()
            loss = F.cross_entropy(net(x), y)
            if change == "weight":
                loss = loss * 1.7
            elif change == "penalty":  # a term on the first layer's weights
                loss = loss + 0.01 * net[0].weight.pow(2).sum()
            loss.backward()
            o.step()
    return str(path)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_an_extra_loss_term_is_not_a_loss_weight(tmp_path, opt):
    """B's loss has an L2 penalty term: its loss is ~1.03x A's at step 0, its gradients are
    not scaled by that, and the ratio changes from step to step."""
    a, b = _run(tmp_path / "a.h5", opt=opt), _run(tmp_path / "b.h5", "penalty", opt)
    for kinds in (None, NO_GRADS):
        r = graddiff.compare(a, b, kinds=kinds)
        assert (r.first.step, r.first.kind) == (0, "loss"), r.headline()
        assert "loss_scale" not in [c.cause for c in r.diagnosis], r.cause.title


def test_a_loss_weight_from_its_gradients(tmp_path):
    a, b = _run(tmp_path / "a.h5"), _run(tmp_path / "b.h5", "weight")
    r = graddiff.compare(a, b)
    assert (r.first.step, r.first.kind) == (0, "loss") and r.cause.cause == "loss_scale"
    assert "B's loss is 1.7x" in r.cause.title
    assert "the gradients are scaled by the same factor as the loss" in r.cause.evidence


def test_a_loss_weight_from_its_ratio_at_another_step(tmp_path):
    """Adam's update does not depend on the loss's scale (up to eps): the runs stay together
    and the ratio recurs at step 1, which corroborates it without gradients. Under SGD the
    weighted run's parameters part, the ratio changes, and no weight is claimed."""
    a, b = _run(tmp_path / "a.h5", opt="adam"), _run(tmp_path / "b.h5", "weight", "adam")
    r = graddiff.compare(a, b, kinds=NO_GRADS)
    assert r.cause.cause == "loss_scale", [(c.cause, c.title) for c in r.diagnosis]
    assert "the losses have the same ratio at step 1 (within 1e-4)" in r.cause.evidence
    a, b = _run(tmp_path / "c.h5"), _run(tmp_path / "d.h5", "weight")
    r = graddiff.compare(a, b, kinds=NO_GRADS)
    assert (r.first.step, r.first.kind) == (0, "loss")
    assert "loss_scale" not in [c.cause for c in r.diagnosis], r.cause.title


def _vae(path, reduction: str) -> str:
    """pytorch/examples' vae loss, shrunk: BCE (summed, or averaged) plus the KL term."""
    torch.manual_seed(0)
    net = _TinyVAE()
    o = torch.optim.Adam(net.parameters(), lr=1e-3)
    data = torch.rand(2, 8, 196, generator=torch.Generator().manual_seed(1))
    with graddiff.trace(net, path, values="full"):
        for x in data:
            o.zero_grad()
            recon, mu, logvar = net(x)
            bce = F.binary_cross_entropy(recon, x, reduction=reduction)
            (bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())).backward()
            o.step()
    return str(path)


def test_a_reduction_beside_an_unscaled_term_is_named(tmp_path):
    """BCE 'sum' vs 'mean' next to a KL term: the losses are in no constant ratio, the
    gradient into the model's output is 8 x 196 = 1568 x the other's."""
    a, b = _vae(tmp_path / "a.h5", "sum"), _vae(tmp_path / "b.h5", "mean")
    r = graddiff.compare(a, b)
    assert (r.first.step, r.first.kind) == (0, "loss"), r.headline()
    assert "loss_scale" not in [c.cause for c in r.diagnosis]
    c = r.cause
    assert c.cause == "loss_function", [(c.cause, c.title) for c in r.diagnosis]
    assert "A sums the term on the model's output where the other run averages it over 1568" in (
        c.title
    )
    assert "the other's x 1568 (one constant" in " ".join(c.evidence)

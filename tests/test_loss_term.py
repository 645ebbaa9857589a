"""A small loss term (a penalty on a VAE encoder's mean) read from the first step where the
runs part (rules_lossfn.rule_loss_term): there the forward pass is bitwise equal and the loss is
not, and the gradient the loss feeds the model's output is bitwise equal while the encoder
output's gradient differs, even where the divergence beyond the tolerance shows elsewhere or
later.

The oracle is the loop: it adds ``c * mu.pow(2).sum()`` to one run's loss from step 0.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_thirdparty_pairs import _TinyVAE

import graddiff


def _run(path, c: float, opt: str, steps: int = 3) -> str:
    torch.manual_seed(0)
    net = _TinyVAE()
    if opt == "adam":
        o = torch.optim.Adam(net.parameters(), lr=1e-3)
    else:
        o = torch.optim.SGD(net.parameters(), lr=1e-3)
    data = torch.rand(steps, 64, 196, generator=torch.Generator().manual_seed(1))
    with graddiff.trace(net, path, values="full"):
        for x in data:
            o.zero_grad()
            recon, mu, logvar = net(x)
            loss = F.binary_cross_entropy(recon, x, reduction="sum")
            if c:
                loss = loss + c * mu.pow(2).sum()
            loss.backward()
            o.step()
    return str(path)


@pytest.mark.parametrize(
    ("c", "opt", "step", "kind"),
    [(3e-3, "adam", 0, "grad"), (1e-3, "sgd", 1, "activation")],
    ids=["divergence in a parameter gradient", "divergence at a later step"],
)
def test_a_small_loss_term_is_read_where_the_runs_part(tmp_path, c, opt, step, kind):
    a, b = _run(tmp_path / "a.h5", c, opt), _run(tmp_path / "b.h5", 0.0, opt)
    with graddiff.open(a) as ra, graddiff.open(b) as rb:
        # oracle: step 0's forward is bitwise equal, its loss is not
        for name in ("enc", "mu", "logvar", "dec"):
            assert (ra.get("activation", name, step=0) == rb.get("activation", name, step=0)).all()
        assert ra.get("loss", "loss", step=0) != rb.get("loss", "loss", step=0)
    r = graddiff.compare(a, b)
    assert r.diverged and (r.first.step, r.first.kind) == (step, kind), r.headline()
    assert (r.first_bitwise.step, r.first_bitwise.kind) == (0, "loss")
    c0 = r.diagnosis[0]
    assert c0.cause == "loss_function" and "a loss term differs" in c0.title, [
        (c.cause, c.title) for c in r.diagnosis
    ]
    assert "mu (Linear)" in c0.title
    text = " ".join(c0.evidence)
    assert "the gradient the loss feeds the model's output is bitwise equal" in text
    assert "the loss reaches those outputs directly" in text
    assert ("this is the first step where the runs part" in text) == (step > 0)
    assert "rounding" not in [c.cause for c in r.diagnosis[:1]]


def _penalised(path, *, l2: float = 0.0, l1: float = 0.0, values: str = "full") -> str:
    """An MLP whose loss adds ``l2/2 * ||W||^2`` (or ``l1 * |W|_1``) of its last weight."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    o = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    with graddiff.trace(net, path, values=values):
        for _ in range(3):
            x, y = torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
            loss = F.cross_entropy(net(x), y)
            loss = loss + 0.5 * l2 * net[2].weight.pow(2).sum() + l1 * net[2].weight.abs().sum()
            o.zero_grad()
            loss.backward()
            o.step()
    return str(path)


def test_a_penalty_on_the_weights_is_a_loss_term_on_the_parameters(tmp_path):
    """The loss differs while the forward and every output gradient are bitwise equal, and
    only the penalised weight's gradient differs (by c·W): the term is on the parameters."""
    a = _penalised(tmp_path / "a.h5")
    b = _penalised(tmp_path / "b.h5", l2=0.01)
    r = graddiff.compare(a, b)
    assert r.diverged and (r.first.step, r.first.kind) == (0, "loss"), r.headline()
    assert r.cause.cause == "loss_function", [(c.cause, c.title) for c in r.diagnosis]
    assert r.cause.title == (
        "a loss term on the parameters differs: B's loss adds an L2 penalty (c/2)·‖W‖² with "
        "c = 0.01 on 2.weight (Linear)"
    )
    assert graddiff.compare(b, a).cause.title.startswith(
        "a loss term on the parameters differs: A's loss adds an L2 penalty"
    )
    # an L1 penalty, or statistics only: the term on the parameters, without the L2 reading
    for other in (
        _penalised(tmp_path / "l1.h5", l1=1e-3),
        _penalised(tmp_path / "s.h5", l2=0.01, values="stats"),
    ):
        base = a if "l1" in str(other) else _penalised(tmp_path / "s0.h5", values="stats")
        c0 = graddiff.compare(base, other).cause
        assert c0.cause == "loss_function" and c0.title.startswith(
            "a loss term on the parameters differs: a penalty on 2.weight (Linear)"
        ), c0

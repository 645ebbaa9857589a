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

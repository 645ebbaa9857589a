"""One run's optimizer step applies no gradient (``zero_grad()`` between ``backward()`` and
``step()``): its parameters stay bitwise unchanged while its recorded gradients are non-zero.

The oracle is the test: it knows which run clears its gradients before the step, so which
run's parameters never move and at which update the runs part.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graddiff


def _run(path, *, opt="sgd", late_zero_grad=False, values="full", frozen=False, warmup=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    if frozen:
        model.requires_grad_(False)
        model[2].requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = (
        torch.optim.SGD(params, lr=0.1, momentum=0.9)
        if opt == "sgd"
        else torch.optim.Adam(params, lr=1e-2)
    )
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda i: min(i / 2, 1.0)) if warmup else None
    gen = torch.Generator().manual_seed(1)
    with graddiff.trace(model, path, values=values):
        for _ in range(3):
            x, y = torch.randn(5, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen)
            loss = F.cross_entropy(model(x), y)
            if late_zero_grad:
                loss.backward()
                optim.zero_grad()
            else:
                optim.zero_grad()
                loss.backward()
            optim.step()
            if sched is not None:
                sched.step()
    return path


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("values", ["full", "stats"])
def test_zero_grad_between_backward_and_step(tmp_path, opt, values):
    a = _run(tmp_path / "a.h5", opt=opt, values=values)
    b = _run(tmp_path / "b.h5", opt=opt, values=values, late_zero_grad=True)
    r = graddiff.compare(a, b)
    assert r.diverged and r.first.step == 1 and r.first.kind == "param", r.headline()
    assert r.cause.cause == "no_update", [(c.cause, c.title) for c in r.diagnosis]
    assert r.cause.title.startswith("B's optimizer step at step 0 applied no gradient")
    r = graddiff.compare(b, a)  # the side follows the run
    assert r.cause.title.startswith("A's optimizer step at step 0 applied no gradient")


def test_parameters_that_move_in_both_runs_are_not_this(tmp_path):
    a = _run(tmp_path / "a.h5")
    b = _run(tmp_path / "b.h5", opt="adam")
    r = graddiff.compare(a, b)
    assert r.diverged and "no_update" not in [c.cause for c in r.diagnosis], r.diagnosis
    # a frozen trunk does not move in either run: its parameters are not evidence
    c = _run(tmp_path / "c.h5", frozen=True)
    d = _run(tmp_path / "d.h5", frozen=True, late_zero_grad=True)
    r = graddiff.compare(c, d)
    assert r.cause.cause == "no_update", [(x.cause, x.title) for x in r.diagnosis]
    assert "2.weight, 2.bias (both Linear) are bitwise unchanged" in r.cause.evidence[0]


def test_a_learning_rate_of_zero_is_named_instead(tmp_path):
    """A warmup's first update at rate 0 leaves B's parameters unchanged too: the recorded
    rate explains it, so the gradients did reach the update."""
    r = graddiff.compare(_run(tmp_path / "a.h5"), _run(tmp_path / "b.h5", warmup=True))
    causes = [c.cause for c in r.diagnosis]
    assert causes[0] == "learning_rate" and "no_update" not in causes, causes

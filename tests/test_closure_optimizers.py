"""``optimizer.step(closure)``: forward and backward run inside the step, after its pre-hook.

The gradient recorded must be the one the update uses (after the closure ran), one step per
``optimizer.step`` call, and LBFGS's repeated closure evaluations are calls 0, 1, ... of one step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.optim.optimizer as optim_module
from torch import nn

import graddiff


def _data(n: int = 4):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)) for _ in range(n)]


def _keys_at(run, step: int, kind: str) -> list[tuple[str, int]]:
    """(name, call) of the records of ``kind`` at ``step``."""
    keys = [run.record_key(int(r)) for r in run.entries(step, step)["record"]]
    return sorted((k.name, k.call) for k in keys if k.kind == kind)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))


def _train(model, data, style: str, opt_cls=torch.optim.SGD, **opt_kw):
    opt = opt_cls(model.parameters(), **(opt_kw or {"lr": 0.1}))
    for x, y in data:
        if style == "plain":
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
            continue

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            return loss

        if style == "keyword":
            opt.step(closure=closure)
        else:
            opt.step(closure)
    return model


@pytest.mark.parametrize("style", ["positional", "keyword"])
def test_closure_loop_records_like_the_plain_loop(tmp_path, style):
    data = _data()
    m_plain, m_closure = _model(), _model()
    with graddiff.trace(m_plain, tmp_path / "plain.h5"):
        _train(m_plain, data, "plain")
    with graddiff.trace(m_closure, tmp_path / "closure.h5"):
        _train(m_closure, data, style)
    report = graddiff.compare(tmp_path / "plain.h5", tmp_path / "closure.h5")
    assert report.verdict == "identical", report.headline()
    run = graddiff.open(tmp_path / "closure.h5")
    assert list(run.steps) == [0, 1, 2, 3]
    assert {k.call for k in run.keys if k.kind == "grad"} == {0}


def test_closure_grad_is_this_steps_gradient(tmp_path):
    """The recorded .grad at step k is the gradient of step k's loss at step k's parameters."""
    data = _data(3)
    model = _model()
    with graddiff.trace(model, tmp_path / "c.h5"):
        _train(model, data, "positional")
    ref = _model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    run = graddiff.open(tmp_path / "c.h5")
    for step, (x, y) in enumerate(data):
        opt.zero_grad()
        F.mse_loss(ref(x), y).backward()
        for name, p in ref.named_parameters():
            assert np.array_equal(run.get("grad", name, step), p.grad.numpy()), (step, name)
        opt.step()


def test_lbfgs_one_step_per_call_with_one_grad_call_per_closure_evaluation(tmp_path):
    data = _data(2)
    model = _model()
    evaluations = []
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    with graddiff.trace(model, tmp_path / "l.h5"):
        for x, y in data:

            def closure(x=x, y=y):
                opt.zero_grad()
                loss = F.mse_loss(model(x), y)
                loss.backward()
                evaluations[-1] += 1
                return loss

            evaluations.append(0)
            opt.step(closure)
    run = graddiff.open(tmp_path / "l.h5")
    assert list(run.steps) == [0, 1]
    assert all(n > 1 for n in evaluations)
    for step, n in enumerate(evaluations):
        assert _keys_at(run, step, "loss") == [("loss", c) for c in range(n)]
        grads = [c for name, c in _keys_at(run, step, "grad") if name == "0.weight"]
        assert grads == list(range(n))


def test_lbfgs_traced_is_bitwise_identical_to_untraced(tmp_path):
    data = _data(3)

    def run(traced: bool):
        model = _model()
        opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3)

        def go():
            for x, y in data:

                def closure(x=x, y=y):
                    opt.zero_grad()
                    loss = F.mse_loss(model(x), y)
                    loss.backward()
                    return loss

                opt.step(closure)

        if traced:
            with graddiff.trace(model, tmp_path / "t.h5"):
                go()
        else:
            go()
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(True), run(False)))


def test_explicit_steps_with_a_closure_record_gradients(tmp_path):
    """A callback calling tr.step() after each closure step (issue 9: it recorded no grads)."""
    model = _model()
    with graddiff.trace(model, tmp_path / "e.h5") as tr:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, y in _data(3):

            def closure(x=x, y=y):
                opt.zero_grad()
                loss = F.mse_loss(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
            tr.step()
    run = graddiff.open(tmp_path / "e.h5")
    assert list(run.steps) == [0, 1, 2]
    for step in run.steps:
        names = {name for name, _ in _keys_at(run, int(step), "grad")}
        assert names == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_closure_of_another_models_optimizer_is_left_alone(tmp_path):
    traced, other = _model(), _model()
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    seen = []

    def closure():
        seen.append(1)
        opt.zero_grad()
        loss = other(torch.ones(2, 6)).sum()
        loss.backward()
        return loss

    with graddiff.trace(traced, tmp_path / "o.h5"):
        traced(torch.ones(2, 6)).sum().backward()
        loss = opt.step(closure)
    assert seen == [1] and loss.requires_grad
    assert not optim_module._global_optimizer_pre_hooks
    assert not optim_module._global_optimizer_post_hooks


def test_closure_result_and_exceptions_pass_through(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sentinel = torch.tensor(3.0)
    with graddiff.trace(model, tmp_path / "x.h5"):
        model(torch.ones(2, 6)).sum().backward()
        assert opt.step(lambda: sentinel) is sentinel

        def bad():
            raise ValueError("boom from the closure")

        with pytest.raises(ValueError, match="boom from the closure"):
            opt.step(bad)
    assert not optim_module._global_optimizer_pre_hooks


def test_forward_only_ignores_closure_steps(tmp_path):
    """forward_only: every model call is a step; a closure step neither wraps nor ends one."""
    model = _model()
    with graddiff.trace(model, tmp_path / "f.h5", forward_only=True):
        _train(model, _data(2), "positional")
    assert list(graddiff.open(tmp_path / "f.h5").steps) == [0, 1]

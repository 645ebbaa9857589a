"""The step model: where steps begin and end for each kind of training loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo_models import BNMLP, LOOPS, batches

import graddiff
from graddiff.steps import StepClock, StepMode

# -- the pure state machine -----------------------------------------------------------------


def test_clock_manual_loop_splits_only_after_gradient_and_change():
    clock = StepClock()
    assert not clock.forward(True, lambda: True)  # no gradient yet
    clock.gradient()
    assert not clock.forward(False, lambda: True)  # no_grad forwards never split
    assert not clock.forward(True, lambda: False)  # accumulation: params unchanged
    assert clock.forward(True, lambda: True)  # manual update happened


def test_clock_optimizer_mode_never_splits_on_forward():
    clock = StepClock()
    clock.gradient()
    assert clock.optimizer_step() and clock.mode is StepMode.OPTIMIZER
    clock.advance()
    clock.gradient()
    assert not clock.forward(True, lambda: True)


def test_clock_explicit_mode_takes_over():
    clock = StepClock()
    clock.started = True
    assert clock.explicit_step()  # a started step ends
    clock.advance()
    assert not clock.explicit_step()  # nothing started: no empty step
    assert not clock.optimizer_step()  # optimizer no longer ends steps
    clock.gradient()
    assert not clock.forward(True, lambda: True)


def test_changed_predicate_is_only_asked_when_it_matters():
    asked = []
    clock = StepClock()
    clock.forward(True, lambda: asked.append(1) or True)
    assert asked == []


# -- integration: each loop style -----------------------------------------------------------


@pytest.mark.parametrize("loop", list(LOOPS), ids=list(LOOPS))
def test_one_recorded_step_per_update(tmp_path, loop):
    torch.manual_seed(0)
    model, data = BNMLP(), batches(4)
    with graddiff.trace(model, tmp_path / "s.h5"):
        LOOPS[loop](model, data)
    run = graddiff.open(tmp_path / "s.h5")
    assert list(run.steps) == [0, 1, 2, 3]
    calls = {k.call for k in run.keys if k.kind == "activation" and k.name == "head"}
    assert calls == ({0, 1} if loop == "accumulate" else {0})


def test_accumulation_without_optimizer_is_one_step(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    data = batches(3, in_shape=(4,), classes=2)
    with graddiff.trace(model, tmp_path / "s.h5"):
        for x, y in data:
            for xs, ys in zip(x.chunk(2), y.chunk(2)):
                F.cross_entropy(model(xs), ys).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
    run = graddiff.open(tmp_path / "s.h5")
    assert list(run.steps) == [0, 1, 2]
    assert run.stats("loss", "loss", 2, call=1)["numel"] == 1


def test_eval_forwards_under_no_grad_start_no_step(tmp_path):
    torch.manual_seed(0)
    model, data = nn.Linear(20, 4), batches(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with graddiff.trace(model, tmp_path / "s.h5"):
        for x, y in data:
            with torch.no_grad():
                model(x)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            with torch.inference_mode():
                model(x)
    run = graddiff.open(tmp_path / "s.h5")
    assert list(run.steps) == [0, 1, 2]
    assert {k.call for k in run.keys if k.kind == "activation"} == {0}


def test_explicit_step_overrides(tmp_path):
    """tr.step() every two optimizer steps: two optimizer updates per recorded step."""
    torch.manual_seed(0)
    model, data = nn.Linear(20, 4), batches(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with graddiff.trace(model, tmp_path / "s.h5") as tr:
        for i, (x, y) in enumerate(data):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if i % 2 == 1:
                tr.step()
    run = graddiff.open(tmp_path / "s.h5")
    # the first optimizer step closed step 0 before tr.step() took over
    assert len(run.steps) == 3


def test_explicit_step_after_each_optimizer_step_adds_no_empty_steps(tmp_path):
    torch.manual_seed(0)
    model, data = nn.Linear(20, 4), batches(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with graddiff.trace(model, tmp_path / "s.h5") as tr:
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            tr.step()
    assert list(graddiff.open(tmp_path / "s.h5").steps) == [0, 1, 2]


def test_step_outside_trace_is_an_error(tmp_path):
    tr = graddiff.trace(nn.Linear(2, 2), tmp_path / "x.h5")
    with pytest.raises(graddiff.TraceUsageError, match="outside"):
        tr.step()


def test_other_models_optimizer_does_not_end_steps(tmp_path):
    """A GAN-like loop: only the traced model's optimizer defines its steps."""
    torch.manual_seed(0)
    gen, disc = nn.Linear(4, 4), nn.Linear(4, 1)
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.1)
    with graddiff.trace(gen, tmp_path / "g.h5"):
        for _ in range(3):
            z = torch.randn(8, 4)
            opt_d.zero_grad()
            disc(gen(z).detach()).mean().backward()
            opt_d.step()
            opt_g.zero_grad()
            (-disc(gen(z)).mean()).backward()
            opt_g.step()
    run = graddiff.open(tmp_path / "g.h5")
    assert list(run.steps) == [0, 1, 2]
    assert run.names("grad") == ["weight", "bias"]

"""graddiff never perturbs what it measures: bitwise-equal training, no RNG use, and nothing
left behind after the trace (also when the body raises)."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.autograd
import torch.nn.functional as F
import torch.optim.optimizer as optim_module
from torch import nn
from zoo_models import BNMLP, LOOPS, SmallCNN, batches, state_of

import graddiff

ORIGINAL_ENGINE = torch.autograd._engine_run_backward


def _model_and_data(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        return BNMLP(inplace=True), batches(4, batch=16, in_shape=(20,), classes=4)
    if kind == "cnn":
        return SmallCNN(), batches(3, batch=8, in_shape=(1, 16, 16), classes=10)
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.resnet18(weights=None, num_classes=10), batches(
        2, batch=4, in_shape=(3, 32, 32), classes=10
    )


CASES = [(m, loop) for m in ("mlp", "cnn") for loop in LOOPS] + [
    ("resnet18", "sgd"),
    ("resnet18", "adamw"),
]


@pytest.mark.parametrize("model_kind,loop", CASES, ids=[f"{m}-{lp}" for m, lp in CASES])
def test_traced_training_is_bitwise_identical(tmp_path, model_kind, loop):
    model, data = _model_and_data(model_kind)
    twin = copy.deepcopy(model)
    LOOPS[loop](model, data)
    rng_before = torch.get_rng_state()
    with graddiff.trace(twin, tmp_path / "t.h5", values="full"):
        LOOPS[loop](twin, data)
    assert torch.equal(torch.get_rng_state(), rng_before), "graddiff consumed RNG"
    want, got = state_of(model), state_of(twin)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), f"{key} differs between traced and untraced runs"
    run = graddiff.open(tmp_path / "t.h5")
    assert len(run.steps) == len(data)
    assert run.complete


def test_dropout_rng_stream_is_untouched(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    twin = copy.deepcopy(model)
    data = batches(3, batch=4, in_shape=(8,), classes=2)
    torch.manual_seed(5)
    LOOPS["sgd"](model, data)
    torch.manual_seed(5)
    with graddiff.trace(twin, tmp_path / "t.h5"):
        LOOPS["sgd"](twin, data)
    for key, value in state_of(model).items():
        assert torch.equal(value, state_of(twin)[key]), key


def _hook_counts(model):
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def _global_state():
    return (
        torch.autograd._engine_run_backward,
        torch.autograd.grad,
        torch.autograd.backward,
        len(optim_module._global_optimizer_pre_hooks),
        len(optim_module._global_optimizer_post_hooks),
    )


def test_everything_removed_on_exit(tmp_path):
    model, data = _model_and_data("mlp")
    before_hooks, before_global = _hook_counts(model), _global_state()
    with graddiff.trace(model, tmp_path / "t.h5") as tr:
        assert _hook_counts(model) > before_hooks
        assert torch.autograd._engine_run_backward is not ORIGINAL_ENGINE
        LOOPS["sgd"](model, data)
    assert tr.steps_recorded == len(data)
    assert _hook_counts(model) == before_hooks
    assert _global_state() == before_global
    assert torch.autograd._engine_run_backward is ORIGINAL_ENGINE
    assert not any(vars(m).get("_graddiff", None) for m in model.modules())


def test_everything_removed_when_the_body_raises(tmp_path):
    model, data = _model_and_data("mlp")
    before_hooks, before_global = _hook_counts(model), _global_state()
    with pytest.raises(ZeroDivisionError), graddiff.trace(model, tmp_path / "t.h5"):
        LOOPS["sgd"](model, data[:2])
        _ = 1 / 0
    assert _hook_counts(model) == before_hooks
    assert _global_state() == before_global
    run = graddiff.open(tmp_path / "t.h5")
    assert list(run.steps) == [0, 1]
    assert run.status.startswith("aborted")


def test_exception_inside_forward_removes_hooks(tmp_path):
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = nn.Sequential(nn.Linear(3, 3), Boom())
    with pytest.raises(RuntimeError, match="boom"), graddiff.trace(model, tmp_path / "t.h5"):
        model(torch.randn(2, 3))
    assert _hook_counts(model) == 0


def test_model_is_collectable_after_trace(tmp_path):
    model, data = _model_and_data("mlp")
    with graddiff.trace(model, tmp_path / "t.h5"):
        LOOPS["sgd"](model, data[:1])
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None, "the trace kept a reference to the model"


def test_nested_trace_of_same_model_is_an_error(tmp_path):
    model, _ = _model_and_data("mlp")
    with graddiff.trace(model, tmp_path / "a.h5"):
        with pytest.raises(graddiff.TraceUsageError, match="already being traced"):
            with graddiff.trace(model, tmp_path / "b.h5"):
                pass
    # the outer trace still cleaned up; a new trace works
    with graddiff.trace(model, tmp_path / "c.h5"):
        pass
    assert _hook_counts(model) == 0


def test_two_models_traced_at_once_exit_in_any_order(tmp_path):
    torch.manual_seed(0)
    a, b = nn.Linear(4, 2), nn.Linear(4, 2)
    x = torch.randn(3, 4)
    ta = graddiff.trace(a, tmp_path / "a.h5").__enter__()
    tb = graddiff.trace(b, tmp_path / "b.h5").__enter__()
    a(x).sum().backward()
    b(x).sum().backward()
    ta.__exit__(None, None, None)  # the first one out first: the shared patch must survive
    assert torch.autograd._engine_run_backward is not ORIGINAL_ENGINE
    tb.__exit__(None, None, None)
    assert torch.autograd._engine_run_backward is ORIGINAL_ENGINE
    assert graddiff.open(tmp_path / "a.h5").names("grad") == ["weight", "bias"]
    assert graddiff.open(tmp_path / "b.h5").names("grad") == ["weight", "bias"]


def test_hooks_never_return_values_into_training(tmp_path):
    """Output-gradient hooks must not replace gradients: grads equal an untraced backward."""
    torch.manual_seed(0)
    model = BNMLP(inplace=True)
    twin = copy.deepcopy(model)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    with graddiff.trace(twin, tmp_path / "t.h5"):
        F.cross_entropy(twin(x), y).backward()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad), n

"""Each recorded kind holds exactly the tensor the contract names, at the right moment."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo_models import BNMLP, batches

import graddiff


def _np(t):
    return t.detach().cpu().numpy()


@pytest.fixture
def sgd_run(tmp_path):
    """3 SGD steps with clipping; references captured by hand alongside the trace."""
    torch.manual_seed(0)
    model = BNMLP(inplace=True)
    data = batches(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref = {"param": [], "grad": [], "buffer": [], "loss": [], "input": [], "logits": []}
    with graddiff.trace(model, tmp_path / "a.h5", values="full"):
        for x, y in data:
            ref["param"].append({n: p.detach().clone() for n, p in model.named_parameters()})
            opt.zero_grad()
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            ref["loss"].append(loss.detach().clone())
            ref["input"].append(x.clone())
            ref["logits"].append(logits.detach().clone())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)  # grad must be post-clip
            ref["grad"].append({n: p.grad.clone() for n, p in model.named_parameters()})
            ref["buffer"].append({n: b.clone() for n, b in model.named_buffers()})
            opt.step()
            with torch.no_grad():  # evaluation inside the loop records nothing, starts no step
                model.eval()
                model(x)
                model.train()
    return graddiff.open(tmp_path / "a.h5"), ref, model


def test_param_grad_buffer_loss_input_values(sgd_run):
    run, ref, model = sgd_run
    assert list(run.steps) == [0, 1, 2]
    for step in range(3):
        for name, value in ref["param"][step].items():
            np.testing.assert_array_equal(run.get("param", name, step), _np(value))
        for name, value in ref["grad"][step].items():
            np.testing.assert_array_equal(run.get("grad", name, step), _np(value))
        for name, value in ref["buffer"][step].items():
            np.testing.assert_array_equal(run.get("buffer", name, step), _np(value))
        np.testing.assert_array_equal(run.get("loss", "loss", step), _np(ref["loss"][step]))
        np.testing.assert_array_equal(run.get("input", "0", step), _np(ref["input"][step]))
        np.testing.assert_array_equal(
            run.get("activation", "(root)", step), _np(ref["logits"][step])
        )
    assert "autograd_grad" not in run.kinds


def test_grad_norm_reflects_clipping(sgd_run):
    run, _, _ = sgd_run
    total = np.sqrt(sum(run.stats("grad", n, 0)["norm"] ** 2 for n in run.names("grad")))
    assert total == pytest.approx(0.5, rel=1e-4)


def test_stats_and_fingerprint_match_values(sgd_run):
    run, _, _ = sgd_run
    from graddiff.entries import array_stats
    from graddiff.format import fingerprint_bytes

    for key in run.keys:
        if key.kind == "grad_output":
            continue
        s = run.stats(key.kind, key.name, 1, key.call)
        arr = run.get(key.kind, key.name, 1, key.call)
        fp = fingerprint_bytes(np.ascontiguousarray(arr))
        assert s["fingerprint"] == f"{fp[0]:016x}{fp[1]:016x}"
        norm, mean, lo, hi, nan, inf = array_stats(arr)
        assert s["norm"] == pytest.approx(norm, rel=1e-5)
        assert s["min"] == pytest.approx(lo) and s["max"] == pytest.approx(hi)
        assert (s["nan"], s["inf"]) == (0, 0)
        assert s["shape"] == list(arr.shape) and s["dtype"] == str(arr.dtype)


def test_activation_copies_survive_inplace_relu(sgd_run):
    """BatchNorm's output is recorded before the in-place ReLU overwrites it."""
    run, _, _ = sgd_run
    bn = run.get("activation", "fc.0.1", 0)
    relu = run.get("activation", "fc.0.2", 0)
    assert bn.min() < 0 and relu.min() == 0
    np.testing.assert_array_equal(np.maximum(bn, 0), relu)


def test_activation_flags_training_mode(sgd_run):
    run, _, _ = sgd_run
    rows = run.entries(0, 0)
    from graddiff.format import FLAG_TRAINING

    acts = [r for r in rows if run.record_key(int(r["record"])).kind == "activation"]
    assert acts and all(r["flags"] & FLAG_TRAINING for r in acts)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_grad_output_equals_full_backward_hook_reference(tmp_path):
    """Tensor hooks on outputs see what register_full_backward_hook would (on a model it can
    hook: no in-place ops)."""
    torch.manual_seed(0)
    model = BNMLP(inplace=False)
    ref_model = copy.deepcopy(model)
    x, y = batches(1)[0]
    expected = {}
    handles = []
    for name, m in ref_model.named_modules():
        if name and not list(m.children()):

            def hook(mod, gin, gout, _n=name):
                expected[_n] = gout[0].clone()

            handles.append(m.register_full_backward_hook(hook))
    F.cross_entropy(ref_model(x), y).backward()
    for h in handles:
        h.remove()
    with graddiff.trace(model, tmp_path / "g.h5", values="full"):
        F.cross_entropy(model(x), y).backward()
    run = graddiff.open(tmp_path / "g.h5")
    assert set(expected) <= set(run.names("grad_output"))
    for name, value in expected.items():
        np.testing.assert_array_equal(run.get("grad_output", name, 0), _np(value))


def test_autograd_grad_named_by_parameter_and_position(tmp_path):
    from torch.autograd import grad  # bound before the trace patches anything

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    x = torch.randn(5, 4, requires_grad=True)
    with graddiff.trace(model, tmp_path / "ag.h5", values="full"):
        out = model(x).sum()
        gx, gw = grad(out, [x, model[0].weight])
    run = graddiff.open(tmp_path / "ag.h5")
    assert run.names("autograd_grad") == ["input[0]", "0.weight"]
    np.testing.assert_array_equal(run.get("autograd_grad", "input[0]", 0), _np(gx))
    np.testing.assert_array_equal(run.get("autograd_grad", "0.weight", 0), _np(gw))
    np.testing.assert_array_equal(run.get("loss", "loss", 0), _np(out))
    assert "grad" not in run.kinds  # autograd.grad leaves .grad untouched


def test_several_autograd_grad_calls_per_step_get_call_indices(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with graddiff.trace(model, tmp_path / "m.h5", values="full"):
        out = model(x)
        g1 = torch.autograd.grad(out[:, 0].sum(), list(model.parameters()), retain_graph=True)
        g2 = torch.autograd.grad(out[:, 1].sum(), list(model.parameters()))
    run = graddiff.open(tmp_path / "m.h5")
    np.testing.assert_array_equal(run.get("autograd_grad", "weight", 0, call=0), _np(g1[0]))
    np.testing.assert_array_equal(run.get("autograd_grad", "weight", 0, call=1), _np(g2[0]))
    np.testing.assert_array_equal(run.get("loss", "loss", 0, call=1), _np(out[:, 1].sum()))


def test_grad_without_optimizer_is_after_last_backward(tmp_path):
    """Manual loop with two losses: .grad recorded is the accumulated one the update uses."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with graddiff.trace(model, tmp_path / "b.h5", values="full"):
        out = model(x)
        out[:, 0].sum().backward(retain_graph=True)
        out[:, 1].sum().backward()
        expected = model.weight.grad.clone()
        with torch.no_grad():
            model.weight -= 0.1 * model.weight.grad
            model.weight.grad.zero_()  # zeroing in place must not change what was recorded
    run = graddiff.open(tmp_path / "b.h5")
    np.testing.assert_array_equal(run.get("grad", "weight", 0), _np(expected))
    assert len(run.names("loss")) == 1 and run.stats("loss", "loss", 0, call=1)["numel"] == 1


def test_kinds_and_modules_options(tmp_path):
    torch.manual_seed(0)
    model = BNMLP()
    data = batches(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with graddiff.trace(model, tmp_path / "k.h5", kinds=["param", "grad"], modules="fc.1*"):
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    run = graddiff.open(tmp_path / "k.h5")
    assert run.kinds == ["param", "grad"]
    assert run.names("param") == ["fc.1.0.weight", "fc.1.1.weight", "fc.1.1.bias"]
    with graddiff.trace(model, tmp_path / "k2.h5", kinds="activation,buffer", modules=["head"]):
        model(data[0][0])
    run2 = graddiff.open(tmp_path / "k2.h5")
    assert run2.names("activation") == ["head"]
    assert "buffer" not in run2.kinds  # head has no buffers


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"values": "some"}, "values="),
        ({"kinds": ["weights"]}, "unknown kind"),
        ({"max_bytes": -1}, "max_bytes"),
    ],
    ids=["bad-values", "bad-kind", "bad-budget"],
)
def test_bad_options_are_clear_errors(tmp_path, kwargs, match):
    with pytest.raises(graddiff.TraceUsageError, match=match):
        graddiff.trace(nn.Linear(2, 2), tmp_path / "x.h5", **kwargs)


def test_not_a_module_and_unwritable_path(tmp_path):
    with pytest.raises(graddiff.TraceUsageError, match="nn.Module"):
        graddiff.trace(lambda x: x, tmp_path / "x.h5")
    with pytest.raises(graddiff.TraceUsageError, match="cannot create the trace file"):
        with graddiff.trace(nn.Linear(2, 2), tmp_path / "no" / "such" / "dir" / "x.h5"):
            pass


def test_environment_is_recorded(tmp_path):
    torch.manual_seed(123)
    model = nn.Linear(3, 2)
    with graddiff.trace(model, tmp_path / "e.h5", values="stats"):
        model(torch.randn(2, 3)).sum().backward()
    env = graddiff.open(tmp_path / "e.h5").environment
    assert env["torch_version"] == torch.__version__
    assert env["initial_seed"] == 123
    assert env["n_parameters"] == 8 and env["model_class"].endswith("Linear")
    assert env["device"] == "cpu" and env["dtype"] == "float32"
    for key in (
        "cudnn_deterministic",
        "cudnn_benchmark",
        "deterministic_algorithms",
        "python",
        "platform",
        "argv",
    ):
        assert key in env
    opts = graddiff.open(tmp_path / "e.h5").options
    assert opts["values"] == "stats"

"""A backward hook in one run only, told from a gradient path (rules_hooks, rules_path).

Each test is its own oracle: it knows which hook it registered, where it acts, and which
gradients it changes (or that it changes none).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from classcheck import diagnosis_unlabelled
from torch import nn

import graddiff

LEAN = ["param", "input", "activation", "loss", "grad"]  # no output gradients


def _bump(g):
    """A gradient hook that is no known transform (not a factor, clip or L2 term)."""
    return g + 0.05 * g.sign()


def _scale_inputs(module, grad_input, grad_output):
    return tuple(None if g is None else 0.5 * g + 0.01 for g in grad_input)


def _log(g):
    return None


def _td(path, detach: bool = True, hook: str = "", late: bool = False) -> str:
    """A TD-style loop (target from the same network). ``hook``: "param" (every parameter
    gets _bump), "module" (a full backward hook on layer 2 changes its input gradient),
    "log" (a hook that returns None on layer 0's weight). ``late``: registered inside the
    trace (seen at its exit)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def register():
        if hook == "param":
            for p in m.parameters():
                p.register_hook(_bump)
        elif hook == "module":
            m[2].register_full_backward_hook(_scale_inputs)
        elif hook == "log":
            m[0].weight.register_hook(_log)

    if not late:
        register()
    o = torch.optim.SGD(m.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    with graddiff.trace(m, path, values="full"):
        if late:
            register()
        for _ in range(2):
            s, s2 = torch.randn(10, 6, generator=g), torch.randn(10, 6, generator=g)
            r = torch.randn(10, generator=g)
            nxt = m(s2).max(1).values
            target = r + 0.9 * (nxt.detach() if detach else nxt)
            loss = F.mse_loss(m(s).max(1).values, target)
            o.zero_grad()
            loss.backward()
            o.step()
    return str(path)


@pytest.mark.parametrize("late", [False, True], ids=["before the trace", "inside it"])
def test_a_hook_on_every_parameter_in_one_run_is_named_before_a_path(tmp_path, late):
    a = _td(tmp_path / "a.h5")
    b = _td(tmp_path / "b.h5", hook="param", late=late)
    assert graddiff.open(b).backward_hooks["params"]["0.weight"] == {
        "tensor": ["test_backward_hooks._bump"]
    }
    r = graddiff.compare(a, b, kinds=LEAN)
    assert r.exit_code == 1 and (r.first.step, r.first.kind) == (0, "grad"), r.headline()
    causes = [c.cause for c in r.diagnosis]
    assert causes[0] == "backward_hook", [(c.cause, c.title) for c in r.diagnosis]
    assert "extra_grad_path" in causes  # the path reading, ranked after the hook
    c = r.cause
    assert "in B only" in c.title
    text = " ".join(c.evidence)
    assert (
        "tensor hook (register_hook) on 0.weight (Linear): none in A, test_backward_hooks._bump in B"
        in text
    )
    assert "the gradients of 4 parameter(s) differ" in text
    assert not diagnosis_unlabelled(r)


def test_a_module_backward_hook_reaches_the_layers_before_it(tmp_path):
    """A full backward hook on layer 2 changes the gradient into its input: layer 0's
    gradients differ, layer 2's own agree; named with the module."""
    a = _td(tmp_path / "a.h5")
    b = _td(tmp_path / "b.h5", hook="module")
    r = graddiff.compare(a, b, kinds=LEAN)
    assert (r.first.step, r.first.kind) == (0, "grad") and r.first.name.startswith("0."), (
        r.headline()
    )
    assert r.cause.cause == "backward_hook", [(c.cause, c.title) for c in r.diagnosis]
    assert "a backward hook on 2 (Linear) in B only" in r.cause.title
    text = " ".join(r.cause.evidence)
    assert "backward hook (register_full_backward_hook) on 2 (Linear)" in text
    assert "while those of the other 2 agree (2.weight, 2.bias (both Linear))" in text


def test_a_hook_that_cannot_reach_the_differing_gradients_is_not_named(tmp_path):
    """B logs layer 0's weight gradient (a hook returning None) and detaches nothing in its
    TD target: every gradient differs, including ones no hook of B reaches, so the cause is
    the path, not the hook."""
    a = _td(tmp_path / "a.h5")
    b = _td(tmp_path / "b.h5", detach=False, hook="log")
    r = graddiff.compare(a, b, kinds=LEAN)
    assert (r.first.step, r.first.kind) == (0, "grad"), r.headline()
    assert "backward_hook" not in [c.cause for c in r.diagnosis]
    assert r.cause.cause == "extra_grad_path", [(c.cause, c.title) for c in r.diagnosis]


def test_a_path_with_the_same_hooks_in_both_runs_rules_hooks_out(tmp_path):
    a = _td(tmp_path / "a.h5")
    b = _td(tmp_path / "b.h5", detach=False)
    r = graddiff.compare(a, b, kinds=LEAN)
    assert r.cause.cause == "extra_grad_path", [(c.cause, c.title) for c in r.diagnosis]
    text = " ".join(r.cause.evidence)
    assert "backward hooks on the traced modules and parameters and the custom" in text
    assert "autograd.Functions in the first step's graphs are the same in both runs" in text
    assert "ranked second: a hook on an intermediate tensor" in text
    assert "backward_hook" not in [c.cause for c in r.diagnosis]


class _StraightThroughTanh(torch.autograd.Function):
    """tanh forward (bitwise torch.tanh), identity backward: a straight-through estimator."""

    @staticmethod
    def forward(ctx, x):
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _Net(nn.Module):
    def __init__(self, straight_through: bool, checkpointed: bool = False):
        super().__init__()
        self.enc, self.head = nn.Linear(6, 16), nn.Linear(16, 3)
        self.st, self.ck = straight_through, checkpointed

    def forward(self, x):
        h = self.enc(x)
        if self.ck:
            h = torch.utils.checkpoint.checkpoint(torch.tanh, h, use_reentrant=True)
        else:
            h = _StraightThroughTanh.apply(h) if self.st else torch.tanh(h)
        return self.head(h)


def _fn_run(path, straight_through: bool, checkpointed: bool = False) -> str:
    torch.manual_seed(0)
    m = _Net(straight_through, checkpointed)
    o = torch.optim.SGD(m.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    with graddiff.trace(m, path, values="full"):
        for _ in range(2):
            x, y = torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g)
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    return str(path)


def test_a_custom_function_in_one_run_is_named(tmp_path):
    """B's tanh is a custom Function with a straight-through backward: the forward agrees
    bitwise, the encoder's gradients differ (the head's agree)."""
    a, b = _fn_run(tmp_path / "a.h5", False), _fn_run(tmp_path / "b.h5", True)
    fa, fb = graddiff.open(a).custom_functions, graddiff.open(b).custom_functions
    assert fa == {"names": [], "complete": True}
    assert fb == {"names": ["test_backward_hooks._StraightThroughTanh"], "complete": True}
    r = graddiff.compare(a, b, kinds=LEAN)
    assert (r.first.step, r.first.kind) == (0, "grad") and r.first.name.startswith("enc."), (
        r.headline()
    )
    assert r.cause.cause == "custom_function", [(c.cause, c.title) for c in r.diagnosis]
    assert "test_backward_hooks._StraightThroughTanh" in r.cause.title
    assert "in B's graph only" in r.cause.title
    assert "extra_grad_path" in [c.cause for c in r.diagnosis]  # ranked after it
    assert not diagnosis_unlabelled(r)


def test_torch_own_functions_are_not_custom(tmp_path):
    """torch.utils.checkpoint's Function is torch's own: not listed, and the same training."""
    a = _fn_run(tmp_path / "a.h5", False)
    b = _fn_run(tmp_path / "b.h5", False, checkpointed=True)
    assert graddiff.open(b).custom_functions == {"names": [], "complete": True}
    r = graddiff.compare(a, b)
    assert "custom_function" not in [c.cause for c in r.diagnosis]

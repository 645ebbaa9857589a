"""Backward passes per parameter (``/reach``) and the user's backward hooks
(``backward_hooks``): recorded without changing training, removed on exit, tolerated when
absent (older files).

The oracle is the loop: it knows how many backward passes reach each parameter at each step.
"""

from __future__ import annotations

import h5py
import pytest
import torch
from torch import nn

import graddiff


class _GenDisc(nn.Module):
    """A generator and a discriminator in one model: ``detach`` cuts the discriminator loss's
    path into the generator."""

    def __init__(self):
        super().__init__()
        self.g = nn.Linear(4, 6)
        self.d = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, z, detach: bool):
        fake = self.g(z)
        return self.d(fake.detach() if detach else fake), fake


class _Renamed(nn.Module):
    """The same model with the generator registered as ``gen`` (for --map)."""

    def __init__(self):
        super().__init__()
        inner = _GenDisc()
        self.gen, self.d = inner.g, inner.d

    def forward(self, z, detach: bool):
        fake = self.gen(z)
        return self.d(fake.detach() if detach else fake), fake


def _train(
    path, detach_at=(), steps: int = 3, fail_at=None, trace: bool = True, model=_GenDisc
) -> nn.Module:
    """Two backward calls per step (the discriminator's loss, then the generator's): the
    first reaches g except at the steps in ``detach_at``."""
    torch.manual_seed(0)
    m = model()
    o = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)

    def loop():
        for step in range(steps):
            if step == fail_at:
                raise RuntimeError("stop")
            z = torch.randn(8, 4, generator=g)
            o.zero_grad()
            out, fake = m(z, step in detach_at)
            out.pow(2).mean().backward(retain_graph=True)
            (fake - 1).pow(2).mean().backward()
            o.step()

    if trace:
        with graddiff.trace(m, path, values="full"):
            loop()
    else:
        loop()
    return m


def test_reach_counts_each_backward_pass_into_each_parameter(tmp_path):
    path = tmp_path / "a.h5"
    _train(path, detach_at=(1,), steps=4)
    run = graddiff.open(path)
    both = {
        "g.weight": 2,
        "g.bias": 2,
        **{f"d.{i}.{w}": 1 for i in (0, 2) for w in ("weight", "bias")},
    }
    assert run.reach(0) == both
    assert run.reach(1) == {**both, "g.weight": 1, "g.bias": 1}
    assert run.reach(2) == both and run.reach(3) == both
    with h5py.File(path, "r") as f:  # changes only: steps 0, 1 and 2
        assert [int(s) for s in f["reach"]["step"]] == [0, 1, 2]


def test_reach_hooks_change_nothing_and_are_removed(tmp_path):
    traced = _train(tmp_path / "a.h5")
    plain = _train(None, trace=False)
    for (n, p), q in zip(traced.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), n
        assert not p._post_accumulate_grad_hooks, n
    with pytest.raises(RuntimeError, match="stop"):
        m = _train(tmp_path / "b.h5", fail_at=1)
    m = _GenDisc()
    with pytest.raises(RuntimeError):
        with graddiff.trace(m, tmp_path / "c.h5"):
            raise RuntimeError("body")
    assert all(not p._post_accumulate_grad_hooks for p in m.parameters())
    assert graddiff.open(tmp_path / "b.h5").reach(0) is not None


def test_no_reach_without_gradients_recorded_or_in_older_files(tmp_path):
    path = tmp_path / "a.h5"
    torch.manual_seed(0)
    m = _GenDisc()
    with graddiff.trace(m, path, kinds=["param", "loss"]):
        out, fake = m(torch.randn(2, 4), False)
        out.sum().backward()
    assert graddiff.open(path).reach(0) is None
    _train(path)
    with h5py.File(path, "a") as f:  # an older file: no /reach
        del f["reach"]
        del f.attrs["backward_hooks"]
    run = graddiff.open(path)
    assert run.reach(0) is None and run.backward_hooks is None


def test_side_of_a_path_from_another_backward_call(tmp_path):
    """Both runs call backward twice per step and the losses agree; in A the discriminator
    loss's backward also reaches the generator (B detaches): the side is A, from the counts.
    Without them (an older trace) the side is not claimed."""
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    _train(a)
    _train(b, detach_at=range(3))
    lean = ["param", "input", "activation", "loss", "grad"]  # no output gradients
    r = graddiff.compare(a, b, kinds=lean)
    assert r.exit_code == 1 and (r.first.step, r.first.kind) == (0, "grad"), r.headline()
    assert r.first.name in ("g.weight", "g.bias")
    assert r.cause.cause == "extra_grad_path", [(c.cause, c.title) for c in r.diagnosis]
    assert "an extra gradient path reaches g (Linear) in A" in r.cause.title
    text = " ".join(r.cause.evidence)
    assert "at step 0: 2 in A, 1 in B" in text
    assert "so the extra path is in A (or B cuts a path that A keeps" in text
    assert "not a backward hook or custom autograd.Function alone" in text
    with h5py.File(a, "a") as f:
        del f["reach"]
    r = graddiff.compare(a, b, kinds=lean)
    assert r.cause.cause == "extra_grad_path" and "side not known" in r.cause.title


def test_side_named_through_a_name_map(tmp_path):
    """compare --map writes B's copy under A's names: its counts follow (renamed)."""
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    _train(a, detach_at=range(3))
    _train(b, model=_Renamed)
    lean = ["param", "input", "activation", "loss", "grad"]
    r = graddiff.compare(a, b, kinds=lean, name_map=["gen -> g"])
    assert r.exit_code == 1 and (r.first.step, r.first.kind) == (0, "grad"), r.headline()
    assert "an extra gradient path reaches g (Linear) in B" in r.cause.title, r.cause.title
    assert "at step 0: 1 in A, 2 in B" in " ".join(r.cause.evidence)

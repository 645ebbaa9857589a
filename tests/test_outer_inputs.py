"""Inputs when the traced model's own forward never runs: the arguments of the outermost
traced submodule calls (a LightningModule's training_step calling ``self.net(x)``, a container
whose parts are called one by one); nothing changes for a model called as a whole."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import graddiff


class Parts(nn.Module):
    """A container: the training loop calls its parts, never ``forward``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.dec = nn.Linear(6, 2)

    def forward(self, x):
        return self.dec(self.enc(x))


def _batches(n=3):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g)) for _ in range(n)]


def train(model, path=None, *, how="parts", ckpt=False, **trace_kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def go():
        for i, (x, y) in enumerate(_batches()):
            if how == "parts":
                h = checkpoint(model.enc, x, use_reentrant=False) if ckpt else model.enc(x)
                out = model.dec(h)
            elif how == "part_then_whole" and i == 0:
                model.enc(x)  # a submodule called before the model itself, in step 0 only
                out = model(x)
            else:
                out = model(x)
            opt.zero_grad()
            F.mse_loss(out, y).backward()
            opt.step()

    if path is None:
        go()
    else:
        with graddiff.trace(model, path, **trace_kw):
            go()
    return model


def _inputs_at(run, step):
    """(name, call) of every input record of ``step``."""
    keys = [run.record_key(int(r)) for r in run.entries(step, step)["record"]]
    return sorted((k.name, k.call) for k in keys if k.kind == "input")


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_parts_called_one_by_one_record_each_outermost_calls_arguments(tmp_path):
    traced = train(Parts(), tmp_path / "t.h5")
    assert _same(traced, train(Parts()))  # observed, not perturbed
    run = graddiff.open(tmp_path / "t.h5")
    x0 = _batches()[0][0]
    # enc's argument is the batch; dec's is enc's output (the same tensor: an alias)
    assert sorted(run.names("input")) == ["dec:0", "enc:0"]
    assert len(run.steps) == 3
    assert (run.get("input", "enc:0", 0) == x0.numpy()).all()
    assert (
        run.stats("input", "dec:0", 1)["fingerprint"]
        == run.stats("activation", "enc", 1)["fingerprint"]
    )
    # enc.0 and enc.1 run inside enc: not outermost, not inputs
    assert all(_inputs_at(run, int(s)) == [("dec:0", 0), ("enc:0", 0)] for s in run.steps)


def test_inputs_do_not_depend_on_the_module_filter(tmp_path):
    """The outermost call is found among all the model's modules, not only the selected."""
    train(Parts(), tmp_path / "t.h5", modules=["enc.*", "dec"])
    run = graddiff.open(tmp_path / "t.h5")
    assert sorted(run.names("input")) == ["dec:0", "enc:0"]
    assert sorted(run.names("activation")) == ["dec", "enc.0", "enc.1"]


def test_checkpointed_part_records_its_input_once_per_step(tmp_path):
    traced = train(Parts(), tmp_path / "t.h5", ckpt=True)
    assert _same(traced, train(Parts(), ckpt=True))
    run = graddiff.open(tmp_path / "t.h5")
    assert sorted(run.names("input")) == ["dec:0", "enc:0"]
    for step in run.steps:  # the recompute inside backward is not a second call
        assert _inputs_at(run, int(step)) == [("dec:0", 0), ("enc:0", 0)]


def test_model_called_as_a_whole_records_its_own_arguments_and_drops_the_extra_hooks(tmp_path):
    """The submodules' outermost-call hooks go at the model's first forward with grad, with the
    inputs they took in that step: every step holds the model's own arguments only, whichever
    module the code called first."""
    model = Parts()
    before = [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()]
    seen = []
    with graddiff.trace(model, tmp_path / "t.h5"):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for i, (x, y) in enumerate(_batches()):
            if i == 0:
                model.enc(x)
            F.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            seen.append(sum(len(m._forward_pre_hooks) for m in model.children()))
    assert seen == [0, 0, 0]
    assert [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()] == before
    assert _same(model, train(Parts(), how="part_then_whole"))
    run = graddiff.open(tmp_path / "t.h5")
    assert run.names("input") == ["0"] and len(run.steps) == 3
    assert all(_inputs_at(run, int(s)) == [("0", 0)] for s in run.steps)

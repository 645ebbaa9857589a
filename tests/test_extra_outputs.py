"""A module that returns an extra value in one run only (eager attention's weights vs an
implementation that returns None there) is an interface difference, not a divergence; a
module that does not run in one run, or whose shared output differs, still is one.

The oracle is the test: it builds both implementations and knows which records each returns.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import graddiff
from graddiff.cli import main as cli_main


class Attention(nn.Module):
    """Returns (output, weights) like eager attention, or (output, None) like sdpa."""

    def __init__(self, with_weights: bool, scale: float = 1.0):
        super().__init__()
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)
        self.with_weights, self.scale = with_weights, scale

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        w = torch.softmax(self.scale * q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
        return self.proj(w @ v), (w if self.with_weights else None)


class Net(nn.Module):
    def __init__(self, with_weights: bool, scale: float = 1.0, skip_attention: bool = False):
        super().__init__()
        self.emb, self.attn, self.head = (
            nn.Linear(4, 8),
            Attention(with_weights, scale),
            nn.Linear(8, 3),
        )
        self.skip = skip_attention

    def forward(self, x):
        h = self.emb(x)
        if not self.skip:
            h = h + self.attn(h)[0]
        return self.head(h).mean(1)


def _run(path, **kw):
    torch.manual_seed(0)
    model = Net(**kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    with graddiff.trace(model, path):
        for _ in range(3):
            x, y = torch.randn(2, 5, 4, generator=gen), torch.randint(0, 3, (2,), generator=gen)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return path


def test_an_extra_returned_value_is_not_a_divergence(tmp_path):
    a, b = _run(tmp_path / "a.h5", with_weights=True), _run(tmp_path / "b.h5", with_weights=False)
    r = graddiff.compare(a, b)
    assert not r.diverged and r.verdict == "identical", r.headline()
    assert "except 2 module output record(s)" in r.headline()
    labels = {e["label"]: e for e in r.structure["extra_outputs"]}
    assert set(labels) == {"activation attn:1", "grad_output attn:1"}, labels
    assert labels["activation attn:1"] == {"label": "activation attn:1", "steps": 3, "in": "A"}
    res = CliRunner().invoke(cli_main, ["compare", "--json", str(a), str(b)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["structure"]["extra_outputs"]


def test_the_shared_output_still_diverges(tmp_path):
    a = _run(tmp_path / "a.h5", with_weights=True)
    b = _run(tmp_path / "b.h5", with_weights=False, scale=2.0)
    r = graddiff.compare(a, b)
    assert r.diverged and r.first.step == 0, r.headline()
    assert r.first.name == "attn.proj", r.headline()  # the output both runs return


def test_a_module_that_does_not_run_is_still_a_divergence(tmp_path):
    a = _run(tmp_path / "a.h5", with_weights=True)
    b = _run(tmp_path / "b.h5", with_weights=True, skip_attention=True)
    r = graddiff.compare(a, b)
    assert r.diverged and r.first.status.startswith("missing"), r.headline()
    assert not r.structure["extra_outputs"]


class _Mlp(nn.Module):
    """fc1 -> activation -> fc2: the activation a module (``module``), a function
    (``function``), missing (``none``), or a BatchNorm without affine parameters (``norm``:
    stateless in parameters but not in buffers)."""

    def __init__(self, how: str):
        super().__init__()
        self.fc1, self.fc2, self.how = nn.Linear(4, 8), nn.Linear(8, 3), how
        if how == "module":
            self.act = nn.ReLU()
        if how == "norm":
            self.act = nn.BatchNorm1d(8, affine=False)

    def forward(self, x):
        h = self.fc1(x)
        if self.how in ("module", "norm"):
            h = self.act(h)
        elif self.how == "function":
            h = F.relu(h)
        return self.fc2(h)


def _mlp_run(path, how):
    torch.manual_seed(0)
    model = _Mlp(how)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    with graddiff.trace(model, path):
        for _ in range(2):
            x, y = torch.randn(6, 4, generator=gen), torch.randint(0, 3, (6,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return path


def test_an_op_written_as_a_module_or_a_function_is_the_same_training(tmp_path):
    a, b = _mlp_run(tmp_path / "a.h5", "module"), _mlp_run(tmp_path / "b.h5", "function")
    r = graddiff.compare(a, b)
    assert not r.diverged and r.verdict == "identical", r.headline()
    assert {e["label"] for e in r.structure["stateless_modules"]} == {
        "activation act",
        "grad_output act",
    }
    assert any("act (ReLU)" in n and "as a function" in n for n in r.notes), r.notes


def test_an_op_left_out_is_named_where_its_output_is_used(tmp_path):
    a, b = _mlp_run(tmp_path / "a.h5", "module"), _mlp_run(tmp_path / "b.h5", "none")
    r = graddiff.compare(a, b)
    assert r.diverged and (r.first.kind, r.first.name) == ("activation", "fc2"), r.headline()
    assert r.cause.cause == "module_output"
    assert r.cause.title == (
        "module fc2 (Linear) gives a different output after act (ReLU), which runs in A only"
    )


def test_a_module_with_buffers_in_one_run_only_is_a_divergence(tmp_path):
    a, b = _mlp_run(tmp_path / "a.h5", "norm"), _mlp_run(tmp_path / "b.h5", "function")
    r = graddiff.compare(a, b)
    assert r.diverged and not r.structure["stateless_modules"], r.headline()

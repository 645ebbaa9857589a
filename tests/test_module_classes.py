"""Module classes recorded at trace time and shown with every record name."""

from __future__ import annotations

import h5py
import torch
from torch import nn

import graddiff
from graddiff.modclass import class_of, describe_label, merge, owner, parse


def test_trace_records_the_class_of_every_module(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "run.h5"
    with graddiff.trace(model, path):
        for _ in range(2):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with graddiff.open(path) as run:
        assert run.module_classes == {
            "(root)": "Sequential",
            "0": "Linear",
            "1": "BatchNorm1d",
            "2": "ReLU",
            "3": "Linear",
        }
        seen = {(k.kind, k.name): run.module_class(k.kind, k.name) for k in run.keys}
    assert seen[("param", "1.weight")] == "BatchNorm1d"
    assert seen[("activation", "2")] == "ReLU"
    assert seen[("grad_output", "(root)")] == "Sequential"
    assert seen[("buffer", "1.running_var")] == "BatchNorm1d"
    assert seen[("loss", "loss")] is None and seen[("input", "0")] is None
    # an older trace without the attribute reads as "no classes known"
    with h5py.File(path, "a") as f:
        del f.attrs["module_classes"]
    with graddiff.open(path) as run:
        assert run.module_classes == {} and run.module_class("param", "1.weight") is None


def test_names_map_to_their_owning_module():
    classes = {"(root)": "GPT2", "h.0.attn": "GPT2Attention", "lstm": "LSTM"}
    assert owner("grad", "h.0.attn.c_attn.weight") == "h.0.attn.c_attn"
    assert class_of(classes, "param", "scale") == "GPT2"  # a parameter of the root module
    assert class_of(classes, "activation", "lstm:0.1") == "LSTM"  # a nested output
    assert class_of(classes, "autograd_grad", "input[0]") is None
    assert (
        describe_label(classes, "activation h.0.attn #2")
        == "activation h.0.attn (GPT2Attention) #2"
    )
    assert describe_label(classes, "loss loss") == "loss loss"
    assert merge({"a": "Linear"}, {"a": "LoRALinear", "b": "ReLU"}) == {
        "a": "Linear / LoRALinear",
        "b": "ReLU",
    }
    assert parse(None) == {} and parse("not json") == {} and parse('["x"]') == {}

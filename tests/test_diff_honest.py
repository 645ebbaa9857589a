"""Honest headlines: what was compared is said, a shorter run fails, no placeholder numbers."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner
from diff_builders import simulate
from torch import nn

import graddiff
import graddiff.cli

PLACEHOLDER = re.compile(r"\b(None|nan|NaN|inf)\b")


def _cli(*args):
    return CliRunner().invoke(graddiff.cli.main, ["compare", *map(str, args)])


def _loop(path, steps, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with graddiff.trace(net, path, values="full"):
        for _ in range(steps):
            opt.zero_grad()
            net(torch.randn(8, 4, generator=g)).square().mean().backward()
            opt.step()
    return path


def test_shorter_run_fails_and_is_named(tmp_path):
    a = _loop(tmp_path / "a.h5", 5)
    b = _loop(tmp_path / "b.h5", 3)
    r = graddiff.compare(a, b)
    assert (r.verdict, r.exit_code, r.first) == ("diverged", 1, None)
    assert r.cause.cause == "step_mismatch"
    assert "B is missing 2 step(s)" in r.cause.title
    assert "in A only (not compared): 2 steps (3..4)" in r.cause.evidence
    assert r.headline().startswith("DIVERGED: the runs record different steps (A 5, B 3)")
    out = _cli(a, b)
    assert out.exit_code == 1 and "different steps" in out.output
    # --steps restricts the comparison to the common steps: then it is a pass
    ok = graddiff.compare(a, b, steps="0:2")
    assert (ok.verdict, ok.exit_code) == ("identical", 0), ok.headline()
    assert _cli(a, b, "--steps", "0:2").exit_code == 0
    # a window reaching past the shorter run still fails: steps 3..4 are missing in B
    assert graddiff.compare(a, b, steps="1:").exit_code == 1


def test_a_divergence_before_the_end_stays_the_first_cause(tmp_path):
    a = _loop(tmp_path / "a.h5", 5)
    b = _loop(tmp_path / "b.h5", 3, seed=1)
    r = graddiff.compare(a, b)
    assert [c.cause for c in r.diagnosis][0] == "different_init"
    assert r.diagnosis[-1].cause == "step_mismatch"


def test_headline_names_the_kinds_and_steps_compared(tmp_path):
    a = simulate(tmp_path / "a.h5")
    b = simulate(tmp_path / "b.h5")
    h = graddiff.compare(a, b, kinds="grad,loss").headline()
    assert (
        h
        == "No difference: the runs are bitwise identical over 4 steps (0..3) of loss, grad (--kinds)."
    )
    full = graddiff.compare(a, b).headline()
    assert "of param, input, activation, loss, grad, buffer." in full and "--kinds" not in full


@pytest.mark.parametrize("kinds", ["grad", "loss", "activation,grad"])
def test_no_claim_about_kinds_not_compared(tmp_path, kinds):
    a = simulate(tmp_path / "a.h5")
    b = simulate(tmp_path / "b.h5", weight_decay=0.5, act="tanh")
    r = graddiff.compare(a, b, kinds=kinds)
    assert r.diverged
    text = " ".join([r.headline()] + [c.title + " " + " ".join(c.evidence) for c in r.diagnosis])
    compared = set(kinds.split(","))
    for kind, words in (
        ("activation", ("forward pass agrees", "activations agree", "model output agrees")),
        ("param", ("parameters agree",)),
        ("input", ("inputs agree",)),
    ):
        if kind not in compared:
            assert not any(w in text for w in words), text


def test_no_placeholders_on_structural_differences(tmp_path):
    a = simulate(tmp_path / "a.h5", hidden=8)
    b = simulate(tmp_path / "b.h5", hidden=6)
    d = json.loads(_cli(a, b, "--json").output)
    text = _cli(a, b).output + " ".join(
        [d["headline"]] + [c["title"] + " ".join(c["evidence"]) for c in d["diagnosis"]]
    )
    assert d["exit_code"] == 1 and not PLACEHOLDER.search(text), text


def test_modules_matching_nothing_is_a_usage_error(tmp_path):
    net = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(graddiff.TraceUsageError, match="matches no module of Sequential"):
        with graddiff.trace(net, tmp_path / "t.h5", modules="patern*"):
            net(torch.ones(1, 2)).sum().backward()
    assert not (tmp_path / "t.h5").exists()
    assert not net._forward_hooks and not net[0]._forward_hooks

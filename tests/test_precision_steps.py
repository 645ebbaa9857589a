"""Precision-aware tolerance over many steps: rounding compounds across optimizer updates, so a
bfloat16-vs-float32 pair of a long run stays "within precision", while an op swap is still
DIVERGED at its first step (docs/tolerance.md, "Precision-aware tolerance")."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graddiff
from graddiff.diff.precision import steps_factor


def _train(path, *, autocast: bool, act=nn.ReLU, steps: int = 20) -> str:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), act(), nn.Linear(32, 32), act(), nn.Linear(32, 4))
    opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    with graddiff.trace(net, path):
        for _ in range(steps):
            x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
    return str(path)


def test_steps_factor_is_a_random_walk_from_the_first_recorded_step():
    assert steps_factor(0, 0) == 1.0
    assert steps_factor(15, 0) == pytest.approx(4.0)
    assert steps_factor(103, 100) == pytest.approx(2.0)
    assert steps_factor(5, 9) == 1.0  # never below one step's bound


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("prec")
    return {
        "fp32": _train(d / "a.h5", autocast=False),
        "bf16": _train(d / "b.h5", autocast=True),
        "gelu": _train(d / "g.h5", autocast=True, act=nn.GELU),
    }


def test_long_bf16_pair_is_within_precision(runs, monkeypatch):
    """20 AdamW steps: with one step's bound (no growth) this pair is DIVERGED late in the
    run, a false alarm (its perturbed twin drifts further); the grown bound judges it within."""
    r = graddiff.compare(runs["fp32"], runs["bf16"])
    assert r.verdict == "within_tolerance", r.headline()
    assert r.headline().startswith("Within bfloat16 precision")
    # without the growth, the same pair is called DIVERGED after its first steps
    monkeypatch.setattr("graddiff.diff.pair.steps_factor", lambda step, first: 1.0)
    flat = graddiff.compare(runs["fp32"], runs["bf16"])
    assert flat.verdict == "diverged" and flat.first.step >= 4, flat.headline()


def test_growth_counts_from_the_first_recorded_step_not_the_window(runs):
    """--steps restricts what is compared, not how long rounding has compounded."""
    r = graddiff.compare(runs["fp32"], runs["bf16"], steps="12:")
    assert r.verdict == "within_tolerance", r.headline()


def test_op_swap_under_bf16_is_still_diverged_at_step_0(runs):
    r = graddiff.compare(runs["fp32"], runs["gelu"])
    assert r.verdict == "diverged" and r.first.step == 0, r.headline()
    assert r.first.kind == "activation"
    assert math.isfinite(r.first.tolerance) and r.first.rel_diff > r.first.tolerance

"""What is stored: fingerprints and stats always; full values by policy and budget."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from zoo_models import BNMLP, LOOPS, batches

import graddiff


def _train(tmp_path, name="v.h5", steps=4, **options):
    torch.manual_seed(0)
    model = BNMLP()
    with graddiff.trace(model, tmp_path / name, **options):
        LOOPS["sgd"](model, batches(steps))
    return graddiff.open(tmp_path / name)


def test_stats_mode_stores_no_values_but_fingerprints(tmp_path):
    run = _train(tmp_path, values="stats")
    assert not run.step_table["full"].any()
    with h5py.File(run.path) as f:
        assert len(f["values"]) == 0
    with pytest.raises(graddiff.ValuesNotStoredError, match=r"full_steps=\[1\]"):
        run.get("param", "head.weight", 1)
    s = run.stats("param", "head.weight", 1)
    assert s["norm"] > 0 and len(s["fingerprint"]) == 32 and not s["values_stored"]


def test_stats_mode_fingerprints_equal_full_mode_fingerprints(tmp_path):
    stats = _train(tmp_path, "s.h5", values="stats")
    full = _train(tmp_path, "f.h5", values="full")
    for key in full.keys:
        for step in full.steps:
            a = stats.stats(key.kind, key.name, step, key.call)
            b = full.stats(key.kind, key.name, step, key.call)
            assert a["fingerprint"] == b["fingerprint"], (key, step)
            assert a["norm"] == pytest.approx(b["norm"], rel=1e-5)


def test_auto_mode_switches_to_stats_when_budget_is_spent(tmp_path):
    one_step = _train(tmp_path, "one.h5", steps=1, values="full")
    step_bytes = int(one_step.entries(0, 0)["nbytes"].sum())
    # Budget of 1.5 steps: steps 0 and 1 start under budget, step 2 does not.
    with pytest.warns(RuntimeWarning, match="statistics only from step 2") as caught:
        run = _train(tmp_path, values="auto", max_bytes=int(step_bytes * 1.5))
    assert len(caught) == 1  # warned once
    assert list(run.step_table["full"]) == [1, 1, 0, 0]
    assert "statistics only from step 2" in run.values_note
    assert run.has_values("grad", "head.weight", 1)
    assert not run.has_values("grad", "head.weight", 2)


def test_full_steps_stores_exactly_those_steps(tmp_path):
    run = _train(tmp_path, full_steps=[0, 3])
    assert list(run.step_table["full"]) == [1, 0, 0, 1]
    np.testing.assert_equal(run.get("param", "head.bias", 3).shape, (4,))


def test_one_tensor_seen_twice_is_stored_once(tmp_path):
    """A Sequential returns its last child's output tensor: both records share bytes."""
    run = _train(tmp_path, steps=1, values="full")
    rows = run.entries(0, 0)
    by_name = {
        run.record_key(int(r["record"])).name: r
        for r in rows
        if run.record_key(int(r["record"])).kind == "activation"
    }
    seq, last = by_name["fc.0"], by_name["fc.0.2"]
    assert seq["offset"] == last["offset"] and seq["nbytes"] == last["nbytes"]
    np.testing.assert_array_equal(
        run.get("activation", "fc.0", 0), run.get("activation", "fc.0.2", 0)
    )


def test_nan_and_inf_are_counted(tmp_path):
    model = torch.nn.Linear(4, 4)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
        model.weight[1, 1] = float("inf")
        model.weight[2, 2] = float("-inf")
    with graddiff.trace(model, tmp_path / "n.h5", values="stats", kinds="param"):
        model(torch.ones(1, 4))
    s = graddiff.open(tmp_path / "n.h5").stats("param", "weight", 0)
    assert (s["nan"], s["inf"]) == (1, 2)
    assert np.isfinite(s["min"]) and np.isfinite(s["max"])


def test_large_and_small_tensors_read_back_exactly(tmp_path):
    """Tensors larger than one write piece and small ones gathered together read back exactly,
    at the first step (copied one by one) and later ones (copied into the step's arena)."""
    from graddiff.writer import STAGE_BYTES, WRITE_BYTES

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(800, 800), torch.nn.ReLU(), torch.nn.Linear(800, 3))
    assert model[0].weight.numel() * 4 > WRITE_BYTES
    assert model[2].weight.numel() * 4 < STAGE_BYTES
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs = [torch.randn(4, 800) for _ in range(3)]
    seen = []
    with graddiff.trace(model, tmp_path / "big.h5", values="full"):
        for x in xs:
            opt.zero_grad()
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            model(x).sum().backward()
            seen.append((before, {n: p.grad.clone() for n, p in model.named_parameters()}))
            opt.step()
    run = graddiff.open(tmp_path / "big.h5")
    assert list(run.steps) == [0, 1, 2]
    for step, (params, grads) in enumerate(seen):
        for name in params:
            np.testing.assert_array_equal(run.get("param", name, step), params[name].numpy())
            np.testing.assert_array_equal(run.get("grad", name, step), grads[name].numpy())
        np.testing.assert_array_equal(run.get("input", "0", step), xs[step].numpy())

"""full_kinds=: full values only for the chosen kinds; everything else as statistics."""

from __future__ import annotations

import os

import pytest
import torch
from zoo_models import BNMLP, LOOPS, batches

import graddiff


def _train(tmp_path, name, **options):
    torch.manual_seed(0)
    model = BNMLP()
    with graddiff.trace(model, tmp_path / name, **options):
        LOOPS["sgd"](model, batches(3))
    return graddiff.open(tmp_path / name)


def test_params_and_grads_only_keep_values_and_the_rest_is_fingerprinted(tmp_path):
    part = _train(tmp_path, "pg.h5", values="full", full_kinds=("param", "grad"))
    full = _train(tmp_path, "all.h5", values="full")
    kinds_with_values = set()
    for key in part.keys:
        for step in part.steps:
            a = part.stats(key.kind, key.name, step, key.call)
            b = full.stats(key.kind, key.name, step, key.call)
            assert a["fingerprint"] == b["fingerprint"], (key, step)
            if a["values_stored"]:
                kinds_with_values.add(key.kind)
                a_val = part.get(key.kind, key.name, step, key.call)
                b_val = full.get(key.kind, key.name, step, key.call)
                assert a_val.tobytes() == b_val.tobytes(), (key, step)
            else:
                assert key.kind not in ("param", "grad"), key
    assert kinds_with_values == {"param", "grad"}
    assert {k.kind for k in part.keys} > {"param", "grad", "activation"}
    assert os.path.getsize(part.path) < os.path.getsize(full.path)


def test_unknown_full_kind_is_a_usage_error(tmp_path):
    with pytest.raises(graddiff.TraceUsageError, match="full_kinds"):
        graddiff.trace(BNMLP(), tmp_path / "x.h5", full_kinds=("weights",))


def test_two_identical_runs_with_partial_values_compare_clean(tmp_path):
    a = _train(tmp_path, "a.h5", values="full", full_kinds="param,grad")
    b = _train(tmp_path, "b.h5", values="full", full_kinds="param,grad")
    assert not graddiff.compare(a, b).diverged

"""End to end: real (tiny, CPU) training runs traced with graddiff.trace, then compared."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from e2e_loops import record  # noqa: E402
from torch import nn  # noqa: E402

import graddiff  # noqa: E402

# (id, variant A, variant B, step, kind, cause id)
BUGS = [
    ("different init", {}, {"init_seed": 1}, 0, "param", "different_init"),
    (
        "missing zero_grad vs autograd.grad loop",
        {"model": "bn_mlp", "zero_grad": False},
        {"model": "bn_mlp", "loop": "autograd"},
        1,
        "grad",
        "grad_accumulation",
    ),
    (
        "batchnorm momentum",
        {"model": "bn_mlp"},
        {"model": "bn_mlp", "bn_momentum": 0.2},
        0,
        "buffer",
        "batchnorm_stats",
    ),
    (
        "dropout rng",
        {"model": "drop_mlp"},
        {"model": "drop_mlp", "rng_seed": 2},
        0,
        "activation",
        "dropout_rng",
    ),
    ("data order", {}, {"data_seed": 3}, 0, "input", "different_inputs"),
    ("weight decay", {}, {"weight_decay": 0.1}, 1, "param", "update_rule"),
    ("gradient clipping", {}, {"clip": 0.05}, 0, "grad", "scaled_gradients"),
    ("lr schedule", {}, {"schedule": (1, 0.5)}, 2, "param", "update_rule"),
    ("swapped activation", {}, {"act": nn.Tanh}, 0, "activation", "module_output"),
    ("frozen layer", {}, {"freeze": "0."}, 0, "grad_output", "frozen_parameter"),
    (
        "forgotten model.train()",
        {"model": "drop_mlp", "evaluate": True},
        {"model": "drop_mlp", "evaluate": True, "back_to_train": False},
        1,
        "activation",
        "train_eval_mode",
    ),
]


@pytest.mark.parametrize(
    ("va", "vb", "step", "kind", "cause"), [b[1:] for b in BUGS], ids=[b[0] for b in BUGS]
)
def test_bug_is_found_and_named(tmp_path, va, vb, step, kind, cause):
    r = graddiff.compare(record(tmp_path / "a.h5", **va), record(tmp_path / "b.h5", **vb))
    assert (r.exit_code, r.first.step, r.first.kind) == (1, step, kind), r.headline()
    assert r.cause.cause == cause, [c.title for c in r.diagnosis]


def test_missing_zero_grad_names_the_accumulating_run(tmp_path):
    a = record(tmp_path / "a.h5", model="bn_mlp", zero_grad=False)
    b = record(tmp_path / "b.h5", model="bn_mlp", loop="autograd")
    r = graddiff.compare(a, b)
    assert "in A" in r.cause.title and "steps 0+1" in r.cause.evidence[0]


def test_identical_runs_exit_0_even_exact(tmp_path):
    a, b = record(tmp_path / "a.h5", model="bn_mlp"), record(tmp_path / "b.h5", model="bn_mlp")
    assert graddiff.compare(a, b).verdict == "identical"
    assert graddiff.compare(a, b, exact=True).exit_code == 0


def test_manual_sgd_vs_optimizer_step_is_rounding_not_divergence(tmp_path):
    # Design decision: same init, p -= lr * g vs SGD.step() on a BatchNorm MLP stays within the
    # default rtol (the bias-before-BatchNorm gradients are rounding residue, see the noise
    # floor); the report traces the first bitwise difference to a rounding-level param change.
    a = record(tmp_path / "a.h5", model="bn_mlp", loop="autograd", steps=3)
    b = record(tmp_path / "b.h5", model="bn_mlp", steps=3)
    r = graddiff.compare(a, b)
    assert (r.verdict, r.exit_code) == ("within_tolerance", 0)
    o = r.first_bitwise
    assert (o.step, o.kind, o.rounding_level) == (1, "param", True)
    assert r.cause.cause == "rounding"
    assert any("update rounds differently" in e for e in r.cause.evidence)
    e = graddiff.compare(a, b, exact=True)
    assert (e.exit_code, e.first.step, e.first.kind, e.cause.cause) == (1, 1, "param", "rounding")


def test_gradient_accumulation_vs_big_batch_is_rounding(tmp_path):
    a, b = record(tmp_path / "a.h5", micro=2), record(tmp_path / "b.h5")
    r = graddiff.compare(a, b)
    assert r.exit_code == 0 and r.first_bitwise is not None
    assert any("joined along dim 0" in n for n in r.structure["pairing"])
    assert graddiff.compare(a, b, exact=True).exit_code == 1


def test_statistics_only_traces_still_find_and_name_the_bug(tmp_path):
    a = record(tmp_path / "a.h5", model="bn_mlp", zero_grad=False, values="stats")
    b = record(tmp_path / "b.h5", model="bn_mlp", loop="autograd", values="stats")
    r = graddiff.compare(a, b)
    assert (r.first.step, r.first.kind, r.first.basis) == (1, "grad", "stats")
    assert r.cause.cause == "grad_accumulation" and "full_steps=[1]" in r.first.note
    assert "rel >= " in r.headline()

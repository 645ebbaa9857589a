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
    ("weight decay", {}, {"weight_decay": 0.1}, 1, "param", "weight_decay"),
    ("gradient clipping", {}, {"clip": 0.05}, 0, "grad", "grad_clipping"),
    ("lr schedule", {}, {"schedule": (1, 0.5)}, 2, "param", "learning_rate"),
    ("swapped activation", {}, {"act": nn.Tanh}, 0, "activation", "module_swap"),
    ("frozen layer", {}, {"freeze": "0."}, 0, "grad_output", "frozen_parameter"),
    (
        "frozen layer, autograd.grad assigned to .grad",
        {"loop": "autograd_assign"},
        {"loop": "autograd_assign", "freeze": "0."},
        0,
        "grad_output",
        "frozen_parameter",
    ),
    (
        "gradient clipping, autograd.grad assigned to .grad",
        {},
        {"loop": "autograd_assign", "clip": 0.05},
        0,
        "grad",
        "grad_clipping",
    ),
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


@pytest.mark.parametrize("values", ["full", "stats"])
def test_identical_runs_exit_0_even_exact(tmp_path, values):
    kw = {"model": "bn_mlp", "micro": 2, "values": values}
    a, b = record(tmp_path / "a.h5", **kw), record(tmp_path / "b.h5", **kw)
    assert graddiff.compare(a, b).verdict == "identical"
    e = graddiff.compare(a, b, exact=True)
    assert (e.exit_code, e.verdict, e.structure["not_comparable"]) == (0, "identical", [])


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


@pytest.mark.parametrize("values", ["full", "stats"])
@pytest.mark.parametrize("micro", [1, 2])
def test_autograd_grad_assigned_to_dot_grad_is_no_divergence(tmp_path, micro, values):
    # B: gs = torch.autograd.grad(loss, params); p.grad = g; opt.step(). Both runs have .grad,
    # which is compared; B's autograd_grad records are a structure note, not "missing in A".
    a = record(tmp_path / "a.h5", micro=micro, values=values)
    b = record(tmp_path / "b.h5", loop="autograd_assign", micro=micro, values=values)
    for x, y, extra in ((a, b, "B"), (b, a, "A")):
        for exact in (False, True):
            r = graddiff.compare(x, y, exact=exact)
            assert (r.verdict, r.exit_code) == ("identical", 0), r.headline()
        assert r.structure["only_in_a"] == r.structure["only_in_b"] == []
        note = f"autograd_grad records only in {extra} (its .grad is compared)"
        assert sum(note in n for n in r.structure["pairing"]) == 4  # one per parameter


@pytest.mark.parametrize("values", ["full", "stats", "step 0 full"])
def test_dot_grad_vs_sum_of_autograd_grad_calls_has_no_made_up_difference(tmp_path, values):
    # A accumulates 2 backward() calls in .grad; B sums 2 autograd.grad calls: parameters and
    # losses are bitwise equal at every step. Without values the sum cannot be judged bitwise.
    kw = {"values": values} if values != "step 0 full" else {"full_steps": [0]}
    a = record(tmp_path / "a.h5", loop="manual", micro=2, **kw)
    b = record(tmp_path / "b.h5", loop="autograd", micro=2, **kw)
    for exact in (False, True):
        r = graddiff.compare(a, b, exact=exact)
        assert (r.verdict, r.exit_code, r.first_bitwise) == ("identical", 0, None), r.headline()
    assert any("sum of 2 autograd_grad call(s) in B" in n for n in r.structure["pairing"])
    unjudged = r.structure["not_comparable"]
    if values == "full":
        assert unjudged == [] and "bitwise identical" in r.headline()
    else:
        assert sorted(u["label"] for u in unjudged) == sorted(
            f"grad {n}" for n in ("0.weight", "0.bias", "2.weight", "2.bias")
        )
        assert all(u["steps"] == (2 if "step 0" in values else 3) for u in unjudged)
        assert "statistics only" in r.headline() and "statistics only" in str(r)


def test_sum_of_autograd_grad_calls_stats_only_still_finds_a_real_bug(tmp_path):
    a = record(tmp_path / "a.h5", loop="manual", micro=2, zero_grad=False, values="stats")
    b = record(tmp_path / "b.h5", loop="autograd", micro=2, values="stats")
    r = graddiff.compare(a, b)
    assert (r.exit_code, r.first.step, r.first.kind, r.first.basis) == (1, 1, "grad", "stats")
    assert r.first_bitwise.step == 1 and r.cause.cause == "grad_accumulation"

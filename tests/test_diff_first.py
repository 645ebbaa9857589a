"""The walk: first divergence in causal order, first bitwise difference, trace-back, growth."""

from __future__ import annotations

import numpy as np
import pytest
from diff_builders import simulate, write_run

import graddiff
from graddiff.entries import entry_from_array

RNG = np.random.default_rng(1)
P = RNG.standard_normal((6, 5)).astype(np.float32)
G = RNG.standard_normal((6, 5)).astype(np.float32)


def _noisy(x, rel, seed=0):
    n = np.random.default_rng(seed).standard_normal(x.shape)
    return (x + rel * np.linalg.norm(x) / np.linalg.norm(n) * n).astype(np.float32)


def _step(p, g, act=None):
    ents = [entry_from_array("param", "w", p, seq=0)]
    if act is not None:
        ents.append(entry_from_array("activation", "fc", act, seq=1))
    ents.append(entry_from_array("grad", "w", g, seq=2))
    return ents


def test_identical_runs(tmp_path):
    a = simulate(tmp_path / "a.h5")
    b = simulate(tmp_path / "b.h5")
    for exact in (False, True):
        r = graddiff.compare(a, b, exact=exact)
        assert (r.verdict, r.exit_code, r.first, r.first_bitwise) == ("identical", 0, None, None)


def test_first_divergence_is_earliest_in_causal_order(tmp_path):
    act = RNG.standard_normal((3, 6)).astype(np.float32)
    a = write_run(tmp_path / "a.h5", [_step(P, G, act), _step(P, G, act)])
    # step 1: the gradient and the activation differ; the activation comes first causally
    b = write_run(tmp_path / "b.h5", [_step(P, G, act), _step(P, G * 2, act * 3)])
    r = graddiff.compare(a, b)
    assert (r.first.step, r.first.kind, r.first.name) == (1, "activation", "fc")
    assert r.first.rel_diff == pytest.approx(2 / 3, rel=1e-6)
    assert r.first.fraction_differing == 1.0 and r.first.index is not None


def test_rounding_origin_is_traced_back_through_amplification(tmp_path):
    p1 = P.copy()
    p1.flat[0] = np.nextafter(p1.flat[0], np.float32(np.inf))
    a = write_run(tmp_path / "a.h5", [_step(P, G), _step(P, G), _step(P, G)])
    b = write_run(
        tmp_path / "b.h5", [_step(P, G), _step(p1, _noisy(G, 4e-4)), _step(p1, _noisy(G, 5e-3))]
    )
    r = graddiff.compare(a, b)
    assert (r.first.step, r.first.kind) == (2, "grad")
    o = r.first_bitwise
    assert (o.step, o.kind, o.rounding_level) == (1, "param", True)
    assert r.cause.cause == "rounding" and r.amplified_rounding
    assert "origin: rounding-level difference in param at step 1" in r.headline()
    assert r.growth["grad"] == [
        (1, pytest.approx(4e-4, rel=1e-3)),
        (2, pytest.approx(5e-3, rel=1e-3)),
    ]
    # under --exact the origin itself is the divergence
    e = graddiff.compare(a, b, exact=True)
    assert (e.first.step, e.first.kind, e.exit_code) == (1, "param", 1)


def test_within_tolerance_reports_the_first_bitwise_difference(tmp_path):
    a = write_run(tmp_path / "a.h5", [_step(P, G), _step(P, G)])
    b = write_run(tmp_path / "b.h5", [_step(P, G), _step(P, _noisy(G, 1e-4))])
    r = graddiff.compare(a, b)
    assert (r.verdict, r.exit_code) == ("within_tolerance", 0)
    assert (r.first_bitwise.step, r.first_bitwise.kind) == (1, "grad")
    assert graddiff.compare(a, b, rtol=1e-5).exit_code == 1


def test_nan_in_one_run_is_a_divergence_whatever_the_tolerance(tmp_path):
    a = simulate(tmp_path / "a.h5")
    b = simulate(tmp_path / "b.h5", nan_at=2)
    r = graddiff.compare(a, b, rtol=10.0)
    assert (r.first.step, r.first.kind, r.first.name, r.first.status) == (
        2,
        "activation",
        "fc1",
        "nonfinite",
    )
    assert r.cause.cause == "nonfinite"


def test_stats_only_divergence_names_the_step_to_rerecord(tmp_path):
    a = simulate(tmp_path / "a.h5", store_values=False)
    b = simulate(tmp_path / "b.h5", store_values=False, zero_grad=False)
    r = graddiff.compare(a, b)
    assert (r.first.step, r.first.kind, r.first.basis) == (1, "grad", "stats")
    assert "full_steps=[1]" in r.first.note and r.first.index is None


def test_micro_batches_are_rounding_not_divergence(tmp_path):
    # no buffer update per micro-batch differs here: the fake BatchNorm is left out by kinds
    a = simulate(tmp_path / "a.h5")
    b = simulate(tmp_path / "b.h5", micro=2)
    kinds = "param,input,activation,loss,grad"
    assert graddiff.compare(a, b, kinds=kinds).exit_code == 0
    assert graddiff.compare(a, b, kinds=kinds, exact=True).exit_code == 1


def test_gradient_source_pairing_is_bitwise_equal(tmp_path):
    a = simulate(tmp_path / "a.h5")
    b = simulate(tmp_path / "b.h5", autograd=True)
    r = graddiff.compare(a, b, exact=True)
    assert r.verdict == "identical"
    assert any("autograd_grad" in n for n in r.structure["pairing"])


def test_steps_and_kinds_restrict_the_comparison(tmp_path):
    a = simulate(tmp_path / "a.h5")
    b = simulate(tmp_path / "b.h5", zero_grad=False)
    assert graddiff.compare(a, b, steps="0:0").exit_code == 0
    assert graddiff.compare(a, b, steps=":1").first.step == 1
    r = graddiff.compare(a, b, kinds=["param"])
    assert (r.first.step, r.first.kind) == (2, "param")


def test_shape_and_missing_names_are_reported_as_structure(tmp_path):
    a = simulate(tmp_path / "a.h5")
    b = simulate(tmp_path / "b.h5", hidden=6, frozen=True)
    r = graddiff.compare(a, b)
    assert r.first.status == "shape" and r.first.rel_diff is None
    assert r.structure["only_in_a"] == ["grad fc1.weight", "grad fc1.bias"]
    assert r.structure["shape_changes"][0]["label"] == "param fc1.weight"


def test_divergence_matrix(tmp_path):
    a = simulate(tmp_path / "a.h5")
    b = simulate(tmp_path / "b.h5", zero_grad=False)
    r = graddiff.compare(a, b)
    steps, labels, rel = r.divergence_matrix()
    assert list(steps) == [0, 1, 2, 3] and rel.shape == (4, len(labels))
    assert labels[0] == "param fc1.weight" and "grad fc1.weight" in labels
    assert np.all(rel[0] == 0)
    assert rel[1, labels.index("grad fc1.weight")] == pytest.approx(r.first.rel_diff)


def test_a_sudden_parameter_jump_after_rounding_noise_is_not_called_amplified(tmp_path):
    steps_a = [_step(P, G) for _ in range(4)]
    steps_b = (
        [_step(P, G)] + [_step(P, _noisy(G, 3e-7, seed=s)) for s in (1, 2)] + [_step(P * 1.5, G)]
    )
    r = graddiff.compare(
        write_run(tmp_path / "a.h5", steps_a), write_run(tmp_path / "b.h5", steps_b)
    )
    assert (r.first.step, r.first.kind) == (3, "param")
    assert r.first_bitwise.rounding_level and not r.amplified_rounding
    # B's parameters jump by 0.5 p with equal gradients: a rate or a decay difference (the
    # update is proportional to the weights), never amplified rounding
    causes = [c.cause for c in r.diagnosis]
    assert causes[0] in ("learning_rate", "weight_decay") and causes[-1] == "rounding"
    assert "not its cause" in r.diagnosis[-1].title


def test_steps_without_compared_records_are_skipped(tmp_path):
    w = np.ones((2, 2), np.float32)
    steps = [[entry_from_array("param", "w", w)] for _ in range(3)]
    steps[1] = [entry_from_array("grad", "w", w)]  # step 1 holds no param
    a = write_run(tmp_path / "a.h5", steps)
    r = graddiff.compare(a, a, kinds="param", steps="1")
    assert r.verdict == "identical" and r.steps["compared"] == 1

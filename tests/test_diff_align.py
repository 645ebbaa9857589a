"""Alignment of two runs into slots: pairing rules, one-sided names, unrelated runs."""

from __future__ import annotations

import numpy as np
import pytest
from diff_builders import simulate, write_run

import graddiff
from graddiff.diff.align import MODE_CONCAT, MODE_ONE, MODE_SUM, align, check_related
from graddiff.entries import entry_from_array
from graddiff.kinds import ALL_KINDS

W = np.arange(6, dtype=np.float32).reshape(2, 3)


def _slots(a, b, kinds=ALL_KINDS):
    with graddiff.open(a) as ra, graddiff.open(b) as rb:
        return align(ra, rb, kinds)


def test_grad_pairs_with_sum_of_autograd_grad_calls(tmp_path):
    a = write_run(
        tmp_path / "a.h5", [[entry_from_array("param", "w", W), entry_from_array("grad", "w", W)]]
    )
    b = write_run(
        tmp_path / "b.h5",
        [
            [entry_from_array("param", "w", W)]
            + [entry_from_array("autograd_grad", "w", W / 2, call=c) for c in range(2)]
        ],
    )
    al = _slots(a, b)
    (g,) = [s for s in al.slots if s.kind == "grad"]
    assert (g.mode_a, g.mode_b, len(g.keys_b)) == (MODE_ONE, MODE_SUM, 2)
    assert "sum of 2 autograd_grad" in g.note
    assert not al.only_a and not al.only_b


def test_different_call_counts_are_joined_or_summed(tmp_path):
    a = simulate(tmp_path / "a.h5", n_steps=1)
    b = simulate(tmp_path / "b.h5", n_steps=1, micro=2)
    modes = {s.label: (s.mode_a, s.mode_b) for s in _slots(a, b).slots}
    assert modes["activation fc1"] == (MODE_CONCAT, MODE_CONCAT)
    assert modes["input 0"] == (MODE_CONCAT, MODE_CONCAT)
    assert modes["loss loss"] == (MODE_SUM, MODE_SUM)
    assert modes["param fc1.weight"] == (MODE_ONE, MODE_ONE)


def test_names_in_one_run_only_are_listed_and_kept_as_slots(tmp_path):
    a = write_run(
        tmp_path / "a.h5", [[entry_from_array("param", "w", W), entry_from_array("grad", "w", W)]]
    )
    b = write_run(tmp_path / "b.h5", [[entry_from_array("param", "w", W)]])
    al = _slots(a, b)
    assert al.only_a == ["grad w"] and al.only_b == []
    assert [s.label for s in al.slots] == ["param w", "grad w"]


def test_slots_follow_causal_order(tmp_path):
    a = simulate(tmp_path / "a.h5", n_steps=1)
    kinds = [s.kind for s in _slots(a, a).slots]
    assert kinds == sorted(kinds, key=ALL_KINDS.index)


def test_unrelated_models_are_refused(tmp_path):
    a = write_run(tmp_path / "a.h5", [[entry_from_array("param", "enc.w", W)]])
    b = write_run(tmp_path / "b.h5", [[entry_from_array("param", "dec.w", W)]])
    with graddiff.open(a) as ra, graddiff.open(b) as rb:
        with pytest.raises(
            graddiff.GraddiffError, match="unrelated models: no param names in common"
        ):
            check_related(ra, rb)


def test_kinds_recorded_in_one_run_only_are_not_compared(tmp_path):
    ents = [entry_from_array("param", "w", W), entry_from_array("grad", "w", W)]
    a = write_run(tmp_path / "a.h5", [ents], options={"kinds": ["param", "grad"]})
    b = write_run(tmp_path / "b.h5", [ents[:1]], options={"kinds": ["param"]})
    al = _slots(a, b)
    assert [s.label for s in al.slots] == ["param w"]
    assert any("not compared: grad" in n for n in al.notes)


def _grads(spec, g=W):
    """Entries of one step: param w, then .grad and/or autograd_grad calls, by ``spec``."""
    ents = [entry_from_array("param", "w", W)]
    for c in range(spec.get("autograd", 0)):
        ents.append(entry_from_array("autograd_grad", "w", g / 2, call=c))
    if spec.get("grad"):
        ents.append(entry_from_array("grad", "w", g))
    return ents


# A parameter's gradient is present in a run when it has .grad or autograd_grad. Both .grad:
# .grad vs .grad (autograd_grad in one run only is a note); both autograd_grad: autograd_grad vs
# autograd_grad (.grad in one run only is a note); .grad only vs autograd_grad only: .grad vs
# their sum; both kinds in both: each with its own kind; neither in one run: missing (frozen).
GRADIENT_SOURCES = [
    ("autograd_grad also in B", {"grad": 1}, {"grad": 1, "autograd": 2}, ["grad w"], "only in B"),
    ("autograd_grad also in A", {"grad": 1, "autograd": 1}, {"grad": 1}, ["grad w"], "only in A"),
    (
        ".grad also in A",
        {"grad": 1, "autograd": 2},
        {"autograd": 2},
        ["autograd_grad w", "autograd_grad w #1"],
        ".grad records only in A",
    ),
    (
        "both kinds in both runs",
        {"grad": 1, "autograd": 2},
        {"grad": 1, "autograd": 2},
        ["grad w", "autograd_grad w", "autograd_grad w #1"],
        None,
    ),
    (".grad vs autograd_grad only", {"grad": 1}, {"autograd": 2}, ["grad w"], "sum of 2"),
]


@pytest.mark.parametrize(
    ("sa", "sb", "labels", "note"),
    [c[1:] for c in GRADIENT_SOURCES],
    ids=[c[0] for c in GRADIENT_SOURCES],
)
def test_gradient_source_rule(tmp_path, sa, sb, labels, note):
    a = write_run(tmp_path / "a.h5", [_grads(sa)])
    b = write_run(tmp_path / "b.h5", [_grads(sb)])
    al = _slots(a, b)
    assert [s.label for s in al.slots if s.kind != "param"] == labels
    assert not al.only_a and not al.only_b
    if note is None:
        assert not al.notes
    else:
        assert any(note in n for n in al.notes), al.notes
    for exact in (False, True):
        r = graddiff.compare(a, b, exact=exact)
        assert (r.verdict, r.exit_code) == ("identical", 0), r.headline()


def test_extra_autograd_grad_note_says_which_gradient_is_compared(tmp_path):
    a = write_run(tmp_path / "a.h5", [_grads({"grad": 1})])
    b = write_run(tmp_path / "b.h5", [_grads({"grad": 1, "autograd": 2})])
    r = graddiff.compare(a, b)
    assert r.structure["pairing"] == [
        "grad w: autograd_grad records only in B (its .grad is compared)"
    ]
    assert "autograd_grad records only in B (its .grad is compared)" in str(r)


def test_extra_autograd_grad_does_not_hide_a_gradient_difference(tmp_path):
    a = write_run(tmp_path / "a.h5", [_grads({"grad": 1})])
    b = write_run(tmp_path / "b.h5", [_grads({"grad": 1, "autograd": 1}, g=W * 2)])
    r = graddiff.compare(a, b)
    assert (r.exit_code, r.first.label, r.first.status) == (1, "grad w", "values")


def test_no_gradient_of_either_kind_is_still_missing(tmp_path):
    a = write_run(tmp_path / "a.h5", [_grads({"grad": 1, "autograd": 1})])
    b = write_run(tmp_path / "b.h5", [_grads({})])
    al = _slots(a, b)
    assert sorted(al.only_a) == ["autograd_grad w", "grad w"] and not al.notes
    r = graddiff.compare(a, b)
    assert (r.exit_code, r.first.status, r.cause.cause) == (1, "missing_in_b", "frozen_parameter")

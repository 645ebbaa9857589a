"""Cells from fingerprints and statistics: codes, NaN/Inf, shapes, dtypes, the stats bound."""

from __future__ import annotations

import numpy as np
import pytest
from diff_builders import write_run

import graddiff
from graddiff.diff.align import align
from graddiff.diff.compare_records import (
    CODE_NAMES,
    DIFF,
    EQUAL,
    MISSING_B,
    NONFINITE,
    SHAPE,
    STATS,
    DtypeTable,
    classify,
)
from graddiff.diff.exact import compare_values
from graddiff.entries import entry_from_array
from graddiff.kinds import ALL_KINDS

RNG = np.random.default_rng(0)
W = RNG.standard_normal((4, 5)).astype(np.float32)


def _cells(tmp_path, ea, eb):
    a = write_run(tmp_path / "a.h5", [ea])
    b = write_run(tmp_path / "b.h5", [eb])
    with graddiff.open(a) as ra, graddiff.open(b) as rb:
        al = align(ra, rb, ALL_KINDS)
        c = classify(ra, rb, al, DtypeTable(ra, rb), np.array([0]))
        return {
            al.slots[int(s)].label: (int(code), float(r))
            for s, code, r in zip(c.slot, c.code, c.rel_lb)
        }


def _p(arr, **kw):
    return entry_from_array("param", "w", arr, **kw)


CASES = [
    ("equal", W, W, EQUAL),
    ("one ulp", W, np.nextafter(W, np.float32(np.inf)), DIFF),
    (
        "nan appears",
        W,
        np.where(np.arange(20).reshape(4, 5) == 3, np.nan, W).astype(np.float32),
        NONFINITE,
    ),
    (
        "inf appears",
        W,
        np.where(np.arange(20).reshape(4, 5) == 3, np.inf, W).astype(np.float32),
        NONFINITE,
    ),
    ("shape", W, W[:3], SHAPE),
    ("dtype only", W, W.astype(np.float64), DIFF),
]


@pytest.mark.parametrize(("a", "b", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cell_codes(tmp_path, a, b, code):
    got = _cells(tmp_path, [_p(a)], [_p(b)])["param w"]
    assert CODE_NAMES[got[0]] == CODE_NAMES[code]


def test_missing_record_is_a_difference(tmp_path):
    got = _cells(tmp_path, [_p(W), entry_from_array("grad", "w", W)], [_p(W)])
    assert got["grad w"][0] == MISSING_B and got["param w"][0] == EQUAL


def test_stats_only_records_are_compared_on_their_stats(tmp_path):
    got = _cells(tmp_path, [_p(W, store_values=False)], [_p(W * 1.5, store_values=False)])[
        "param w"
    ]
    assert got[0] == STATS
    exact = compare_values(W, W * np.float32(1.5)).rel_diff
    assert 0.3 < got[1] <= exact + 1e-12  # the bound holds and is informative here


@pytest.mark.parametrize("seed", range(5))
def test_stats_bound_never_exceeds_exact_relative_difference(tmp_path, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((8, 3)).astype(np.float32)
    b = (a + rng.standard_normal((8, 3)) * 10.0 ** -rng.integers(1, 6)).astype(np.float32)
    got = _cells(tmp_path, [_p(a, store_values=False)], [_p(b, store_values=False)])["param w"]
    assert got[1] <= compare_values(a, b).rel_diff * (1 + 1e-9)


def test_same_nan_in_both_runs_is_equal(tmp_path):
    a = W.copy()
    a[0, 0] = np.nan
    assert _cells(tmp_path, [_p(a)], [_p(a.copy())])["param w"][0] == EQUAL


def test_joined_calls_equal_one_big_call_bitwise(tmp_path):
    x = RNG.standard_normal((6, 4)).astype(np.float32)
    ea = [entry_from_array("input", "0", x)]
    eb = [
        entry_from_array("input", "0", x[:3], call=0),
        entry_from_array("input", "0", x[3:], call=1),
    ]
    assert _cells(tmp_path, ea, eb)["input 0"][0] == EQUAL


def test_compare_values_element_detail():
    a = np.zeros((3, 4), np.float32)
    b = a.copy()
    b[2, 1] = 0.5
    b[0, 0] = 0.1
    d = compare_values(a, b)
    assert d.index == [2, 1] and d.max_abs_diff == pytest.approx(0.5)
    assert d.fraction_differing == pytest.approx(2 / 12) and not d.bitwise_equal
    assert compare_values(a, a.copy()).bitwise_equal


def _compare(tmp_path, ea, eb, **kw):
    a = write_run(tmp_path / "a.h5", [ea])
    b = write_run(tmp_path / "b.h5", [eb])
    return graddiff.compare(a, b, **kw)


def _halves(kind, name, x, **kw):
    n = len(x) // 2
    return [
        entry_from_array(kind, name, x[:n], call=0, **kw),
        entry_from_array(kind, name, x[n:], call=1, **kw),
    ]


def test_joined_stats_only_calls_make_up_no_bitwise_difference(tmp_path):
    # the stats of joined calls (norm, mean) are recombined in float64: rounding must not read
    # as a difference (odd column counts give halves that are not 8-byte aligned: no fp_sum)
    for seed in range(40):
        rng = np.random.default_rng(seed)
        rows, cols = int(rng.integers(1, 12)) * 2, int(rng.integers(1, 9))
        x = rng.standard_normal((rows, cols)) * 10.0 ** rng.integers(-3, 4) + rng.standard_normal()
        x = x.astype(np.float32)
        ea = [entry_from_array("input", "0", x, store_values=False)]
        eb = _halves("input", "0", x, store_values=False)
        r = _compare(tmp_path, ea, eb, exact=True)
        assert (r.verdict, r.exit_code) == ("identical", 0), (seed, rows, cols, r.headline())


def test_joined_aligned_calls_prove_a_one_ulp_difference_from_fingerprints(tmp_path):
    x = RNG.standard_normal((6, 4)).astype(np.float32)
    y = x.copy()
    y[4, 1] = np.nextafter(y[4, 1], np.float32(np.inf))  # neither min nor max: stats blind
    ea = [entry_from_array("input", "0", x, store_values=False)]
    eb = _halves("input", "0", y, store_values=False)
    r = _compare(tmp_path, ea, eb, exact=True)
    assert (r.exit_code, r.first.label, r.first.status) == (1, "input 0", "stats")


def _grad_vs_sum(g1, g2, scale=1.0, **kw):
    total = ((g1 + g2) * np.float32(scale)).astype(np.float32)
    ea = [entry_from_array("param", "w", W), entry_from_array("grad", "w", total, **kw)]
    eb = [
        entry_from_array("param", "w", W),
        entry_from_array("autograd_grad", "w", g1, call=0, **kw),
        entry_from_array("autograd_grad", "w", g2, call=1, **kw),
    ]
    return ea, eb


@pytest.mark.parametrize("seed", range(4))
def test_sum_of_stats_only_calls_makes_up_no_bitwise_difference(tmp_path, seed):
    rng = np.random.default_rng(seed)
    g1 = rng.standard_normal((64, 33)).astype(np.float32)
    g2 = (rng.standard_normal((64, 33)) * 10.0 ** rng.integers(-3, 3)).astype(np.float32)
    ea, eb = _grad_vs_sum(g1, g2, store_values=False)
    for exact in (False, True):
        r = _compare(tmp_path, ea, eb, exact=exact)
        assert (r.verdict, r.exit_code, r.first_bitwise) == ("identical", 0, None), r.headline()
    (u,) = r.structure["not_comparable"]
    assert (u["label"], u["steps"]) == ("grad w", 1)
    # with full values the sum is compared bitwise, and is equal
    ea, eb = _grad_vs_sum(g1, g2)
    r = _compare(tmp_path, ea, eb, exact=True)
    assert (r.verdict, r.structure["not_comparable"]) == ("identical", [])


def test_sum_of_stats_only_calls_still_shows_a_real_difference(tmp_path):
    rng = np.random.default_rng(7)
    g1 = (rng.standard_normal((8, 5)) + 1).astype(np.float32)  # a mean the stats can see
    g2 = (rng.standard_normal((8, 5)) + 1).astype(np.float32)
    r = _compare(tmp_path, *_grad_vs_sum(g1, g2, scale=1.5, store_values=False))
    assert (r.exit_code, r.first.label, r.first.basis) == (1, "grad w", "stats")
    assert r.first.rel_diff > 0.01
    r = _compare(tmp_path, *_grad_vs_sum(g1, g2, scale=1.0 + 1e-3, store_values=False), exact=True)
    assert (r.exit_code, r.first.label) == (1, "grad w")  # beyond rounding: a real difference

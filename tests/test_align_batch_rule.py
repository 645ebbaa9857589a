"""Which records are joined along dim 0 when two runs micro-batch differently: only those that
carry the batch (synthetic traces; the real Trainer case is in test_integration_transformers)."""

from __future__ import annotations

import numpy as np
from diff_builders import write_run

import graddiff
from graddiff.diff.align import MODE_CONCAT, MODE_ONE, MODE_SUM, align, carries_batch
from graddiff.entries import entry_from_array as E
from graddiff.kinds import ALL_KINDS

rng = np.random.default_rng(0)
W = rng.standard_normal((3, 4)).astype(np.float32)
IDS = rng.standard_normal((8, 4)).astype(np.float32)
POS = np.arange(4, dtype=np.float32)[None]  # (1, T): the same for every micro-batch
POS_GRAD = rng.standard_normal((2, 1, 4)).astype(np.float32)  # per micro-batch (1, T) grads


def _full_batch():
    return [
        E("param", "w", W),
        E("input", "ids", IDS),
        E("input", "num_items", np.array(32.0, np.float32)),
        E("input", "pos", POS),
        E("activation", "(root):loss", np.array(1.5, np.float32)),
        E("activation", "per_batch_stat", IDS.mean(0, keepdims=True)),
        E("grad_output", "pos", POS_GRAD.sum(0)),
        E("loss", "loss", np.array(1.5, np.float32)),
    ]


def _micro_batches():
    out = [E("param", "w", W)]
    for c, half in enumerate(np.split(IDS, 2)):
        out += [
            E("input", "ids", half, call=c),
            E("input", "num_items", np.array(32.0, np.float32), call=c),
            E("input", "pos", POS, call=c),
            E("activation", "(root):loss", np.array(0.7 + c * 0.1, np.float32), call=c),
            E("activation", "per_batch_stat", half.mean(0, keepdims=True), call=c),
            E("grad_output", "pos", POS_GRAD[c], call=c),
            E("loss", "loss", np.array(0.7 + c * 0.1, np.float32), call=c),
        ]
    return out


def test_carries_batch():
    assert carries_batch([(8, 4)], [(4, 4), (4, 4)])
    assert not carries_batch([(1, 4)], [(1, 4), (1, 4)])  # position ids
    assert not carries_batch([()], [(), ()])  # a scalar
    assert not carries_batch([(8, 4)], [(4, 3), (4, 3)])  # other dims differ
    assert carries_batch([], [(1, 4)])  # unknown: keep the join


def test_only_batch_carrying_records_are_joined(tmp_path):
    a = write_run(tmp_path / "a.h5", [_full_batch()])
    b = write_run(tmp_path / "b.h5", [_micro_batches()])
    with graddiff.open(a) as ra, graddiff.open(b) as rb:
        al = align(ra, rb, ALL_KINDS)
    slots = {s.label.split(" #")[0]: s for s in al.slots}
    assert (slots["input ids"].mode_a, slots["input ids"].mode_b) == (MODE_CONCAT, MODE_CONCAT)
    for name in ("input num_items", "input pos"):  # the same in every micro-batch: call 0
        s = slots[name]
        assert (s.mode_a, s.mode_b, len(s.keys_b)) == (MODE_ONE, MODE_ONE, 1), name
        assert "does not carry the batch" in s.note
    s = slots["grad_output pos"]  # gradient of a broadcast output: summed over the batch
    assert (s.mode_a, s.mode_b, len(s.keys_b)) == (MODE_SUM, MODE_SUM, 2)
    # a scalar output and a per-micro-batch statistic are not compared, and say so
    assert "activation (root):loss" not in slots and "activation per_batch_stat" not in slots
    notes = "\n".join(al.notes)
    assert "activation (root):loss" in notes and "per-micro-batch scalar" in notes
    assert "activation per_batch_stat" in notes and "differs between micro-batches" in notes
    assert not al.only_a and not al.only_b


def test_the_comparison_passes(tmp_path):
    a = write_run(tmp_path / "a.h5", [_full_batch()])
    b = write_run(tmp_path / "b.h5", [_micro_batches()])
    report = graddiff.compare(a, b)
    assert report.exit_code == 0, report.headline()


def test_a_different_unbatched_input_is_still_a_divergence(tmp_path):
    a = write_run(tmp_path / "a.h5", [_full_batch()])
    micro = [
        E("input", "num_items", np.array(30.0, np.float32), call=e.call)
        if (e.kind, e.name) == ("input", "num_items")
        else e
        for e in _micro_batches()
    ]
    b = write_run(tmp_path / "b.h5", [micro])
    report = graddiff.compare(a, b)
    assert (report.first.kind, report.first.name) == ("input", "num_items")

"""Name maps without torch: rule matching, folding into {i} patterns, and transforms applied to
values and to statistics-only steps (synthetic traces)."""

from __future__ import annotations

import numpy as np
import pytest
from diff_builders import write_run

import graddiff
from graddiff.diff.generalize import generalize
from graddiff.diff.namemap import MapError, parse_map
from graddiff.entries import entry_from_array


def test_most_specific_rule_wins_and_kinds_filter():
    nm = parse_map(
        [
            "enc.layer.{i} -> blocks.{i}",
            "enc.layer.{i}.attn.q -> blocks.{i}.q_proj",
            {"from": "enc.layer.{i}.attn.q.W", "to": "blocks.{i}.q_proj.weight", "transpose": True},
            {"from": "head", "to": "lm_head", "kinds": ["param"]},
            {"regex": True, "from": r"emb\.(\w+)", "to": r"embed.\1"},
        ]
    )
    assert nm.match("activation", "enc.layer.3").targets == ("blocks.3",)
    assert nm.match("activation", "enc.layer.3.mlp").targets == ("blocks.3.mlp",)
    assert nm.match("param", "enc.layer.3.attn.q.b").targets == ("blocks.3.q_proj.b",)
    m = nm.match("param", "enc.layer.3.attn.q.W")
    assert m.targets == ("blocks.3.q_proj.weight",) and m.rule.transpose == ()
    assert nm.match("param", "head.weight").targets == ("lm_head.weight",)
    assert nm.match("activation", "head").rule is None  # kinds: param only
    assert nm.match("param", "emb.weight").targets == ("embed.weight",)
    assert nm.match("param", "other").rule is None


def test_overlap_names_both_rules():
    nm = parse_map(["a.{i} -> x.{i}", "a.* -> y"])
    with pytest.raises(MapError, match=r"rule 1 \(a.\{i\} -> x.\{i\}\) and rule 2 \(a.\* -> y\)"):
        nm.match("param", "a.0")


def test_folding_keeps_meaning():
    rules = [{"from": f"layers.{i}.x", "to": f"blocks.{i}.y"} for i in range(2)]
    keys = [("param", "layers.0.x"), ("param", "layers.1.x")]
    assert generalize(rules, keys) == [{"from": "layers.{i}.x", "to": "blocks.{i}.y"}]
    # B has a third layer that the concrete rules leave alone: folding would map it too
    assert generalize(rules, [*keys, ("param", "layers.2.x")]) == rules


def _trace(path, step_entries):
    return write_run(path, step_entries)


def test_join_split_and_statistics_only(tmp_path):
    """B keeps q, k, v apart where A fuses them; B's weight is A's transposed. Step 1 of B
    is statistics only: the join combines statistics, the transpose keeps them."""
    rng = np.random.default_rng(0)
    steps_a, steps_b = [], []
    for step in range(2):
        q, k, v = (rng.standard_normal((4, 3)).astype(np.float32) for _ in range(3))
        w = rng.standard_normal((5, 3)).astype(np.float32)
        steps_a.append(
            [
                entry_from_array("param", "qkv.weight", np.concatenate([q, k, v]), seq=0),
                entry_from_array("param", "out.weight", w, seq=1),
            ]
        )
        full = step == 0
        steps_b.append(
            [
                entry_from_array("param", "q.weight", q, seq=0, store_values=full),
                entry_from_array("param", "k.weight", k, seq=1, store_values=full),
                entry_from_array("param", "v.weight", v, seq=2, store_values=full),
                entry_from_array(
                    "param", "o.W", np.ascontiguousarray(w.T), seq=3, store_values=full
                ),
            ]
        )
    a, b = _trace(tmp_path / "a.h5", steps_a), _trace(tmp_path / "b.h5", steps_b)
    rules = [
        {"from": ["q", "k", "v"], "to": "qkv"},
        {"from": "o.W", "to": "out.weight", "transpose": True},
    ]
    rep = graddiff.compare(a, b, name_map=rules)
    assert rep.exit_code == 0, rep.first
    assert rep.steps["compared"] == 2
    assert any("statistics" in n for n in rep.notes), rep.notes
    # the other way round: A's fused weight split into B's parts; B's stats-only step left out
    back = [
        {"from": "qkv", "to": ["q", "k", "v"]},
        {"from": "out.weight", "to": "o.W", "transpose": True},
    ]
    rep = graddiff.compare(b, a, name_map=back)
    assert rep.exit_code == 0 and rep.steps["compared"] == 2
    rep = graddiff.compare(a, b, name_map=rules, steps="0")
    assert rep.exit_code == 0
    # a planted difference in one part is found under A's (joined) name
    steps_b[0][1] = entry_from_array("param", "k.weight", steps_b[0][1].values * 2, seq=1)
    bad = _trace(tmp_path / "bad.h5", steps_b)
    rep = graddiff.compare(a, bad, name_map=rules)
    assert (rep.first.step, rep.first.name) == (0, "qkv.weight")


def test_split_of_statistics_only_step_is_left_out_with_a_note(tmp_path):
    rng = np.random.default_rng(1)
    steps_a, steps_b = [], []
    for step in range(2):
        q, k = (rng.standard_normal((2, 3)).astype(np.float32) for _ in range(2))
        steps_a.append(
            [entry_from_array("param", "q", q), entry_from_array("param", "k", k, seq=1)]
        )
        steps_b.append(
            [entry_from_array("param", "qk", np.concatenate([q, k]), store_values=step == 0)]
        )
    a, b = _trace(tmp_path / "a.h5", steps_a), _trace(tmp_path / "b.h5", steps_b)
    rep = graddiff.compare(a, b, name_map=[{"from": "qk", "to": ["q", "k"]}])
    assert rep.exit_code == 0 and rep.steps["compared"] == 1
    assert any("1 step(s) of B not compared" in n for n in rep.notes), rep.notes


def test_rename_only_map_with_offset_and_window(tmp_path):
    """Renames and offsets only: B is copied and renamed (no step-by-step rewrite)."""
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((3, 2)).astype(np.float32) for _ in range(5)]
    a = _trace(tmp_path / "a.h5", [[entry_from_array("param", "net.w", x)] for x in xs])
    b = _trace(
        tmp_path / "b.h5",
        [
            [entry_from_array("param", "model.w", x, store_values=i % 2 == 0)]
            for i, x in enumerate(xs[2:])
        ],
    )
    rep = graddiff.compare(a, b, name_map=["model -> net"], offset=2, exact=True)
    assert rep.exit_code == 0 and rep.steps["compared"] == 3 and rep.steps["first"] == 2
    assert rep.structure["name_map"]["renamed"] == 1
    rep = graddiff.compare(a, b, name_map=["model -> net"], steps_a="3:", steps_b="1:3", exact=True)
    assert rep.exit_code == 0 and (rep.steps["first"], rep.steps["last"]) == (3, 4)
    rep = graddiff.compare(a, b, name_map=["model -> net"], offset=1)
    assert rep.exit_code == 1 and rep.first.step == 1
    # the source file is untouched
    with graddiff.open(b) as run:
        assert run.names() == ["model.w"] and list(run.steps) == [0, 1, 2]


def test_negative_offset_drops_the_steps_before_a(tmp_path):
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((2, 2)).astype(np.float32) for _ in range(4)]
    a = _trace(tmp_path / "a.h5", [[entry_from_array("param", "w", x)] for x in xs[1:]])
    b = _trace(tmp_path / "b.h5", [[entry_from_array("param", "w", x)] for x in xs])
    rep = graddiff.compare(a, b, offset=-1, exact=True)
    assert rep.exit_code == 0 and (rep.steps["first"], rep.steps["last"]) == (0, 2)
    assert rep.structure["steps_only_in_b"] is None

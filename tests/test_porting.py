"""Comparing two implementations (issue 15): name maps, transforms, step offsets.

A tiny transformer written two ways (porting_models.py) with weights copied across compares
clean through a map; each planted port bug is named at its mapped layer; a run resumed from a
checkpoint aligns with its uninterrupted twin. Bad maps: one ``Error:`` line naming the rule.
"""

from __future__ import annotations

import copy
import json

import porting_models as pm
import pytest
import torch
from click.testing import CliRunner

import graddiff
import graddiff.cli

MAP = """\
rules:
  - tok -> embed
  - layers.{i}.norm_a -> blocks.{i}.ln1
  - layers.{i}.norm_b -> blocks.{i}.ln2
  - layers.{i}.attention -> blocks.{i}.attn
  - from: layers.{i}.attention.qkv
    to: ["blocks.{i}.attn.q_proj", "blocks.{i}.attn.k_proj", "blocks.{i}.attn.v_proj"]
  - layers.{i}.attention.proj -> blocks.{i}.attn.out_proj
  - layers.{i}.ff -> blocks.{i}.mlp
  - layers.{i}.ff.up -> blocks.{i}.mlp.fc1
  - layers.{i}.ff.down -> blocks.{i}.mlp.fc2
  - layers.{i} -> blocks.{i}
  - final_norm -> ln_f
  - lm_head -> head
  - {from: "layers.{i}.attention.proj.W", to: "blocks.{i}.attn.out_proj.weight", transpose: true}
  - {from: "layers.{i}.ff.up.W", to: "blocks.{i}.mlp.fc1.weight", transpose: true}
  - {from: "layers.{i}.ff.down.W", to: "blocks.{i}.mlp.fc2.weight", transpose: true}
  - {from: lm_head.W, to: head.weight, transpose: true}
  - {regex: true, from: 'layers\\.(\\d+)\\.attention\\.proj\\.b', to: 'blocks.\\1.attn.out_proj.bias'}
  - layers.{i}.ff.up.b -> blocks.{i}.mlp.fc1.bias
  - layers.{i}.ff.down.b -> blocks.{i}.mlp.fc2.bias
  - lm_head.b -> head.bias
"""

#: the first layer where each planted bug shows, by A's (mapped) name
BUGS = {
    "scale": ("activation", "blocks.0.attn.out_proj"),  # the attention output feeds out_proj
    "eps": ("activation", "blocks.0.ln1"),
    "transpose": ("param", "blocks.1.attn.out_proj.weight"),
}


def _cli(*args):
    return CliRunner().invoke(graddiff.cli.main, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("porting")
    out = {}
    for bug in ["", *BUGS]:
        sub = d / (bug or "clean")
        sub.mkdir()
        out[bug] = pm.pair(sub, bug)
    (d / "map.yaml").write_text(MAP)
    out["map"] = str(d / "map.yaml")
    out["dir"] = d
    return out


def test_port_compares_clean_through_a_map(runs):
    a, b = runs[""]
    r = _cli("compare", a, b, "--map", runs["map"])
    assert r.exit_code == 0, r.output
    assert "No divergence" in r.output
    assert "mapped onto A's" in r.output
    # the same pair without a map: unrelated models, exit 2
    r = _cli("compare", a, b)
    assert r.exit_code == 2 and "no param names in common" in r.output


@pytest.mark.parametrize("bug", list(BUGS))
def test_port_bug_named_at_the_mapped_layer(runs, bug):
    a, b = runs[bug]
    r = _cli("compare", a, b, "--map", runs["map"], "--json")
    assert r.exit_code == 1, r.output
    rep = json.loads(r.output)
    assert (rep["first"]["kind"], rep["first"]["name"], rep["first"]["step"]) == (*BUGS[bug], 0)
    assert rep["run_b"] == b
    assert rep["structure"]["name_map"]["transformed"] > 0


def test_map_as_data_and_the_api(runs):
    a, b = runs[""]
    import yaml

    rules = yaml.safe_load(MAP)["rules"]
    rep = graddiff.compare(a, b, name_map=rules)
    assert rep.exit_code == 0 and rep.first is None
    assert rep.structure["name_map"]["unmapped_b"] == []


def _write(tmp_path, text, name="bad.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text, expect",
    [
        # names of A on the left: the rule matches nothing in B
        (
            "rules: ['blocks.{i}.ln1 -> layers.{i}.norm_a']",
            "rule 1 (blocks.{i}.ln1 -> layers.{i}.norm_a) matches no record of B",
        ),
        ("rules: ['tok -> nowhere']", "rule 1 (tok -> nowhere) maps onto names that A"),
        (
            "rules: [{from: 'layers.{i}.attention.qkv', to: ['blocks.{i}.attn.q_proj', 'blocks.{i}.attn.k_proj']}]",
            "'layers.0.attention.qkv.weight' has 48 along dim 0, but A's parts have 16+16",
        ),
        (
            "rules: [{from: lm_head.W, to: head.weight, reshape: [5, 7]}]",
            "cannot reshape to [5, 7]",
        ),
        (
            "rules: ['tok -> embed', 'tok -> embed']",
            "rule 1 (tok -> embed) and rule 2 (tok -> embed) both map",
        ),
        (
            "rules: ['layers.{i}.norm_a -> blocks.{i}.ln1', 'layers.{j}.norm_b -> blocks.{j}.ln1']",
            "both map onto",
        ),
        ("rules: [{from: tok}]", "rule 1: needs both 'from'"),
        ("rules: ['tok => embed']", "write it as 'B_NAME -> A_NAME'"),
        ("rules: [{from: 'a.{i}', to: 'b.{j}'}]", "uses {j}, which 'from' does not capture"),
        ("rules: [\n  - tok -> [a", "not valid YAML"),
    ],
    ids=[
        "backwards",
        "no-target",
        "split-sizes",
        "reshape",
        "duplicate",
        "collision",
        "no-to",
        "arrow",
        "capture",
        "yaml",
    ],
)
def test_bad_maps_exit_2_naming_the_rule(runs, tmp_path, text, expect):
    a, b = runs[""]
    r = _cli("compare", a, b, "--map", _write(tmp_path, text))
    assert r.exit_code == 2, r.output
    assert r.output.startswith("Error: ") and r.output.count("\n") == 1, r.output
    assert expect in r.output


def test_missing_map_file_exit_2(runs, tmp_path):
    a, b = runs[""]
    r = _cli("compare", a, b, "--map", tmp_path / "nope.yaml")
    assert r.exit_code == 2 and "cannot read the name map" in r.output


# -- a run resumed from a checkpoint ------------------------------------------------------------


def _adam_run(model, opt, path, batches):
    with graddiff.trace(model, path):
        for ids, target in batches:
            loss = torch.nn.functional.cross_entropy(
                model(ids).reshape(-1, pm.V), target.reshape(-1)
            )
            opt.zero_grad()
            loss.backward()
            opt.step()


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A: 4 Adam steps in one go. B: resumed at step 2 from A's checkpoint (with and without
    the optimizer state)."""
    d = tmp_path_factory.mktemp("resume")
    data = pm.batches(4)
    torch.manual_seed(0)
    model = pm.RefModel()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for ids, target in data[:2]:  # the untraced warm-up, then the checkpoint
        loss = torch.nn.functional.cross_entropy(model(ids).reshape(-1, pm.V), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    torch.manual_seed(0)
    full = pm.RefModel()
    full_opt = torch.optim.Adam(full.parameters(), lr=1e-2)
    _adam_run(full, full_opt, d / "full.h5", data)
    out = {"full": str(d / "full.h5")}
    for tag, restore_opt in (("resumed", True), ("reset", False)):
        m = pm.RefModel()
        m.load_state_dict(ckpt[0])
        o = torch.optim.Adam(m.parameters(), lr=1e-2)
        if restore_opt:
            o.load_state_dict(ckpt[1])
        _adam_run(m, o, d / f"{tag}.h5", data[2:])
        out[tag] = str(d / f"{tag}.h5")
    return out


def test_resumed_run_aligns_with_offset(resumed):
    for args in (["--offset", "2"], ["--steps-a", "2:", "--steps-b", "0:"]):
        r = _cli("compare", resumed["full"], resumed["resumed"], "--exact", *args)
        assert r.exit_code == 0, r.output
        assert "bitwise identical over 2 steps" in r.output
        assert "compared with A's step s+2" in r.output


def test_resumed_run_without_offset_suggests_it(resumed):
    rep = graddiff.compare(resumed["full"], resumed["resumed"])
    assert rep.exit_code == 1 and rep.first.kind == "param" and rep.first.step == 0
    assert any("--offset 2" in n and "resumed from A's step 2" in n for n in rep.notes), rep.notes


def test_optimizer_state_not_restored_found_at_the_right_step(resumed):
    rep = graddiff.compare(resumed["full"], resumed["reset"], offset=2)
    assert rep.exit_code == 1
    # step 2 (A's numbering) agrees up to the gradients; its update differs: params of step 3
    assert (rep.first.step, rep.first.kind) == (3, "param")


def test_bad_step_options_exit_2(resumed):
    r = _cli("compare", resumed["full"], resumed["resumed"], "--offset", "2", "--steps-a", "2:")
    assert r.exit_code == 2 and "either --offset or --steps-a/--steps-b" in r.output
    r = _cli("compare", resumed["full"], resumed["resumed"], "--steps-b", "x:")
    assert r.exit_code == 2 and "Error:" in r.output
    r = _cli("compare", resumed["full"], resumed["resumed"], "--offset", "100")
    assert r.exit_code == 2 and "no step in common" in r.output


# -- automatic structural matching ----------------------------------------------------------------


def test_port_compares_clean_through_map_auto(runs):
    a, b = runs[""]
    r = _cli("compare", a, b, "--map", "auto")
    assert r.exit_code == 0, r.output
    assert "No divergence" in r.output and "--map auto" in r.output


@pytest.mark.parametrize("bug", list(BUGS))
def test_port_bug_named_through_map_auto(runs, bug):
    a, b = runs[bug]
    rep = graddiff.compare(a, b, name_map="auto")
    assert rep.exit_code == 1
    kind, name = BUGS[bug]
    if bug == "transpose":
        # the untransposed copy has equal values without a transpose, so the proposed map pairs
        # it as copied; the layer still parts first, at its output
        kind, name = "activation", "blocks.1.attn.out_proj"
        # ... and flags that weight: its layout is unlike its siblings'
        assert any("ambiguous" in n and "layers.1.attention.proj.W" in n for n in rep.notes)
    assert (rep.first.kind, rep.first.name, rep.first.step) == (kind, name, 0)


def test_map_command_writes_a_reviewable_map(runs, tmp_path):
    import yaml

    a, b = runs[""]
    out = tmp_path / "auto.yaml"
    r = _cli("map", a, b, "-o", out)
    assert r.exit_code == 0, r.output
    data = yaml.safe_load(out.read_text())
    rules = {(str(x["from"]), str(x["to"])): x for x in data["rules"]}
    # per-layer rules are folded into {i} patterns
    qkv = [
        "blocks.{i}.attn.q_proj.weight",
        "blocks.{i}.attn.k_proj.weight",
        "blocks.{i}.attn.v_proj.weight",
    ]
    qkv = rules[("layers.{i}.attention.qkv.weight", str(qkv))]
    assert qkv["confidence"] == 1.0 and "fused" in qkv["evidence"]
    assert rules[("lm_head.W", "head.weight")]["transpose"] is True
    assert rules[("layers.{i}.ff.up", "blocks.{i}.mlp.fc1")]["kinds"] == [
        "activation",
        "grad_output",
    ]
    assert not any(".0." in str(x["from"]) for x in data["rules"])
    assert data["ambiguous"] == [] and data["unmatched_a"] == [] and data["unmatched_b"] == []
    # the written map, unedited, compares clean
    r = _cli("compare", a, b, "--map", out)
    assert r.exit_code == 0, r.output


def test_map_command_reports_ambiguous_pairs(tmp_path):
    """Two same-shape layers whose weights were not copied: their order is the only evidence."""
    torch.manual_seed(0)
    m1 = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    m2 = torch.nn.Sequential()
    m2.add_module("first", torch.nn.Linear(4, 4))
    m2.add_module("second", torch.nn.Linear(4, 4))
    x = torch.randn(2, 4)
    for m, p in ((m1, tmp_path / "a.h5"), (m2, tmp_path / "b.h5")):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        with graddiff.trace(m, p):
            m(x).sum().backward()
            opt.step()
    r = _cli("map", tmp_path / "a.h5", tmp_path / "b.h5")
    assert r.exit_code == 1, r.output
    assert "ambiguous pair(s)" in r.output
    r = _cli("map", tmp_path / "a.h5", tmp_path / "nope.h5")
    assert r.exit_code == 2 and r.output.startswith("Error: ")


# -- forward-only recording ---------------------------------------------------------------------


def test_forward_only_compares_two_ports_on_one_batch(tmp_path):
    torch.manual_seed(0)
    ids = pm.batches(1)[0][0]
    out = {}
    for bug in ("", "scale"):
        ref, port = pm.RefModel(), pm.PortModel(bug)
        pm.copy_weights(ref, port)
        for tag, m in (("a", ref), ("b", port)):
            p = out[(tag, bug)] = tmp_path / f"{tag}{bug}.h5"
            with graddiff.trace(m, p, forward_only=True):
                with torch.no_grad():  # an evaluation forward: one step per model call
                    m(ids)
                m(ids).sum().backward()  # a grad forward is one step too; no gradients recorded
    run = graddiff.open(out[("a", "")])
    assert list(run.steps) == [0, 1] and run.options["forward_only"] is True
    assert set(run.kinds) == {"param", "input", "activation"}
    assert "(root)" in run.names("activation")
    run.close()
    rep = graddiff.compare(out[("a", "")], out[("b", "")], name_map="auto")
    assert rep.exit_code == 0, rep.first
    rep = graddiff.compare(out[("a", "scale")], out[("b", "scale")], name_map="auto")
    assert (rep.first.step, rep.first.kind, rep.first.name) == (
        0,
        "activation",
        "blocks.0.attn.out_proj",
    )


def test_mapping_side_never_imports_torch():
    import subprocess
    import sys

    code = (
        "import graddiff.cli.map, graddiff.diff.automap, graddiff.diff.mapped, "
        "graddiff.diff.namemap, graddiff.diff.stepalign, sys; assert 'torch' not in sys.modules"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_html_report_through_a_map(runs, tmp_path):
    a, b = runs["scale"]
    out = tmp_path / "r.html"
    r = _cli("compare", a, b, "--map", runs["map"], "--html", out)
    assert r.exit_code == 1, r.output
    assert "blocks.0.attn.out_proj" in out.read_text()


def test_offset_reports_steps_in_a_numbering(resumed):
    rep = graddiff.compare(resumed["full"], resumed["resumed"], offset=2)
    assert rep.exit_code == 0
    assert (rep.steps["first"], rep.steps["last"], rep.steps["in_b"]) == (2, 3, 2)
    assert rep.structure["steps_only_in_a"] == [0, 1, 2]
    assert rep.structure["steps_only_in_b"] is None


def test_module_classes_recorded_and_used(tmp_path):
    """A has a Dropout that B lacks: all outputs have one shape, weights differ; the module
    classes tell which Linear of A the second Linear of B is."""
    from graddiff.diff.automap import propose_map

    x = torch.randn(2, 4)
    torch.manual_seed(1)
    m_a = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.0), torch.nn.Linear(4, 4))
    torch.manual_seed(2)
    m_b = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    for m, p in ((m_a, tmp_path / "a.h5"), (m_b, tmp_path / "b.h5")):
        with graddiff.trace(m, p, forward_only=True):
            m(x)
    with graddiff.open(tmp_path / "a.h5") as a, graddiff.open(tmp_path / "b.h5") as b:
        assert a.module_classes == {
            "(root)": "Sequential",
            "0": "Linear",
            "1": "Dropout",
            "2": "Linear",
        }
        prop = propose_map(a, b)
    pairs = {(p.b, p.a) for p in prop.pairs if p.group == "module"}
    assert (("1",), ("2",)) in pairs and (("0",), ("0",)) in pairs
    assert "activation 1" in prop.unmatched_a
    # without the classes, the Dropout and the Linear would tie (the weights, square and not
    # copied, stay ambiguous: their layout cannot be told)
    assert not [p for p in prop.ambiguous if p.group == "module"]


def test_map_auto_on_runs_that_share_their_names(runs):
    a, _ = runs[""]
    rep = graddiff.compare(a, a, name_map="auto")
    assert rep.exit_code == 0 and "already share their record names" in " ".join(rep.notes)
    r = _cli("map", a, a)
    assert r.exit_code == 0 and "rules: []" in r.output


def test_unmapped_records_of_b_carry_their_classes(runs):
    """Without the final-norm rule, B's final_norm records match nothing of A: they are listed
    under B's own names, each with its module class read from B's trace."""
    a, b = runs[""]
    rules = [line for line in MAP.splitlines() if "final_norm" not in line]
    path = _write(runs["dir"], "\n".join(rules) + "\n", name="no_final_norm.yaml")
    rep = graddiff.compare(a, b, name_map=path)
    nm = rep.to_dict()["structure"]["name_map"]
    unmapped = dict(zip(nm["unmapped_b"], nm["unmapped_b_classes"]))
    assert "activation final_norm" in unmapped, nm["unmapped_b"]
    assert unmapped["activation final_norm"] == "LayerNorm"
    assert len(nm["unmapped_b_classes"]) == len(nm["unmapped_b"])

"""``graddiff compare``: exit codes on every path, --json, options, one-line input errors."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from diff_builders import simulate, write_run

import graddiff.cli
from graddiff.entries import entry_from_array


def _run(*args):
    return CliRunner().invoke(graddiff.cli.main, ["compare", *map(str, args)])


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    d = tmp_path_factory.mktemp("traces")
    return {
        "base": simulate(d / "base.h5"),
        "same": simulate(d / "same.h5"),
        "nozero": simulate(d / "nozero.h5", zero_grad=False),
        "micro": simulate(d / "micro.h5", micro=2),
    }


def test_identical_exit_0(traces):
    for extra in ([], ["--exact"]):
        r = _run(traces["base"], traces["same"], *extra)
        assert r.exit_code == 0, r.output
        assert "No difference" in r.output


def test_diverged_exit_1_verdict_first(traces):
    r = _run(traces["base"], traces["nozero"])
    assert r.exit_code == 1
    lines = r.output.splitlines()
    assert lines[0].startswith("DIVERGED at step 1: grad fc1.weight")
    assert "missing zero_grad" in r.output and "\x1b[" not in r.output  # plain text off a TTY


def test_exact_and_rtol(traces):
    kinds = ["--kinds", "param,input,activation,loss,grad"]
    assert _run(traces["base"], traces["micro"], *kinds).exit_code == 0
    assert _run(traces["base"], traces["micro"], *kinds, "--exact").exit_code == 1
    assert _run(traces["base"], traces["micro"], *kinds, "--rtol", "0").exit_code == 1


def test_json_schema(traces):
    r = _run(traces["base"], traces["nozero"], "--json")
    assert r.exit_code == 1
    d = json.loads(r.output)
    assert d["diverged"] is True and d["exit_code"] == 1
    for key in ("step", "kind", "name", "max_abs_diff", "rel_diff", "index", "fraction_differing"):
        assert key in d["first"]
    assert (d["first"]["step"], d["first"]["kind"]) == (1, "grad")
    assert d["diagnosis"][0]["cause"] == "grad_accumulation"
    assert isinstance(d["environment_diff"], list) and isinstance(d["growth"]["grad"], list)
    assert d["first_bitwise"]["step"] == 1
    same = json.loads(_run(traces["base"], traces["same"], "--json").output)
    assert same["diverged"] is False and same["first"] is None and same["first_bitwise"] is None


def test_steps_and_kinds_options(traces):
    assert _run(traces["base"], traces["nozero"], "--steps", "0").exit_code == 0
    assert _run(traces["base"], traces["nozero"], "--steps", "2:").exit_code == 1
    r = _run(traces["base"], traces["nozero"], "--kinds", "param", "--json")
    assert json.loads(r.output)["first"]["step"] == 2


def test_html_calls_the_postmortem_writer(traces, tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("graddiff.postmortem.html")
    fake.write_html = lambda report, path: calls.append((report.verdict, path))
    monkeypatch.setitem(sys.modules, "graddiff.postmortem.html", fake)
    r = _run(traces["base"], traces["nozero"], "--html", tmp_path / "r.html")
    assert r.exit_code == 1 and calls == [("diverged", str(tmp_path / "r.html"))]


def test_html_unavailable_is_one_line_exit_2(traces, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "graddiff.postmortem.html", None)
    r = _run(traces["base"], traces["nozero"], "--html", tmp_path / "r.html")
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert r.output.startswith("Error: HTML reports are not available")


def _bad_inputs(d, base):
    (d / "text.h5").write_text("not hdf5\n")
    (d / "empty.h5").write_bytes(b"")
    raw = Path(base).read_bytes()
    (d / "cut.h5").write_bytes(raw[: len(raw) // 2])
    w = np.ones((3, 2), np.float32)
    other = write_run(d / "other.h5", [[entry_from_array("param", "decoder.w", w)]])
    return {
        "missing": (d / "nope.h5", "no such file"),
        "text": (d / "text.h5", "not a readable HDF5 file"),
        "empty": (d / "empty.h5", "empty file"),
        "truncated": (d / "cut.h5", "truncated"),
        "unrelated": (other, "unrelated models"),
    }


@pytest.mark.parametrize("case", ["missing", "text", "empty", "truncated", "unrelated"])
def test_bad_input_one_line_exit_2(traces, tmp_path, case):
    path, message = _bad_inputs(tmp_path, traces["base"])[case]
    r = _run(traces["base"], path)
    assert r.exit_code == 2
    assert r.output.count("\n") == 1 and r.output.startswith("Error: ") and message in r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize(
    ("opt", "value"), [("--rtol", "-1"), ("--steps", "a:b"), ("--kinds", "nope")]
)
def test_bad_options_exit_2(traces, opt, value):
    r = _run(traces["base"], traces["same"], opt, value)
    assert r.exit_code == 2 and r.output.startswith("Error: ") and r.output.count("\n") == 1


def test_compare_path_never_imports_torch():
    code = "import graddiff, graddiff.diff, graddiff.cli.compare, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_corrupted_values_are_an_input_error(tmp_path):
    import h5py

    a = simulate(tmp_path / "a.h5", n_steps=2)
    b = simulate(tmp_path / "b.h5", n_steps=2, zero_grad=False)
    with h5py.File(b, "r+") as f:  # flip the stored bytes of step 1, fingerprints untouched
        raw = f["values/00000001"][:]
        f["values/00000001"][:] = raw ^ 0x5A
    r = _run(a, b)
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert "do not match their fingerprint" in r.output


@pytest.mark.parametrize("store_values", [True, False], ids=["full", "stats"])
def test_autograd_grad_assigned_to_dot_grad_exit_0(tmp_path, store_values):
    # B: autograd.grad per micro-batch, summed into p.grad, optimizer step: .grad vs .grad
    a = simulate(tmp_path / "a.h5", micro=2, store_values=store_values)
    b = simulate(
        tmp_path / "b.h5", micro=2, autograd=True, assign_grad=True, store_values=store_values
    )
    for extra in ([], ["--exact"]):
        r = _run(a, b, *extra)
        assert r.exit_code == 0, r.output
        assert r.output.startswith("No difference: the runs are bitwise identical")
    assert "autograd_grad records only in B (its .grad is compared)" in r.output


def test_summed_stats_only_gradients_exit_0_even_exact(tmp_path):
    a = simulate(tmp_path / "a.h5", micro=2, store_values=False)
    b = simulate(tmp_path / "b.h5", micro=2, autograd=True, store_values=False)
    for extra in ([], ["--exact"]):
        r = _run(a, b, *extra, "--json")
        assert r.exit_code == 0, r.output
        d = json.loads(r.output)
        assert (d["verdict"], d["first_bitwise"]) == ("identical", None)
        assert {u["label"] for u in d["structure"]["not_comparable"]} == {
            "grad fc1.weight",
            "grad fc1.bias",
            "grad fc2.weight",
            "grad fc2.bias",
        }
    text = " ".join(_run(a, b, "--exact").output.split())  # the terminal wraps long lines
    assert text.startswith("No difference over 4 steps (0..3)") and "statistics only" in text
    assert "not comparable bitwise at up to 4 step(s) (statistics only): grad fc1.weight" in text

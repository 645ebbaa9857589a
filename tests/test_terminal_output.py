"""Terminal output at 80 and 120 columns and in a pipe: fits, no trailing blanks, gaps and cut
lists marked, module classes shown, written files named on stderr, exit codes pipe-proof."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from diff_builders import MLP_CLASSES, simulate

import graddiff.cli
from graddiff.cli.output import CleanStdout, strip_trailing


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    d = tmp_path_factory.mktemp("term")
    kw = {"n_steps": 30, "module_classes": MLP_CLASSES}
    return {
        "base": simulate(d / "base.h5", **kw),
        "same": simulate(d / "same.h5", **kw),
        "nozero": simulate(d / "nozero.h5", zero_grad=False, **kw),
        "old": simulate(d / "old.h5", n_steps=30),  # a trace without module classes
        "dir": d,
    }


def run(columns, *args):
    r = CliRunner().invoke(graddiff.cli.main, [str(a) for a in args], env={"COLUMNS": str(columns)})
    return r


def fits(text: str, columns: int) -> None:
    for line in text.splitlines():
        assert len(line) <= columns, f"{len(line)} > {columns}: {line!r}"
        assert line == line.rstrip(), f"trailing blanks: {line!r}"


@pytest.mark.parametrize("columns", [80, 120])
def test_compare_fits_the_width(traces, columns):
    r = run(columns, "compare", traces["base"], traces["nozero"])
    assert r.exit_code == 1
    fits(r.output, columns)
    lines = r.output.splitlines()
    # the verdict first, with the module class after the name
    assert lines[0].startswith("DIVERGED at step 1: grad fc1.weight (Linear)")
    assert "record              grad fc1.weight (Linear)" in r.output
    # growth table: kinds down, steps across, skipped steps marked with …
    head = next(i for i, line in enumerate(lines) if line.startswith("Growth"))
    header = lines[head + 2].split()
    assert header[0] == "step" and "…" in header
    assert [int(s) for s in header[1:] if s != "…"] == sorted(
        int(s) for s in header[1:] if s != "…"
    )
    n_steps_shown = sum(1 for s in header[1:] if s != "…")
    assert n_steps_shown < 30 and len(lines[head + 2]) <= columns


def test_cut_lists_say_how_many_more():
    from graddiff.diff.render import more

    assert more(["a", "b", "c", "d", "e"], 3) == "a, b, c and 2 more"
    assert more(["a", "b"], 3) == "a, b"


def test_wider_terminal_wraps_less(traces):
    narrow = run(80, "compare", traces["base"], traces["nozero"]).output.splitlines()
    wide = run(120, "compare", traces["base"], traces["nozero"]).output.splitlines()
    assert len(wide) < len(narrow)
    # wrapped evidence keeps a hanging indent under its bullet
    i = next(i for i, line in enumerate(narrow) if line.startswith("  - "))
    assert narrow[i + 1].startswith("    ") and not narrow[i + 1].startswith("     -")


def test_old_trace_shows_no_class_and_json_carries_classes(traces):
    r = run(80, "compare", traces["base"], traces["old"], "--json")
    d = json.loads(r.output)
    assert d["first"] is None or d["first"]["module_class"] in (None, "Linear")
    r = run(80, "compare", traces["old"], traces["old"])
    assert "(Linear)" not in r.output and r.exit_code == 0
    d = json.loads(run(80, "compare", traces["base"], traces["nozero"], "--json").output)
    assert d["first"]["module_class"] == "Linear"
    assert d["module_classes"]["fc1"] == "Linear" and d["module_classes"]["(root)"] == "MLP"


def test_show_leads_with_the_run_and_folds_the_environment(traces):
    r = run(80, "show", traces["nozero"])
    assert r.exit_code == 0
    fits("\n".join(r.output.splitlines()[1:]), 80)  # line 0 is the path
    lines = r.output.splitlines()
    assert lines[1].startswith("  steps    30 (0..29)")
    order = [
        next(i for i, x in enumerate(lines) if x.startswith(p))
        for p in ("  steps", "  loss", "  findings", "  values", "  records", "  environment")
    ]
    assert order == sorted(order)
    assert "--env lists them" in lines[-1] and "torch_version" not in r.output
    assert "grad fc1.weight (Linear)" in r.output  # findings carry the class
    assert "scale; x: step" in r.output  # the chart's legend
    full = run(80, "show", traces["nozero"], "--env")
    assert "torch_version" in full.output and "--env lists them" not in full.output


def test_check_wraps_findings(traces):
    r = run(80, "check", traces["nozero"])
    assert r.exit_code == 1
    fits("\n".join(r.output.splitlines()[1:]), 80)
    body = r.output.splitlines()[1:]
    assert body[0].startswith("  step 1  grad_accumulation  grad fc1.weight (Linear)")
    assert all(line.startswith("      ") for line in body[1:] if not line.startswith("  step"))


def test_written_files_are_named_on_stderr(traces, tmp_path):
    out = tmp_path / "r.html"
    cmd = [sys.executable, "-m", "graddiff", "compare", traces["base"], traces["nozero"]]
    p = subprocess.run([*cmd, "--html", str(out)], capture_output=True, text=True)
    assert p.returncode == 1 and out.exists()
    assert p.stderr.strip() == f"wrote {out}" and str(out) not in p.stdout


@pytest.mark.parametrize(("b", "code"), [("same", 0), ("nozero", 1)])
def test_exit_code_is_the_same_through_a_closed_pipe(traces, b, code):
    """`graddiff compare a b | head -1`: the reader is gone before the report is written."""
    args = [sys.executable, "-m", "graddiff", "compare", traces["base"], traces[b]]
    r, w = os.pipe()
    os.close(r)  # nobody will ever read: every write to stdout fails with EPIPE
    try:
        p = subprocess.run(args, stdout=w, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(w)
    assert p.returncode == code and p.stderr == ""
    assert subprocess.run(args, capture_output=True).returncode == code


def test_clean_stdout_strips_before_colour_codes_and_holds_partial_lines():
    assert strip_trailing("a  \x1b[0m\nb \n") == "a\x1b[0m\nb\n"

    class Sink:
        def __init__(self):
            self.text = ""

        def write(self, t):
            self.text += t

        def flush(self):
            pass

    sink = Sink()
    out = CleanStdout(sink)
    out.write("x   ")
    assert sink.text == ""  # the line is not finished: trailing blanks may follow
    out.write("  y  \nz  ")
    out.flush()
    assert sink.text == "x     y\nz"
    assert os.linesep  # (platform newline untouched: click writes "\n")

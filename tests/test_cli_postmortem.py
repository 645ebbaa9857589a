"""The post-mortem commands through click: output, exit codes on every path, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from test_postmortem_traces import simulate

from graddiff.cli import main


def invoke(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    d = tmp_path_factory.mktemp("traces")
    text = d / "notes.txt"
    text.write_text("not a trace\n")
    empty = d / "empty.h5"
    empty.write_bytes(b"")
    return {
        "clean": simulate(d / "clean.h5"),
        "clean2": simulate(d / "clean2.h5", lr=0.0501),
        "nan": simulate(d / "nan.h5", nan_at=3, values={0, 1}, status="recording"),
        "text": str(text),
        "empty": str(empty),
        "missing": str(d / "missing.h5"),
        "dir": str(d),
    }


BAD = {"missing": "no such file", "text": "not a readable HDF5 file", "empty": "empty file"}
COMMANDS = {
    "show": ["show"],
    "check": ["check"],
    "inspect": ["inspect", "--list"],
    "plot": ["plot", "-o", "{dir}/x.png"],
    "shell": ["shell", "-c", "pass"],
}


@pytest.mark.parametrize("bad", list(BAD), ids=list(BAD))
@pytest.mark.parametrize("cmd", list(COMMANDS), ids=list(COMMANDS))
def test_bad_input_is_one_error_line(traces, cmd, bad):
    args = [a.format(dir=traces["dir"]) for a in COMMANDS[cmd]]
    r = invoke(args[0], traces[bad], *args[1:])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and BAD[bad] in lines[0]


def test_show(traces):
    r = invoke("show", traces["nan"])
    assert r.exit_code == 0, r.output
    for needle in (
        "status   recording",
        "steps    6 (0..5)",
        "full values at steps 0-1",
        "loss",
        "step 3  nan  activation fc1",
    ):
        assert needle in r.output
    r = invoke("show", traces["clean"], "--json")
    d = json.loads(r.output)
    assert r.exit_code == 0 and d["findings"] == [] and d["values"]["mode"] == "full"


def test_check_exit_codes_and_json(traces):
    r = invoke("check", traces["clean"])
    assert r.exit_code == 0 and "clean (6 steps checked)" in r.output
    r = invoke("check", traces["nan"])
    assert r.exit_code == 1 and "step 3  nan  activation fc1" in r.output
    r = invoke("check", traces["nan"], "--json")
    assert r.exit_code == 1 and json.loads(r.output)["findings"][0]["step"] == 3
    assert invoke("check", traces["nan"], "--ignore", "nan").exit_code == 0
    assert invoke("check", traces["nan"], "--ignore", "bogus").exit_code == 2


def test_inspect_record_and_values(traces):
    r = invoke(
        "inspect", traces["clean"], "--step", 2, "--kind", "grad", "--name", "fc2.bias", "--values"
    )
    assert r.exit_code == 0, r.output
    assert "grad fc2.bias at step 2" in r.output and "fingerprint" in r.output and "[" in r.output
    r = invoke("inspect", traces["clean"], "-k", "activation", "-n", "fc*", "--json")
    assert r.exit_code == 0 and [d["name"] for d in json.loads(r.output)] == ["fc1", "fc2"]
    r = invoke("inspect", traces["clean"], "--list", "--kind", "grad")
    assert r.exit_code == 0 and r.output.count("\n") == 5


@pytest.mark.parametrize(
    "args, message",
    [
        (["-k", "grad", "-n", "fc1.weigth"], "did you mean fc1.weight"),
        (["-k", "gradd", "-n", "fc1.weight"], "unknown kind 'gradd'"),
        (["-k", "grad", "-n", "fc1.weight", "-s", "99"], "step 99 is not a complete step"),
        (["-k", "grad", "-n", "fc1.weight", "-s", "4", "--values"], "statistics only"),
        (["-k", "grad", "-n", "fc1.weight", "--call", "3"], "no call 3"),
        ([], "say which record"),
    ],
    ids=["name", "kind", "step", "values", "call", "nothing"],
)
def test_inspect_errors(traces, args, message):
    r = invoke("inspect", traces["nan"], *args)
    assert r.exit_code == 2
    assert r.output.count("\n") == 1 and message in r.output


def test_plot_one_and_two_runs(traces, tmp_path):
    r = invoke("plot", traces["clean"], "-o", tmp_path / "one.png")
    assert r.exit_code == 0 and "3 panels" in r.output and (tmp_path / "one.png").stat().st_size > 0
    r = invoke("plot", traces["clean"], traces["clean2"], "-o", tmp_path / "two.svg")
    assert r.exit_code == 0 and "4 panels" in r.output
    r = invoke("plot", traces["clean"], "-o", tmp_path / "x.gif")
    assert r.exit_code == 2 and "unsupported plot format" in r.output
    assert invoke("plot", traces["clean"]).exit_code == 2  # -o is required


def test_plot_without_matplotlib(traces, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    r = invoke("plot", traces["clean"], "-o", tmp_path / "x.png")
    assert r.exit_code == 2 and r.output.startswith("Error: plotting needs matplotlib")


def test_shell_command_and_stdin(traces):
    r = invoke(
        "shell",
        traces["clean"],
        traces["clean2"],
        "-c",
        "print(a.steps[-1], b.path.endswith('clean2.h5'), report.diverged, np.__name__)",
    )
    assert r.exit_code == 0, r.output
    assert r.output.strip() == "5 True True numpy"
    assert invoke("shell", traces["clean"], "-c", "1/0").exit_code == 1
    r = invoke("shell", traces["clean"], input="print(len(a.names('grad')))\n")
    assert r.exit_code == 0 and "a = graddiff.open(" in r.output and "4" in r.output


def test_shell_prefers_ipython_on_a_terminal(traces, monkeypatch):
    import types

    import graddiff.cli.shell as shell

    seen = {}
    fake = types.ModuleType("IPython")
    fake.start_ipython = lambda argv, user_ns, **kw: seen.update(ns=user_ns, kw=kw)
    monkeypatch.setitem(sys.modules, "IPython", fake)
    monkeypatch.setattr(shell, "_interactive", lambda: True)
    r = invoke("shell", traces["clean"])
    assert r.exit_code == 0 and "a = graddiff.open(" in r.output
    assert seen["ns"]["a"].path == traces["clean"] and seen["kw"] == {"display_banner": False}
    out = invoke("shell", traces["clean"], "--plain", input="print(7*6)\n").output
    assert out.replace(traces["clean"], "").count("42") == 1  # the path may hold "42" (pytest-42N)


def test_namespace_is_pure(traces):
    from graddiff.postmortem.shellns import build_namespace, close_namespace

    ns, banner = build_namespace([traces["clean"]])
    try:
        assert set(ns) >= {"a", "np", "graddiff", "runs"} and "b" not in ns and "report" not in ns
        assert "a = graddiff.open(" in banner
    finally:
        close_namespace(ns)


def test_compare_html_end_to_end(traces, tmp_path):
    out = tmp_path / "r.html"
    r = invoke("compare", traces["clean"], traces["clean2"], "--html", out)
    assert r.exit_code == 1, r.output
    text = out.read_text("utf-8")
    assert "DIVERGED" in text and 'id="heat-diff"' in text


def test_reading_commands_do_not_import_torch():
    code = (
        "import graddiff.cli.show, graddiff.cli.check, graddiff.cli.inspect, graddiff.cli.plot, "
        "graddiff.cli.shell, graddiff.postmortem.html, sys; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

"""The CLI's promises on hostile input: exit codes, one-line errors, no hang, nothing leaked.

Internal errors (exit 3, log file, --debug), bare ``graddiff``, escaping of terminal control
characters and rich markup from names, paths and metadata, refusal of FIFOs, devices and
directories, the watchdog for a corrupt heap that makes HDF5 loop forever, and refusal of
HDF5 external storage, external links and virtual datasets (a crafted trace pointing at a
secret file must print none of it). Traces come from the torch-free TraceWriter.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import graddiff
from graddiff.cli import main
from graddiff.entries import entry_from_array
from graddiff.errors import TraceFileError
from graddiff.format import FLAG_VALUES, fingerprint_bytes
from graddiff.textsafe import escape_markup, one_line, printable, safe_console
from graddiff.writer import TraceWriter

EVIL_NAME = "fc\x1b[2J\x1b]0;pwned\x07[bold]x[/bold][/x]:smile:\r\u202e"
HTML_NAME = "fc<script>alert(1)</script><img src=x onerror=alert(1)>.bias"


def write_trace(path, names=("fc.weight", "fc.bias"), environment=None, steps=3, seed=0) -> str:
    rng = np.random.default_rng(seed)
    w = TraceWriter(str(path), environment=environment or {"rank": 0}, options={"values": "full"})
    for step in range(steps):
        ents = []
        for i, name in enumerate(names):
            ents.append(
                entry_from_array("param", name, rng.standard_normal(6).astype(np.float32), seq=i)
            )
            ents.append(
                entry_from_array(
                    "grad", name, rng.standard_normal(6).astype(np.float32), seq=10 + i
                )
            )
        w.write_step(step, ents)
    w.close()
    return str(path)


def cli(*args, env=None, timeout=60):
    """Run the installed CLI as a user would (own process, pipes), with a hard timeout."""
    e = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "graddiff", *map(str, args)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        env=e,
    )


def assert_one_error_line(res, code=2):
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    return lines[0]


# -- exit codes and internal errors -------------------------------------------------------------


def test_bare_graddiff_prints_help_and_exits_0():
    res = cli()
    assert res.returncode == 0, res.stderr
    assert "Commands:" in res.stdout and "compare" in res.stdout and res.stderr == ""


def test_internal_error_is_exit_3_one_line_with_a_log(tmp_path, monkeypatch):
    path = write_trace(tmp_path / "a.h5")
    import graddiff.cli.show as show

    def boom(*a, **k):
        raise ValueError("deliberate bug")

    monkeypatch.setattr(show, "summarize", boom)
    res = CliRunner().invoke(main, ["show", path])
    assert res.exit_code == 3
    line = res.stderr.strip()
    assert "\n" not in line and line.startswith("Error: internal error")
    assert "ValueError: deliberate bug" in line and "Traceback" not in res.output
    log = re.search(r"traceback in (\S+\.log)", line).group(1)
    try:
        with open(log) as fh:
            text = fh.read()
        assert "Traceback" in text and "deliberate bug" in text and "show" in text
    finally:
        os.unlink(log)
    res = CliRunner().invoke(main, ["--debug", "show", path])
    assert res.exit_code == 3
    assert "Traceback" in res.stderr and "deliberate bug" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("Error: internal error")


def test_unknown_command_and_option_are_usage_errors(tmp_path):
    assert_one_error_line(cli("frobnicate"))
    assert_one_error_line(cli("show", "--nope", write_trace(tmp_path / "a.h5")))


# -- escaping ---------------------------------------------------------------------------------


def test_textsafe_helpers():
    assert printable("a\x1b[31mb\r\n\tc\x9b") == "a\\x1b[31mb\\x0d\n\tc\\x9b"
    assert one_line("a\nb\tc") == "a\\x0ab\\x09c"
    assert printable("\u202eabc") == "\\u202eabc"
    assert printable("bad\udcaebyte") == "bad\\udcaebyte"  # lone surrogate: undecodable byte
    assert escape_markup("[bold]x") == "\\[bold]x"
    import io

    buf = io.StringIO()
    con = safe_console(file=buf, force_terminal=True, color_system="standard", width=80)
    con.print(f"{EVIL_NAME} [red]plain[/red]", style="bold")
    out = buf.getvalue()
    # rich's own styling is kept, nothing from the text reaches the terminal raw
    assert "\x1b[1m" in out and "\x1b[2J" not in out and "\x1b]0" not in out and "\r" not in out
    assert "[bold]x[/bold][/x]" in out and "[red]plain[/red]" in out and ":smile:" in out


@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs") / "[lr=0.1]" / "[/x]"
    d.mkdir(parents=True)
    env = {"argv": ["train.py", "--tag", "[/x]\x1b[2J"], "cwd": "[/bad]\x1b]0;t\x07"}
    names = (EVIL_NAME, HTML_NAME)
    a = write_trace(d / "a.h5", names=names, environment=env)
    b = write_trace(
        d / "b.h5", names=names, environment={"cwd": "<img src=x onerror=alert(2)>"}, seed=1
    )
    return a, b


@pytest.mark.parametrize(
    "args",
    [
        ["show", "{a}", "--env"],
        ["inspect", "{a}", "--list"],
        ["inspect", "{a}", "--kind", "param", "--name", "fc*", "--values"],
        ["check", "{a}"],
        ["compare", "{a}", "{b}"],
        ["compare", "{a}", "{a}"],
    ],
    ids=lambda a: " ".join(a),
)
def test_names_paths_and_metadata_print_escaped(evil, args):
    a, b = evil
    res = cli(*[x.format(a=a, b=b) for x in args])
    assert res.returncode in (0, 1), res.stderr
    out = res.stdout + res.stderr
    assert "\x1b" not in out and "\r" not in out and "\x07" not in out and "\u202e" not in out
    assert "Traceback" not in out
    if args[0] != "inspect":
        assert "[lr=0.1]/[/x]" in out  # paths print as given, markup not interpreted
    if args not in (["check", "{a}"], ["compare", "{a}", "{a}"]):
        assert "\\x1b[2J" in out  # the escape sequence is shown, not executed


def test_html_report_escapes_names_and_metadata(evil, tmp_path):
    a, b = evil
    out = tmp_path / "report.html"
    res = cli("compare", a, b, "--html", out)
    assert res.returncode == 1, res.stderr
    page = out.read_text()
    assert "fc&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>alert" not in page and "<img src=x" not in page and "\x1b" not in page


# -- special files, hangs -------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_and_devices_are_refused_fast(tmp_path):
    fifo = tmp_path / "trace.h5"
    os.mkfifo(fifo)
    good = write_trace(tmp_path / "good.h5")
    for args in (
        ["show", fifo],
        ["compare", good, fifo],
        ["check", "/dev/null"],
        ["show", tmp_path],
    ):
        t0 = time.monotonic()
        line = assert_one_error_line(cli(*args, timeout=30))
        assert time.monotonic() - t0 < 20
        assert re.search(r"is a (FIFO|character device|directory)", line), line
    with pytest.raises(TraceFileError, match="FIFO"):
        graddiff.open(fifo)


def zero_first_heap_object(src: str, dst: str) -> None:
    """16 zeroed bytes over the first object header of the global heap (record names)."""
    with open(src, "rb") as fh:
        data = bytearray(fh.read())
    at = data.index(b"GCOL")
    data[at + 16 : at + 32] = bytes(16)
    with open(dst, "wb") as fh:
        fh.write(data)


def test_corrupt_heap_is_refused_before_hdf5_loops_on_it(tmp_path):
    good = write_trace(tmp_path / "good.h5")
    bad = str(tmp_path / "heap.h5")
    zero_first_heap_object(good, bad)
    for args in (["show", bad], ["compare", good, bad], ["inspect", bad, "--list"]):
        t0 = time.monotonic()
        line = assert_one_error_line(cli(*args, env={"GRADDIFF_WATCHDOG": "0"}, timeout=60))
        assert "heap.h5: corrupt graddiff file: global heap collection" in line
        assert time.monotonic() - t0 < 30
    with pytest.raises(TraceFileError, match="global heap"):
        graddiff.open(bad)  # the Python API, which has no watchdog, does not hang either


WATCHED_HANG = """
import re, sys
from graddiff.cli.watchdog import run_watched

def hang():  # catastrophic backtracking: like HDF5's loop, it never releases the GIL
    re.match(r"(a+)+$", "a" * 64 + "b")
    return 0

def on_stall(limit):
    print(f"Error: stalled for {limit:g} s", file=sys.stderr)
    return 2

sys.exit(run_watched(hang, on_stall))
"""


def test_watchdog_ends_a_command_that_holds_the_gil_forever():
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-c", WATCHED_HANG],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, GRADDIFF_WATCHDOG="1.5"),
    )
    assert res.returncode == 2 and res.stderr.strip() == "Error: stalled for 1.5 s"
    assert time.monotonic() - t0 < 30


def test_watchdog_passes_output_and_exit_code_through(tmp_path):
    good = write_trace(tmp_path / "good.h5")
    res = cli("check", good, env={"GRADDIFF_WATCHDOG": "5"})
    assert res.returncode == 0 and "clean" in res.stdout and res.stderr == ""
    other = write_trace(tmp_path / "other.h5", seed=3)
    res = cli("compare", good, other, env={"GRADDIFF_WATCHDOG": "5"})
    assert res.returncode == 1 and "DIVERGED" in res.stdout


# -- a trace is data: nothing outside it is read ------------------------------------------------


def _external_values(trace: str, secret: str) -> None:
    """Point step 0's values at bytes of ``secret`` (HDF5 external raw storage), with entry rows
    whose fingerprints match the secret: the worst case, an attacker who knows what to expect."""
    size = os.path.getsize(secret)
    with open(secret, "rb") as fh:
        raw = np.frombuffer(fh.read(), np.uint8)
    with h5py.File(trace, "r+") as f:
        del f["values/00000000"]
        f["values"].create_dataset("00000000", (size,), np.uint8, external=[(secret, 0, size)])
        ent = f["entries"][:]
        i = int(np.nonzero(ent["step"] == 0)[0][0])
        row = ent[i]
        row["ndim"], row["shape"][0], row["numel"] = 1, size, size
        row["offset"], row["nbytes"] = 0, size
        row["fp_sum"], row["fp_pos"] = fingerprint_bytes(raw)
        ent[i] = row
        # the step's other rows keep statistics only: no range overlaps the secret's
        others = (ent["step"] == 0) & (np.arange(len(ent)) != i)
        ent["flags"][others] &= ~np.uint8(FLAG_VALUES)
        ent["offset"][others], ent["nbytes"][others] = -1, 0
        f["entries"][:] = ent
        rec = f["records"][:]
        rec[int(row["record"])]["dtype"] = b"uint8"
        f["records"][:] = rec


SECRET = b"TOKEN-s3cr3t-0123456789abcdef\n"


@pytest.mark.parametrize("how", ["external-storage", "external-link", "virtual", "soft-link"])
def test_storage_outside_the_trace_is_refused(tmp_path, how):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    trace = write_trace(tmp_path / "evil.h5")
    if how == "external-storage":
        _external_values(trace, str(secret))
    else:
        other = write_trace(tmp_path / "other.h5")
        with h5py.File(trace, "r+") as f:
            del f["records"]
            if how == "external-link":
                f["records"] = h5py.ExternalLink(other, "/records")
            elif how == "soft-link":
                f["records"] = h5py.SoftLink("/entries")
            else:
                with h5py.File(other, "r") as o:
                    src = o["records"]
                    layout = h5py.VirtualLayout(shape=src.shape, dtype=src.dtype)
                    layout[:] = h5py.VirtualSource(src)
                f.create_virtual_dataset("records", layout)
    for args in (
        ["inspect", trace, "-k", "param", "-n", "fc.weight", "--values", "--json"],
        ["inspect", trace, "--list"],
        ["show", trace],
        ["check", trace],
        ["compare", trace, trace],
    ):
        res = cli(*args)
        out = res.stdout + res.stderr
        assert "s3cr3t" not in out and "0123456789abcdef" not in out
        assert "Traceback" not in out and res.returncode in (0, 1, 2)
        if how != "external-storage" or "--values" in args:
            assert "refused" in assert_one_error_line(res), out
    if how == "external-storage":  # the index opens; the values are refused
        with graddiff.open(trace) as run:
            with pytest.raises(TraceFileError, match="refused"):
                run.get("param", "fc.weight", 0)
    else:
        with pytest.raises(TraceFileError, match="refused"):
            graddiff.open(trace)


def test_undecodable_bytes_in_metadata_and_names(tmp_path):
    """A bit flip in the heap can leave bytes that are not UTF-8 in a string: printed, plotted
    and compared as U+FFFD, never a crash (found by the fuzz campaign)."""
    path = write_trace(tmp_path / "a.h5")
    good = write_trace(tmp_path / "good.h5")
    with h5py.File(path, "r+") as f:
        f.attrs.create("environment", b'{"cuda": "13\xae0"}', dtype=h5py.string_dtype())
        f.attrs.create("module_classes", b'{"fc": "\xccinear"}', dtype=h5py.string_dtype())
    with graddiff.open(path) as run:
        assert run.environment["cuda"] == "13\ufffd0"
    for args in (["show", path], ["plot", path, "-o", tmp_path / "p.png"], ["compare", good, path]):
        res = cli(*args)
        assert res.returncode in (0, 1) and "Traceback" not in res.stderr, res.stderr

"""Packaging guardrails: one top-level package, hooks installed as graddiff.hooks, a lazy and
torch-free reading side, and a public API that resolves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import graddiff

ROOT = Path(__file__).resolve().parents[1]


def test_every_public_name_resolves():
    for name in graddiff.__all__:
        assert getattr(graddiff, name) is not None, name


def test_hooks_folder_is_graddiff_hooks():
    import graddiff.hooks

    assert Path(graddiff.hooks.__file__).resolve().parent == ROOT / "hooks"


def test_top_level_is_only_graddiff():
    egg = list(ROOT.glob("*.egg-info/top_level.txt"))
    if egg:  # present after `pip install -e .`
        assert egg[0].read_text().split() == ["graddiff"]
    cfg = (ROOT / "setup.cfg").read_text()
    assert "graddiff.hooks = hooks" in cfg and "packages = find:" not in cfg


def _run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_reading_side_never_imports_torch():
    result = _run(
        "import sys, graddiff, graddiff.reader, graddiff.cli, graddiff.format, graddiff.writer\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "graddiff.open\n"
        "assert 'torch' not in sys.modules"
    )
    assert result.returncode == 0, result.stderr


def test_python_dash_m_and_console_script_agree():
    result = subprocess.run(
        [sys.executable, "-m", "graddiff", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and graddiff.__version__ in result.stdout


def test_unknown_command_is_one_error_line_exit_2():
    result = subprocess.run(
        [sys.executable, "-m", "graddiff", "frobnicate"], capture_output=True, text=True
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:")

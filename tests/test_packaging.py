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


def test_every_subpackage_is_listed_in_setup_cfg():
    """`packages` is explicit (see setup.cfg): a new subpackage must be added there."""
    cfg = (ROOT / "setup.cfg").read_text()
    listed = set(cfg.split("packages =", 1)[1].split("package_dir", 1)[0].split())
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "graddiff").rglob("__init__.py")
    }
    assert found | {"graddiff.hooks"} == listed


def test_wheel_contains_every_module(tmp_path):
    """A non-editable install ships the demo, post-mortem and hooks packages."""
    import zipfile

    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    wheel = next(tmp_path.glob("graddiff-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ROOT.joinpath("graddiff").rglob("*.py"):
        assert str(module.relative_to(ROOT)) in names, module
    for module in ROOT.joinpath("hooks").glob("*.py"):
        assert f"graddiff/hooks/{module.name}" in names, module


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


def test_integrations_import_no_framework():
    """graddiff.integrations is importable without Lightning or transformers being imported."""
    result = _run(
        "import sys, graddiff.integrations\n"
        "bad = [m for m in ('lightning', 'transformers', 'accelerate', 'torch') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    assert result.returncode == 0, result.stderr

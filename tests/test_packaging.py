"""Packaging guardrails: one top-level package, hooks installed as graddiff.hooks, a lazy and
torch-free reading side, and a public API that resolves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

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


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project built as a wheel, as ``pip install`` would build it."""
    out = tmp_path_factory.mktemp("wheel")
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
            str(out),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    return next(out.glob("graddiff-*.whl"))


def test_wheel_contains_every_module(wheel):
    """A non-editable install ships the demo, post-mortem and hooks packages."""
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ROOT.joinpath("graddiff").rglob("*.py"):
        assert str(module.relative_to(ROOT)) in names, module
    for module in ROOT.joinpath("hooks").glob("*.py"):
        assert f"graddiff/hooks/{module.name}" in names, module


def _requires(wheel: Path) -> list[Requirement]:
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    return [
        Requirement(line.split(":", 1)[1])
        for line in text.splitlines()
        if line.startswith("Requires-Dist:")
    ]


# Where numba 0.68.1 and llvmlite 0.50 publish binary wheels (checked on PyPI with
# ``pip install --dry-run --only-binary=:all: --platform ... --python-version ...``).
_WITH_WHEELS = [
    ("linux", "x86_64", "3.10"),
    ("linux", "aarch64", "3.15"),
    ("darwin", "arm64", "3.12"),
    ("win32", "AMD64", "3.13"),
]
_WITHOUT = [
    ("linux", "x86_64", "3.9"),  # no numba 0.68 for 3.9
    ("linux", "x86_64", "3.16"),  # not released: no wheels yet
    ("linux", "ppc64le", "3.12"),
    ("darwin", "x86_64", "3.12"),
    ("win32", "ARM64", "3.12"),
    ("win32", "x86", "3.12"),
]


def _env(plat: str, machine: str, py: str, impl: str = "CPython") -> dict[str, str]:
    return {
        "sys_platform": plat,
        "platform_machine": machine,
        "python_version": py,
        "python_full_version": py + ".0",
        "platform_python_implementation": impl,
        "implementation_name": impl.lower(),
        "extra": "",
    }


def test_numba_is_a_core_dependency_only_where_it_has_wheels(wheel):
    """Plain ``pip install graddiff`` gets the fused kernel, and never builds numba from source:
    the marker admits exactly the interpreters and platforms numba ships wheels for."""
    numba = [r for r in _requires(wheel) if r.name == "numba"]
    core = [r for r in numba if "extra" not in str(r.marker)]
    fast = [r for r in numba if "extra" in str(r.marker)]
    assert len(core) == 1 and len(fast) == 1, numba
    req = core[0]
    assert req.specifier.contains("0.68.1")
    for case in _WITH_WHEELS:
        assert req.marker.evaluate(_env(*case)), case
    for case in _WITHOUT:
        assert not req.marker.evaluate(_env(*case)), case
    assert not req.marker.evaluate(_env("linux", "x86_64", "3.11", impl="PyPy"))
    # the old "fast" extra is an alias: the same requirement, only under the extra
    for case in _WITH_WHEELS + _WITHOUT:
        env = dict(_env(*case), extra="fast")
        assert fast[0].marker.evaluate(env) == req.marker.evaluate(env), case
    assert fast[0].specifier == req.specifier


def test_numba_marker_admits_this_machine_when_numba_is_here():
    """Where the suite runs with numba (CI: linux x86_64), the marker must select it."""
    import importlib.util

    cfg = (ROOT / "setup.cfg").read_text()
    line = next(x.strip() for x in cfg.splitlines() if x.strip().startswith("numba"))
    if importlib.util.find_spec("numba") is None:
        pytest.skip("numba not installed here")
    assert Requirement(line).marker.evaluate()


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

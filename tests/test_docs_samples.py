"""The Python samples in README.md and docs/ run as written.

A fenced block whose info string is ``python`` is a complete program: the blocks of one page run
in order, in one namespace, in a fresh temporary folder, and must not raise. A block marked
``python {.fragment}`` (a few lines out of a larger program, e.g. ``train(model)`` with no
``train``) is only compiled. mkdocs renders both the same (pymdownx.superfences reads the
attribute as a CSS class), and GitHub highlights both as Python.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
_BLOCK = re.compile(r"^```(python[^\n]*)\n(.*?)^```\s*$", re.S | re.M)


def samples(page: Path) -> list[tuple[int, bool, str]]:
    """(line, is_fragment, code) for each Python block of the page."""
    text = page.read_text()
    out = []
    for m in _BLOCK.finditer(text):
        info, code = m.group(1), m.group(2)
        line = text.count("\n", 0, m.start()) + 2
        out.append((line, ".fragment" in info, code))
    return out


WITH_SAMPLES = [p for p in PAGES if samples(p)]


@pytest.mark.parametrize("page", WITH_SAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_samples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs_sample__"}
    for line, fragment, code in samples(page):
        where = f"{page.relative_to(ROOT)}:{line}"
        compiled = compile(code, where, "exec")  # a fragment must still be valid Python
        if fragment:
            continue
        try:
            exec(compiled, namespace)
        except Exception as exc:
            pytest.fail(
                f"{where}: the sample raised {type(exc).__name__}: {exc}\n"
                "Fix the sample, or mark it as a fragment (```python {.fragment}) if it is not "
                "meant to run on its own."
            )
    assert os.getcwd() == str(tmp_path)


def test_the_marker_is_recognised():
    page = ROOT / "docs" / "testing.md"
    assert any(fragment for _, fragment, _ in samples(page))
    assert any(not fragment for _, fragment, _ in samples(ROOT / "docs" / "index.md"))

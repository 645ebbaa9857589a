"""Every cause id the differ's diagnosis can emit has a row in the README's diagnoses table and
in docs/diagnoses.md. The ids are read from the code (every ``Cause("id", ...)`` in
graddiff/diff/), not from a list kept here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _emitted_ids() -> set[str]:
    ids, odd = set(), []
    for path in sorted((ROOT / "graddiff" / "diff").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Cause"):
                continue
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                ids.add(first.value)
            else:  # an id that is not a literal could not be checked against the tables
                odd.append(f"{path.name}:{node.lineno}")
    assert not odd, f"Cause ids must be string literals: {odd}"
    return ids


def _table_ids(text: str) -> set[str]:
    """The ids named in the first column of a markdown table (`id`, or several)."""
    ids = set()
    for line in text.splitlines():
        if line.startswith("|"):
            ids |= set(re.findall(r"`([a-z_]+)`", line.split("|")[1]))
    return ids


def test_the_scan_finds_the_known_causes():
    ids = _emitted_ids()
    # the scan works (a broken scan would make the table tests pass vacuously)
    assert {"learning_rate", "weight_decay", "rounding", "unknown", "step_mismatch"} <= ids
    assert len(ids) >= 20


def test_every_cause_is_in_docs_diagnoses():
    missing = _emitted_ids() - _table_ids((ROOT / "docs" / "diagnoses.md").read_text())
    assert not missing, f"cause ids without a row in docs/diagnoses.md: {sorted(missing)}"


def test_every_cause_is_in_the_readme_table():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Diagnoses", 1)[1].split("\n## ", 1)[0]
    assert "docs/diagnoses.md" in section
    missing = _emitted_ids() - _table_ids(section)
    assert not missing, (
        f"cause ids without a row in the README's diagnoses table: {sorted(missing)}"
    )

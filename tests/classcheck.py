"""Does a sentence name a record without its module class? (every output: ``fc1.weight (Linear)``)

``unlabelled(text, names)`` lists each occurrence of a classed record or module name in ``text``
that is not followed by its class, directly (``fc1.weight (Linear)``) or as one of a group of
neighbours sharing it (``fc1.weight, fc1.bias (both Linear)``, graddiff.modclass.describe_list).
Names that read as numbers (``0``, a Sequential's child) are skipped: "step 0" is not a module.
"""

from __future__ import annotations

import re

import graddiff
from graddiff.modclass import class_of

_NAME = r"[\w.\[\]:()-]+?"  # another record name (after its kind) in a group of neighbours


def unlabelled(text: str, names: dict[str, str]) -> list[str]:
    """Occurrences of a classed name in ``text`` not followed by its class."""
    bad = []
    for name, cls in names.items():
        if re.fullmatch(r"[\d.]+", name):
            continue
        pat = rf"(?<![\w.]){re.escape(name)}(?!\w|\.\w|\()"  # "D(x)": code, a call
        for m in re.finditer(pat, text):
            tail = text[m.end() :]
            group = rf"^(?:,\s+(?:[a-z_]+ )?{_NAME}(?=[,\s]))*\s+\((?:both\s+|all\s+)?{re.escape(cls)}\)"
            if not re.match(group, tail):
                bad.append(f"{name} (expected {cls}): ...{text[m.start() : m.end() + 40]}...")
    return bad


def classed_names(paths, classes: dict[str, str]) -> dict[str, str]:
    """Every record and module name of these runs whose class is known -> that class."""
    out = {}
    for path in paths:
        with graddiff.open(path) as run:
            for k in run.keys:
                cls = class_of(classes, k.kind, k.name)
                if cls and not k.name.startswith("("):
                    out[k.name] = cls
    for mod, cls in classes.items():
        if not mod.startswith("("):
            out[mod] = cls
    return out


def diagnosis_unlabelled(report) -> list[str]:
    """Bare names in the titles, evidence and fixes of a comparison's diagnosis."""
    names = classed_names((report.run_a, report.run_b), report.module_classes)
    sentences = [s for c in report.diagnosis for s in (c.title, *c.evidence, c.fix)]
    return [b for s in sentences for b in unlabelled(s, names)]

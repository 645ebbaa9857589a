"""The namespace and banner of ``graddiff shell``: a pure function, tested without a terminal.

Data flow: paths --graddiff.open / graddiff.compare--> {a, b, runs, report, np, graddiff}.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..reader import open_run


def build_namespace(paths: list[str], *, compare: bool = True) -> tuple[dict[str, Any], str]:
    """Open the runs as ``a``, ``b``; compare two runs as ``report``; import numpy as ``np``."""
    import graddiff

    runs = [open_run(p) for p in paths]
    ns: dict[str, Any] = {"np": np, "graddiff": graddiff, "runs": runs}
    lines = ["graddiff shell: loaded"]
    for name, run in zip("ab", runs):
        ns[name] = run
        lines.append(
            f"  {name} = graddiff.open({run.path!r})  # {len(run.steps)} steps, {len(run.keys)} records"
        )
    if len(runs) == 2 and compare:
        report = graddiff.compare(runs[0].path, runs[1].path)
        ns["report"] = report
        verdict = getattr(report, "headline", None)
        lines.append(
            f"  report = graddiff.compare(a.path, b.path)  # {verdict() if callable(verdict) else report}"
        )
    lines.append("  np = numpy, graddiff")
    lines.append(
        "Try: a.steps, a.names('grad'), a.stats('grad', NAME, STEP), a.get(KIND, NAME, STEP), "
        "a.check().findings" + (", report.first, report.plot('div.png')" if "report" in ns else "")
    )
    return ns, "\n".join(lines)


def close_namespace(ns: dict[str, Any]) -> None:
    for run in ns.get("runs", []):
        run.close()

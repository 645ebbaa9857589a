"""A self-contained HTML report of a comparison (``graddiff compare --html``, ``Report.html``).

Data flow: ``graddiff.diff.Report`` --to_dict() + plot_divergence()--> one HTML file with inline
CSS and the heatmap embedded as a base64 PNG: no network, no external files. The JSON fields
are rendered generically (dicts as key/value tables, lists of dicts as tables), so fields the
differ adds later still show.
"""

from __future__ import annotations

import base64
import html
import io
import os
from typing import Any, Optional

from ..errors import GraddiffError
from ..textsafe import printable

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
.verdict{padding:.8em 1em;border-radius:6px;font-size:1.1em;font-weight:600}
.diverged{background:#fde2e1;border:1px solid #e0a3a0}.same{background:#e3f4e1;border:1px solid #9fd19a}
.within_tolerance{background:#fff4d6;border:1px solid #e6cf86}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}code,td{font-family:ui-monospace,Menlo,Consolas,monospace}
img{max-width:100%;border:1px solid #eee}.muted{color:#777}
"""


def _e(x: Any) -> str:
    """HTML-escaped, with control characters shown as escapes (``graddiff.textsafe``)."""
    return html.escape(printable("" if x is None else x))


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def render_value(v: Any) -> str:
    """Any JSON value as HTML: tables for dicts and lists of dicts, escaped text otherwise."""
    if isinstance(v, dict):
        if not v:
            return '<span class="muted">none</span>'
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{render_value(x)}</td></tr>" for k, x in v.items())
        return f"<table>{rows}</table>"
    if isinstance(v, list):
        if not v:
            return '<span class="muted">none</span>'
        if all(isinstance(x, dict) for x in v):
            cols = list(dict.fromkeys(k for x in v for k in x))
            head = "".join(f"<th>{_e(c)}</th>" for c in cols)
            body = "".join(
                "<tr>" + "".join(f"<td>{render_value(x.get(c))}</td>" for c in cols) + "</tr>"
                for x in v
            )
            return f"<table><tr>{head}</tr>{body}</table>"
        return _e(", ".join(_fmt(x) for x in v))
    return _e(_fmt(v)) if v is not None else '<span class="muted">-</span>'


def _heatmap_img(report: Any) -> str:
    try:
        from .plots import plot_divergence

        fig = plot_divergence(report)
    except GraddiffError as exc:  # matplotlib missing: the report still renders
        return f'<p class="muted">No heatmap: {_e(exc)}</p>'
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="divergence heatmap" src="data:image/png;base64,{data}">'


def _growth_table(growth: dict) -> str:
    rows = []
    for kind, pts in growth.items():
        pts = [(s, r) for s, r in pts if r is not None]
        if not pts:
            continue
        nonzero = [(s, r) for s, r in pts if r]
        first = nonzero[0][0] if nonzero else "-"
        rows.append(
            {
                "kind": kind,
                "first step with a difference": first,
                "last step": pts[-1][0],
                "rel diff at last step": pts[-1][1],
                "max rel diff": max(r for _, r in pts),
            }
        )
    return render_value(rows)


def render_html(report: Any, title: Optional[str] = None) -> str:
    """The HTML text of the report."""
    d = report.to_dict()
    a, b = os.path.basename(str(report.run_a)), os.path.basename(str(report.run_b))
    title = title or f"graddiff: {a} vs {b}"
    verdict = d.get("verdict") or ("diverged" if d.get("diverged") else "same")
    css_class = {
        "identical": "same",
        "diverged": "diverged",
        "within_tolerance": "within_tolerance",
    }.get(verdict, "diverged" if d.get("diverged") else "same")
    headline = d.get("headline") or ("DIVERGED" if d.get("diverged") else "No divergence")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="muted">A: <code>{_e(report.run_a)}</code><br>B: <code>{_e(report.run_b)}</code></p>',
        f'<div class="verdict {css_class}">{_e(headline)}</div>',
        "<h2>Diagnosis</h2>",
        render_value(d.get("diagnosis")),
        "<h2>Environment differences</h2>",
        render_value(d.get("environment_diff")),
        "<h2>Divergence heatmap</h2>",
        _heatmap_img(report),
        "<h2>First divergence</h2>",
        render_value(d.get("first")),
        "<h2>First bitwise difference</h2>",
        render_value(d.get("first_bitwise")),
        "<h2>Growth of the difference per kind</h2>",
        _growth_table(d.get("growth") or {}),
    ]
    for key in ("steps", "structure", "notes"):
        if d.get(key):
            parts += [f"<h2>{_e(key.capitalize())}</h2>", render_value(d[key])]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(report: Any, path: Any, *, title: Optional[str] = None) -> str:
    """Write the self-contained HTML report to ``path``; returns the path."""
    path = os.fspath(path)
    text = render_html(report, title)
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as exc:
        raise GraddiffError(
            f"{path}: cannot write the HTML report ({exc.strerror or exc})"
        ) from None
    return path

"""Self-contained interactive HTML reports: one file, no network, no external files.

``graddiff compare --html`` / ``Report.html``: verdict, cause and fix first; the divergence
heatmap (steps x records, log10 relative difference, tolerance and first divergence marked,
hover values, drag to zoom, a filter box); the growth of the difference per kind; the loss of
both runs; a sortable table of records; the environment diff. ``graddiff show --html`` /
:func:`write_run_html`: one run's loss, per-layer gradient and parameter norms, findings.

Data flow: Report / Run --> plain dicts (this module) --> JSON inside the page --> the
hand-written script of ``htmlassets`` draws it. Heatmaps travel as log10 values quantised to
16 bits (0.0006 decades: three significant digits on hover), deflate-compressed when that
pays, base64 in the page.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import zlib
from typing import Any, Optional

import numpy as np

from ..diff.report import status_text
from ..errors import GraddiffError
from ..kinds import CAUSAL_RANK, GRADIENT_KINDS
from ..modclass import class_of, with_class
from ..textsafe import printable
from .htmlassets import CSS, JS
from .series import collect_series, loss_curve
from .termchart import use_log

#: codes of the 16-bit heatmap encoding (everything else: a quantised log10 value)
ABSENT, ZERO, NONFINITE = 0, 1, 65535
_LEVELS = 65532  # codes 2 .. 65534


def _e(x: Any) -> str:
    """HTML-escaped, with control characters shown as escapes (``graddiff.textsafe``)."""
    return html.escape(printable("" if x is None else x))


def _printable(obj: Any) -> Any:
    """Every string in the page's data with control characters shown as escapes."""
    if isinstance(obj, str):
        return printable(obj)
    if isinstance(obj, dict):
        return {k: _printable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_printable(v) for v in obj]
    return obj


def _g(x: Optional[float]) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a" if x is None else str(x)
    return f"{x:.3g}" if x == 0 or 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"


def encode_heatmap(values: np.ndarray, nonfinite: Optional[np.ndarray] = None) -> dict[str, Any]:
    """``values`` (rows x steps, >= 0, NaN = absent) as the page's 16-bit log10 encoding."""
    v = np.asarray(values, dtype=np.float64)
    codes = np.full(v.shape, ABSENT, dtype="<u2")
    present = np.isfinite(v)
    zero = present & (v == 0)
    pos = present & (v > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(pos, np.log10(np.where(pos, v, 1.0)), np.nan)
    finite = logs[pos]
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 0.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    codes[zero] = ZERO
    codes[pos] = (2 + np.round((logs[pos] - lo) / (hi - lo) * (_LEVELS - 1))).astype("<u2")
    if nonfinite is not None:
        codes[np.asarray(nonfinite, bool)] = NONFINITE
    raw = np.ascontiguousarray(codes).tobytes()
    packed = zlib.compress(raw, 6)
    deflate = len(packed) < 0.8 * len(raw)
    data = base64.b64encode(packed if deflate else raw).decode("ascii")
    return {"lo": lo, "hi": hi, "deflate": deflate, "data": data}


def _row(display: str, kind: str, cls: Optional[str]) -> dict[str, Any]:
    return {"display": display, "search": f"{display} {kind} {cls or ''}".lower()}


def _page(title: str, body: str, data: dict[str, Any]) -> str:
    payload = json.dumps(_printable(data), allow_nan=False, separators=(",", ":"))
    payload = payload.replace("<", "\\u003c")
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
            body,
            '<div id="tip" role="tooltip"></div>',
            f'<script type="application/json" id="graddiff-data">{payload}</script>',
            f"<script>{JS}</script>",
            "</body></html>",
        ]
    )


def _facts(pairs: list[tuple[str, Any]]) -> str:
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in pairs if v not in (None, ""))
    return f'<dl class="facts">{rows}</dl>'


def _filter_box(what: str) -> str:
    return (
        '<div class="toolbar"><input type="search" id="filter" autocomplete="off" '
        f'placeholder="filter {what}: name, class or kind (words AND-ed)" '
        'aria-label="filter records"><span id="filter-count" class="muted small"></span></div>'
    )


def _json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (np.floating,)):
        return _json_safe(float(x))
    if isinstance(x, (np.integer,)):
        return int(x)
    return x


# -- comparison report ------------------------------------------------------------------------
def _cause_html(report: Any) -> str:
    if not report.diagnosis:
        return ""
    main, *rest = report.diagnosis
    label = "Likely cause" if report.diverged else "Explanation"
    parts = [f'<div class="cause"><div class="title">{_e(label)}: {_e(main.title)}</div>']
    if main.evidence:
        parts.append("<ul>" + "".join(f"<li>{_e(x)}</li>" for x in main.evidence) + "</ul>")
    if main.fix:
        parts.append(f'<div class="fix"><b>Fix:</b> {_e(main.fix)}</div>')
    for c in rest:
        parts.append(f'<div class="cause"><div class="title">Also: {_e(c.title)}</div>')
        if c.evidence:
            parts.append("<ul>" + "".join(f"<li>{_e(x)}</li>" for x in c.evidence) + "</ul>")
        if c.fix:
            parts.append(f'<div class="fix"><b>Fix:</b> {_e(c.fix)}</div>')
        parts.append("</div>")
    parts.append("</div>")
    return "".join(parts)


def _difference_html(d: Any, title: str) -> str:
    if d is None:
        return ""
    side = []
    for tag, facts in (("A", d.a), ("B", d.b)):
        if not facts:
            side.append((tag, "absent"))
            continue
        norm = "n/a (sum of calls)" if facts.get("norm") is None else _g(facts["norm"])
        text = f"{facts.get('dtype')} {tuple(facts.get('shape') or ())}, norm {norm}"
        if facts.get("nan") or facts.get("inf"):
            text += f", {facts['nan']} NaN, {facts['inf']} Inf"
        side.append((tag, text))
    rel = None
    if d.rel_diff is not None:
        rel = _g(d.rel_diff) + (" (lower bound, from statistics)" if d.basis == "stats" else "")
    pairs = [
        ("step", d.step),
        ("record", d.described),
        ("status", status_text(d.status)),
        ("relative difference", rel),
        ("max abs difference", None if d.max_abs_diff is None else _g(d.max_abs_diff)),
        (
            "largest at",
            None
            if d.index is None
            else f"index {tuple(d.index)}: A {_g(d.a_value)} vs B {_g(d.b_value)}",
        ),
        (
            "elements differing",
            None if d.fraction_differing is None else f"{d.fraction_differing:.1%}",
        ),
        *side,
        ("note", d.note),
    ]
    return f"<h2>{_e(title)}</h2>" + _facts(pairs)


def _structure_html(report: Any) -> str:
    st, d = report.structure, report.describe
    items = []
    for side in ("a", "b"):
        names = st.get(f"only_in_{side}") or []
        if names:
            items.append(f"only in {side.upper()}: " + report.describe_all(names))
    for what in ("shape", "dtype"):
        for ch in st.get(f"{what}_changes") or []:
            items.append(
                f"{what} differs: {d(ch['label'])} from step {ch['step']}: {ch['a']} in A vs "
                f"{ch['b']} in B"
            )
    groups: dict[str, list[str]] = {}
    for note in st.get("pairing") or []:
        label, _, how = note.partition(": ")
        groups.setdefault(how, []).append(label)
    items += [f"paired ({how}): {report.describe_all(labels)}" for how, labels in groups.items()]
    for u in st.get("not_comparable") or []:
        items.append(
            f"not comparable bitwise (statistics only) at up to {u['steps']} step(s): "
            f"{d(u['label'])}"
        )
    if not items:
        return ""
    return "<h2>Structure</h2><ul>" + "".join(f"<li>{_e(x)}</li>" for x in items) + "</ul>"


def _records_table(report: Any, steps: np.ndarray, labels: list[str], rel: np.ndarray) -> dict:
    """One row per record: name, class, kind, first step beyond tolerance, largest difference."""
    threshold = 0.0 if report.exact else float(report.rtol)
    rows = []
    with np.errstate(invalid="ignore"):
        for j, label in enumerate(labels):
            col = rel[:, j] if rel.size else np.zeros(0)
            kind, _, rest = label.partition(" ")
            name = rest.split(" #", 1)[0]
            cls = class_of(report.module_classes, kind, name)
            finite = np.isfinite(col)
            beyond = np.flatnonzero(finite & (col > threshold))
            worst = int(np.nanargmax(np.where(finite, col, -1.0))) if finite.any() else None
            rows.append(
                {
                    "name": rest,
                    "cls": cls,
                    "kind": kind,
                    "first": int(steps[beyond[0]]) if len(beyond) else None,
                    "max": _json_safe(float(col[worst])) if worst is not None else None,
                    "at": int(steps[worst]) if worst is not None and col[worst] > 0 else None,
                    "search": f"{rest} {kind} {cls or ''}".lower(),
                }
            )
    tol = "any difference" if report.exact else f"rtol {report.rtol:g}"
    return {
        "columns": [
            {"key": "name", "label": "record"},
            {"key": "cls", "label": "module class"},
            {"key": "kind", "label": "kind"},
            {"key": "first", "label": f"first step beyond {tol}", "kind": "int"},
            {"key": "max", "label": "largest rel diff", "kind": "num"},
            {"key": "at", "label": "at step", "kind": "int"},
        ],
        "rows": rows,
    }


def _loss_overlay(report: Any) -> list[dict[str, Any]]:
    """Loss of run A and of run B (when both files are readable and recorded a loss)."""
    from ..reader import open_run

    out = []
    for tag, path, dash in (("A", report.run_a, ""), ("B", report.run_b, "6 4")):
        try:
            with open_run(path) as run:
                steps, loss = loss_curve(run)
        except (GraddiffError, OSError):
            return []
        if not len(loss):
            return []
        pts = [[int(s), _json_safe(float(v))] for s, v in zip(steps, loss)]
        out.append({"name": f"{tag}: {os.path.basename(str(path))}", "points": pts, "dash": dash})
    return out


def report_data(report: Any) -> tuple[str, dict[str, Any]]:
    """(body HTML, data for the script) of a comparison report."""
    a, b = os.path.basename(str(report.run_a)), os.path.basename(str(report.run_b))
    steps, labels, rel = report.divergence_matrix()
    steps = np.asarray(steps, dtype=np.int64)
    labels = list(labels)
    rel = np.asarray(rel, dtype=np.float64).reshape(len(steps), len(labels))
    data: dict[str, Any] = {"heatmaps": [], "charts": []}
    body = [
        f"<h1>{_e(a)} vs {_e(b)}</h1>",
        f'<div class="muted small">A: <code>{_e(report.run_a)}</code> &nbsp; '
        f"B: <code>{_e(report.run_b)}</code> &nbsp; {_e(report.steps.get('compared'))} steps "
        f"compared, tolerance {'exact' if report.exact else f'rtol {report.rtol:g}'}</div>",
        f'<div class="verdict v-{_e(report.verdict)}"><div class="head">{_e(report.headline())}'
        f"</div>{_cause_html(report)}</div>",
        _difference_html(report.first, "First divergence"),
    ]
    o = report.first_bitwise
    if o is not None and (
        report.first is None or (o.step, o.label) != (report.first.step, report.first.label)
    ):
        body.append(_difference_html(o, "First bitwise difference"))
    body.append("<h2>Where the runs differ</h2>")
    if len(steps) and labels:
        body.append(_filter_box("records"))
        body.append('<div id="heat-diff" class="heat"></div>')
        mark = None
        if report.first is not None and report.first.label in labels:
            hits = np.flatnonzero(steps == report.first.step)
            if len(hits):
                mark = {"row": labels.index(report.first.label), "col": int(hits[0])}
        tol = None if report.exact else math.log10(report.rtol)
        enc = encode_heatmap(rel.T)
        data["heatmaps"].append(
            {
                "id": "heat-diff",
                "scale": "diff",
                "steps": steps.tolist(),
                "rows": [_row(report.describe(lab), lab.split(" ", 1)[0], None) for lab in labels],
                "tol": tol,
                "tolName": f"rtol {report.rtol:g}",
                "mark": mark,
                **enc,
            }
        )
        for r, lab in zip(data["heatmaps"][0]["rows"], labels):
            kind, _, rest = lab.partition(" ")
            r["search"] = f"{report.describe(lab)} {kind}".lower()
    else:
        body.append('<p class="muted">nothing compared</p>')
    series = []
    for kind in sorted(report.growth, key=lambda k: CAUSAL_RANK.get(k, 99)):
        pts = [[int(s), _json_safe(float(r))] for s, r in report.growth[kind] if r is not None]
        if any(p[1] for p in pts):
            series.append({"name": kind, "points": pts})
    if series:
        body.append("<h2>Growth of the difference per kind</h2>")
        body.append(
            '<p class="note">the largest relative difference over the records of each '
            "kind, per step (log scale; zero: bitwise equal, not drawn)</p>"
        )
        body.append('<div id="growth"></div>')
        data["charts"].append(
            {
                "id": "growth",
                "series": series,
                "options": {
                    "log": True,
                    "ylabel": "max rel diff",
                    "hlines": []
                    if report.exact
                    else [{"y": report.rtol, "label": f"rtol {report.rtol:g}"}],
                    "vlines": [
                        {
                            "x": report.first.step,
                            "label": f"first divergence (step {report.first.step})",
                        }
                    ]
                    if report.first is not None
                    else [],
                },
            }
        )
    loss = _loss_overlay(report)
    if loss:
        values = np.array([p[1] for s in loss for p in s["points"] if p[1] is not None])
        body.append('<h2>Loss of both runs</h2><div id="loss"></div>')
        data["charts"].append(
            {"id": "loss", "series": loss, "options": {"log": use_log(values), "ylabel": "loss"}}
        )
    if labels:
        body.append("<h2>Records</h2>")
        body.append('<p class="note">click a column to sort; the filter above applies here too</p>')
        body.append('<div id="records"></div>')
        data["records"] = _records_table(report, steps, labels, rel)
    body.append("<h2>Environment differences</h2>")
    if report.environment_diff:
        body.append('<p class="note">highlighted: differences that can change the numbers</p>')
        body.append('<div id="env"></div>')
        data["env"] = [
            {
                "key": row["key"],
                "a": " ".join(map(str, row["a"])) if isinstance(row["a"], list) else row["a"],
                "b": " ".join(map(str, row["b"])) if isinstance(row["b"], list) else row["b"],
                "relevant": bool(row.get("relevant")),
            }
            for row in report.environment_diff
        ]
        data["env"] = [
            {
                k: _json_safe(v) if not isinstance(v, (dict, list)) else json.dumps(v)
                for k, v in r.items()
            }
            for r in data["env"]
        ]
    else:
        body.append('<p class="muted">no differences recorded</p>')
    body.append(_structure_html(report))
    if report.notes:
        body.append(
            "<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in report.notes) + "</ul>"
        )
    return "\n".join(body), data


def render_html(report: Any, title: Optional[str] = None) -> str:
    """The HTML text of a comparison report."""
    a, b = os.path.basename(str(report.run_a)), os.path.basename(str(report.run_b))
    body, data = report_data(report)
    return _page(title or f"graddiff: {a} vs {b}", body, data)


# -- one run ---------------------------------------------------------------------------------
def _norm_heatmap(
    run: Any, series: dict, kinds: set, steps: np.ndarray, hid: str
) -> Optional[dict]:
    keys = [k for k in series if k.kind in kinds]
    if not keys or not len(steps):
        return None
    pos = {int(s): i for i, s in enumerate(steps)}
    mat = np.full((len(keys), len(steps)), np.nan)
    bad = np.zeros(mat.shape, dtype=bool)
    rows = []
    for r, k in enumerate(keys):
        s = series[k]
        cols = [pos[int(x)] for x in s.steps]
        norms = s.norm.astype(np.float64)
        nonfinite = ~np.isfinite(norms) | (s.rows["nan"] > 0) | (s.rows["inf"] > 0)
        mat[r, cols] = np.where(nonfinite, np.nan, norms)
        bad[r, cols] = nonfinite
        label = k.name if len(kinds) == 1 else f"{k.kind} {k.name}"
        if k.call:
            label += f" (call {k.call})"
        cls = run.module_class(k.kind, k.name)
        rows.append(_row(with_class(label, cls), k.kind, cls))
    return {
        "id": hid,
        "scale": "norm",
        "steps": steps.tolist(),
        "rows": rows,
        "tol": None,
        "mark": None,
        **encode_heatmap(mat, bad),
    }


def run_data(run: Any, summary: Optional[dict] = None) -> tuple[str, dict[str, Any]]:
    """(body HTML, data for the script) of one run's page."""
    from .summary import _size, summarize

    if summary is None:
        summary = summarize(run)
    series = collect_series(run, kinds={"loss", "param", *GRADIENT_KINDS})
    steps = np.asarray(run.steps, dtype=np.int64)
    st = summary["steps"]
    data: dict[str, Any] = {"heatmaps": [], "charts": []}
    v = summary["values"]
    body = [
        f"<h1>{_e(os.path.basename(str(run.path)))}</h1>",
        f'<div class="muted small"><code>{_e(run.path)}</code></div>',
        '<div class="verdict v-run"><div class="head">'
        + _e(
            f"{st['count']} steps ({st['first']}..{st['last']}), {summary['status_text']}"
            if st["count"]
            else "no complete step"
        )
        + "</div>"
        + _facts(
            [
                (
                    "values",
                    {
                        "full": "full values at every step",
                        "stats": "statistics only",
                        "none": "-",
                        "mixed": f"full values at steps {v['full_ranges']}",
                    }[v["mode"]],
                ),
                ("file", f"{_size(summary['file_size'])}, graddiff {summary['graddiff_version']}"),
                ("created", summary.get("created")),
                ("model", summary["environment"].get("model_class")),
            ]
        )
        + "</div>",
    ]
    found = summary.get("findings")
    if found is not None:
        body.append(f"<h2>Findings ({len(found) or 'none'})</h2>")
        if not found:
            body.append('<p class="muted">graddiff check found nothing wrong</p>')
        for f in found[:200]:
            where = with_class(f"{f['record_kind']} {f['name']}", f.get("module_class"))
            body.append(
                f'<div class="finding"><b>step {_e(f["step"])}</b> &nbsp;{_e(f["kind"])} &nbsp;'
                f'<span class="where">{_e(where)}</span><br>{_e(f["message"])}</div>'
            )
        if len(found) > 200:
            body.append(f'<p class="muted">and {len(found) - 200} more (graddiff check --json)</p>')
    loss_steps, loss = loss_curve(run, series)
    body.append("<h2>Loss</h2>")
    if len(loss):
        body.append('<div id="loss"></div>')
        pts = [[int(s), _json_safe(float(x))] for s, x in zip(loss_steps, loss)]
        data["charts"].append(
            {
                "id": "loss",
                "series": [{"name": "loss", "points": pts}],
                "options": {"log": use_log(loss), "ylabel": "loss"},
            }
        )
    else:
        body.append('<p class="muted">no loss recorded</p>')
    grad_kinds = {k.kind for k in series if k.kind in GRADIENT_KINDS} or {"grad"}
    maps = [
        (grad_kinds, "heat-grad", "Gradient norm per layer"),
        ({"param"}, "heat-param", "Parameter norm per layer"),
    ]
    body.append(_filter_box("layers"))
    for kinds, hid, title in maps:
        h = _norm_heatmap(run, series, kinds, steps, hid)
        body.append(f"<h2>{_e(title)}</h2>")
        if h is None:
            body.append(f'<p class="muted">no {_e(" / ".join(sorted(kinds)))} recorded</p>')
            continue
        body.append(f'<div id="{hid}" class="heat"></div>')
        data["heatmaps"].append(h)
    rows = []
    for k, s in series.items():
        if k.kind == "loss":
            continue
        norms = s.norm.astype(np.float64)
        fin = norms[np.isfinite(norms)]
        cls = run.module_class(k.kind, k.name)
        rows.append(
            {
                "name": k.name + (f" (call {k.call})" if k.call else ""),
                "cls": cls,
                "kind": k.kind,
                "first": _json_safe(float(norms[0])) if len(norms) else None,
                "last": _json_safe(float(norms[-1])) if len(norms) else None,
                "min": _json_safe(float(fin.min())) if len(fin) else None,
                "max": _json_safe(float(fin.max())) if len(fin) else None,
                "search": f"{k.name} {k.kind} {cls or ''}".lower(),
            }
        )
    if rows:
        body.append("<h2>Records</h2>")
        body.append('<div id="records"></div>')
        data["records"] = {
            "columns": [
                {"key": "name", "label": "record"},
                {"key": "cls", "label": "module class"},
                {"key": "kind", "label": "kind"},
                {"key": "first", "label": "norm at first step", "kind": "num"},
                {"key": "last", "label": "norm at last step", "kind": "num"},
                {"key": "min", "label": "smallest norm", "kind": "num"},
                {"key": "max", "label": "largest norm", "kind": "num"},
            ],
            "rows": rows,
        }
    env = summary["environment"]
    body.append("<h2>Environment</h2>")
    if env:
        body.append('<div id="env"></div>')
        data["env"] = [
            {
                "key": key,
                "a": val
                if isinstance(val, (str, int, float, bool)) or val is None
                else json.dumps(val),
                "b": "",
            }
            for key, val in env.items()
        ]
        data["envSingle"] = True
    return "\n".join(body), data


def render_run_html(run: Any, summary: Optional[dict] = None) -> str:
    body, data = run_data(run, summary)
    return _page(f"graddiff: {os.path.basename(str(run.path))}", body, data)


def _write(path: Any, text: str) -> str:
    path = os.fspath(path)
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as exc:
        raise GraddiffError(
            f"{path}: cannot write the HTML report ({exc.strerror or exc})"
        ) from None
    return path


def write_html(report: Any, path: Any, *, title: Optional[str] = None) -> str:
    """Write the comparison report to ``path``; returns the path."""
    return _write(path, render_html(report, title))


def write_run_html(run: Any, path: Any, *, summary: Optional[dict] = None) -> str:
    """Write one run's page (loss, per-layer norms, findings) to ``path``; returns the path."""
    return _write(path, render_run_html(run, summary))

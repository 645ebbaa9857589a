"""The summary of one trace (``graddiff show``, ``Run.summary()``): a plain dict, and its text.

Data flow: Run --series--> :func:`summarize` (dict, JSON-ready) --> :func:`render_summary`
(lines of text for the CLI). The single-run findings come from :func:`check_run`.
"""

from __future__ import annotations

import textwrap
from typing import Any

import numpy as np

from ..modclass import with_class
from ..reader import Run
from .findings import check_run
from .series import collect_series, loss_curve
from .termchart import render_chart

#: Environment keys shown first, in this order; the rest follow sorted.
_ENV_FIRST = (
    "torch_version",
    "cuda_version",
    "device",
    "dtype",
    "model_class",
    "n_parameters",
    "initial_seed",
    "deterministic_algorithms",
    "cudnn_deterministic",
    "cudnn_benchmark",
    "num_threads",
    "world_size",
    "python",
    "platform",
)


def describe_ranges(steps: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``."""
    if not steps:
        return "none"
    parts, start, prev = [], steps[0], steps[0]
    for s in [*steps[1:], None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if s is not None:
            start = prev = s
    return ", ".join(parts)


def describe_status(status: str, n_steps: int) -> str:
    if status == "complete":
        return "complete"
    if status == "recording":
        return (
            f"recording: the recording process was killed or is still running; the {n_steps} "
            f"committed steps are readable"
        )
    return status


def describe_values(run: Run) -> dict[str, Any]:
    """Whether full values were stored, at which steps, and why they stopped (if they did)."""
    table = run.step_table
    full = [int(s) for s in table["step"][table["full"] != 0]]
    n = len(table)
    mode = "none" if not n else "full" if len(full) == n else "stats" if not full else "mixed"
    out: dict[str, Any] = {
        "mode": mode,
        "full_steps": len(full),
        "full_ranges": describe_ranges(full),
    }
    if (
        mode == "mixed"
        and full
        and full[-1] < int(table["step"][-1])
        and full == list(range(full[0], full[-1] + 1))
    ):
        out["stats_only_from"] = full[-1] + 1
    out["note"] = run.values_note
    return out


def summarize(run: Run, *, findings: bool = True) -> dict[str, Any]:
    """Everything ``graddiff show`` prints, as a JSON-ready dict."""
    series = collect_series(run)
    kinds: dict[str, dict[str, int]] = {}
    for key, s in series.items():
        k = kinds.setdefault(key.kind, {"records": 0, "entries": 0})
        k["records"] += 1
        k["entries"] += len(s.rows)
    for kind in run.kinds:
        kinds.setdefault(kind, {"records": 0, "entries": 0})
    steps, loss = loss_curve(run, series)
    out: dict[str, Any] = {
        "path": run.path,
        "file_size": run.file_size,
        "status": run.status,
        "status_text": describe_status(run.status, len(run.steps)),
        "created": run.created,
        "graddiff_version": run.graddiff_version,
        "steps": {
            "count": len(run.steps),
            "first": int(run.steps[0]) if len(run.steps) else None,
            "last": int(run.steps[-1]) if len(run.steps) else None,
        },
        "kinds": kinds,
        "values": describe_values(run),
        "environment": dict(run.environment),
        "options": dict(run.options),
        "loss": {"steps": [int(s) for s in steps], "values": [float(v) for v in loss]},
    }
    settings = run.optimizer_settings
    out["optimizer"] = {
        "changes": settings.to_list(),
        "lines": [[step, lines] for step, lines in settings.changes()],
    }
    if findings:
        out["findings"] = [f.to_dict() for f in check_run(run, series=series)]
    return out


#: Change steps of the optimizer settings that ``show`` prints unless asked for all.
SHOWN_CHANGES = 6


def render_optimizer(
    summary: dict[str, Any], *, columns: int = 80, full: bool = False
) -> list[str]:
    """The optimizer settings over steps: the first ones in full, then each change."""
    changes = summary.get("optimizer", {}).get("lines", [])
    if not changes:
        return ["  optimizer settings not recorded (no optimizer stepped, or an older trace)"]
    lines = ["  optimizer settings (at the update of each step; changes only)"]
    shown = changes if full else changes[:SHOWN_CHANGES]
    for step, texts in shown:
        for i, text in enumerate(texts):
            prefix = f"    step {step:<5} " if i == 0 else " " * 15
            lines += _wrap(prefix, text, columns, 17)
    if len(shown) < len(changes):
        lines += _wrap(
            "    ",
            f"... and {len(changes) - len(shown)} more change step(s), the last at step "
            f"{changes[-1][0]} (graddiff show --optimizer lists them all)",
            columns,
            8,
        )
    return lines


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _wrap(prefix: str, text: str, width: int, indent: int) -> list[str]:
    return textwrap.wrap(
        text,
        width=max(30, width),
        initial_indent=prefix,
        subsequent_indent=" " * indent,
        break_on_hyphens=False,
    ) or [prefix.rstrip()]


def render_findings(
    findings: list[dict[str, Any]], *, columns: int = 80, indent: int = 2
) -> list[str]:
    """Each finding as ``step N  kind  record (Class)`` and its message wrapped under it."""
    pad = " " * indent
    lines = []
    for f in findings:
        where = with_class(f"{f['record_kind']} {f['name']}", f.get("module_class"))
        if f.get("call"):
            where += f" (call {f['call']})"
        lines += _wrap(f"{pad}step {f['step']}  {f['kind']}  ", where, columns, indent + 4)
        lines += _wrap(pad + "    ", f["message"], columns, indent + 4)
    return lines


def render_summary(
    summary: dict[str, Any],
    *,
    width: int = 60,
    columns: int = 80,
    env: bool = False,
    optimizer: bool = False,
) -> list[str]:
    """The text of ``graddiff show``: what happened (steps, loss, findings) first, then what was
    recorded (the optimizer settings: every change when ``optimizer``), then the environment
    (one line unless ``env``). ``width``: loss chart columns;
    ``columns``: the width every line fits."""
    st = summary["steps"]
    steps = (
        f"{st['count']} ({st['first']}..{st['last']})" if st["count"] else "0 (no complete step)"
    )
    lines = [str(summary["path"]), f"  steps    {steps}"]
    lines += _wrap("  status   ", summary["status_text"], columns, 11)
    loss = summary["loss"]
    if loss["values"]:
        vals = np.array(loss["values"], dtype=np.float64)
        lines += _wrap("  loss     ", f"first {vals[0]:.4g}, {_last_loss(loss, vals)}", columns, 11)
        chart_w = max(8, min(width, columns - 16))
        lines += [
            "    " + line
            for line in render_chart(np.array(loss["steps"]), vals, width=chart_w, label="loss")
        ]
    else:
        lines.append("  loss     not recorded")
    if "findings" in summary:
        found = summary["findings"]
        lines.append(f"  findings {len(found) or 'none (graddiff check: clean)'}")
        lines += render_findings(found, columns=columns, indent=4)
    v = summary["values"]
    values = {
        "full": "full values at every step",
        "stats": "statistics only (no full values)",
        "none": "-",
        "mixed": f"full values at steps {v['full_ranges']}, statistics only elsewhere",
    }[v["mode"]]
    if "stats_only_from" in v:
        values = f"full values at steps {v['full_ranges']}, statistics only from step {v['stats_only_from']}"
    if v["note"]:
        values += f" ({v['note']})"
    lines += _wrap("  values   ", values, columns, 11)
    lines.append("  records")
    for kind, k in summary["kinds"].items():
        lines.append(f"    {kind:<14}{k['records']:>6} records {k['entries']:>9} entries")
    if "optimizer" in summary:
        lines += render_optimizer(summary, columns=columns, full=optimizer)
    lines.append(
        f"  file     {_size(summary['file_size'])}, graddiff {summary['graddiff_version']}"
        + (f", created {summary['created']}" if summary.get("created") else "")
    )
    envd = summary["environment"]
    if envd and env:
        lines.append("  environment")
        for key in [
            *(k for k in _ENV_FIRST if k in envd),
            *sorted(k for k in envd if k not in _ENV_FIRST),
        ]:
            value = envd[key]
            if key == "argv" and isinstance(value, list):
                value = " ".join(str(a) for a in value)
            lines += _wrap(f"    {key:<26}", str(value), columns, 30)
    elif envd:
        brief = ", ".join(
            f"{label} {envd[k]}"
            for k, label in (
                ("torch_version", "torch"),
                ("device", "device"),
                ("dtype", "dtype"),
                ("model_class", "model"),
            )
            if envd.get(k) is not None
        )
        lines += _wrap(
            "  environment ",
            (f"{brief} ({len(envd)} keys" if brief else f"{len(envd)} keys (")
            + "; --env lists them)",
            columns,
            4,
        )
    return [line.rstrip() for line in lines]


def _last_loss(loss: dict, vals: np.ndarray) -> str:
    """ "last 0.53", or, when the run ends in NaN/Inf, how long and since when."""
    ok = np.isfinite(vals)
    if ok[-1]:
        return f"last {vals[-1]:.4g}"
    steps = np.asarray(loss["steps"])
    if not ok.any():
        return f"non-finite at every step ({vals[-1]})"
    i = int(np.flatnonzero(ok)[-1])
    tail = len(vals) - 1 - i
    return (
        f"last {vals[-1]} (the last {tail} steps are non-finite since step {int(steps[i + 1])}; "
        f"last finite {vals[i]:.4g} at step {int(steps[i])})"
    )

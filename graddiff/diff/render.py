"""Terminal rendering of a Report with rich: the verdict first, then the evidence.

Only the CLI and ``Report.render``/``str(report)`` call this; a console that is not a terminal
gives plain text (no colour, no control codes).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .report import Report, _g

_STATUS = {
    "values": "values differ",
    "stats": "statistics differ (full values not stored)",
    "missing_in_a": "absent in A",
    "missing_in_b": "absent in B",
    "shape": "shapes differ",
    "nonfinite": "NaN/Inf at different places",
}
_STYLE = {"identical": "bold green", "within_tolerance": "bold green", "diverged": "bold red"}


def render_report(report: Report, console: Console) -> None:
    """Print verdict, likely cause, first divergence detail, growth, structure, environment."""
    console.print(Text(report.headline(), style=_STYLE[report.verdict]))
    console.print(f"A: {report.run_a}\nB: {report.run_b}", style="dim", highlight=False)
    if report.diagnosis:
        _causes(report, console)
    if report.first is not None:
        _difference_table(report, console)
    o = report.first_bitwise
    if o is not None and (
        report.first is None or (o.step, o.label) != (report.first.step, report.first.label)
    ):
        console.print(
            f"First bitwise difference: {o.label} at step {o.step} ({_rel(o)}"
            + (", rounding level" if o.rounding_level else "")
            + ")",
            highlight=False,
        )
    if report.growth and report.first_bitwise is not None:
        _growth(report, console)
    _structure(report, console)
    if report.environment_diff:
        _environment(report, console)
    else:
        console.print("Environment: no differences recorded.", style="dim", highlight=False)
    for note in report.notes:
        console.print(f"note: {note}", style="dim", highlight=False)


def _rel(d) -> str:
    """'rel X', or 'rel >= X' when judged on statistics (a lower bound)."""
    return f"rel {'>= ' if d.basis == 'stats' else ''}{_g(d.rel_diff)}"


def _causes(report: Report, console: Console) -> None:
    main, *rest = report.diagnosis
    label = "Likely cause" if report.diverged else "Explanation"
    console.print(Text.assemble((f"{label}: ", "bold"), (main.title, "bold yellow")))
    rows = [("  -", line) for line in main.evidence]
    if main.fix:
        rows.append(("  fix:", main.fix))
    _hanging(console, rows)
    for c in rest:
        console.print(f"Also: {c.title}", style="yellow", highlight=False)
        _hanging(console, [("  -", line) for line in c.evidence[:2]])


def _hanging(console: Console, rows: list[tuple[str, str]]) -> None:
    """Bullets whose wrapped lines stay indented."""
    if not rows:
        return
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True, style="bold")
    grid.add_column()
    for mark, text in rows:
        grid.add_row(mark, Text(text))
    console.print(grid)


def _difference_table(report: Report, console: Console) -> None:
    f = report.first
    t = Table(
        title="First divergence", title_justify="left", show_header=False, box=None, pad_edge=False
    )
    t.add_column(style="bold")
    t.add_column()
    t.add_row("step", str(f.step))
    t.add_row("record", f"{f.kind} {f.name}" + (f" (call {f.call})" if f.call else ""))
    t.add_row("status", _STATUS.get(f.status, f.status))
    if f.rel_diff is not None:
        t.add_row("rel diff", _g(f.rel_diff) + (" (lower bound)" if f.basis == "stats" else ""))
    if f.max_abs_diff is not None:
        t.add_row("max abs diff", _g(f.max_abs_diff))
    if f.index is not None:
        t.add_row("largest at", f"index {tuple(f.index)}: A {_g(f.a_value)} vs B {_g(f.b_value)}")
    if f.fraction_differing is not None:
        t.add_row("elements differing", f"{f.fraction_differing:.1%}")
    for side, facts in (("A", f.a), ("B", f.b)):
        t.add_row(side, _facts(facts))
    if f.note:
        t.add_row("note", f.note)
    console.print(t)


def _facts(facts: Any) -> str:
    if not facts:
        return "absent"
    norm = "n/a (sum of calls)" if facts.get("norm") is None else _g(facts["norm"])
    text = f"{facts['dtype']} {tuple(facts['shape'])}, norm {norm}"
    if facts.get("nan") or facts.get("inf"):
        text += f", {facts['nan']} NaN, {facts['inf']} Inf"
    return text


def _growth(report: Report, console: Console) -> None:
    steps = sorted({s for v in report.growth.values() for s, _ in v})
    if len(steps) > 8:  # the start, around the divergence, and the end
        pick = set(steps[:3]) | set(steps[-2:])
        if report.first is not None:
            near = [s for s in steps if s >= report.first.step][:3]
            pick |= set(near)
        steps = sorted(pick)
    t = Table(title="Growth: max relative difference per kind", title_justify="left")
    t.add_column("step", justify="right")
    kinds = list(report.growth)
    for k in kinds:
        t.add_column(k, justify="right")
    table = {k: dict(v) for k, v in report.growth.items()}
    for s in steps:
        t.add_row(str(s), *[_g(table[k].get(s)) if s in table[k] else "" for k in kinds])
    console.print(t)


def _structure(report: Report, console: Console) -> None:
    st = report.structure
    lines = []
    if st.get("only_in_a"):
        lines.append(
            f"only in A: {', '.join(st['only_in_a'][:8])}"
            + (" ..." if len(st["only_in_a"]) > 8 else "")
        )
    if st.get("only_in_b"):
        lines.append(
            f"only in B: {', '.join(st['only_in_b'][:8])}"
            + (" ..." if len(st["only_in_b"]) > 8 else "")
        )
    for ch in st.get("shape_changes", [])[:5]:
        lines.append(
            f"shape differs: {ch['label']} from step {ch['step']}: {tuple(ch['a'])} in A vs {tuple(ch['b'])} in B"
        )
    for ch in st.get("dtype_changes", [])[:5]:
        lines.append(
            f"dtype differs: {ch['label']} from step {ch['step']}: {ch['a']} in A vs {ch['b']} in B"
        )
    groups: dict[str, list[str]] = {}
    for note in st.get("pairing", []):
        label, _, how = note.partition(": ")
        groups.setdefault(how, []).append(label)
    for how, labels in groups.items():
        names = ", ".join(labels[:3]) + (f" and {len(labels) - 3} more" if len(labels) > 3 else "")
        lines.append(f"paired: {names}: {how}")
    unsure = st.get("not_comparable") or []
    if unsure:
        labels = [u["label"] for u in unsure]
        names = ", ".join(labels[:3]) + (f" and {len(labels) - 3} more" if len(labels) > 3 else "")
        steps = max(u["steps"] for u in unsure)
        lines.append(
            f"not comparable bitwise at up to {steps} step(s) (statistics only): {names}: a sum "
            "or join of several calls cannot be judged bitwise from statistics; they agree "
            "within rounding (store full values, e.g. values='full' or full_steps=[...], to "
            "compare them exactly)"
        )
    if lines:
        console.print("Structure:", style="bold")
        for line in lines:
            console.print(f"  {line}", highlight=False)


def _environment(report: Report, console: Console) -> None:
    t = Table(title="Environment differences", title_justify="left")
    t.add_column("key")
    t.add_column("A")
    t.add_column("B")
    for row in report.environment_diff:
        style = None if row["relevant"] else "dim"
        t.add_row(row["key"], _short(row["a"]), _short(row["b"]), style=style)
    console.print(t)


def _short(v: Any) -> str:
    text = " ".join(v) if isinstance(v, list) else str(v)
    return text if len(text) <= 40 else text[:37] + "..."

"""Terminal rendering of a Report with rich: the verdict first, then the evidence.

Only the CLI and ``Report.render``/``str(report)`` call this; a console that is not a terminal
gives plain text (no colour, no control codes).
"""

from __future__ import annotations

import textwrap
from typing import Any, Optional

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .report import Report, _g, _g_apart, status_text

_STYLE = {"identical": "bold green", "within_tolerance": "bold green", "diverged": "bold red"}


def render_report(report: Report, console: Console) -> None:
    """Print verdict, likely cause, first divergence detail, growth, structure, environment.

    Every line fits ``console.width``: prose wraps with a hanging indent, lists that are cut
    say how many more there are, tables that skip steps mark the gap with ``…``.
    """
    width = console.width
    _lines(console, wrap("", report.headline(), width), style=_STYLE[report.verdict])
    _lines(console, [f"A: {report.run_a}", f"B: {report.run_b}"], style="dim")
    if report.diagnosis:
        _causes(report, console)
    if report.first is not None:
        _difference_table(report, console)
    o = report.first_bitwise
    if o is not None and (
        report.first is None or (o.step, o.label) != (report.first.step, report.first.label)
    ):
        text = (
            f"{o.described} at step {o.step} ({_rel(o)}"
            + (", rounding level" if o.rounding_level else "")
            + ")"
        )
        _lines(console, wrap("First bitwise difference: ", text, width))
    if report.growth and report.first_bitwise is not None:
        _growth(report, console)
    _structure(report, console)
    if report.environment_diff:
        _environment(report, console)
    else:
        _lines(console, ["Environment: no differences recorded."], style="dim")
    for note in report.notes:
        _lines(console, wrap("note: ", note, width), style="dim")


def wrap(prefix: str, text: str, width: int, indent: Optional[int] = None) -> list[str]:
    """``prefix + text`` wrapped at ``width``, continuation lines indented under the text."""
    pad = " " * (len(prefix) if indent is None else indent)
    return textwrap.wrap(
        text,
        width=max(20, width),
        initial_indent=prefix,
        subsequent_indent=pad,
        break_long_words=True,
        break_on_hyphens=False,
    ) or [prefix.rstrip()]


def more(items: list[str], limit: int, sep: str = ", ") -> str:
    """The first ``limit`` items joined, and ``and N more`` when there are more."""
    shown = sep.join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _lines(console: Console, lines: list[str], style: Optional[str] = None) -> None:
    """Print pre-wrapped plain lines (no markup, no highlighting, no re-wrapping)."""
    for line in lines:
        console.print(Text(line, style=style or ""), soft_wrap=True)


def _rel(d) -> str:
    """'rel X', or 'rel >= X' when judged on statistics (a lower bound)."""
    return f"rel {'>= ' if d.basis == 'stats' else ''}{_g(d.rel_diff)}"


def _causes(report: Report, console: Console) -> None:
    width = console.width
    main, *rest = report.diagnosis
    label = "Likely cause" if report.diverged else "Explanation"
    _lines(console, wrap(f"{label}: ", main.title, width), style="bold yellow")
    lines: list[str] = []
    for line in main.evidence:
        lines += wrap("  - ", line, width)
    if main.fix:
        lines += wrap("  fix: ", main.fix, width)
    _lines(console, lines)
    for c in rest:
        _lines(console, wrap("Also: ", c.title, width), style="yellow")
        lines = []
        for line in c.evidence[:2]:
            lines += wrap("  - ", line, width)
        if len(c.evidence) > 2:
            lines.append(f"  ({len(c.evidence) - 2} more in --json)")
        _lines(console, lines)


def _difference_table(report: Report, console: Console) -> None:
    f = report.first
    t = Table(
        title="First divergence", title_justify="left", show_header=False, box=None, pad_edge=False
    )
    t.add_column(style="bold")
    t.add_column()
    t.add_row("step", str(f.step))
    t.add_row("record", f.described)
    t.add_row("status", status_text(f.status))
    if f.rel_diff is not None:
        limit = f.tolerance if f.tolerance is not None else report.rtol
        rel = _g_apart(f.rel_diff, limit)[0]
        t.add_row("rel diff", rel + (" (lower bound)" if f.basis == "stats" else ""))
    if f.max_abs_diff is not None:
        t.add_row("max abs diff", _g(f.max_abs_diff))
    if f.index is not None:
        va, vb = _g_apart(f.a_value, f.b_value)
        t.add_row("largest at", f"index {tuple(f.index)}: A {va} vs B {vb}")
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
    """Kinds down, steps across: as many step columns as the width allows, gaps marked ``…``."""
    kinds = [k for k in report.growth if report.growth[k]]
    table = {k: dict(report.growth[k]) for k in kinds}
    steps = sorted({s for k in kinds for s in table[k]})
    if not steps:
        return
    first = report.first.step if report.first else None
    for n in range(len(steps), min(2, len(steps) - 1), -1):  # most columns that fit
        cols = _with_gaps(steps, _pick_steps(steps, n, first))
        cells = {
            k: ["…" if s is None else (_g(table[k][s]) if s in table[k] else "") for s in cols]
            for k in kinds
        }
        widths = [
            max(1 if s is None else len(str(s)), *(len(cells[k][i]) for k in kinds))
            for i, s in enumerate(cols)
        ]
        # each column: its cells, one space of padding either side, one for the divider
        if max(len(k) for k in kinds) + 2 + sum(w + 3 for w in widths) <= console.width:
            break
    t = Table(
        title="Growth: max relative difference per kind",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1),
    )
    t.add_column("step", no_wrap=True)
    for s in cols:
        t.add_column("…" if s is None else str(s), justify="right", no_wrap=True)
    for k in kinds:
        t.add_row(k, *cells[k])
    console.print(t)


def _with_gaps(steps: list[int], shown: list[int]) -> list[Optional[int]]:
    """``shown`` with None wherever steps between two shown ones are left out."""
    out: list[Optional[int]] = []
    for i, s in enumerate(shown):
        if i and steps.index(s) != steps.index(shown[i - 1]) + 1:
            out.append(None)
        out.append(s)
    return out


def _pick_steps(steps: list[int], n: int, first: Optional[int]) -> list[int]:
    """At most ``n`` steps: the start, around the first divergence, and the end."""
    if len(steps) <= n:
        return steps
    pick = set(steps[:2]) | set(steps[-2:])
    if first is not None:
        pick |= set([s for s in steps if s >= first][:3])
    rest = [s for s in steps if s not in pick]
    while len(pick) < n and rest:  # fill evenly
        pick.add(rest.pop(len(rest) // 2))
    return sorted(pick)[:n] if len(pick) > n else sorted(pick)


def _structure(report: Report, console: Console) -> None:
    st = report.structure
    d = report.describe
    lines = []
    if st.get("only_in_a"):
        lines.append("only in A: " + report.describe_all(st["only_in_a"], 8))
    if st.get("only_in_b"):
        lines.append("only in B: " + report.describe_all(st["only_in_b"], 8))
    for what in ("shape", "dtype"):
        changes = st.get(f"{what}_changes", [])
        for ch in changes[:5]:
            a, b = (tuple(ch[x]) if what == "shape" else ch[x] for x in ("a", "b"))
            lines.append(
                f"{what} differs: {d(ch['label'])} from step {ch['step']}: {a} in A vs {b} in B"
            )
        if len(changes) > 5:
            lines.append(f"{what} differs: {len(changes) - 5} more records")
    groups: dict[str, list[str]] = {}
    for note in st.get("pairing", []):
        label, _, how = note.partition(": ")
        groups.setdefault(how, []).append(label)
    for how, labels in groups.items():
        lines.append(f"paired: {report.describe_all(labels, 3)}: {how}")
    unsure = st.get("not_comparable") or []
    if unsure:
        labels = [u["label"] for u in unsure]
        steps = max(u["steps"] for u in unsure)
        lines.append(
            f"not comparable bitwise at up to {steps} step(s) (statistics only): "
            f"{report.describe_all(labels, 3)}: a sum "
            "or join of several calls cannot be judged bitwise from statistics; they agree "
            "within rounding (store full values, e.g. values='full' or full_steps=[...], to "
            "compare them exactly)"
        )
    if lines:
        _lines(console, ["Structure:"], style="bold")
        out: list[str] = []
        for line in lines:
            out += wrap("  ", line, console.width, indent=4)
        _lines(console, out)


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

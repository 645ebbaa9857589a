"""``graddiff compare A.h5 B.h5``: the thin CLI shell over ``graddiff.compare``.

The Report owns the verdict and the exit code (0 same within tolerance, 1 diverged); input
problems raise GraddiffError, which the CLI group turns into one ``Error:`` line and exit 2.
"""

from __future__ import annotations

import json
from typing import Optional

import click

from ..diff import DEFAULT_RTOL, compare
from . import terminal_console


@click.command("compare")
@click.argument("run_a", metavar="A.h5")
@click.argument("run_b", metavar="B.h5")
@click.option("--exact", is_flag=True, help="Any bitwise difference is a divergence.")
@click.option(
    "--rtol",
    type=float,
    default=None,
    help=f"Tolerance on ||a-b|| / max(||a||,||b||) per tensor (default {DEFAULT_RTOL:g}).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object instead of the report."
)
@click.option(
    "--steps",
    default=None,
    metavar="RANGE",
    help="Steps to compare: K, LO:HI, LO: or :HI (inclusive).",
)
@click.option(
    "--kinds", default=None, multiple=True, help="Kinds to compare (repeat or comma-separate)."
)
@click.option(
    "--html", "html_path", default=None, metavar="FILE", help="Also write an HTML report."
)
def compare_cmd(
    run_a: str,
    run_b: str,
    exact: bool,
    rtol: Optional[float],
    as_json: bool,
    steps: Optional[str],
    kinds: tuple[str, ...],
    html_path: Optional[str],
) -> int:
    """Find where two runs diverge: the first step, kind and record, and the likely cause.

    Exit code 0: no divergence beyond the tolerance; 1: diverged; 2: usage or input error.
    """
    report = compare(run_a, run_b, rtol=rtol, exact=exact, steps=steps, kinds=list(kinds) or None)
    if html_path:
        report.html(html_path)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, allow_nan=False))
    else:
        report.render(terminal_console())
    return report.exit_code

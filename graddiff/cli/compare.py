"""``graddiff compare A.h5 B.h5``: the thin CLI shell over ``graddiff.compare``.

The Report owns the verdict and the exit code (0 same within tolerance, 1 diverged); input
problems raise GraddiffError, which the CLI group turns into one ``Error:`` line and exit 2.
"""

from __future__ import annotations

import json
from typing import Optional

import click

from ..diff import DEFAULT_RTOL, compare
from ..ranks.sides import split_sides
from . import terminal_console


@click.command("compare")
@click.argument("runs", nargs=-1, required=True, metavar="A.h5 B.h5")
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
    "--map",
    "name_map",
    default=None,
    metavar="MAP",
    help="Rules from B's names to A's (a .yaml/.json file), or 'auto' (docs/porting.md).",
)
@click.option(
    "--steps-a", default=None, metavar="RANGE", help="A's steps, e.g. 500: (resumed runs)."
)
@click.option("--steps-b", default=None, metavar="RANGE", help="B's steps, e.g. 0: (resumed runs).")
@click.option(
    "--offset", type=int, default=None, help="Compare B's step s with A's step s + OFFSET."
)
@click.option(
    "--reduction",
    type=click.Choice(["mean", "sum"]),
    default=None,
    help="Loss reduction of a side of several rank files (default: detected).",
)
@click.option(
    "--noise",
    default=None,
    metavar="TWIN",
    help="A perturbed twin of A or B (trace(..., perturb='ulp'|'bfloat16')): tolerance per "
    "record and step.",
)
@click.option(
    "--noise-of",
    type=click.Choice(["A", "B"], case_sensitive=False),
    default=None,
    help="The run the --noise twin is a copy of (default: the one whose dtypes it shares, else A).",
)
@click.option(
    "--html", "html_path", default=None, metavar="FILE", help="Also write an HTML report."
)
def compare_cmd(
    runs: tuple[str, ...],
    exact: bool,
    rtol: Optional[float],
    as_json: bool,
    steps: Optional[str],
    kinds: tuple[str, ...],
    name_map: Optional[str],
    steps_a: Optional[str],
    steps_b: Optional[str],
    offset: Optional[int],
    reduction: Optional[str],
    noise: Optional[str],
    noise_of: Optional[str],
    html_path: Optional[str],
) -> int:
    """Find where two runs diverge: the first step, kind and record, and the likely cause.

    A side may be the ranks of one data-parallel run: a quoted glob ("ddp/run_*.h5") or its
    files listed one after the other; they are merged into the global batch
    (docs/distributed.md).

    Exit code 0: no divergence beyond the tolerance; 1: diverged; 2: usage or input error.
    """
    side_a, side_b = split_sides(runs)
    report = compare(
        side_a if len(side_a) > 1 else side_a[0],
        side_b if len(side_b) > 1 else side_b[0],
        rtol=rtol,
        exact=exact,
        steps=steps,
        kinds=list(kinds) or None,
        name_map=name_map,
        steps_a=steps_a,
        steps_b=steps_b,
        offset=offset,
        reduction=reduction,
        noise=noise,
        noise_of=noise_of,
    )
    if html_path:
        report.html(html_path)
        click.echo(f"wrote {html_path}", err=True)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, allow_nan=False))
    else:
        report.render(terminal_console())
    return report.exit_code

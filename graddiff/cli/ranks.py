"""``graddiff ranks run_*.h5``: the thin CLI shell over ``graddiff.check_ranks``.

Exit codes as ``compare``: 0 consistent, 1 inconsistent, 2 usage or input error (one line).
"""

from __future__ import annotations

import json
from typing import Optional

import click

from ..ranks import check_ranks
from . import terminal_console


@click.command("ranks")
@click.argument("files", nargs=-1, required=True, metavar="RUN_0.h5 RUN_1.h5 ... | 'run_*.h5'")
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object instead of the report."
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Processes that read the rank files (default: chosen from the file count, their size "
    "and the CPUs; 1: one after another in this process).",
)
def ranks_cmd(files: tuple[str, ...], as_json: bool, workers: Optional[int]) -> int:
    """Check that the ranks of one data-parallel run agree: parameters, step-start buffers and
    all-reduced gradients must be bitwise equal on every rank. Names the first step, record
    and odd rank (by majority), and the cause.

    Exit code 0: consistent; 1: inconsistent; 2: usage or input error.
    """
    report = check_ranks(list(files), workers=workers)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, allow_nan=False))
    else:
        report.render(terminal_console())
    return report.exit_code

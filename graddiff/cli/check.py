"""``graddiff check RUN.h5``: single-run findings; exit 0 clean, 1 findings, 2 bad input."""

from __future__ import annotations

import click

from ..postmortem.findings import FINDING_KINDS, check_run
from ..postmortem.jsonout import dumps
from ..postmortem.summary import render_findings
from ..reader import open_run
from ..textsafe import echo
from . import terminal_console


@click.command("check")
@click.argument("run_path", metavar="RUN.h5")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@click.option(
    "--ignore",
    multiple=True,
    type=click.Choice(FINDING_KINDS),
    help="Leave out findings of this kind (repeatable).",
)
def check_cmd(run_path: str, as_json: bool, ignore: tuple[str, ...]) -> int:
    """Find what went wrong in one run: the first NaN/Inf, .grad accumulating across steps,
    exploding or vanishing gradients, parameters that never change, dead ReLU units.

    Each finding names the step, the record (kind and layer) and the evidence.
    Exit code 0 clean, 1 findings, 2 bad input.
    """
    with open_run(run_path) as run:
        report = check_run(run, ignore=ignore)
    if as_json:
        echo(dumps(report.to_dict()))
        return report.exit_code
    if report.clean:
        echo(f"{run_path}: clean ({report.n_steps} steps checked)")
        return 0
    n = len(report)
    echo(f"{run_path}: {n} finding{'s' if n > 1 else ''} in {report.n_steps} steps")
    columns = terminal_console().width
    for line in render_findings([f.to_dict() for f in report], columns=columns):
        echo(line)
    return report.exit_code

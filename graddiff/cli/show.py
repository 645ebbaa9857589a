"""``graddiff show RUN.h5``: the summary of one trace (a thin shell over postmortem.summary)."""

from __future__ import annotations

from typing import Optional

import click

from ..postmortem.jsonout import dumps
from ..postmortem.summary import render_summary, summarize
from ..reader import open_run
from ..textsafe import echo
from . import terminal_console


@click.command("show")
@click.argument("run_path", metavar="RUN.h5")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--no-check", is_flag=True, help="Leave out the findings of 'graddiff check'.")
@click.option("--width", default=60, show_default=True, help="Columns of the loss chart.")
@click.option("--env", "env", is_flag=True, help="List the recorded environment in full.")
@click.option(
    "--optimizer",
    "optimizer",
    is_flag=True,
    help="List every change of the recorded optimizer settings (lr per step, ...).",
)
@click.option(
    "--html",
    "html_path",
    default=None,
    metavar="FILE",
    help="Also write an interactive HTML page: loss, per-layer gradient and parameter norms.",
)
def show_cmd(
    run_path: str,
    as_json: bool,
    no_check: bool,
    width: int,
    env: bool,
    optimizer: bool,
    html_path: Optional[str],
) -> int:
    """Summarise one trace: steps, loss, findings, then what was recorded and the environment.

    Exit code 0 (findings do not change it; 'graddiff check' owns that verdict), 2 for a bad file.
    """
    with open_run(run_path) as run:
        summary = summarize(run, findings=not no_check)
        if html_path:
            from ..postmortem.html import write_run_html

            write_run_html(run, html_path, summary=summary)
            echo(f"wrote {html_path}", err=True)
    if as_json:
        echo(dumps(summary))
    else:
        columns = terminal_console().width
        for line in render_summary(
            summary, width=max(8, width), columns=columns, env=env, optimizer=optimizer
        ):
            echo(line)
    return 0

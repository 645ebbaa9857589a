"""``graddiff inspect RUN.h5``: one recorded tensor's stats, fingerprint and values; or a listing."""

from __future__ import annotations

from typing import Optional

import click

from ..errors import GraddiffError
from ..postmortem.jsonout import dumps
from ..postmortem.lookup import (
    check_step,
    format_listing,
    format_record,
    list_records,
    record_at,
    resolve,
)
from ..reader import open_run
from ..textsafe import echo

MAX_SHOWN = 20


@click.command("inspect")
@click.argument("run_path", metavar="RUN.h5")
@click.option("--step", "-s", type=int, help="Step to look at (default: the first).")
@click.option(
    "--kind", "-k", help="Record kind: param, input, activation, loss, grad_output, grad, ..."
)
@click.option("--name", "-n", help="Record name, or a glob such as 'fc*.weight'.")
@click.option(
    "--call", "-c", "call_index", type=int, help="Call index (a module called twice: 0, 1)."
)
@click.option("--values", "-v", "show_values", is_flag=True, help="Print the stored values too.")
@click.option(
    "--list", "-l", "listing", is_flag=True, help="List records (filtered by --kind/--name)."
)
@click.option(
    "--threshold", default=200, show_default=True, help="Summarise arrays larger than this."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect_cmd(
    run_path: str,
    step: Optional[int],
    kind: Optional[str],
    name: Optional[str],
    call_index: Optional[int],
    show_values: bool,
    listing: bool,
    threshold: int,
    as_json: bool,
) -> int:
    """Look at one recorded tensor (or every tensor a --name glob matches), or --list names.

    Example: graddiff inspect run.h5 --step 3 --kind grad --name 'fc1.*' --values
    """
    with open_run(run_path) as run:
        if listing:
            rows = list_records(run, resolve(run, kind, name, call_index))
            if as_json:
                echo(dumps(rows))
            else:
                for line in format_listing(rows):
                    echo(line)
            return 0
        if name is None and kind is None:
            raise GraddiffError(
                f"say which record: --kind KIND --name NAME (list them: graddiff inspect {run_path} --list)"
            )
        keys = resolve(run, kind, name, call_index)
        step = check_step(run, step)
        shown = []
        for key in keys[:MAX_SHOWN]:
            try:
                shown.append(record_at(run, key, step))
            except GraddiffError:
                if len(keys) == 1:
                    raise
        if not shown:
            raise GraddiffError(
                f"{run_path}: none of the {len(keys)} matching records was recorded at step {step}"
            )
        values = {}
        if show_values:
            for st in shown:
                if st["values_stored"]:
                    values[id(st)] = run.get(st["kind"], st["name"], step, st["call"])
            if not values:
                raise GraddiffError(
                    f"{run_path}: step {step} holds statistics only for "
                    f"{'this record' if len(shown) == 1 else 'these records'}; re-record with "
                    f"graddiff.trace(..., full_steps=[{step}]) for its values"
                )
        if as_json:
            out = [
                dict(st, values=values[id(st)].tolist()) if id(st) in values else st for st in shown
            ]
            echo(dumps(out if len(out) > 1 else out[0]))
            return 0
        for i, st in enumerate(shown):
            if i:
                echo("")
            for line in format_record(st, values.get(id(st)), threshold=threshold):
                echo(line)
            if show_values and id(st) not in values:
                echo("    (values not stored at this step)")
        if len(keys) > MAX_SHOWN:
            echo(f"... {len(keys) - MAX_SHOWN} more records match; narrow --name or --kind")
    return 0

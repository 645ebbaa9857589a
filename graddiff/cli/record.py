"""``graddiff record -o run.h5 -- python train.py ARGS``: trace a script without editing it.

A thin shell over ``graddiff.record`` (imported when the command runs: torch loads only then).
The exit code is the script's; 2 with one ``Error:`` line when the command is unusable or the
script ran to the end without graddiff finding a model to record.
"""

from __future__ import annotations

import os
from typing import Optional

import click

from ..errors import GraddiffError


def _notify(message: str) -> None:
    click.echo(f"graddiff record: {message}", err=True)


@click.command(
    "record",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option(
    "-o",
    "--output",
    required=True,
    metavar="RUN.h5",
    help="The trace file. {rank} becomes the distributed rank; {model} the model's class name.",
)
@click.option(
    "--model-class",
    default=None,
    metavar="NAME",
    help="Trace the modules of this class (name or module.Class) handed to an optimizer.",
)
@click.option(
    "--model",
    "model_attr",
    default=None,
    metavar="MODULE.ATTR",
    help="Trace this object, e.g. __main__.model, when an optimizer gets its parameters.",
)
@click.option("--kinds", default=None, help="Kinds to record, comma-separated (default all).")
@click.option(
    "--modules", default=None, help="Glob patterns of module names to record, comma-separated."
)
@click.option(
    "--values",
    type=click.Choice(["auto", "full", "stats"]),
    default="auto",
    show_default=True,
    help="Full values, statistics only, or full values until --max-bytes is spent.",
)
@click.option(
    "--max-bytes",
    type=click.IntRange(min=0),
    default=None,
    help="Full-values budget of --values auto (default 2 GiB).",
)
@click.option(
    "--full-steps",
    default=None,
    metavar="K,K,...",
    help="Store full values exactly at these steps.",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="-- python SCRIPT.py [ARGS]")
def record_cmd(
    output: str,
    model_class: Optional[str],
    model_attr: Optional[str],
    kinds: Optional[str],
    modules: Optional[str],
    values: str,
    max_bytes: Optional[int],
    full_steps: Optional[str],
    command: tuple[str, ...],
) -> int:
    """Run a training script unmodified and trace the model(s) it trains.

    The models are found through the optimizers the script creates (the modules whose
    parameters an optimizer is handed), or named with --model-class / --model. Exit code: the
    script's own; 2 when there is no command, or the script ran without graddiff finding a model.

    Example: graddiff record -o a.h5 -- python train.py --lr 0.1
    """
    if model_class and model_attr:
        raise GraddiffError("--model-class and --model: choose one")
    options: dict = {"values": values}
    if kinds:
        options["kinds"] = kinds
    if modules:
        options["modules"] = [m.strip() for m in modules.split(",") if m.strip()]
    if max_bytes is not None:
        options["max_bytes"] = max_bytes
    if full_steps is not None:
        try:
            options["full_steps"] = [int(s) for s in full_steps.split(",") if s.strip()]
        except ValueError:
            raise GraddiffError(
                f"--full-steps {full_steps!r}: use step numbers, e.g. 0,10"
            ) from None
    parent = os.path.dirname(os.path.abspath(output)) or "."
    if not os.path.isdir(parent):
        raise GraddiffError(f"-o {output}: the folder {parent} does not exist")
    from ..record import parse_command, run

    parse_command(list(command))  # a bad command is a usage error before anything is imported
    code, recording = run(
        list(command),
        output,
        trace_options=options,
        model_class=model_class,
        model_attr=model_attr,
        notify=_notify,
    )
    if recording.paths or recording.left_to_script:
        return code
    if recording.script_traces:
        _notify(
            f"nothing recorded by graddiff record: the script traced its models itself "
            f"({recording.script_traces} graddiff.trace block(s))"
        )
        return code
    if recording.failures:
        why = f"recording could not start ({recording.failures[0]})"
    elif recording.optimizers == 0:
        why = "the script created no optimizer (graddiff record finds models through the optimizer their parameters are handed to)"
    elif model_class or model_attr:
        why = f"no optimizer was handed the parameters of {model_class or model_attr}"
    else:
        why = "no optimizer parameter belongs to an nn.Module"
    if code != 0:  # the script failed first: its traceback is above, its exit code is the result
        when = "" if recording.failures else " before training started"
        _notify(f"nothing recorded: the script exited with code {code}{when} ({why})")
        return code
    if recording.failures:
        raise GraddiffError(f"nothing recorded: {why}")
    raise GraddiffError(
        f"no model found: {why}; nothing recorded. Name it with --model-class NAME or "
        "--model MODULE.ATTR, or wrap the training loop in graddiff.trace(model, path)"
    )

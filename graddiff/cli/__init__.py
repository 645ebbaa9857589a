"""The ``graddiff`` command line: a thin shell over the library.

Each subcommand lives in its own module and is imported only when used, so ``graddiff --help``
and the reading commands stay fast and never import torch. Exit codes, for every command:
0 = clean (no divergence, no findings), 1 = diverged / findings, 2 = usage or input error
(one ``Error:`` line on stderr, no traceback).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any, Optional

import click

from .._version import __version__
from ..errors import GraddiffError

EXIT_OK, EXIT_DIFFERENT, EXIT_ERROR = 0, 1, 2

#: name -> (module under graddiff.cli, attribute, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "compare": (
        "compare",
        "compare_cmd",
        "Find where two runs diverge (the first step, kind, layer).",
    ),
    "map": (
        "map",
        "map_cmd",
        "Propose a name map between two implementations (for compare --map).",
    ),
    "show": ("show", "show_cmd", "Summarise one trace: steps, kinds, environment, loss, findings."),
    "inspect": (
        "inspect",
        "inspect_cmd",
        "Look at one recorded tensor: stats, fingerprint, values.",
    ),
    "check": (
        "check",
        "check_cmd",
        "Single-run findings: NaN/Inf, accumulating grads, dead units.",
    ),
    "plot": ("plot", "plot_cmd", "Plot norms of one run, or the divergence between two."),
    "shell": ("shell", "shell_cmd", "An interactive Python session with the runs loaded."),
    "demo": ("demo", "demo_cmd", "Record the motivating bugs and show graddiff's verdicts."),
}


def terminal_console() -> Any:
    """The rich Console every command prints with: colour on a terminal, plain text when piped."""
    from rich.console import Console

    if sys.stdout.isatty():
        return Console(highlight=False)
    return Console(force_terminal=False, color_system=None, highlight=False, soft_wrap=True)


class GraddiffGroup(click.Group):
    """Lazy subcommands, and one-line errors with graddiff's exit codes."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [
            name
            for name, (module, _, _) in COMMANDS.items()
            if importlib.util.find_spec(f"{__name__}.{module}") is not None
        ]

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        try:
            mod = importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{module}":
                return None
            raise
        return getattr(mod, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def main(self, args: Any = None, prog_name: Any = None, **extra: Any) -> Any:  # type: ignore[override]
        extra.pop("standalone_mode", None)
        try:
            rv = super().main(
                args=args, prog_name=prog_name or "graddiff", standalone_mode=False, **extra
            )
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"Error: {exc.format_message()}{hint}", err=True)
            sys.exit(EXIT_ERROR)
        except click.Abort:
            click.echo("Error: aborted", err=True)
            sys.exit(130)
        except GraddiffError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(EXIT_ERROR)
        except click.ClickException as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(EXIT_ERROR)
        sys.exit(rv if isinstance(rv, int) else EXIT_OK)


@click.group(cls=GraddiffGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="graddiff")
def main() -> None:
    """graddiff: find where two PyTorch training runs part ways.

    Record each run with `with graddiff.trace(model, "run.h5"):` around the training loop,
    then `graddiff compare a.h5 b.h5`. Exit codes: 0 clean, 1 diverged or findings,
    2 usage or input error.
    """

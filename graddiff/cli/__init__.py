"""The ``graddiff`` command line: a thin shell over the library.

Each subcommand lives in its own module and is imported only when used, so ``graddiff --help``
and the reading commands stay fast and never import torch. Exit codes, for every command
(docs/json-and-exit-codes.md):

- 0 clean (no divergence, no findings), 1 diverged / findings;
- 2 usage or input error: one ``Error:`` line on stderr naming the file and the problem;
- 3 internal error (a bug in graddiff): one ``Error:`` line naming a log file that holds the
  traceback (printed instead with ``graddiff --debug``);
- 130 interrupted (Ctrl-C), 141 the output pipe was closed (``graddiff show a.h5 | head``).

The reading commands run under a watchdog (``cli/watchdog.py``) so that a file on which HDF5
loops forever ends in exit 2, not a hang. Everything printed goes through ``graddiff.textsafe``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import tempfile
import traceback
from typing import Any, Optional

import click

from .._version import __version__
from ..errors import GraddiffError
from ..textsafe import one_line, safe_console

EXIT_OK, EXIT_DIFFERENT, EXIT_ERROR, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_PIPE = 130, 141
#: Commands that read traces run under the watchdog (demo records, shell is interactive).
WATCHED = {"compare", "show", "inspect", "check", "plot", "map", "ranks"}

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
    "ranks": (
        "ranks",
        "ranks_cmd",
        "Check that the ranks of one distributed run agree (params, buffers, grads).",
    ),
    "record": (
        "record",
        "record_cmd",
        "Trace an unmodified script: record -o run.h5 -- python train.py ARGS.",
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
    """The rich Console every command prints with: colour on a terminal, plain text when piped;
    markup never interpreted, control characters escaped (``graddiff.textsafe``). Lines wrap at
    the terminal's width; in a pipe at ``$COLUMNS``, else 80 columns."""
    if sys.stdout.isatty():
        return safe_console()
    return safe_console(force_terminal=False, color_system=None)


def _command_name(args: list[str]) -> Optional[str]:
    """The subcommand in an argument list (the first word that is not a group option)."""
    for a in args:
        if not a.startswith("-"):
            return a
    return None


def _trace_args(args: list[str]) -> list[str]:
    """Arguments that name existing files (for the watchdog's message)."""
    out = []
    for a in args[1:]:
        try:
            if not a.startswith("-") and os.path.exists(a):
                out.append(a)
        except (OSError, ValueError):
            pass
    return out


def _internal_error(exc: BaseException, debug: bool, args: list[str]) -> int:
    """A bug in graddiff: one line, traceback in a log file (or on stderr with --debug)."""
    what = one_line(f"{type(exc).__name__}: {exc}")[:300]
    if debug:
        traceback.print_exc()
        click.echo(f"Error: internal error in graddiff {__version__} ({what})", err=True)
        return EXIT_INTERNAL
    where = "rerun with 'graddiff --debug ...' for the traceback"
    try:
        fd, log = tempfile.mkstemp(prefix="graddiff-crash-", suffix=".log")
        with os.fdopen(fd, "w") as fh:
            fh.write(f"graddiff {__version__}, python {sys.version.split()[0]}\n")
            fh.write(f"argv: {['graddiff', *args]!r}\n\n")
            fh.write(traceback.format_exc())
        where = f"traceback in {log}"
    except OSError:
        pass
    click.echo(
        f"Error: internal error in graddiff {__version__} ({what}); please report it, {where}",
        err=True,
    )
    return EXIT_INTERNAL


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
        args = list(sys.argv[1:] if args is None else args)
        if not args:  # bare `graddiff`: the help, not an error
            with click.Context(self, info_name=prog_name or "graddiff") as ctx:
                click.echo(self.get_help(ctx))
            sys.exit(EXIT_OK)
        name = _command_name(args)
        debug = "--debug" in args[: args.index(name)] if name in args else "--debug" in args

        def run() -> int:
            return self._run(args, prog_name, debug, extra)

        from .watchdog import run_watched

        def on_stall(limit: float) -> int:
            files = ", ".join(one_line(a) for a in _trace_args(args)) or "the input"
            click.echo(
                f"Error: {files}: reading made no progress for {limit:g} s (a corrupt HDF5 "
                f"structure can make the HDF5 library loop forever), stopped; set "
                f"GRADDIFF_WATCHDOG=SECONDS to wait longer, 0 to wait forever",
                err=True,
            )
            return EXIT_ERROR

        from . import output

        previous = output.install()  # clean lines; a closed pipe keeps the verdict's exit code
        try:
            code = run_watched(run, on_stall) if name in WATCHED else run()
        finally:
            output.restore(previous)
        sys.exit(code)

    def _run(self, args: list[str], prog_name: Any, debug: bool, extra: dict) -> int:
        """Run the command line; every outcome becomes an exit code and at most one line."""
        try:
            rv = super().main(
                args=args, prog_name=prog_name or "graddiff", standalone_mode=False, **extra
            )
        except click.exceptions.Exit as exc:
            return exc.exit_code
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"Error: {one_line(exc.format_message())}{hint}", err=True)
            return EXIT_ERROR
        except (click.Abort, KeyboardInterrupt):
            click.echo("Error: interrupted", err=True)
            return EXIT_INTERRUPTED
        except GraddiffError as exc:
            click.echo(f"Error: {one_line(exc)}", err=True)
            return EXIT_ERROR
        except click.ClickException as exc:
            click.echo(f"Error: {one_line(exc.format_message())}", err=True)
            return EXIT_ERROR
        except BrokenPipeError:
            _silence_stdout()
            return EXIT_PIPE
        except OSError as exc:  # writing an output (--html, -o) failed: the user's environment
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"Error: {one_line(where)}{one_line(exc.strerror or exc)}", err=True)
            return EXIT_ERROR
        except MemoryError:
            click.echo("Error: out of memory", err=True)
            return EXIT_ERROR
        except SystemExit as exc:  # sys.exit() inside a command: keep its code (also in a child)
            if exc.code is None or isinstance(exc.code, int):
                return exc.code or EXIT_OK
            click.echo(f"Error: {one_line(exc.code)}", err=True)
            return EXIT_ERROR
        except Exception as exc:
            return _internal_error(exc, debug, args)
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _silence_stdout()
            return EXIT_PIPE
        return rv if isinstance(rv, int) else EXIT_OK


def _silence_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so that the final flush cannot raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


@click.group(cls=GraddiffGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="graddiff")
@click.option("--debug", is_flag=True, help="Print the traceback of an internal error.")
def main(debug: bool) -> None:
    """graddiff: find where two PyTorch training runs part ways.

    Record each run with `with graddiff.trace(model, "run.h5"):` around the training loop,
    then `graddiff compare a.h5 b.h5`. Exit codes: 0 clean, 1 diverged or findings,
    2 usage or input error, 3 internal error (a bug: please report it).
    """

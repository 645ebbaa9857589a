"""``graddiff shell A.h5 [B.h5]``: Python with the runs open as ``a``, ``b`` (and ``report``)."""

from __future__ import annotations

import code
import sys
import traceback
from typing import Optional

import click

from ..postmortem.shellns import build_namespace, close_namespace


def _interactive() -> bool:
    """IPython only on a terminal: piped input goes to the plain console, line by line."""
    return sys.stdin.isatty()


@click.command("shell")
@click.argument("run_a", metavar="A.h5")
@click.argument("run_b", metavar="[B.h5]", required=False)
@click.option(
    "-c", "--command", "source", metavar="CODE", help="Run CODE with the runs loaded, then exit."
)
@click.option(
    "--plain", is_flag=True, help="Use the plain Python console even if IPython is installed."
)
@click.option("--no-compare", is_flag=True, help="Do not compare two runs on start.")
def shell_cmd(
    run_a: str, run_b: Optional[str], source: Optional[str], plain: bool, no_compare: bool
) -> int:
    """Open an interactive Python session (IPython when installed) with the runs loaded:
    a, b (graddiff.Run), report (graddiff.compare of a and b), np (numpy).

    With -c CODE, run CODE in that namespace and exit (1 if it raised).
    """
    paths = [p for p in (run_a, run_b) if p]
    ns, banner = build_namespace(paths, compare=not no_compare)
    try:
        if source is not None:
            try:
                exec(compile(source, "<graddiff shell -c>", "exec"), ns)
            except SystemExit as exc:
                return exc.code if isinstance(exc.code, int) else 0
            except Exception:
                click.echo(traceback.format_exc().rstrip(), err=True)
                return 1
            return 0
        click.echo(banner)
        if not plain and _interactive():
            try:
                import IPython
            except ImportError:
                pass
            else:
                IPython.start_ipython(argv=[], user_ns=ns, display_banner=False)
                return 0
        code.interact(banner="", local=ns, exitmsg="")
        return 0
    finally:
        close_namespace(ns)

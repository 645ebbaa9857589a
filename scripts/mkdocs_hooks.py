"""mkdocs hook: reference pages generated from the code, so they cannot drift from it.

``<!-- graddiff:cli -->`` in a page becomes the reference of every ``graddiff`` subcommand,
read from the click commands themselves (usage, help, options, defaults). Loaded by
``hooks:`` in mkdocs.yml; no mkdocs plugin to install.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # mkdocs may run from an interpreter without the editable install
    sys.path.insert(0, str(ROOT))

CLI_MARKER = "<!-- graddiff:cli -->"


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001 (mkdocs API)
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    return markdown


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _option_row(param, ctx) -> str:  # noqa: ANN001
    record = param.get_help_record(ctx) or ("/".join(param.opts), "")
    return f"| `{record[0]}` | {_cell(record[1])} |"


def command_markdown(name: str, cmd, parent_ctx) -> str:  # noqa: ANN001
    """One command: heading, usage, help text, and the options as a table."""
    import click

    ctx = click.Context(cmd, info_name=name, parent=parent_ctx)
    usage = " ".join(cmd.collect_usage_pieces(ctx))
    lines = [f"## `{ctx.command_path}`", "", "```text", f"{ctx.command_path} {usage}", "```", ""]
    if cmd.help:
        lines += [inspect.cleandoc(cmd.help), ""]
    help_option = cmd.get_help_option(ctx)
    options = [
        p for p in cmd.get_params(ctx) if isinstance(p, click.Option) and p is not help_option
    ]
    if options:
        lines += ["| option | meaning |", "|---|---|"]
        lines += [_option_row(p, ctx) for p in options]
        lines.append("")
    return "\n".join(lines)


def cli_reference() -> str:
    """Every subcommand of ``graddiff``, in the order ``graddiff --help`` lists them."""
    import click

    from graddiff.cli import main

    root = click.Context(main, info_name="graddiff")
    parts = []
    for name in main.list_commands(root):
        cmd = main.get_command(root, name)
        if cmd is not None:
            parts.append(command_markdown(name, cmd, root))
    return "\n".join(parts)

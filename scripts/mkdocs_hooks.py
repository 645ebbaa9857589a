"""mkdocs hook: reference pages generated from the code, so they cannot drift from it.

``<!-- graddiff:cli -->`` in a page becomes the reference of every ``graddiff`` subcommand,
read from the click commands themselves (usage, help, options, defaults);
``<!-- graddiff:api -->`` becomes the signatures and docstrings of the public Python API.
Loaded by ``hooks:`` in mkdocs.yml; no mkdocs plugin to install.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _import_graddiff() -> None:
    """Make this checkout's graddiff importable, also from an interpreter that has not installed
    it (a plain ``mkdocs`` on PATH): the source tree on sys.path, and ``hooks/`` as
    ``graddiff.hooks`` (setup.cfg's package_dir does that for an installed copy)."""
    import importlib.util

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if importlib.util.find_spec("graddiff.hooks") is None:
        spec = importlib.util.spec_from_file_location(
            "graddiff.hooks",
            ROOT / "hooks" / "__init__.py",
            submodule_search_locations=[str(ROOT / "hooks")],
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["graddiff.hooks"] = module
        spec.loader.exec_module(module)


_import_graddiff()

CLI_MARKER = "<!-- graddiff:cli -->"
API_MARKER = "<!-- graddiff:api -->"

#: The public API, in the order a user meets it: (object path, members to document).
API = [
    ("graddiff.trace", []),
    ("graddiff.Tracer", ["step", "steps_recorded", "bytes_written"]),
    ("graddiff.compare", []),
    (
        "graddiff.Report",
        [
            "verdict",
            "exit_code",
            "cause",
            "origin",
            "headline",
            "to_dict",
            "render",
            "html",
            "plot",
            "divergence_matrix",
        ],
    ),
    ("graddiff.open", []),
    (
        "graddiff.Run",
        [
            "steps",
            "complete",
            "keys",
            "kinds",
            "names",
            "stats",
            "has_values",
            "get",
            "entries",
            "check",
            "summary",
            "plot",
        ],
    ),
    ("graddiff.testing.assert_runs_match", []),
    ("graddiff.GraddiffError", []),
    ("graddiff.TraceFileError", []),
    ("graddiff.TraceUsageError", []),
    ("graddiff.ValuesNotStoredError", []),
]


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001 (mkdocs API)
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    if API_MARKER in markdown:
        markdown = markdown.replace(API_MARKER, api_reference())
    return markdown


def _object(path: str):  # noqa: ANN202
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _signature(obj, name: str) -> str:  # noqa: ANN001
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name
    bare = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    sig = sig.replace(parameters=bare, return_annotation=inspect.Signature.empty)
    return f"{name}{sig}"


def _doc_block(obj) -> list[str]:  # noqa: ANN001
    doc = inspect.getdoc(obj)
    return ["```text", doc, "```", ""] if doc else []


def api_reference() -> str:
    """Signatures and docstrings of the public API (``API``), read from the installed code."""
    lines = []
    for path, members in API:
        obj = _object(path)
        short = path
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            base = obj.__mro__[1].__name__
            lines += [f"### `{short}`", "", f"An exception (subclass of `{base}`).", ""]
            lines += _doc_block(obj)
            continue
        heading = short if inspect.isclass(obj) else _signature(obj, short)
        lines += [f"### `{short}`", "", "```python {.fragment}", heading, "```", ""]
        lines += _doc_block(obj)
        for member in members:
            try:
                attr = inspect.getattr_static(obj, member)
            except AttributeError:  # set in __init__: an instance attribute
                lines += [f"- `{member}` (attribute)"]
                continue
            if isinstance(attr, property):
                doc = _first_line(attr.fget)
                lines += [f"- `{member}` (property)" + (f": {doc}" if doc else "")]
            elif callable(attr):
                sig = _signature(getattr(obj, member), member)
                sig = sig.replace("(self, ", "(").replace("(self)", "()")
                doc = _first_line(attr)
                lines += [f"- `{sig}`" + (f": {doc}" if doc else "")]
            else:
                lines += [f"- `{member}`"]
        if members:
            lines.append("")
    return "\n".join(lines)


def _first_line(fn) -> str:  # noqa: ANN001
    doc = inspect.getdoc(fn) or ""
    return doc.split("\n\n")[0].replace("\n", " ")


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

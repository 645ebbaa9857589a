"""Make text from files and users safe to print: no terminal escapes, no rich markup.

A trace is data from anyone: module names, metadata, paths and argv recorded in it reach the
terminal. Control characters (ESC sequences, carriage returns, C1 codes, bidi overrides) are
shown as visible escapes (``\\x1b``), never sent raw; rich markup is never interpreted.

Every command prints through one of these:

- :func:`echo` for plain lines (``click.echo`` with control characters escaped);
- :func:`safe_console` for rich output: a Console with markup and emoji off whose every text
  segment is escaped as it is written (rich's own styling and cursor codes are kept);
- :func:`one_line` for an ``Error:`` line or a name inside a sentence (newlines escaped too);
- :func:`escape_markup` for code that must build a rich markup string from untrusted text.
"""

from __future__ import annotations

import re
from typing import Any

# C0 controls except tab and newline, DEL, C1 controls, Unicode bidi / invisible overrides
# that can reorder or hide what a terminal shows, and lone surrogates (undecodable bytes in a
# name), which no output stream can encode.
_CONTROL = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\u202a-\u202e\u2060-\u2064"
    "\u2066-\u2069\ufeff\ud800-\udfff]"
)
_CONTROL_LINE = re.compile(_CONTROL.pattern[:-1] + "\t\n]")


def _escape(m: re.Match) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def printable(text: Any) -> str:
    """``text`` with every control character but tab and newline shown as an escape."""
    return _CONTROL.sub(_escape, str(text))


def one_line(text: Any) -> str:
    """``text`` as one printable line (tabs and newlines escaped as well)."""
    return _CONTROL_LINE.sub(_escape, str(text))


def escape_markup(text: Any) -> str:
    """``text`` printable and with rich markup escaped, for a markup-enabled console."""
    from rich.markup import escape

    return escape(printable(text))


def echo(text: Any = "", *, err: bool = False, nl: bool = True) -> None:
    """``click.echo`` with control characters escaped."""
    import click

    click.echo(printable(text), err=err, nl=nl)


def safe_console(**kwargs: Any) -> Any:
    """A rich Console that never interprets markup or emoji and escapes control characters in
    everything it prints (kwargs as for ``rich.console.Console``)."""
    from rich.console import Console

    class SafeConsole(Console):
        def _render_buffer(self, buffer: Any) -> str:  # rich's single point of output
            from rich.segment import Segment

            return super()._render_buffer(
                Segment(printable(s.text), s.style, s.control) if not s.control else s
                for s in buffer
            )

    kwargs.setdefault("markup", False)
    kwargs.setdefault("emoji", False)
    kwargs.setdefault("highlight", False)
    return SafeConsole(**kwargs)

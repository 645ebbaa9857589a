"""What every command writes to stdout goes through here: clean lines, any width, any pipe.

:class:`CleanStdout` wraps the process's stdout for the duration of a command: it drops the
trailing spaces rich pads table cells with (also before a colour reset), and a closed pipe
(``graddiff compare a.h5 b.h5 | head``) silences the rest of the output instead of raising,
so the exit code is the command's verdict whether or not stdout is a pipe.
"""

from __future__ import annotations

import io
import os
import re
import sys
from typing import Any, Optional, TextIO

_TRAILING = re.compile(r"[ \t]+((?:\x1b\[[0-9;]*m)*)(?=\n)")


def strip_trailing(text: str) -> str:
    """Remove spaces and tabs before each newline (keeping colour codes that follow them)."""
    return _TRAILING.sub(r"\1", text)


class CleanStdout(io.TextIOBase):
    """A text stream over ``stream`` that strips trailing blanks and survives a closed pipe."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self._stream = stream
        self._pending = ""  # text after the last newline, held until the line ends
        self.broken = False

    # attributes click and rich look at
    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._stream, "encoding", None) or "utf-8"

    @property
    def errors(self) -> Optional[str]:  # type: ignore[override]
        return getattr(self._stream, "errors", None)

    def isatty(self) -> bool:
        return bool(getattr(self._stream, "isatty", lambda: False)())

    def fileno(self) -> int:
        return self._stream.fileno()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:  # type: ignore[override]
        if self.broken:
            return len(text)
        data = self._pending + text
        cut = data.rfind("\n") + 1
        self._pending = data[cut:]
        if cut:
            self._emit(strip_trailing(data[:cut]))
        return len(text)

    def flush(self) -> None:
        if self._pending and not self.broken:
            tail, self._pending = self._pending.rstrip(" \t"), ""
            self._emit(tail)
        if not self.broken:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._closed_pipe()

    def _emit(self, text: str) -> None:
        try:
            self._stream.write(text)
        except BrokenPipeError:
            self._closed_pipe()

    def _closed_pipe(self) -> None:
        """The reader went away: discard the rest, and point fd 1 at /dev/null so that the
        interpreter's final flush cannot fail either (Python docs, 'Note on SIGPIPE')."""
        self.broken = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            pass


def install() -> Any:
    """Wrap ``sys.stdout`` (returns the previous stream for :func:`restore`)."""
    previous = sys.stdout
    if not isinstance(previous, CleanStdout):
        sys.stdout = CleanStdout(previous)
    return previous


def restore(previous: Any) -> None:
    current = sys.stdout
    if isinstance(current, CleanStdout):
        current.flush()
    sys.stdout = previous

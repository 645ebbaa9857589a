"""One bag for every hook handle and patch restorer; ``remove()`` is idempotent.

``trace.__exit__`` empties the bag whether the body returned or raised, so nothing graddiff
installed outlives the trace.
"""

from __future__ import annotations

from typing import Any, Callable


class HandleBag:
    """Collects ``RemovableHandle``s and undo callables; removes them in reverse order."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], Any]] = []

    def add(self, handle: Any) -> Any:
        """Keep a handle (anything with ``.remove()``) or an undo callable; returns it."""
        self._undo.append(handle.remove if hasattr(handle, "remove") else handle)
        return handle

    def __len__(self) -> int:
        return len(self._undo)

    def remove(self) -> None:
        errors = []
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except Exception as exc:  # keep removing the rest; report the first failure
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> HandleBag:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

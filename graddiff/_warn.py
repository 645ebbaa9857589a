"""Warnings that point at the user's line, not at graddiff's or torch's internals.

graddiff warns from inside hooks (called by torch from the user's ``loss.backward()`` or
``optimizer.step()``) and from the writer; a fixed ``stacklevel`` would name a graddiff file.
"""

from __future__ import annotations

import os
import sys
import warnings

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_INTERNAL = (_PACKAGE_DIR + os.sep,)


def _internal_dirs() -> tuple[str, ...]:
    dirs = list(_INTERNAL)
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch, "__file__", None):
        dirs.append(os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)
    hooks = sys.modules.get("graddiff.hooks")
    if hooks is not None and getattr(hooks, "__file__", None):
        dirs.append(os.path.dirname(os.path.abspath(hooks.__file__)) + os.sep)
    return tuple(dirs)


def warn_user(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn`` with the stack level of the first frame outside graddiff and torch."""
    internal = _internal_dirs()
    frame = sys._getframe(1)
    level = 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(internal):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level if frame is not None else 2)

"""Each module's own settings as torch prints them (``extra_repr``): ``eps=1e-05``, ``p=0.1``,
``approximate='tanh'``, ``momentum=0.1``.

Written once per trace (root attribute ``module_settings``, see graddiff/format.py), they are
the recorded evidence for compare's ``module_config`` cause: a module of the same class built
with other arguments (a LayerNorm ``eps`` from another config, a GELU's tanh approximation, a
Dropout's ``p``). Read once at trace entry; a module whose ``extra_repr`` fails or is empty is
left out, so recording never depends on user code behaving.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .naming import wrapped_module

#: Longest settings string kept per module (a custom extra_repr may print a whole tensor).
MAX_SETTINGS_CHARS = 400


def module_settings(modules: Iterable[tuple[str, nn.Module]]) -> dict[str, str]:
    """name -> the module's ``extra_repr()`` on one line, for modules that print settings."""
    out: dict[str, str] = {}
    for name, module in modules:
        try:
            text = wrapped_module(module).extra_repr()
        except Exception:  # user code: a broken extra_repr must not stop the trace
            continue
        if isinstance(text, str):
            text = " ".join(text.split())
            if text:
                out[name] = text[:MAX_SETTINGS_CHARS]
    return out

"""Which backward passes reach each parameter: one post-accumulate-grad hook per parameter.

torch calls a parameter's post-accumulate-grad hook (torch >= 2.1) once per ``backward()``
that accumulates into its ``.grad`` (``torch.autograd.grad`` accumulates nothing and calls
none), after the accumulation. The hook only counts: ``sink.on_accumulate(name, param)``; it reads
no tensor and returns None, so the gradient is untouched. Measured: 0.1-0.2 us per parameter
per backward (``benchmarks/reach_cost.py``).

``custom_functions`` lists the user's custom ``torch.autograd.Function``s found in the graphs
of the first step's gradient computations (one walk of each graph, from the outputs
differentiated; Functions defined in torch itself, such as torch.compile's and checkpoint's,
are left out).

Also the inventory of the user's own backward hooks on the model (module backward and
backward-pre hooks, tensor and post-accumulate-grad hooks on parameters, torch's global
module backward hooks): taken before graddiff installs anything and after it removed
everything, so graddiff's own hooks are never in it.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from .handles import HandleBag


def install_reach_hooks(params: list[tuple[str, torch.Tensor]], sink: Any, bag: HandleBag) -> bool:
    """One counting hook per trainable parameter; False where torch has no such hook."""
    if not hasattr(torch.Tensor, "register_post_accumulate_grad_hook"):
        return False
    for name, p in params:
        if p.requires_grad and p.is_leaf:
            # sink.on_accumulate(name, param) returns None and touches no tensor
            bag.add(
                p.register_post_accumulate_grad_hook(functools.partial(sink.on_accumulate, name))
            )
    return True


def _hook_names(hooks: Any) -> list[str]:
    """The hooks of one torch hook dict, each by its function's qualified name."""
    out = []
    for fn in list((hooks or {}).values()):
        f = fn.func if isinstance(fn, functools.partial) else fn
        mod = getattr(f, "__module__", None) or ""
        name = getattr(f, "__qualname__", None) or type(f).__name__
        out.append(f"{mod}.{name}" if mod and mod != "__main__" else name)
    return sorted(out)


def backward_hook_inventory(
    modules: list[tuple[str, nn.Module]], params: list[tuple[str, torch.Tensor]]
) -> dict[str, Any]:
    """{"modules": {name: {"backward": [...], "backward_pre": [...]}}, "params": {name:
    {"tensor": [...], "post_accumulate": [...]}}, "global": {...}}: only what has hooks."""
    mods: dict[str, Any] = {}
    for name, m in modules:
        kinds = {
            "backward": _hook_names(getattr(m, "_backward_hooks", None)),
            "backward_pre": _hook_names(getattr(m, "_backward_pre_hooks", None)),
        }
        kinds = {k: v for k, v in kinds.items() if v}
        if kinds:
            mods[name] = kinds
    ps: dict[str, Any] = {}
    for name, p in params:
        kinds = {
            "tensor": _hook_names(getattr(p, "_backward_hooks", None)),
            "post_accumulate": _hook_names(getattr(p, "_post_accumulate_grad_hooks", None)),
        }
        kinds = {k: v for k, v in kinds.items() if v}
        if kinds:
            ps[name] = kinds
    glob: dict[str, Any] = {}
    try:
        import torch.nn.modules.module as _m

        glob = {
            "backward": _hook_names(getattr(_m, "_global_backward_hooks", None)),
            "backward_pre": _hook_names(getattr(_m, "_global_backward_pre_hooks", None)),
        }
        glob = {k: v for k, v in glob.items() if v}
    except Exception:
        pass
    return {"modules": mods, "params": ps, "global": glob}


def merge_inventories(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The union of two inventories (hooks seen at trace entry or at its exit)."""
    out: dict[str, Any] = {}
    for part in ("modules", "params", "global"):
        pa, pb = a.get(part, {}), b.get(part, {})
        if part == "global":
            out[part] = {k: sorted(set(pa.get(k, [])) | set(pb.get(k, []))) for k in {*pa, *pb}}
            continue
        merged: dict[str, Any] = {}
        for name in {*pa, *pb}:
            ka, kb = pa.get(name, {}), pb.get(name, {})
            merged[name] = {k: sorted(set(ka.get(k, [])) | set(kb.get(k, []))) for k in {*ka, *kb}}
        out[part] = merged
    return out


#: Nodes walked per graph at most (a bound on the one-time cost; larger graphs are cut).
MAX_GRAPH_NODES = 200_000


def custom_functions(outputs: list[torch.Tensor]) -> tuple[set[str], bool]:
    """The qualified names of the user's custom autograd Functions in the graph behind
    ``outputs`` (the forward class's module and name; torch's own left out), and whether the
    whole graph was walked."""
    backward_cfunction = torch.autograd.function.BackwardCFunction
    seen: set[int] = set()
    found: set[str] = set()
    todo = [t.grad_fn for t in outputs if getattr(t, "grad_fn", None) is not None]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        if len(seen) >= MAX_GRAPH_NODES:
            return found, False
        seen.add(id(node))
        if isinstance(node, backward_cfunction):
            cls = getattr(node, "_forward_cls", None)
            mod = getattr(cls, "__module__", "") or ""
            if cls is not None and mod != "torch" and not mod.startswith("torch."):
                name = getattr(cls, "__qualname__", type(node).__name__)
                found.add(f"{mod}.{name}" if mod and mod != "__main__" else name)
        todo.extend(fn for fn, _ in getattr(node, "next_functions", ()) if fn is not None)
    return found, True

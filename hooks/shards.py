"""Sharded parameters (FSDP2 ``fully_shard``, DTensor; FSDP1 with ``use_orig_params=True``):
this rank's shard, and where it sits.

A DTensor's operators may run collectives, so the hooks never apply torch ops to one: they read
its local shard (``_local_tensor``, a plain tensor, no dispatch) and record that. Where each
shard sits in the full tensor is computed once at trace entry (a pure function of the global
shape, the device mesh and the placements, no communication) and stored in the trace, so that
the full tensor is reassembled by name at compare time (graddiff.ranks.merge).
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import torch


def _dtensor_type() -> Optional[type]:
    mod = sys.modules.get("torch.distributed.tensor")  # never imported by graddiff itself
    return getattr(mod, "DTensor", None)


def local_tensor(t: Any) -> Any:
    """The rank-local tensor of a DTensor; anything else as it is."""
    cls = _dtensor_type()
    if cls is not None and isinstance(t, cls):
        return t._local_tensor
    return t


def shard_layout(named: list[tuple[str, torch.Tensor]]) -> dict[str, dict[str, Any]]:
    """name -> {global_shape, local_shape, offset, placements, mesh_shape} for DTensor params."""
    cls = _dtensor_type()
    if cls is None:
        return {}
    out = {}
    for name, t in named:
        if not isinstance(t, cls):
            continue
        local_shape, offset = _local_shape_and_offset(t)
        out[name] = {
            "global_shape": [int(s) for s in t.shape],
            "local_shape": [int(s) for s in local_shape],
            "offset": [int(o) for o in offset],
            "placements": [str(p) for p in t.placements],
            "mesh_shape": [int(s) for s in t.device_mesh.shape],
        }
    return out


def _local_shape_and_offset(t: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        return compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    except ImportError:  # older torch: one Shard(dim) over a 1-D mesh, torch.chunk's split
        placement = t.placements[0]
        dim = getattr(placement, "dim", 0)
        n, size = t.device_mesh.size(), int(t.shape[dim])
        chunk = -(-size // n)
        start = min(chunk * t.device_mesh.get_local_rank(), size)
        offset = [0] * t.dim()
        offset[dim] = start
        return tuple(t._local_tensor.shape), tuple(offset)


def flat_shard_layout(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """name -> {global_shape, flat_range, ...} for FSDP1 units with ``use_orig_params=True``:
    each original parameter is then a 1-D view of this rank's piece of the flat parameter, the
    elements [start, stop) of the flattened full tensor (empty when not in this rank's shard)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    cls = getattr(fsdp, "FullyShardedDataParallel", None)
    if cls is None:
        return {}
    from .naming import clean_name

    out = {}
    for prefix, mod in model.named_modules():
        handle = getattr(mod, "_handle", None) if isinstance(mod, cls) else None
        flat = getattr(handle, "flat_param", None)
        if flat is None or not getattr(handle, "_use_orig_params", False):
            continue
        world = int(getattr(handle, "world_size", 1))
        for fqn, shape, info in zip(flat._fqns, flat._shapes, flat._shard_param_infos):
            name = clean_name(f"{prefix}.{fqn}" if prefix else fqn)
            rng = (
                [int(info.intra_param_start_idx), int(info.intra_param_end_idx) + 1]
                if info.in_shard
                else [0, 0]
            )
            out[name] = {
                "global_shape": [int(s) for s in shape],
                "flat_range": rng,
                "placements": ["FSDP1 flat shard"],
                "mesh_shape": [world],
            }
    return out

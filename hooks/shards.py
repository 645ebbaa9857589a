"""Sharded parameters (FSDP2 ``fully_shard``, DTensor; FSDP1): this rank's shard, and where it
sits.

A DTensor's operators may run collectives, so the hooks never apply torch ops to one: they read
its local shard (``_local_tensor``, a plain tensor, no dispatch) and record that. Where each
shard sits in the full tensor is computed once at trace entry (a pure function of the global
shape, the device mesh and the placements, no communication) and stored in the trace, so that
the full tensor is reassembled by name at compare time (graddiff.ranks.merge).

FSDP1 with ``use_orig_params=False`` trains FlatParameters (one 1-D shard per unit and rank);
each is recorded as one piece per original parameter, under the original name (FlatPieces), so
that FSDP1 compares with DDP or a single process by name as ``use_orig_params=True`` does.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch


def _dtensor_type() -> Optional[type]:
    mod = sys.modules.get("torch.distributed.tensor")  # never imported by graddiff itself
    return getattr(mod, "DTensor", None)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def local_tensor(t: Any) -> Any:
    """The rank-local tensor of a DTensor; anything else as it is."""
    if type(t) in _PLAIN:  # the hot path (every capture): no module lookup
        return t
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


@dataclass(frozen=True)
class FlatPieces:
    """FSDP1 ``use_orig_params=False``: where each original parameter sits in this rank's
    (padded, 1-D) shard of one FlatParameter. ``split`` cuts the shard (or its ``.grad``) into
    views, one per original parameter: slicing only, no copy, no collective."""

    shard_numel: int
    pieces: tuple[tuple[str, int, int], ...]  # (original name, start, stop) in the shard

    def split(self, flat: Any) -> Optional[list[tuple[str, torch.Tensor]]]:
        """(name, view) per original parameter; None when ``flat`` is not the local shard
        (e.g. unsharded at this moment): the caller then records it as it is."""
        if not isinstance(flat, torch.Tensor) or flat.dim() != 1:
            return None
        if flat.numel() != self.shard_numel:
            return None
        flat = flat.detach()
        return [(name, flat[a:b]) for name, a, b in self.pieces]


def flat_shards(
    model: torch.nn.Module,
) -> tuple[dict[str, dict[str, Any]], dict[int, FlatPieces]]:
    """FSDP1 units: the layout of every original parameter (name -> {global_shape, flat_range,
    ...}: the elements [start, stop) of the flattened full tensor that this rank holds, empty
    when none), and, for units with ``use_orig_params=False``, the FlatPieces of each
    FlatParameter (by ``id``), whose pieces are then recorded under the original names.

    With ``use_orig_params=True`` each original parameter already is a 1-D view of this rank's
    piece and is recorded as it is."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    cls = getattr(fsdp, "FullyShardedDataParallel", None)
    if cls is None:
        return {}, {}
    from .naming import clean_name

    layout: dict[str, dict[str, Any]] = {}
    pieces: dict[int, FlatPieces] = {}
    for prefix, mod in model.named_modules():
        handle = getattr(mod, "_handle", None) if isinstance(mod, cls) else None
        flat = getattr(handle, "flat_param", None)
        if flat is None:
            continue
        orig = bool(getattr(handle, "_use_orig_params", False))
        world = int(getattr(handle, "world_size", 1))
        flat_name = clean_name(f"{prefix}._flat_param" if prefix else "_flat_param")
        cut = []
        for fqn, shape, info in zip(flat._fqns, flat._shapes, flat._shard_param_infos):
            name = clean_name(f"{prefix}.{fqn}" if prefix else fqn)
            rng = (
                [int(info.intra_param_start_idx), int(info.intra_param_end_idx) + 1]
                if info.in_shard
                else [0, 0]
            )
            layout[name] = {
                "global_shape": [int(s) for s in shape],
                "flat_range": rng,
                "placements": ["FSDP1 flat shard"],
                "mesh_shape": [world],
            }
            if not orig:
                start = int(info.offset_in_shard) if info.in_shard else 0
                stop = start + (int(info.numel_in_shard) if info.in_shard else 0)
                layout[name]["flat_param"] = flat_name
                layout[name]["shard_range"] = [start, stop]
                cut.append((name, start, stop))
        if not orig:
            size = getattr(flat, "_sharded_size", None)
            numel = int(size.numel()) if size is not None else int(flat.numel())
            pieces[id(flat)] = FlatPieces(numel, tuple(cut))
    return layout, pieces


def full_parameter_counts(model: torch.nn.Module) -> Optional[tuple[int, int]]:
    """(parameters, trainable parameters) of the unsharded model under FSDP1, whose parameters
    on a rank are flat shards or 1-D pieces of them (None without FSDP1 units). Each original
    parameter counts its full size once; other parameters (DTensors: their global size) count
    as they are."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    cls = getattr(fsdp, "FullyShardedDataParallel", None)
    if cls is None:
        return None
    managed: set[int] = set()
    total = trainable = 0
    for mod in model.modules():
        handle = getattr(mod, "_handle", None) if isinstance(mod, cls) else None
        flat = getattr(handle, "flat_param", None)
        if flat is None or id(flat) in managed:
            continue
        managed.add(id(flat))
        managed.update(id(p) for p in (getattr(flat, "_params", None) or ()))
        n = int(sum(int(k) for k in flat._numels))
        total += n
        trainable += n if flat.requires_grad else 0
    if not managed:
        return None
    for p in model.parameters():
        if id(p) not in managed:
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    return total, trainable

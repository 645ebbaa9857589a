"""Where this process sits in a distributed launch, and the per-rank trace path.

Recording side only (imports torch lazily). ``trace(model, "run_{rank}.h5")`` formats the path
with the fields below; the decision for a template without ``{rank}`` depends only on the
template and the launch (never on timing), so every rank takes the same one before training
starts:

- ``{rank}``: global rank; ``{local_rank}``: rank on this node; ``{world_size}``: number of
  ranks; ``{node}``: this node's index (torchrun's ``GROUP_RANK``). Format specs work
  (``{rank:03d}``); ``{{`` and ``}}`` are literal braces.
- An unknown field (``{RANK}``, ``{gpu}``) is a ``TraceUsageError`` on every rank.
- Under a launch with more than one rank, a template that does not tell the ranks apart (no
  ``{rank}``; ``{local_rank}`` alone on several nodes) gets ``_rank{rank}`` inserted before the
  file extension, with one warning (on rank 0): otherwise the ranks would open one file.
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass
from typing import Optional

from ._warn import warn_user
from .errors import TraceUsageError

FIELDS = ("rank", "local_rank", "world_size", "node")


@dataclass(frozen=True)
class Launch:
    """This process's place in the launch (single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def fields(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in FIELDS}


def _env_int(name: str) -> Optional[int]:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


def current_launch() -> Launch:
    """From ``torch.distributed`` when initialised, else from the launcher's environment
    (torchrun, SLURM-style ``RANK``/``WORLD_SIZE``): a trace may start before
    ``init_process_group``."""
    import torch

    dist = getattr(torch, "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        rank, world = int(dist.get_rank()), int(dist.get_world_size())
    else:
        rank, world = _env_int("RANK") or 0, _env_int("WORLD_SIZE") or 1
    local_world = _env_int("LOCAL_WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK")
    if local_rank is None:
        local_rank = rank % local_world if local_world else rank
    if local_world is None:
        local_world = world if local_rank == rank else 1
    node = _env_int("GROUP_RANK")
    if node is None:
        node = _env_int("NODE_RANK")
    if node is None:
        node = rank // local_world if local_world else 0
    return Launch(rank, world, local_rank, local_world, node)


def template_fields(template: str) -> list[str]:
    """The replacement fields of a path template; a malformed one is a TraceUsageError."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise TraceUsageError(
            f"path {template!r}: {exc} (write {{{{ and }}}} for braces)"
        ) from None
    out = []
    for _, field, _, conversion in parsed:
        if field is None:
            continue
        if field not in FIELDS or conversion:
            what = f"{{{field}}}" if field else "{}"
            raise TraceUsageError(
                f"path {template!r}: unknown field {what}; use "
                + ", ".join(f"{{{f}}}" for f in FIELDS)
            )
        out.append(field)
    return out


def _insert_rank(template: str) -> str:
    head, tail = os.path.split(template)
    stem, ext = os.path.splitext(tail)
    return os.path.join(head, f"{stem}_rank{{rank}}{ext}")


def resolve_path(template: str, launch: Launch) -> str:
    """The trace path of this rank (see the module docstring for the rules)."""
    fields = template_fields(template)
    unique = "rank" in fields or (
        "local_rank" in fields
        and ("node" in fields or launch.local_world_size == launch.world_size)
    )
    if launch.distributed and not unique:
        fixed = _insert_rank(template)
        if launch.rank == 0:
            warn_user(
                f"graddiff: the trace path {template!r} has no {{rank}} under a launch of "
                f"{launch.world_size} ranks; writing {fixed!r} on every rank instead"
            )
        template = fixed
    try:
        return template.format(**launch.fields())
    except (ValueError, KeyError, IndexError) as exc:
        raise TraceUsageError(f"path {template!r}: cannot format it ({exc})") from None


#: Traces entered so far in this process, per path template: the n-th trace of a template
#: shares one run id on every rank (rank 0 may trace more, e.g. a single-process reference).
_traces_entered: dict[str, int] = {}
#: How long a rank waits at trace entry for rank 0 to publish the run id.
RUN_ID_TIMEOUT_S = 30.0


def shared_run_id(launch: Launch, template: str) -> Optional[str]:
    """An id that every rank's n-th trace of ``template`` shares, and no other run has.

    Rank 0 draws it and publishes it in the process group's key-value store; the other ranks
    read it there (waiting at most ``RUN_ID_TIMEOUT_S``, never in a collective, so a rank that
    does not trace cannot hang the others). ``graddiff ranks`` uses it to refuse files of
    different runs. None outside an initialised process group, or if the store is unavailable.
    """
    import datetime
    import uuid

    import torch

    dist = getattr(torch, "distributed", None)
    if not launch.distributed or dist is None or not dist.is_available():
        return None
    if not dist.is_initialized():
        return None
    n = _traces_entered.get(template, 0)
    _traces_entered[template] = n + 1
    key = f"graddiff/run_id/{n}/{template}"
    try:
        store = dist.distributed_c10d._get_default_store()
        if launch.rank == 0:
            value = uuid.uuid4().hex
            store.set(key, value)
            return value
        store.wait([key], datetime.timedelta(seconds=RUN_ID_TIMEOUT_S))
        return store.get(key).decode()
    except Exception:  # no store, a timeout: the id is optional
        return None

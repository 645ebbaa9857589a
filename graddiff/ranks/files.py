"""The files of one distributed run: expand globs, open them, and refuse sets that are not one run.

Data flow: paths/globs --> RankSet (runs ordered by rank) --> consistency check (``graddiff
ranks``) or rank-merged comparison (``graddiff compare "run_*.h5" single.h5``). Every refusal is
one GraddiffError line (exit 2): ranks of different runs, different world sizes, a missing or
duplicated rank. Never imports torch.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import GraddiffError
from ..modclass import merge
from ..reader import Run, open_run

_GLOB_CHARS = re.compile(r"[*?\[]")


def _natural(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def expand(paths: Sequence[str]) -> list[str]:
    """Paths with globs expanded (natural order: run_2 before run_10); a glob matching nothing
    is an error."""
    out: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if _GLOB_CHARS.search(p) and not os.path.exists(p):
            hits = sorted(glob.glob(p), key=_natural)
            if not hits:
                raise GraddiffError(f"{p}: no file matches")
            out.extend(hits)
        else:
            out.append(p)
    return out


def _env_int(run: Run, key: str, default: int) -> int:
    try:
        return int(run.environment.get(key, default))
    except (TypeError, ValueError):
        return default


@dataclass
class RankSet:
    """The runs of one distributed launch, ``runs[r]`` being rank r."""

    runs: list[Run]
    world_size: int
    run_id: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        return [r.path for r in self.runs]

    def close(self) -> None:
        for run in self.runs:
            run.close()

    @property
    def module_classes(self) -> dict[str, str]:
        """Module name -> class name over every rank (graddiff.modclass; old traces: empty)."""
        out: dict[str, str] = {}
        for run in self.runs:
            out = merge(out, run.module_classes or {})
        return out

    def describe(self) -> str:
        names = [os.path.basename(p) for p in self.paths]
        shown = ", ".join(names) if len(names) <= 4 else f"{names[0]} ... {names[-1]}"
        return f"{len(self.runs)} ranks ({shown})"


def open_ranks(paths: Sequence[str], *, min_ranks: int = 2) -> RankSet:
    """Open every rank file of one run. Raises GraddiffError when they are not one run."""
    files = expand(paths)
    if len(files) < min_ranks:
        raise GraddiffError(
            f"need the files of at least {min_ranks} ranks, got {len(files)}: "
            f"{', '.join(files) or 'none'} (pass every rank's file, or a glob such as 'run_*.h5')"
        )
    runs: list[Run] = []
    try:
        for p in files:
            runs.append(open_run(p))
        return _check(runs)
    except BaseException:
        for run in runs:
            run.close()
        raise


def _check(runs: list[Run]) -> RankSet:
    worlds = {}
    for run in runs:
        worlds.setdefault(_env_int(run, "world_size", 1), []).append(run.path)
    if len(worlds) > 1:
        parts = [f"{files[0]} has {w}" for w, files in sorted(worlds.items())]
        raise GraddiffError(
            f"different world sizes ({'; '.join(parts)}): these files come from different runs"
        )
    world = next(iter(worlds))
    if world < 2:
        raise GraddiffError(
            f"{runs[0].path}: recorded by a single process (world_size 1), not one rank of a "
            f"distributed run"
        )
    ids = {}
    for run in runs:
        rid = run.environment.get("run_id")
        if rid:
            ids.setdefault(str(rid), []).append(run.path)
    if len(ids) > 1:
        (id_a, fa), (id_b, fb) = list(ids.items())[:2]
        raise GraddiffError(
            f"files of different runs: {fa[0]} (run {id_a[:8]}) and {fb[0]} (run {id_b[:8]})"
        )
    by_rank: dict[int, Run] = {}
    for run in runs:
        rank = _env_int(run, "rank", 0)
        if rank in by_rank:
            raise GraddiffError(f"rank {rank} appears twice: {by_rank[rank].path} and {run.path}")
        if not 0 <= rank < world:
            raise GraddiffError(f"{run.path}: rank {rank} outside world_size {world}")
        by_rank[rank] = run
    missing = [r for r in range(world) if r not in by_rank]
    if missing:
        shown = ", ".join(str(r) for r in missing[:8]) + (", ..." if len(missing) > 8 else "")
        raise GraddiffError(
            f"missing rank{'s' if len(missing) > 1 else ''} {shown} of {world} "
            f"(got {len(by_rank)} file{'s' if len(by_rank) > 1 else ''}): pass every rank's file"
        )
    params = {}
    for run in by_rank.values():
        if not len(run.steps):
            continue  # killed before its first step: nothing recorded to compare
        params.setdefault(tuple(sorted(run.names("param"))), []).append(run.path)
    if len(params) > 1:
        (_, fa), (_, fb) = list(params.items())[:2]
        raise GraddiffError(
            f"files of different models: {fa[0]} and {fb[0]} record different parameter names"
        )
    ordered = [by_rank[r] for r in range(world)]
    return RankSet(ordered, world, next(iter(ids), ""))

"""The two sides of ``compare`` when a side is several rank files (a glob or a list).

``compare("run_*.h5", "single.h5")``: a side that names more than one file is the ranks of one
data-parallel run and is merged into one trace of the global batch (``ranks.merge``); a side of
one file is opened as it is. On the command line, several files may also be listed without
quotes (the shell expands the glob): consecutive files of one run form a side.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional, Union

from ..errors import GraddiffError
from ..reader import Run, open_run
from .files import RankSet, expand, open_ranks
from .merge import detect_reduction, merge_ranks

Side = Union[Run, RankSet]


def _paths(x: Any) -> Optional[list[str]]:
    """The files a side names, or None for a Run object."""
    if isinstance(x, Run):
        return None
    if isinstance(x, (list, tuple)):
        return expand([os.fspath(p) for p in x])
    return expand([os.fspath(x)])


def is_several(x: Any) -> bool:
    paths = _paths(x)
    return paths is not None and len(paths) > 1


def _open_side(x: Any) -> tuple[Side, bool]:
    if isinstance(x, Run):
        return x, False
    paths = _paths(x) or []
    if len(paths) == 1:
        return open_run(paths[0]), True
    return open_ranks(paths), True


def _label(x: Any, rs: RankSet) -> str:
    text = os.fspath(x) if not isinstance(x, (list, tuple)) else f"{x[0]} ... {x[-1]}"
    return f"{text} ({len(rs.runs)} ranks merged)"


def open_pair(
    a: Any, b: Any, reduction: Optional[str]
) -> tuple[Run, Run, list[Run], list[str], dict[str, str]]:
    """Open both sides, merging rank sets. Returns (A, B, runs to close, notes, labels)."""
    opened: list[Any] = []
    try:
        sa, own_a = _open_side(a)
        if own_a:
            opened.append(sa)
        sb, own_b = _open_side(b)
        if own_b:
            opened.append(sb)
        notes: list[str] = []
        labels: dict[str, str] = {}
        runs: list[Run] = []
        out = []
        for tag, side, raw, other in (("A", sa, a, sb), ("B", sb, b, sa)):
            if isinstance(side, Run):
                out.append(side)
                continue
            ref = other if isinstance(other, Run) else None
            if reduction is None:
                red, note = detect_reduction(side, ref)
            else:
                red, note = reduction, f"loss reduction '{reduction}' (--reduction)"
            merged = merge_ranks(side, red, f"{tag}")
            runs.append(merged.run)
            notes.append(f"{tag} = {_label(raw, side)}: {note}")
            notes.extend(merged.notes)
            labels[tag] = _label(raw, side)
            out.append(merged.run)
        for side in opened:
            if isinstance(side, RankSet):
                side.close()
            else:
                runs.append(side)
        opened = []
        return out[0], out[1], runs, notes, labels
    except BaseException:
        for side in opened:
            side.close()
        raise


def split_sides(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Several files on the command line: consecutive files of one distributed run are a side.

    Two arguments are the two sides (each may be a glob)."""
    if len(args) == 2:
        return [args[0]], [args[1]]
    if len(args) < 2:
        raise GraddiffError("compare needs two sides: A.h5 B.h5 (a side may be a quoted glob)")
    files = expand(list(args))
    ids = []
    for path in files:
        with open_run(path) as run:
            env = run.environment
            ids.append((env.get("run_id") or path, env.get("world_size", 1)))
    groups: list[list[str]] = []
    for i, path in enumerate(files):
        if groups and ids[i] == ids[i - 1]:
            groups[-1].append(path)
        else:
            groups.append([path])
    if len(groups) != 2:
        raise GraddiffError(
            f"cannot tell the two sides apart in {len(files)} files ({len(groups)} runs): quote "
            f'each side\'s glob, e.g. graddiff compare "ddp/run_*.h5" single.h5'
        )
    return groups[0], groups[1]


def same_run_note(a: Run, b: Run) -> str:
    """A note when A and B are two ranks of one distributed run (their data differs by design)."""
    ea, eb = a.environment, b.environment
    rid = ea.get("run_id")
    if not rid or rid != eb.get("run_id") or ea.get("rank") == eb.get("rank"):
        return ""
    return (
        f"A and B are ranks {ea.get('rank')} and {eb.get('rank')} of one distributed run: their "
        f"inputs, activations and losses differ by design; 'graddiff ranks' checks what must "
        f"agree (parameters, step-start buffers, all-reduced gradients), and 'graddiff compare "
        f'"run_*.h5" single.h5\' compares the merged ranks with a single process'
    )

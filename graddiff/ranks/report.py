"""``graddiff.check_ranks(files)``: the consistency check of one run's ranks, and its report.

Data flow: files --> RankSet --> Consistency (vote) --> diagnose_ranks --> RanksReport, which
owns the verdict and the exit code (0 consistent, 1 inconsistent; input problems raise
GraddiffError, exit 2) for the library, the terminal and ``--json`` alike.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from ..diff.context import Cause
from ..modclass import class_of, with_class
from .causes import diagnose_ranks
from .consistency import RANK_LOCAL, Consistency, Disagreement, check_consistency
from .files import RankSet, open_ranks

EXIT_CONSISTENT, EXIT_INCONSISTENT = 0, 1


@dataclass
class RanksReport:
    """What ``graddiff ranks`` prints."""

    files: list[str]
    world_size: int
    run_id: str
    steps: dict[str, int]
    compared: list[str]
    not_compared: list[str]
    n_records: int
    first: Optional[dict[str, Any]]
    diagnosis: Optional[Cause]
    counts: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: module name -> class name (every rank's; empty for traces without it)
    module_classes: dict[str, str] = field(default_factory=dict)

    @property
    def consistent(self) -> bool:
        return self.first is None and self.diagnosis is None

    @property
    def exit_code(self) -> int:
        return EXIT_CONSISTENT if self.consistent else EXIT_INCONSISTENT

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": "consistent" if self.consistent else "inconsistent",
            "exit_code": self.exit_code,
            "files": self.files,
            "world_size": self.world_size,
            "run_id": self.run_id or None,
            "steps": self.steps,
            "compared_kinds": self.compared,
            "not_compared_kinds": self.not_compared,
            "records_compared": self.n_records,
            "first": self.first,
            "diagnosis": self.diagnosis.to_dict() if self.diagnosis else None,
            "counts": self.counts,
            "notes": self.notes,
            "seconds": round(self.seconds, 3),
            "module_classes": dict(self.module_classes),
        }

    def render(self, console: Any) -> None:
        p = console.print
        s = self.steps
        span = f"steps {s['first']}..{s['last']}" if s["compared"] else "no step"
        p(
            f"graddiff ranks: {self.world_size} ranks, {span} ({s['compared']} completed by "
            f"every rank), {self.n_records} replicated records"
        )
        p(f"  compared across ranks: {', '.join(self.compared) or 'nothing'} (fingerprints)")
        p(f"  not compared (each rank's own by design): {', '.join(self.not_compared)}")
        if self.consistent and not self.n_records:
            p(
                "CONSISTENT in step structure: every rank ran the same passes; no replicated record to compare"
            )
        elif self.consistent:
            p("CONSISTENT: every replicated record is bitwise equal on every rank at every step")
        else:
            f = self.first
            if f is not None:
                vote = (
                    f"majority: {_ranks_text(f['majority'])}"
                    if f["strict_majority"]
                    else f"no majority; reference {_ranks_text(f['majority'])}"
                )
                p(
                    f"INCONSISTENT at step {f['step']}: "
                    f"{with_class(f['kind'] + ' ' + f['name'], f.get('module_class'))} differs on "
                    f"{_ranks_text(f['odd_ranks'])} ({vote})"
                )
            else:
                p("INCONSISTENT: the ranks ran different numbers of passes or steps")
            if self.diagnosis is not None:
                d = self.diagnosis
                p(f"  cause: {d.title}")
                for line in d.evidence:
                    p(f"    - {line}")
                if d.fix:
                    p(f"  fix: {d.fix}")
            c = self.counts
            if c["disagreements"]:
                per_kind = ", ".join(f"{k} {n}" for k, n in c["by_kind"].items())
                per_rank = ", ".join(f"rank {r}: {n}" for r, n in list(c["by_rank"].items())[:8])
                p(
                    f"  {c['disagreements']} record-steps differ over {c['steps_differing']} "
                    f"step(s) ({per_kind}; outside the majority: {per_rank})"
                )
        for note in self.notes:
            p(f"  note: {note}")


def _ranks_text(ranks: list[int]) -> str:
    if len(ranks) > 6:
        return f"{len(ranks)} ranks ({', '.join(str(r) for r in ranks[:6])}, ...)"
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def _first(d: Optional[Disagreement], classes: dict[str, str]) -> Optional[dict[str, Any]]:
    if d is None:
        return None
    return {
        "step": d.step,
        "kind": d.key.kind,
        "name": d.key.name,
        "module_class": class_of(classes, d.key.kind, d.key.name),
        "call": d.key.call,
        "odd_ranks": d.odd,
        "majority": d.groups[0],
        "strict_majority": d.majority,
        "groups": d.groups,
    }


def _notes(rs: RankSet, c: Consistency) -> list[str]:
    notes = []
    for r, run in enumerate(rs.runs):
        if not run.complete:
            last = int(run.steps[-1]) if len(run.steps) else None
            upto = f"up to step {last}" if last is not None else "no complete step"
            notes.append(
                f"rank {r} ({run.path}): status '{run.status}': read {upto}; later steps of "
                f"other ranks are not compared"
            )
    missing = [k for k in ("param", "buffer_start", "grad") if k not in c.kinds]
    recorded_all = {k for k in ("param", "grad") if all(k in run.kinds for run in rs.runs)}
    missing = [k for k in missing if not (k in recorded_all and c.skipped_shards)]
    recorded = {k for run in rs.runs for k in run.kinds}
    for k in missing:
        if k == "buffer_start" and "buffer" in recorded:
            notes.append(
                "buffers recorded only at the step's end (a trace from before buffer_start): "
                "rank-local by design there, so not compared"
            )
        elif k in recorded:
            notes.append(f"{k} recorded on some ranks only: not compared")
    if c.skipped_shards:
        notes.append(
            f"{c.skipped_shards} sharded record(s) hold a different shard per rank: not compared"
        )
    return notes


def check_ranks(files: Sequence[str], *, workers: Optional[int] = None) -> RanksReport:
    """Check that the ranks of one data-parallel run hold the same replicated state.

    Args:
        files: every rank's trace file (paths or globs such as ``"runs/run_*.h5"``).
        workers: processes that read the files: None chooses (serial for 1-2 files or small
            traces, else one per CPU up to one per file); 1 reads them one after another in
            this process; N reads them in up to N worker processes. Same result either way.

    Returns:
        A :class:`RanksReport`; ``exit_code`` 0 when consistent, 1 when not.

    Raises:
        GraddiffError: unreadable files, or files that are not all the ranks of one run.
    """
    t0 = time.perf_counter()
    rs = open_ranks(list(files))
    try:
        c = check_consistency(rs, workers)
        cause = diagnose_ranks(rs, c)
        steps = c.steps
        report = RanksReport(
            files=rs.paths,
            world_size=rs.world_size,
            run_id=rs.run_id,
            steps={
                "compared": int(len(steps)),
                "first": int(steps[0]) if len(steps) else -1,
                "last": int(steps[-1]) if len(steps) else -1,
                "per_rank": [int(n) for n in c.step_counts],
            },
            compared=list(c.kinds),
            not_compared=[k for k in RANK_LOCAL if any(k in run.kinds for run in rs.runs)],
            n_records=c.n_records,
            first=_first(c.first, rs.module_classes),
            diagnosis=cause,
            counts={
                "disagreements": c.n_disagreements,
                "steps_differing": c.steps_differing,
                "by_kind": dict(c.by_kind),
                "by_rank": {int(r): n for r, n in sorted(c.by_rank.items())},
            },
            notes=_notes(rs, c),
            module_classes=rs.module_classes,
        )
    finally:
        rs.close()
    report.seconds = time.perf_counter() - t0
    return report

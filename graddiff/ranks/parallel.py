"""Reading the rank files of ``graddiff ranks`` in worker processes.

h5py serialises every read in one process (a global lock), so threads cannot read rank files
in parallel; worker processes can. Each worker is a fresh interpreter running
``python -m graddiff.ranks.worker`` (graddiff.ranks.worker): it gets paths and the compared
record keys (a JSON spec), and writes plain .npy arrays into a temporary folder; this process
then votes on them block by block through memory maps, exactly as on the serial path (the same
``read_block`` fills both, so results and exit codes are identical). No pickle; the workers never
import torch or the caller's main module, so calling ``check_ranks`` from a training script
does not rerun it.

Starting a worker costs about 0.3 s of CPU (an interpreter importing numpy and h5py), so
``workers=None`` reads small sets serially: 1 or 2 files, fewer than MIN_AUTO_WORKERS idle CPUs
(two workers were measured slower than the serial path at every size), or fewer entry rows than
repay the workers' start (:func:`min_rows`, from costs measured by
benchmarks/bench_distributed.py).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Optional

import numpy as np

from ..errors import GraddiffError
from ..reader import RecordKey, Run

#: Measured with benchmarks/bench_distributed.py (docs/distributed.md): a worker's start (a fresh
#: interpreter importing numpy, h5py and the reader) costs about WORKER_START_S seconds of CPU,
#: and the serial path about ROW_COST_S seconds per entry row read and voted on.
WORKER_START_S = 0.3
ROW_COST_S = 0.5e-6
#: Two workers never beat the serial path, even on an idle machine: the vote stays in this
#: process and the hand-over through .npy files costs more per row than the read saves
#: (32 ranks x 200 steps, 1.87 M rows, idle 2-CPU machine: serial 0.081 ms per rank x step,
#: 2 workers 0.123). Automatic parallel reads therefore use at least this many workers.
MIN_AUTO_WORKERS = 3


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def usable_cpus() -> int:
    """CPUs not busy with other work: the available CPUs less the 1-minute load average (this
    process counted as one of ours). A loaded machine gives workers no core to run on."""
    cpus = available_cpus()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not Unix
        return cpus
    return max(1, min(cpus, int(cpus - max(0.0, load - 1.0) + 0.5)))


def entry_rows(run: Run) -> int:
    st = run.step_table
    return int((st["stop"] - st["start"]).sum()) if len(st) else 0


def min_rows(workers: int) -> float:
    """Entry rows (all files) from which ``workers`` processes beat the serial path: their
    start cost is repaid when the work saved, rows x ROW_COST_S x (1 - 1/workers), exceeds it."""
    return WORKER_START_S / (ROW_COST_S * (1.0 - 1.0 / workers))


def choose_workers(runs: list[Run], steps: np.ndarray, workers: Optional[int]) -> int:
    """Worker processes to read ``runs`` with (1: serial, in this process). ``workers`` given:
    that many, at most one per file. None: serial for 1 or 2 files, with fewer than
    MIN_AUTO_WORKERS idle CPUs, or
    for fewer entry rows than :func:`min_rows`; else one worker per idle CPU, at most one per
    file. Serial always where the OS is not POSIX."""
    if os.name != "posix":  # the workers' progress is watched with select() on pipes
        return 1
    if workers is not None:
        return max(1, min(int(workers), len(runs)))
    if len(runs) <= 2:
        return 1
    n = min(len(runs), usable_cpus())
    if n < MIN_AUTO_WORKERS or sum(entry_rows(run) for run in runs) < min_rows(n):
        return 1
    return n


def _worker_env() -> dict[str, str]:
    """The environment of a worker: this graddiff importable first, whatever the caller's cwd."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


class parallel_reader:
    """Context manager yielding (first step index, per-rank block arrays) for every block of
    ``per_block`` steps, the arrays read by ``n`` worker processes. Raises GraddiffError (one
    line) when a worker fails; the workers and their files are gone on exit."""

    def __init__(
        self,
        runs: list[Run],
        steps: np.ndarray,
        keys: list[RecordKey],
        skipped: set[RecordKey],
        per_block: int,
        n: int,
    ) -> None:
        self.runs, self.steps, self.per_block, self.n = runs, steps, per_block, n
        self.keys, self.skipped = keys, skipped
        self._tmp: Optional[tempfile.TemporaryDirectory] = None
        self._maps: list[list[np.ndarray]] = []

    def __enter__(self) -> Iterator[tuple[int, list]]:
        self._tmp = tempfile.TemporaryDirectory(prefix="graddiff-ranks-")
        try:
            self._run_workers(self._tmp.name)
            self._maps = [self._load(self._tmp.name, r) for r in range(len(self.runs))]
        except BaseException:
            self._cleanup()
            raise
        return self._blocks()

    def __exit__(self, *exc: object) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        self._maps = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _run_workers(self, out: str) -> None:
        jobs = [[r, os.path.abspath(run.path)] for r, run in enumerate(self.runs)]
        shares = [jobs[w :: self.n] for w in range(self.n)]
        spec = {
            "steps": [int(s) for s in self.steps],
            "keys": [[k.kind, k.name, k.call] for k in self.keys],
            "skipped": [[k.kind, k.name, k.call] for k in sorted(self.skipped, key=str)],
            "per_block": self.per_block,
            "out": out,
        }
        workers: list[_Worker] = []
        try:
            for w, share in enumerate(shares):
                path = os.path.join(out, f"spec{w}.json")
                with open(path, "w", encoding="utf-8") as f:
                    json.dump({**spec, "jobs": share}, f)
                workers.append(_Worker(worker_command(path), share, os.path.join(out, f"err{w}")))
            _wait(workers, stall_limit())
        finally:
            for w in workers:
                w.stop()

    def _load(self, out: str, rank: int) -> list[np.ndarray]:
        stem = os.path.join(out, str(rank))
        return [
            np.load(f"{stem}.{part}.npy", mmap_mode="r", allow_pickle=False)
            for part in ("fs", "fp", "have", "passes")
        ]

    def _blocks(self) -> Iterator[tuple[int, list]]:
        for lo in range(0, len(self.steps), self.per_block):
            hi = lo + self.per_block
            yield lo, [[np.asarray(a[lo:hi]) for a in maps] for maps in self._maps]


def worker_command(spec_path: str) -> list[str]:
    return [sys.executable, "-m", "graddiff.ranks.worker", spec_path]


def stall_limit() -> float:
    """Seconds a worker may go without progress (``GRADDIFF_WATCHDOG``, as the CLI's watchdog:
    default 30, 0 waits forever)."""
    raw = os.environ.get("GRADDIFF_WATCHDOG", "")
    try:
        return max(0.0, float(raw)) if raw.strip() else 30.0
    except ValueError:
        return 30.0


class _Worker:
    """One worker process: it writes a rank number to stdout when it starts a file and after
    every block, which is its heartbeat (a corrupt HDF5 structure can make the library loop
    forever); its stderr goes to a file."""

    def __init__(self, cmd: list[str], share: list, err_path: str) -> None:
        self.share, self.err_path = share, err_path
        self.rank = share[0][0] if share else -1
        self.last = time.monotonic()
        self._buf = b""
        with open(err_path, "wb") as err:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                env=_worker_env(),
            )

    def feed(self, data: bytes) -> None:
        self.last = time.monotonic()
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines[-1:]:
            try:
                self.rank = int(line)
            except ValueError:
                pass

    def path(self) -> str:
        return next((p for r, p in self.share if r == self.rank), "?")

    def failure(self) -> str:
        with open(self.err_path, "rb") as f:
            err = f.read()[-4000:]
        return _failure(err, self.proc.returncode, self.share)

    def stop(self) -> None:
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _wait(workers: list[_Worker], limit: float) -> None:
    """Until every worker has exited; GraddiffError on the first failure or stall."""
    running = {w.proc.stdout.fileno(): w for w in workers if w.proc.stdout is not None}
    while running:
        ready, _, _ = select.select(list(running), [], [], 0.5)
        for fd in ready:
            w = running[fd]
            data = os.read(fd, 4096)
            if data:
                w.feed(data)
                continue
            del running[fd]  # end of output: the worker has exited (or is exiting)
            if w.proc.wait() != 0:
                raise GraddiffError(w.failure())
        now = time.monotonic()
        for w in running.values():
            if limit and now - w.last > limit:
                raise GraddiffError(
                    f"{w.path()}: reading made no progress for {limit:g} s in a worker process "
                    f"(a corrupt HDF5 structure can make the HDF5 library loop forever), "
                    f"stopped; set GRADDIFF_WATCHDOG=SECONDS to wait longer, 0 to wait forever"
                )


def _failure(err: bytes, code: int, share: list) -> str:
    lines = [ln for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()]
    last = next((ln for ln in reversed(lines) if ln.startswith("Error: ")), None)
    if last is not None:
        return last[len("Error: ") :]
    files = ", ".join(p for _, p in share[:3]) + (" ..." if len(share) > 3 else "")
    how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    return f"reading {files} failed: the worker process ended ({how})"

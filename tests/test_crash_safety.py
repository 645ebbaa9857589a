"""kill -9 in the middle of a traced training run: the trace keeps every committed step.

A subprocess (tests/scripts/train_mlp.py) trains a BatchNorm MLP under
``graddiff.trace(..., values="full")`` and prints ``done K`` after each ``opt.step()``. The parent
SIGKILLs it at a seeded point, sometimes right after a line, sometimes a few milliseconds later
(mid-write). Why at most the last two confirmed steps can be missing: ``done K`` is printed
after the optimizer pre-hook handed step K to the writer queue, which holds one pending step;
the put only succeeded once the writer thread had taken step K-1 off the queue, which it does
only after finishing (and flushing, the commit) step K-2. So steps 0..K-2 are on disk; K-1 may
be mid-write and K may still sit in the queue.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

import graddiff
from graddiff.format import FLAG_VALUES

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "train_mlp.py")


def _kill_after(path: str, kill_at: int, delay: float, timeout: float = 150.0) -> int:
    """Run the trainer, SIGKILL it once it confirmed step ``kill_at``; return the last confirmed step."""
    cmd = [
        sys.executable,
        SCRIPT,
        path,
        "--print-done",
        "--steps",
        "400",
        "--width",
        "128",
        "--batch",
        "64",
    ]
    err_path = path + ".stderr"
    with open(err_path, "w") as err:  # a file, not a pipe: nothing can block on a full pipe
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    watchdog = threading.Timer(timeout, proc.kill)  # a hung trainer ends the read loop below
    watchdog.start()
    last = -1
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("done "):
                last = int(line.split()[1])
            if last >= kill_at:
                if delay:
                    time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=30)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    if last < kill_at:
        with open(err_path) as fh:
            pytest.fail(
                f"trainer ended (rc {proc.returncode}) before step {kill_at}:\n{fh.read()[-3000:]}"
            )
    assert proc.returncode == -signal.SIGKILL
    return last


# Seeded kill points: (kill after this confirmed step, extra delay before the kill).
_rng = random.Random(20261122)
KILLS = [(_rng.randrange(1, 40), delay) for delay in (0.0, 0.003, 0.02)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_at,delay", KILLS, ids=[f"step{k}-{int(d * 1000)}ms" for k, d in KILLS]
)
def test_kill_9_keeps_committed_steps(tmp_path, kill_at, delay):
    path = str(tmp_path / "killed.h5")
    confirmed = _kill_after(path, kill_at, delay)
    assert confirmed >= kill_at

    with graddiff.open(path) as run:
        assert run.status == "recording"  # never closed: the status says so
        assert not run.complete
        steps = [int(s) for s in run.steps]
        assert steps == list(range(len(steps))), "committed steps must be 0..N-1 without gaps"
        # Every step up to confirmed-2 is committed; at most two confirmed steps are lost.
        assert len(steps) >= confirmed - 1, (confirmed, steps[-3:])
        lost = max(0, confirmed + 1 - len(steps))
        assert lost <= 2
        print(
            f"kill after confirmed step {confirmed} (+{delay * 1000:.0f} ms): {len(steps)} steps committed, {lost} confirmed steps lost"
        )

        # Every stored value of every committed step reads back, fingerprint-verified.
        n_records = None
        n_values = 0
        for block in run.iter_step_blocks(16):
            for step in sorted(set(block["step"].tolist())):
                rows = block[block["step"] == step]
                n_records = len(rows) if n_records is None else n_records
                assert len(rows) == n_records, f"step {step} is partial"
            for row in block:
                assert row["flags"] & FLAG_VALUES
                arr = run.values_of(row)  # raises TraceFileError on a fingerprint mismatch
                assert arr.size == int(row["numel"])
                n_values += 1
        assert n_values == n_records * len(steps)
        # The last committed step is as complete as the first.
        last = steps[-1]
        assert run.get("grad", "6.weight", last).shape == (10, 128)
        assert run.get("buffer", "1.running_mean", last).shape == (128,)

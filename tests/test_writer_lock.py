"""A second writer never destroys a live run's file (graddiff/filelock.py).

HDF5 truncates a file it opens for writing before it tries its lock; graddiff locks first.
Checked with two real traced training processes (with and without HDF5's file locking), two
writers in one process, the lock-file fallback for filesystems without flock, and targets that
are not regular files.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import numpy as np
import pytest

import graddiff
import graddiff.filelock as filelock
from graddiff.entries import entry_from_array
from graddiff.errors import TraceFileError
from graddiff.filelock import LockError
from graddiff.writer import TraceWriter

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "train_mlp.py")
SECOND = """
import sys
from graddiff.writer import TraceWriter
try:
    TraceWriter(sys.argv[1]).close()
except OSError as exc:
    print("refused:", exc)
"""


def _step(w: TraceWriter, step: int) -> None:
    arr = np.full(4, step, np.float32)
    w.write_step(step, [entry_from_array("param", "w", arr, seq=0)])


@pytest.mark.parametrize("hdf5_locking", ["default", "FALSE"])
def test_second_training_process_leaves_the_live_run_complete(tmp_path, hdf5_locking):
    path = str(tmp_path / "run.h5")
    env = dict(os.environ)
    if hdf5_locking == "FALSE":
        env["HDF5_USE_FILE_LOCKING"] = "FALSE"
    steps = 40
    first = subprocess.Popen(
        [sys.executable, SCRIPT, path, "--steps", str(steps), "--sleep", "0.15", "--print-done"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        for line in first.stdout:
            if line.startswith("done 2"):
                break
        second = subprocess.run(
            [sys.executable, "-c", SECOND, path],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert first.poll() is None, "the first run ended before the second started"
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    assert second.returncode == 0 and second.stdout.startswith("refused: "), second
    assert "locked: another process is writing a trace to this file" in second.stdout
    with graddiff.open(path) as run:
        assert run.complete and len(run.steps) == steps
        for step in run.steps:  # every value verified against its fingerprint
            run.get("param", "0.weight", int(step))


def test_a_second_trace_to_the_same_path_is_one_clear_error(tmp_path):
    import torch

    path = str(tmp_path / "run.h5")
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    with graddiff.trace(a, path):
        a(torch.ones(1, 3)).sum().backward()
        opt.step()
        with pytest.raises(graddiff.TraceUsageError) as info:
            with graddiff.trace(b, path):
                pass
        a(torch.ones(1, 3)).sum().backward()
        opt.step()
    msg = str(info.value)
    assert "\n" not in msg and "cannot create the trace file (locked: another process" in msg
    with graddiff.open(path) as run:
        assert run.complete and list(run.steps) == [0, 1]


def test_two_writers_in_one_process(tmp_path):
    path = str(tmp_path / "run.h5")
    first = TraceWriter(path)
    _step(first, 0)
    with pytest.raises(LockError, match="locked: another process is writing"):
        TraceWriter(path)
    _step(first, 1)
    first.close()
    with graddiff.open(path) as run:
        assert list(run.steps) == [0, 1] and run.complete
    again = TraceWriter(path)  # the lock went with close()
    again.close()


def test_reader_of_a_live_file_is_told_it_is_locked(tmp_path):
    path = str(tmp_path / "run.h5")
    w = TraceWriter(path)
    _step(w, 0)
    try:
        with pytest.raises(TraceFileError, match="locked: a running trace is still writing it"):
            graddiff.open(path)
        res = subprocess.run(
            [sys.executable, "-m", "graddiff", "show", path], capture_output=True, text=True
        )
        assert res.returncode == 2 and res.stderr.count("\n") == 1
        assert "locked: a running trace is still writing it" in res.stderr
    finally:
        w.close()


def test_lock_file_where_flock_is_missing(tmp_path, monkeypatch):
    class NoFlock:
        LOCK_EX = LOCK_NB = 0

        @staticmethod
        def flock(fd, op):
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(filelock, "fcntl", NoFlock)
    path = str(tmp_path / "run.h5")
    lockfile = tmp_path / ".run.h5.graddiff-lock"
    first = TraceWriter(path)
    _step(first, 0)
    assert lockfile.exists()
    with pytest.raises(LockError, match="graddiff-lock exists"):
        TraceWriter(path)
    first.close()
    assert not lockfile.exists()
    with graddiff.open(path) as run:
        assert list(run.steps) == [0]
    # a lock file left by a killed process of this host is taken over
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    import socket

    lockfile.write_text(f"{dead}@{socket.gethostname()}")
    TraceWriter(path).close()
    assert not lockfile.exists()


@pytest.mark.parametrize("target", ["/dev/full", "dir"])
def test_targets_that_are_not_regular_files(tmp_path, target):
    if target == "dir":
        target = str(tmp_path / "a_directory.h5")
        os.mkdir(target)
    elif not os.path.exists(target):
        pytest.skip(f"no {target}")
    with pytest.raises(LockError) as info:
        TraceWriter(target)
    assert "\n" not in str(info.value) and "not a trace file" in str(info.value)
    if target != "/dev/full":  # no ballast or lock file left beside it
        assert sorted(os.listdir(tmp_path)) == ["a_directory.h5"]

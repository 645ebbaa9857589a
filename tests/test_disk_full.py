"""A trace that cannot fit: training finishes unchanged, the file keeps its committed steps.

Every case runs tests/scripts/train_mlp.py in a subprocess, because the failure modes being
guarded against are process-level: a disk-full HDF5 file can segfault the interpreter at exit
(FIELD-NOTES 10). The script trains untraced first, then traced, and prints both final losses;
they must be bitwise equal whatever happened to the trace.

- (a) ``ulimit -f`` (RLIMIT_FSIZE) of a few MB: the writer's file-size check stops recording.
- (b) a real small filesystem (tmpfs): the writer's free-space check stops recording.
- (c) errors the checks do not catch: the checks switched off on a full tmpfs, so HDF5 itself
  gets ENOSPC; and ``write_step`` raising ``OSError(28)``; and, as a documented limitation,
  HDF5 itself hitting the file-size limit.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import tempfile

import pytest

import graddiff
from graddiff.format import FLAG_VALUES
from graddiff.writer import BALLAST_BYTES, MIN_FREE_BYTES

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "train_mlp.py")
STEPS = 40


def _train(path: str, *extra: str, fsize: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:  # runs in the child before exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(
        [sys.executable, SCRIPT, path, "--compare", "--steps", str(STEPS), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit if fsize is not None else None,
    )


def _check_training(out: subprocess.CompletedProcess) -> str:
    """Exit 0, identical loss traced/untraced, exactly one graddiff warning. Returns it."""
    assert out.returncode == 0, f"rc={out.returncode}\n{out.stderr[-3000:]}"
    losses = dict(line.split() for line in out.stdout.splitlines() if "_loss " in line)
    assert losses["traced_loss"] == losses["untraced_loss"]  # float.hex: bitwise
    assert "exit-ok" in out.stdout
    warnings = [line for line in out.stderr.splitlines() if "RuntimeWarning: graddiff:" in line]
    assert len(warnings) == 1, out.stderr
    assert "Traceback" not in out.stderr
    return warnings[0]


def _check_trace(path: str, status: str) -> int:
    """The file opens with steps 0..N-1 (N >= 1), a 'stopped:' status, all values verified."""
    with graddiff.open(path) as run:
        assert run.status.startswith("stopped:"), run.status
        assert re.search(status, run.status), run.status
        assert "\n" not in run.status
        steps = [int(s) for s in run.steps]
        assert steps == list(range(len(steps)))
        assert 1 <= len(steps) < STEPS
        ents = run.entries()
        assert len(ents) and all(row["flags"] & FLAG_VALUES for row in ents)
        for row in ents:
            run.values_of(row)  # fingerprint-verified
    assert not os.path.exists(
        os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.graddiff-ballast")
    )
    return len(steps)


@pytest.fixture
def tmpfs():
    """Mount a tmpfs of the requested size (root only; skipped where mount is not allowed)."""
    mounted: list[str] = []

    def mount(size: str) -> str:
        d = tempfile.mkdtemp(prefix="graddiff-tmpfs-")
        try:
            out = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", d],
                capture_output=True,
                text=True,
            )
            why = (out.stderr.strip() or f"exit {out.returncode}") if out.returncode else ""
        except OSError as exc:  # no mount binary
            why = str(exc)
        if why:
            os.rmdir(d)
            pytest.skip(f"cannot mount a tmpfs here (needs root): {why}")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", d], check=True)
        os.rmdir(d)


@pytest.mark.slow
def test_file_size_limit(tmp_path):
    path = str(tmp_path / "limited.h5")
    out = _train(path, fsize=4_000_000)
    warning = _check_training(out)
    assert "file-size limit" in warning
    n = _check_trace(path, r"file-size limit \(ulimit -f, 4000000 bytes\)")
    assert os.path.getsize(path) <= 4_000_000
    print(f"ulimit -f 4 MB: {n} of {STEPS} steps kept, file {os.path.getsize(path)} bytes")


@pytest.mark.slow
def test_small_filesystem(tmpfs):
    # Room for the ballast and the free-space reserve plus ~6 MiB: about 30 steps of 190 KB.
    size = (MIN_FREE_BYTES + BALLAST_BYTES) // 2**20 + 6
    d = tmpfs(f"{size}m")
    path = os.path.join(d, "small.h5")
    out = _train(path)
    warning = _check_training(out)
    assert "free on the disk" in warning
    n = _check_trace(path, r"MiB free on the disk")
    print(f"tmpfs {size} MiB: {n} of {STEPS} steps kept")


@pytest.mark.slow
def test_enospc_from_hdf5_itself(tmpfs):
    """Checks off on an 8 MiB tmpfs: HDF5 really gets ENOSPC mid-step. The ballast (deleted
    before closing) lets HDF5 write its metadata, so the process exits 0 and the file reads."""
    d = tmpfs("8m")
    path = os.path.join(d, "full.h5")
    out = _train(path, "--no-space-check")
    warning = _check_training(out)
    assert "No space left on device (errno 28)" in warning
    n = _check_trace(path, r"writing step \d+ to .* failed: No space left on device \(errno 28\)")
    print(f"tmpfs 8 MiB, checks off: ENOSPC at step {n}, {n} steps kept")


@pytest.mark.slow
def test_write_step_raising_enospc(tmp_path):
    path = str(tmp_path / "raised.h5")
    out = _train(path, "--fail-write-at", "3")
    warning = _check_training(out)
    assert "writing step 3" in warning and "No space left on device (errno 28)" in warning
    assert _check_trace(path, r"writing step 3 .*No space left on device") == 3


@pytest.mark.slow
def test_file_size_limit_hit_by_hdf5_needs_padding(tmp_path):
    """Known limitation, kept visible: with the size check off, HDF5 may reserve space past the
    limit before the write fails, so the superblock claims an end of file the file never
    reached and HDF5 refuses to open it. Training is unaffected, and extending the file with
    zeros to the claimed size (``truncate -s``, where no limit applies) recovers every
    committed step, fingerprint-verified."""
    path = str(tmp_path / "efbig.h5")
    out = _train(path, "--no-space-check", fsize=4_000_000)
    warning = _check_training(out)
    assert "File too large (errno 27)" in warning
    try:  # which write meets the limit first depends on timing (a step written inline or by
        # the writer thread): where HDF5 had reserved space past it, the file needs padding
        graddiff.open(path).close()
    except graddiff.TraceFileError as exc:
        assert "truncated" in str(exc), exc
        claimed = int(re.search(r"stored_eof = (\d+)", str(exc)).group(1))
        assert os.path.getsize(path) < claimed
        os.truncate(path, claimed)
    _check_trace(path, r"File too large \(errno 27\)")


def test_space_is_checked_again_only_when_the_spare_bytes_may_run_out(tmp_path, monkeypatch):
    """Free space and ``ulimit -f`` are not checked before every step (two system calls that
    release the GIL), only when the bytes written since the last check could exceed what it
    left spare: small steps share one check, and a step larger than the spare gets its own."""
    import numpy as np

    from graddiff.entries import entry_from_array
    from graddiff.writer import RECHECK_BYTES, TraceWriter

    calls: list[int] = []
    check = TraceWriter._check_space
    monkeypatch.setattr(
        TraceWriter, "_check_space", lambda self, v: calls.append(v) or check(self, v)
    )
    w = TraceWriter(str(tmp_path / "t.h5"), ballast=False)
    small = [entry_from_array("param", "w", np.arange(16, dtype=np.float32), store_values=False)]
    for step in range(100):
        w.write_step(step, small)
    assert calls[0] == 0 and 1 < len(calls) < 10, calls  # the first step, then now and then
    big = np.ones(RECHECK_BYTES // 4 + 1, dtype=np.float32)  # more than any check leaves
    calls.clear()
    w.write_step(100, [entry_from_array("param", "w", big)])
    assert calls == [big.nbytes]
    w.close()
    with graddiff.open(str(tmp_path / "t.h5")) as run:
        assert [int(s) for s in run.steps] == list(range(101))

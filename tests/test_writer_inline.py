"""Statistics-only steps written on the training thread when the writer thread is idle.

``BackgroundWriter.submit(inline=True)``: a step that needs no device wait and keeps no
values is written by the caller when nothing handed over earlier is still unwritten; else it
is queued as before. Steps stay in order, one thread writes at a time, and a write failure
stops recording exactly as on the writer thread.
"""

from __future__ import annotations

import errno
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

import graddiff
from graddiff.entries import entry_from_array
from graddiff.writer import BackgroundWriter, TraceWriter


def _train(model, steps, path, **options):
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    with graddiff.trace(model, path, **options) as tr:
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            # the writer thread idle before the next step is submitted, whatever the load:
            # (on a busy machine a handed-over step can still be unwritten when the next
            # one arrives, which is then queued behind it, as it should be)
            tr._writer._queue.join()
    return tr._writer


def _model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _rows(path):
    with graddiff.open(path) as run:
        return [int(s) for s in run.steps], run.entries()


def test_statistics_steps_are_written_inline_with_the_same_rows(tmp_path, monkeypatch):
    """A statistics-only trace is written on the training thread (the writer thread idle)
    and holds the rows the hand-off writes."""
    inline = _train(_model(), 6, tmp_path / "inline.h5", values="stats")
    assert inline.steps_inline >= 5  # the first may find the thread still starting
    submit = BackgroundWriter.submit
    monkeypatch.setattr(
        BackgroundWriter,
        "submit",
        lambda self, step, entries, inline=False, **kw: submit(self, step, entries, **kw),
    )
    handed = _train(_model(), 6, tmp_path / "handed.h5", values="stats")
    assert handed.steps_inline == 0
    (sa, ea), (sb, eb) = _rows(tmp_path / "inline.h5"), _rows(tmp_path / "handed.h5")
    assert sa == sb == list(range(6))
    for col in ("record", "seq", "fp_sum", "fp_pos", "norm", "mean", "min", "max"):
        assert np.array_equal(ea[col], eb[col]), col


def test_steps_with_values_go_to_the_writer_thread_in_order(tmp_path):
    """Full-values steps are handed over; a statistics step after them waits its turn (the
    file's steps are in order, every value verified)."""
    w = _train(_model(), 8, tmp_path / "mixed.h5", values="stats", full_steps=[1, 2, 5])
    steps, entries = _rows(tmp_path / "mixed.h5")
    assert steps == list(range(8))
    assert 0 < w.steps_inline < 8
    with graddiff.open(tmp_path / "mixed.h5") as run:
        kept = [e for e in run.entries() if e["flags"] & 2]
        assert {int(e["step"]) for e in kept} == {1, 2, 5}
        for e in kept:
            run.values_of(e)  # fingerprint-verified


def test_an_inline_write_never_overtakes_a_step_being_written(tmp_path, monkeypatch):
    """While the writer thread writes a step it took from the queue, a later step is queued,
    not written from the caller: the file's steps stay in order."""
    started, release = threading.Event(), threading.Event()
    write = TraceWriter.write_step

    def slow(self, step, entries, **kw):
        if step == 0:
            started.set()
            release.wait(10)
        return write(self, step, entries, **kw)

    monkeypatch.setattr(TraceWriter, "write_step", slow)
    bw = BackgroundWriter(lambda: TraceWriter(str(tmp_path / "order.h5"), ballast=False))
    e = entry_from_array("param", "w", np.arange(4.0), store_values=False)
    bw.submit(0, [e])  # handed over
    assert started.wait(10)
    bw.submit(1, [e], inline=True)  # the writer is busy: queued, not written here
    assert bw.steps_inline == 0
    release.set()
    time.sleep(0.05)
    bw.submit(2, [e], inline=True)
    bw.close()
    steps, _ = _rows(tmp_path / "order.h5")
    assert steps == [0, 1, 2]


def test_an_inline_write_failure_stops_recording_with_one_warning(tmp_path, monkeypatch):
    """A write error on the training thread is handled as on the writer thread: recording
    stops with one warning, training goes on, the steps before stay readable."""
    write = TraceWriter.write_step

    def failing(self, step, entries, **kw):
        if step == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, step, entries, **kw)

    monkeypatch.setattr(TraceWriter, "write_step", failing)
    model = _model()
    with pytest.warns(RuntimeWarning, match="No space left on device") as record:
        _train(model, 6, tmp_path / "full.h5", values="stats")
    assert len([w for w in record if "graddiff" in str(w.message)]) == 1
    with graddiff.open(tmp_path / "full.h5") as run:
        assert [int(s) for s in run.steps] == [0, 1, 2]
        assert run.status.startswith("stopped:")

"""Steps of final entries (statistics only) are written on the submitting thread while the
writer thread is idle; every other step, and every step after a slow inline write, goes to the
writer thread. Either way the file holds every step, in order."""

from __future__ import annotations

import threading
import time

import numpy as np

import graddiff
import graddiff.writer as writer_module
from graddiff.entries import entry_from_array
from graddiff.writer import BackgroundWriter, TraceWriter


class _Watched(TraceWriter):
    """A TraceWriter that notes which thread wrote each step (and can be slowed down)."""

    def __init__(self, path: str, slow: dict) -> None:
        super().__init__(path)
        self.threads: dict[int, str] = {}
        self.slow = slow

    def write_step(self, step, entries, *args, **kwargs):
        self.threads[step] = threading.current_thread().name
        time.sleep(self.slow.get(step, 0.0))
        return super().write_step(step, entries, *args, **kwargs)


def _entries(step: int, values: bool = False) -> list:
    arr = np.full(3, step, np.float32)
    return [entry_from_array("param", "w", arr, seq=0, store_values=values)]


def _writer(path, slow=None) -> tuple[BackgroundWriter, list]:
    made: list[_Watched] = []

    def factory() -> _Watched:
        made.append(_Watched(str(path), slow or {}))
        return made[0]

    return BackgroundWriter(factory), made


def test_final_steps_inline_others_on_the_writer_thread(tmp_path):
    bw, made = _writer(tmp_path / "w.h5")
    me = threading.current_thread().name
    for step in range(6):
        # steps 2 and 3 carry values (not final): the writer thread takes them; the final
        # step 4 right after may find it still busy, and then queues too
        bw.submit(step, _entries(step, values=step in (2, 3)), final=step not in (2, 3))
    bw.close()
    threads = made[0].threads
    assert threads[0] == threads[1] == me
    assert threads[2] == threads[3] == "graddiff-writer"
    with graddiff.open(tmp_path / "w.h5") as run:
        assert [int(s) for s in run.steps] == list(range(6))
        assert [run.stats("param", "w", s)["max"] for s in range(6)] == list(range(6))


def test_slow_inline_write_sends_later_steps_to_the_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_module, "INLINE_MAX_SECONDS", 0.1)
    monkeypatch.setattr(writer_module, "INLINE_BACKOFF_STEPS", 3)
    bw, made = _writer(tmp_path / "w.h5", slow={1: 0.3})
    me = threading.current_thread().name
    for step in range(8):
        bw.submit(step, _entries(step), final=True)
        while bw._queue.unfinished_tasks:  # let the thread finish, so that only the
            time.sleep(0.001)  # back-off decides where the next step goes
    bw.close()
    threads = made[0].threads
    assert [threads[s] == me for s in range(8)] == [True] * 2 + [False] * 3 + [True] * 3
    with graddiff.open(tmp_path / "w.h5") as run:
        assert [int(s) for s in run.steps] == list(range(8))

"""``graddiff ranks`` reading rank files in worker processes (graddiff.ranks.parallel).

Synthetic stats-mode rank files (written with TraceWriter, no torch launch: milliseconds). What
must hold: the parallel path gives the same report and exit code as the serial one, for
consistent runs and for every kind of disagreement; a worker that meets a corrupt entries table
gives one ``Error:`` line and exit 2; the workers never import torch; the automatic choice
reads small sets serially.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import graddiff
import graddiff.ranks.parallel as parallel
from graddiff.cli import main
from graddiff.entries import EntryData
from graddiff.ranks import open_ranks
from graddiff.ranks.parallel import choose_workers, min_rows
from graddiff.writer import TraceWriter

N_RECORDS = 6  # param/grad of three layers, plus one loss


def _write(root, n_ranks=4, n_steps=5, tweak=None, run_id="synthetic"):
    """One stats-mode file per rank; ``tweak(rank, step, entries)`` may change a rank's rows."""
    rng = np.random.default_rng(0)
    fps = rng.integers(0, 2**62, size=(n_steps, N_RECORDS + n_ranks, 2))
    os.makedirs(root, exist_ok=True)
    for r in range(n_ranks):
        env = {"rank": r, "world_size": n_ranks, "run_id": run_id}
        w = TraceWriter(os.path.join(root, f"run_{r}.h5"), env, {}, ballast=False)
        for s in range(n_steps):
            ents = [
                EntryData(
                    "param" if i % 2 else "grad",
                    f"layer{i // 2}.weight",
                    0,
                    "float32",
                    (4, 4),
                    (1.0, 0.0, -1.0, 1.0, 0, 0),
                    (int(fps[s, i, 0]), int(fps[s, i, 1])),
                    seq=i,
                )
                for i in range(N_RECORDS)
            ]
            loss_fp = fps[s, N_RECORDS + r]  # each rank's own loss: never compared
            ents.append(
                EntryData(
                    "loss",
                    "loss",
                    0,
                    "float32",
                    (),
                    (1.0,) * 4 + (0, 0),
                    tuple(map(int, loss_fp)),
                    seq=99,
                )
            )
            if tweak is not None:
                ents = tweak(r, s, ents)
            w.write_step(s, ents)
        w.close()
    return [os.path.join(root, "run_*.h5")]


def _changed(rank, step, index):
    def tweak(r, s, ents):
        if r == rank and s == step:
            e = ents[index]
            ents[index] = EntryData(
                e.kind,
                e.name,
                e.call,
                e.dtype,
                e.shape,
                e.stats,
                (e.fingerprint[0] ^ 1, e.fingerprint[1]),
                seq=e.seq,
            )
        return ents

    return tweak


def _dropped(rank, step, index):
    def tweak(r, s, ents):
        return [e for i, e in enumerate(ents) if not (r == rank and s == step and i == index)]

    return tweak


def _extra_pass(rank, step):
    def tweak(r, s, ents):
        if r == rank and s == step:
            loss = ents[-1]
            ents.append(
                EntryData(
                    loss.kind,
                    loss.name,
                    1,
                    loss.dtype,
                    loss.shape,
                    loss.stats,
                    loss.fingerprint,
                    seq=100,
                )
            )
        return ents

    return tweak


def _report(files, workers):
    d = graddiff.check_ranks(files, workers=workers).to_dict()
    d.pop("seconds")
    return d


@pytest.mark.parametrize(
    "case",
    [
        ("consistent", None),
        ("param on rank 2 of 4", _changed(2, 3, 1)),
        ("grad on rank 0 of 4 (majority 1..3)", _changed(0, 1, 2)),
        ("grad missing on rank 3", _dropped(3, 2, 4)),
        ("extra pass on rank 1", _extra_pass(1, 2)),
    ],
    ids=lambda c: c[0],
)
def test_parallel_report_equals_serial(tmp_path, case):
    _, tweak = case
    files = _write(tmp_path / "r", tweak=tweak)
    serial = _report(files, 1)
    for workers in (2, 4):
        assert _report(files, workers) == serial
    assert serial["exit_code"] == (0 if tweak is None else 1)


def test_parallel_many_blocks(tmp_path, monkeypatch):
    """Blocks of a few steps: the memory-mapped arrays are voted on block by block."""
    import graddiff.ranks.consistency as consistency

    files = _write(tmp_path / "r", n_ranks=3, n_steps=9, tweak=_changed(1, 7, 3))
    monkeypatch.setattr(consistency, "BLOCK_STEPS", 2)
    serial = _report(files, 1)
    assert _report(files, 3) == serial
    assert (serial["first"]["step"], serial["first"]["odd_ranks"]) == (7, [1])


def test_corrupt_entries_in_a_worker_is_one_error_line(tmp_path):
    files = _write(tmp_path / "r", n_ranks=3)
    bad = tmp_path / "r" / "run_2.h5"
    with h5py.File(bad, "r+") as f:  # a row naming a record that does not exist
        row = f["entries"][3]
        row["record"] = 10**6
        f["entries"][3] = row
    for workers in ("1", "3"):
        result = CliRunner().invoke(main, ["ranks", "--workers", workers, *files])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2, result.output
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
        assert "run_2.h5" in lines[0] and "names a record that does not exist" in lines[0]
    # the temporary folder of the workers is gone
    assert not [n for n in os.listdir(_tmpdir()) if n.startswith("graddiff-ranks-")]


def _tmpdir():
    import tempfile

    return tempfile.gettempdir()


def test_called_from_a_script_the_workers_do_not_rerun_it(tmp_path):
    """Workers are fresh ``python -m graddiff.ranks.worker`` interpreters: a calling script
    without a ``__main__`` guard is not rerun (multiprocessing's spawn would rerun it)."""
    files = _write(tmp_path / "r", n_ranks=3, tweak=_changed(1, 2, 1))
    marker = tmp_path / "ran"
    script = tmp_path / "script.py"
    script.write_text(
        "import sys, graddiff\n"
        f"open({str(marker)!r}, 'a').write('x')\n"
        f"r = graddiff.check_ranks({files!r}, workers=3)\n"
        "print(r.exit_code, r.first['step'], r.first['odd_ranks'][0], 'torch' in sys.modules)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(graddiff.__file__)))
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "2", "1", "False"]
    assert marker.read_text() == "x"


def test_worker_output_and_imports(tmp_path):
    """A worker run as graddiff runs it: its arrays are read_block's, and it imports no torch."""
    from graddiff.ranks.consistency import key_ids, pass_records, read_block
    from graddiff.reader import RecordKey

    files = _write(tmp_path / "r", n_ranks=2, n_steps=4)
    path = str(tmp_path / "r" / "run_1.h5")
    keys = [RecordKey("param", f"layer{i}.weight", 0) for i in range(3)]
    out = tmp_path / "out"
    out.mkdir()
    spec = {
        "steps": [0, 1, 2, 3],
        "keys": [[k.kind, k.name, k.call] for k in keys],
        "skipped": [],
        "per_block": 3,
        "out": str(out),
        "jobs": [[1, path]],
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    code = (
        "import sys\n"
        "from graddiff.ranks.worker import main\n"
        f"rc = main([{str(tmp_path / 'spec.json')!r}])\n"
        "print(rc, 'torch' in sys.modules)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(graddiff.__file__)))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    *progress, last = res.stdout.strip().splitlines()
    assert last.split() == ["0", "False"], res.stderr
    assert progress == ["1"] * (1 + 2)  # heartbeats: the file opened, then each of 2 blocks
    with graddiff.open(path) as run:
        index = {k: i for i, k in enumerate(keys)}
        want = read_block(run, run.steps, key_ids(run, index, set()), 3, pass_records(run))
    for part, arr in zip(("fs", "fp", "have", "passes"), want):
        np.testing.assert_array_equal(np.load(out / f"1.{part}.npy"), arr)
    assert want[2].all() and list(want[3]) == [1, 1, 1, 1]
    del files


def test_automatic_choice(tmp_path, monkeypatch):
    files = _write(tmp_path / "r", n_ranks=3)
    rs = open_ranks(files)
    try:
        steps = rs.runs[0].steps
        monkeypatch.setattr(parallel, "usable_cpus", lambda: 8)
        assert choose_workers(rs.runs, steps, None) == 1  # a few rows: serial
        assert choose_workers(rs.runs, steps, 8) == 3  # never more workers than files
        assert choose_workers(rs.runs, steps, 1) == 1
        rows = sum(parallel.entry_rows(run) for run in rs.runs)
        monkeypatch.setattr(parallel, "ROW_COST_S", 2 * parallel.WORKER_START_S / rows)
        assert choose_workers(rs.runs, steps, None) == 3  # enough rows: one worker per file
        assert choose_workers(rs.runs[:2], steps, None) == 1  # two files: serial
        monkeypatch.setattr(parallel, "usable_cpus", lambda: 2)
        assert choose_workers(rs.runs, steps, None) == 1  # two workers never pay: serial
        assert choose_workers(rs.runs, steps, 2) == 2  # unless asked for
        monkeypatch.setattr(parallel, "usable_cpus", lambda: 1)
        assert choose_workers(rs.runs, steps, None) == 1  # no idle CPU: serial
        assert min_rows(2) > min_rows(16) > 0  # more workers repay their start sooner
    finally:
        rs.close()


def test_stalled_worker_is_stopped_with_one_error_line(tmp_path, monkeypatch):
    """A worker that makes no progress (the HDF5 library can loop forever on a corrupt
    structure) is killed after GRADDIFF_WATCHDOG seconds: one Error line, exit 2."""
    files = _write(tmp_path / "r", n_ranks=3)
    hang = [sys.executable, "-c", "import time; time.sleep(60)"]
    monkeypatch.setattr(parallel, "worker_command", lambda spec: hang)
    monkeypatch.setenv("GRADDIFF_WATCHDOG", "1")
    result = CliRunner().invoke(main, ["ranks", "--workers", "3", *files])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "run_0.h5: reading made no progress for 1 s in a worker process" in lines[0]


def test_killed_worker_is_one_error_line(tmp_path, monkeypatch):
    files = _write(tmp_path / "r", n_ranks=3)
    monkeypatch.setattr(parallel, "worker_command", lambda spec: ["sh", "-c", "kill -9 $$"])
    result = CliRunner().invoke(main, ["ranks", "--workers", "2", *files])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "the worker process ended (killed by signal 9)" in lines[0]

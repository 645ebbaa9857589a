"""graddiff.open on bad inputs: every failure is one TraceFileError line that names the file.

Traces are built with the torch-free TraceWriter (docs/CONTRACT.md), damaged on purpose, and
opened again. Byte offsets for targeted corruption come from HDF5's own storage info, so each
flip lands where the test means it to.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

import graddiff
from graddiff.entries import entry_from_array
from graddiff.errors import TraceFileError
from graddiff.format import STEP_DTYPE
from graddiff.writer import TraceWriter

N_STEPS = 4


def _write_trace(path) -> str:
    """A small valid trace: 4 steps, params, an activation and grads, all with values."""
    rng = np.random.default_rng(0)
    w = TraceWriter(str(path), environment={"rank": 0}, options={"values": "full"})
    for step in range(N_STEPS):
        w.write_step(
            step,
            [
                entry_from_array(
                    "param", "fc.weight", rng.standard_normal((16, 8)).astype(np.float32), seq=0
                ),
                entry_from_array(
                    "param", "fc.bias", rng.standard_normal(16).astype(np.float32), seq=1
                ),
                entry_from_array(
                    "activation", "fc", rng.standard_normal((4, 16)).astype(np.float32), seq=2
                ),
                entry_from_array(
                    "grad", "fc.weight", rng.standard_normal((16, 8)).astype(np.float32), seq=3
                ),
            ],
        )
    w.close()
    return str(path)


@pytest.fixture
def trace_path(tmp_path) -> str:
    return _write_trace(tmp_path / "good.h5")


def _assert_one_line_error(path, match: str) -> TraceFileError:
    with pytest.raises(TraceFileError, match=match) as info:
        run = graddiff.open(path)
        run.close()
    text = str(info.value)
    assert "\n" not in text, text
    assert str(path) in text
    return info.value


def test_good_trace_reads_back(trace_path):
    with graddiff.open(trace_path) as run:
        assert list(run.steps) == list(range(N_STEPS))
        assert run.status == "complete"
        for step in run.steps:
            assert run.get("param", "fc.weight", int(step)).shape == (16, 8)


def test_missing_path(tmp_path):
    _assert_one_line_error(tmp_path / "nope.h5", "no such file")


def test_directory(tmp_path):
    _assert_one_line_error(tmp_path, "is a directory")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.h5"
    p.write_bytes(b"")
    _assert_one_line_error(p, "empty file")


def test_text_file(tmp_path):
    p = tmp_path / "notes.h5"
    p.write_text("step,loss\n0,2.3\n1,2.1\n")
    _assert_one_line_error(p, "not a readable HDF5 file")


@pytest.mark.parametrize("keep", [8, 100, 0.5, -1], ids=["8B", "100B", "half", "minus-1B"])
def test_truncated_trace(trace_path, tmp_path, keep):
    size = os.path.getsize(trace_path)
    n = int(size * keep) if isinstance(keep, float) else (keep if keep > 0 else size + keep)
    p = tmp_path / f"cut_{n}.h5"
    with open(trace_path, "rb") as src:
        p.write_bytes(src.read(n))
    assert os.path.getsize(p) == n < size
    _assert_one_line_error(p, "truncated or not a graddiff trace")


def test_plain_hdf5_without_marker(tmp_path):
    p = tmp_path / "plain.h5"
    with h5py.File(p, "w") as f:
        f["x"] = np.arange(10)
    _assert_one_line_error(p, "not a graddiff file")


def test_newer_format_version(trace_path):
    with h5py.File(trace_path, "r+") as f:
        f.attrs["format_version"] = 99
    err = _assert_one_line_error(trace_path, "newer than this graddiff reads")
    assert "99" in str(err) and "upgrade graddiff" in str(err)


def test_missing_table(trace_path):
    with h5py.File(trace_path, "r+") as f:
        del f["entries"]
    _assert_one_line_error(trace_path, "the 'entries' table is missing")


def _values_file_offset(path: str, step: int, name: str) -> int:
    """Absolute byte offset in the file of the first value byte of a record at a step."""
    with graddiff.open(path) as run:
        rid = run.keys.index(graddiff.RecordKey("param", name))
        ents = run.entries(step, step)
        row = ents[ents["record"] == rid][0]
        in_blob = int(row["offset"])
    with h5py.File(path, "r") as f:
        ds = f[f"values/{step:08d}"]
        base = ds.id.get_offset()  # contiguous layout: the blob's start in the file
        assert base is not None
        # Sanity: the bytes at that offset are the ones the reader would return.
        expect = ds[in_blob : in_blob + 8].tobytes()
    with open(path, "rb") as fh:
        fh.seek(base + in_blob)
        assert fh.read(8) == expect
    return base + in_blob


def test_flipped_value_bytes_fail_fingerprint_on_get(trace_path):
    offset = _values_file_offset(trace_path, step=2, name="fc.weight")
    with open(trace_path, "r+b") as fh:
        fh.seek(offset + 5)
        byte = fh.read(1)
        fh.seek(offset + 5)
        fh.write(bytes([byte[0] ^ 0x5A]))
    with graddiff.open(trace_path) as run:  # the index is intact: open succeeds
        run.get("param", "fc.weight", 1)  # other steps and records are untouched
        run.get("param", "fc.bias", 2)
        with pytest.raises(TraceFileError, match="do not match their fingerprint") as info:
            run.get("param", "fc.weight", 2)
    assert "\n" not in str(info.value) and trace_path in str(info.value)


def test_inconsistent_steps_table(trace_path):
    """A steps row pointing past the entries table (a rewritten, self-consistent HDF5 file)."""
    with h5py.File(trace_path, "r+") as f:
        steps = f["steps"][:]
        steps["stop"][-1] = 10**9
        f["steps"][:] = steps
    _assert_one_line_error(trace_path, "step index is inconsistent")


def test_steps_table_bytes_overwritten(trace_path):
    """Raw garbage over the steps table's data chunk, found through HDF5's chunk index."""
    with h5py.File(trace_path, "r") as f:
        info = f["steps"].id.get_chunk_info(0)
        start, size = info.byte_offset, info.size
    assert size > 0
    with open(trace_path, "r+b") as fh:
        fh.seek(start)
        fh.write(b"\xff" * (STEP_DTYPE.itemsize * N_STEPS))  # the committed rows
    _assert_one_line_error(trace_path, "corrupt graddiff file")


def test_steps_table_with_repeated_step(trace_path):
    with h5py.File(trace_path, "r+") as f:
        steps = f["steps"][:]
        steps["step"][2] = steps["step"][1]
        f["steps"][:] = steps
    _assert_one_line_error(trace_path, "step index is inconsistent")


def test_corrupt_metadata_json(trace_path):
    with h5py.File(trace_path, "r+") as f:
        f.attrs["environment"] = "{not json"
    _assert_one_line_error(trace_path, "unreadable metadata")


def test_uncommitted_rows_are_invisible(trace_path, tmp_path):
    """Entries past the last /steps row (a step that never committed) are ignored."""
    with h5py.File(trace_path, "r+") as f:
        steps = f["steps"][:]
        f["steps"].resize((len(steps) - 1,))
    with graddiff.open(trace_path) as run:
        assert list(run.steps) == list(range(N_STEPS - 1))
        with pytest.raises(KeyError, match="not a complete step"):
            run.get("param", "fc.weight", N_STEPS - 1)


@pytest.mark.slow
def test_reading_never_imports_torch(trace_path, tmp_path):
    code = (
        "import sys, graddiff\n"
        f"run = graddiff.open({trace_path!r})\n"
        "a = run.get('param', 'fc.weight', 1)\n"
        "assert a.shape == (16, 8), a.shape\n"
        "run.entries(); run.stats('grad', 'fc.weight', 3)\n"
        "bad = []\n"
        f"for p in [{str(tmp_path / 'missing.h5')!r}, {str(tmp_path)!r}]:\n"
        "    try:\n"
        "        graddiff.open(p)\n"
        "    except graddiff.TraceFileError:\n"
        "        pass\n"
        "    else:\n"
        "        bad.append(p)\n"
        "assert not bad, bad\n"
        "assert 'torch' not in sys.modules, 'graddiff.open imported torch'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_copy_of_good_trace_still_reads(trace_path, tmp_path):
    """Control for the damage tests: copying alone does not break a trace."""
    p = tmp_path / "copy.h5"
    shutil.copy(trace_path, p)
    with graddiff.open(p) as run:
        assert len(run.steps) == N_STEPS

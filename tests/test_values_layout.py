"""Full values through the step arena and the piecewise writer, and hostile value ranges.

The recorder copies each kept CPU tensor into one reused buffer per step (graddiff/arena.py);
the writer stores the arena's referenced slots back to back in ``/values/<step>``, then any
values from elsewhere. Readers must refuse entry rows whose byte ranges overlap or leave the
step's values, with one line, never an over-read.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import graddiff
from graddiff.arena import ALIGN, Arena, ArenaPool
from graddiff.cli import main
from graddiff.entries import EntryData, entry_from_array
from graddiff.errors import TraceFileError
from graddiff.format import FLAG_VALUES
from graddiff.writer import BackgroundWriter, TraceWriter, _place_values


def test_arena_slots_are_aligned_disjoint_and_zero_padded():
    pool = ArenaPool()
    first = pool.acquire()
    assert first.capacity == 0 and first.slot(10) is None  # the first step is not sized yet
    first.seal()
    first.release()
    arena = pool.acquire()
    assert arena.capacity >= ALIGN
    arena.buf[:] = 0xAB  # what an earlier step left there
    a, b = arena.slot(3), arena.slot(5)
    assert (a, b) == (0, ALIGN)
    assert not arena.buf[3:ALIGN].any()  # padding between slots is zeroed
    assert arena.owns(arena.base + b, 5) == b
    assert arena.owns(arena.base + b, 6) is None  # past the used part
    arena.release()
    arena.release()  # idempotent
    assert pool.acquire() is arena  # reused


def test_pool_grows_to_a_step_that_did_not_fit():
    pool = ArenaPool()
    arena = pool.acquire()
    arena.seal()
    arena.release()
    small = pool.acquire()
    assert small.slot(small.capacity + 1) is None
    small.seal()  # the next arenas fit this step, with headroom
    small.release()
    big = pool.acquire()
    assert big is not small and big.capacity > small.capacity
    assert big.slot(small.capacity + 1) == 0
    pool.clear()  # the trace ended: an arena still being written is not kept afterwards
    big.release()
    assert not pool._idle


def _arena_entry(arena: Arena, name: str, arr: np.ndarray, seq: int) -> EntryData:
    off = arena.slot(arr.nbytes)
    view = arena.buf[off : off + arr.nbytes].view(arr.dtype).reshape(arr.shape)
    view[...] = arr
    e = entry_from_array("activation", name, arr, seq=seq)
    e.values = view
    return e


def test_placement_packs_referenced_slots_and_stores_others_once():
    pool = ArenaPool()
    pool._fit(4096)
    arena = pool.acquire()
    x = np.arange(7, dtype=np.float32)
    a = _arena_entry(arena, "a", x, 0)
    arena.slot(100)  # a slot no entry refers to (a gradient captured twice, say)
    b = _arena_entry(arena, "b", x * 2, 1)
    alias = entry_from_array("activation", "alias", x * 2, seq=2)
    alias.values = b.values  # one tensor under two names
    outside = entry_from_array("loss", "loss", np.float32(3.0).reshape(()), seq=3)
    twice = entry_from_array("input", "again", np.float32(3.0).reshape(()), seq=4)
    twice.values = outside.values
    stats_only = entry_from_array("param", "w", x, seq=5, store_values=False)
    off, nbytes, segments, total = _place_values([a, b, alias, outside, twice, stats_only], arena)
    assert off[:2] == [0, 28] and off[2] == off[1]  # the unused slot is left out
    assert off[3] == off[4] == 56 and off[5] == -1
    assert nbytes == [28, 28, 28, 4, 4, 0]
    assert total == 60
    blob = np.concatenate([s for _, s in segments])
    assert [o for o, _ in segments] == [0, 28, 56]
    assert blob[:28].view(np.float32).tolist() == x.tolist()
    assert blob[28:56].view(np.float32).tolist() == (x * 2).tolist()


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 16), torch.nn.ReLU(inplace=True), torch.nn.Linear(16, 3)
    )


def test_traced_values_come_from_the_arena_and_read_back_exactly(tmp_path, monkeypatch):
    from graddiff.hooks import snapshot

    copied = []  # (arena capacity, copied into it)
    into = snapshot._into_arena

    def counted(x, arena, entry):
        out = into(x, arena, entry)
        copied.append((arena.capacity, out is not None))
        return out

    monkeypatch.setattr(snapshot, "_into_arena", counted)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs = [torch.randn(5, 12) for _ in range(4)]
    params = []
    with graddiff.trace(model, tmp_path / "t.h5", values="full"):
        for x in xs:
            params.append({n: p.detach().clone() for n, p in model.named_parameters()})
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    unsized = [ok for cap, ok in copied if cap == 0]  # step 0: the arena is not sized yet
    sized = [ok for cap, ok in copied if cap > 0]  # then every tensor fits
    assert unsized and not any(unsized)
    assert len(sized) >= 3 * 12 and all(sized)
    with graddiff.open(tmp_path / "t.h5") as run:
        for step, ps in enumerate(params):
            for name, p in ps.items():
                np.testing.assert_array_equal(run.get("param", name, step), p.numpy())
            np.testing.assert_array_equal(run.get("input", "0", step), xs[step].numpy())
        rows = run.entries()
        assert (rows["flags"] & FLAG_VALUES).all()


def test_a_failed_writer_hands_every_arena_back(tmp_path):
    class Failing:
        path = str(tmp_path / "x.h5")

        def write_step(self, step, entries, arena=None):
            raise OSError(28, "No space left on device")

        def close(self, status):
            pass

    pool = ArenaPool()
    pool._fit(1024)
    bw = BackgroundWriter(Failing)
    arenas = [pool.acquire() for _ in range(3)]
    with pytest.warns(RuntimeWarning, match="No space left"):
        for i, arena in enumerate(arenas):
            arena.slot(8)
            bw.submit(i, [], arena=arena)  # after the first failure, dropped (and handed back)
        bw.close()
    assert all(a._released for a in arenas)
    assert len(pool._idle) == 3


def _trace(path) -> str:
    rng = np.random.default_rng(0)
    w = TraceWriter(str(path), options={"values": "full"})
    for step in range(2):
        w.write_step(
            step,
            [
                entry_from_array("param", "w", rng.standard_normal((4, 4)).astype(np.float32)),
                entry_from_array("param", "b", rng.standard_normal(4).astype(np.float32), seq=1),
                entry_from_array(
                    "grad", "w", rng.standard_normal((4, 4)).astype(np.float32), seq=2
                ),
            ],
        )
    w.close()
    return str(path)


def _edit_rows(path, edit) -> None:
    with h5py.File(path, "r+") as f:
        rows = f["entries"][:]
        edit(rows)
        f["entries"][:] = rows


@pytest.mark.parametrize(
    "edit, match",
    [
        # the bias's range starts inside the weight's
        (lambda r: r["offset"].__setitem__(1, 8), "overlap another entry's"),
        # same start, different length: not one tensor under two names
        (lambda r: r["offset"].__setitem__(1, 0), "overlap another entry's"),
        (lambda r: r["offset"].__setitem__(1, -5), "out of range"),
        (lambda r: r["offset"].__setitem__(1, 2**62), "out of range"),
    ],
)
def test_overlapping_or_impossible_ranges_are_refused(tmp_path, edit, match):
    path = _trace(tmp_path / "t.h5")
    _edit_rows(path, edit)
    with graddiff.open(path) as run:
        with pytest.raises(TraceFileError, match=match) as info:
            run.entries()
        with pytest.raises(TraceFileError, match=match):
            run.get("param", "w", 0)
    assert "\n" not in str(info.value) and path in str(info.value)


def test_a_range_past_the_values_is_refused_without_reading(tmp_path):
    path = _trace(tmp_path / "t.h5")
    with h5py.File(path, "r") as f:
        size = f["values/00000000"].shape[0]
    # the last entry of step 0 moved to end 1 byte past the step's values
    _edit_rows(path, lambda r: r["offset"].__setitem__(2, size - r["nbytes"][2] + 1))
    with graddiff.open(path) as run:
        run.get("param", "w", 0)  # the others still read
        with pytest.raises(TraceFileError, match="out of range"):
            run.get("grad", "w", 0)


def test_cli_refuses_overlapping_values_with_one_error_line(tmp_path):
    a = _trace(tmp_path / "a.h5")
    b = _trace(tmp_path / "b.h5")
    _edit_rows(b, lambda r: r["offset"].__setitem__(1, 8))
    res = CliRunner().invoke(main, ["compare", a, b])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and "overlap" in lines[0]


def test_an_alias_sharing_its_range_is_accepted(tmp_path):
    """One tensor recorded under two names is stored once: two rows, one range."""
    path = _trace(tmp_path / "t.h5")

    def alias(r):
        r["offset"][2], r["nbytes"][2] = r["offset"][0], r["nbytes"][0]
        r["fp_sum"][2], r["fp_pos"][2] = r["fp_sum"][0], r["fp_pos"][0]

    _edit_rows(path, alias)
    with graddiff.open(path) as run:
        np.testing.assert_array_equal(run.get("grad", "w", 0), run.get("param", "w", 0))


# -- the values' file range reserved before the write (graddiff/falloc.py) -------------------
def _big_steps(path, reserve: bool, steps: int = 3) -> tuple[TraceWriter, list[np.ndarray]]:
    rng = np.random.default_rng(1)
    w = TraceWriter(str(path), options={"values": "full"}, ballast=False)
    if not reserve:
        w._reserver.fd = None
    arrays = []
    for step in range(steps):
        a = rng.standard_normal(40_003).astype(np.float32)  # 160 KB: above RESERVE_BYTES
        b = rng.standard_normal(7).astype(np.float64)  # a small one in the same step
        arrays.append((a, b))
        w.write_step(
            step, [entry_from_array("param", "a", a), entry_from_array("param", "b", b, seq=1)]
        )
    return w, arrays


def test_reserved_values_read_back_and_the_file_is_the_same_size(tmp_path):
    """Reserving each step's range changes no byte that readers see: the values read back
    exactly, and the file has the size it has without reservation (KEEP_SIZE)."""
    from graddiff import falloc

    sizes = {}
    for reserve in (True, False):
        path = tmp_path / f"r{int(reserve)}.h5"
        w, arrays = _big_steps(path, reserve)
        reserved = w._reserver.reserved
        w.close()
        sizes[reserve] = path.stat().st_size
        if reserve and falloc._FALLOCATE is not None and w._reserver.refused is None:
            with h5py.File(path, "r") as f:  # every step's whole values dataset
                assert reserved == sum(f["values"][k].shape[0] for k in f["values"]) > 0
        with graddiff.open(path) as run:
            for step, (a, b) in enumerate(arrays):
                np.testing.assert_array_equal(run.get("param", "a", step), a)
                np.testing.assert_array_equal(run.get("param", "b", step), b)
    assert sizes[True] == sizes[False]


def test_a_refused_reservation_switches_it_off_and_the_writes_go_on(tmp_path, monkeypatch):
    from graddiff import falloc

    calls = []

    def refuse(fd, mode, offset, nbytes):
        calls.append((mode, offset, nbytes))
        return -1

    monkeypatch.setattr(falloc, "_FALLOCATE", refuse)
    w, arrays = _big_steps(tmp_path / "t.h5", reserve=True)
    assert len(calls) == 1 and calls[0][0] == falloc.FALLOC_FL_KEEP_SIZE  # then off
    assert w._reserver.refused is not None and w._reserver.reserved == 0
    w.close()
    with graddiff.open(tmp_path / "t.h5") as run:
        for step, (a, _) in enumerate(arrays):
            np.testing.assert_array_equal(run.get("param", "a", step), a)


def test_the_reserved_range_is_the_values_dataset(tmp_path, monkeypatch):
    """What is reserved is exactly each step's values dataset (its HDF5 file range)."""
    from graddiff import falloc

    seen = []
    real = falloc._FALLOCATE
    monkeypatch.setattr(
        falloc,
        "_FALLOCATE",
        lambda fd, mode, off, n: seen.append((off, n)) or (real(fd, mode, off, n) if real else 0),
    )
    w, _ = _big_steps(tmp_path / "t.h5", reserve=True)
    if w._reserver.fd is None and not seen:
        w.close()
        pytest.skip("no HDF5 file descriptor to reserve through on this platform")
    w.close()
    with h5py.File(tmp_path / "t.h5", "r") as f:
        ranges = [(f["values"][k].id.get_offset(), f["values"][k].shape[0]) for k in f["values"]]
    assert seen == ranges

"""The value path of one full-values step, piece by piece, against torch.save of the same tensors.

Takes the tensors graddiff records in full mode at one training step (inputs, activations,
output gradients, parameters, gradients, buffers, loss: bench_record.py's ``save_all`` set) and
times, interleaved round-robin in one process (the order rotates), per step:

    copy, then stats  torch ``copy_`` into the step's arena, then the fused statistics pass over
                      the copy (what full mode did before the fused copy: two reads)
    fused copy+stats  ``snapshot.copy_and_stats``: one read of each tensor that copies it into
                      the arena and takes its statistics and fingerprint (what it does now)
    write (graddiff)  ``TraceWriter.write_step`` of those entries from the arena: rows, one
                      values dataset written in ``WRITE_BYTES`` pieces, flush (page cache)
    write, no reserve the same with the file range not reserved first (``graddiff.falloc``
                      switched off: what the writer did before)
    raw pwrite        the same bytes with ``os.pwrite`` in the same pieces (no HDF5: the floor
                      of any writer into the page cache)
    torch.save        ``torch.save`` of the same tensors to a new file (CRC32 on, the default)
    torch.save, no CRC  the same with ``torch.serialization.set_crc32_options(False)``

Thread CPU time of the timing thread (copies and writes run there; the fused pass splits
tensors of 2 MiB and more across ``--threads`` threads, whose time is counted by taking
process CPU time instead: ``cpu`` below is process CPU) and wall time; medians over rounds of
the per-step median, and the minimum. Run by hand (writes about ``--steps`` x 2 steps of values
per round to a scratch folder on the repository's disk, removed at the end)::

    python benchmarks/bench_value_path.py --model mlp --rounds 7 --steps 5
    python benchmarks/bench_value_path.py --model resnet18 --rounds 5 --steps 3
    python benchmarks/bench_value_path.py --model mlp_small --rounds 7 --steps 50
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_record as br  # noqa: E402

from graddiff.arena import ArenaPool  # noqa: E402
from graddiff.entries import EntryData  # noqa: E402
from graddiff.hooks import snapshot  # noqa: E402
from graddiff.writer import WRITE_BYTES, TraceWriter  # noqa: E402


def step_tensors(wl: br.Workload) -> dict[str, torch.Tensor]:
    """The tensors of one training step that full mode records (contiguous CPU copies)."""
    torch.manual_seed(0)
    model, opt = wl.fresh()
    keep: dict[str, torch.Tensor] = {}
    col = br.Collector(model, lambda k, t: keep.__setitem__(k, t.detach().clone()))
    before = {f"param0/{n}": p.detach().clone() for n, p in model.named_parameters()}
    loss = br.train_step(model, opt, wl.batches[0], None, wl.loss_fn)
    col.remove()
    out = {**before, **keep}
    for k, t in br.state_tensors(model, loss).items():
        out[k] = t.detach().clone()
    return {k: t.contiguous() for k, t in out.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mlp", choices=br.MODELS)
    p.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resnet-batch", type=int, default=16)
    p.add_argument("--resnet-size", type=int, default=64)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    wl = br.Workload(a.model, a)
    tensors = step_tensors(wl)
    items = list(tensors.items())
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    scratch = tempfile.mkdtemp(prefix="graddiff-vpath-", dir=br.same_disk_tmp())
    pool = ArenaPool()
    pool._fit(sum(-(-max(t.nbytes, 1) // 64) * 64 for t in tensors.values()))

    def fill(fused: bool):
        """One step's capture into a fresh arena: (arena, entries)."""
        arena = pool.acquire()
        entries = []
        for seq, (name, t) in enumerate(items):
            off = arena.slot(t.numel() * t.element_size())
            whole = torch.from_numpy(arena.buf)
            dst = whole[off : off + t.nbytes].view(t.dtype).view(t.shape)
            e = EntryData(
                "param",
                name,
                0,
                snapshot.dtype_name(t.dtype),
                tuple(t.shape),
                (0.0,) * 4 + (0, 0),
                (0, 0),
                None,
                0,
                seq,
            )
            done = snapshot.copy_and_stats(t, dst, arena.base + off) if fused else None
            if done is None:
                dst.copy_(t)
                done = snapshot.stats_on_cpu(dst)
            e.stats, e.fingerprint = done
            e.values = snapshot._to_numpy_bytes(dst)
            entries.append(e)
        return arena, entries

    prepared = fill(True)
    writer_state: dict[str, object] = {}

    def write_graddiff(reserve: bool) -> Callable[[int], None]:
        key = f"w{int(reserve)}"

        def run(i: int) -> None:
            w = writer_state.get(key)
            if w is None:
                w = writer_state[key] = TraceWriter(
                    os.path.join(scratch, f"{key}.h5"), ballast=False
                )
                if not reserve:
                    w._reserver.fd = None  # type: ignore[attr-defined]
            w.write_step(i, prepared[1], arena=prepared[0])  # type: ignore[union-attr]

        return run

    def write_raw(i: int) -> None:
        fd = writer_state.get("fd")
        if fd is None:
            fd = writer_state["fd"] = os.open(
                os.path.join(scratch, "r.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            )
        buf = prepared[0].buf[: prepared[0].used]
        for k in range(0, buf.size, WRITE_BYTES):
            os.pwrite(fd, buf[k : k + WRITE_BYTES], i * buf.size + k)  # type: ignore[arg-type]

    def save(i: int, crc: bool) -> None:
        torch.serialization.set_crc32_options(crc)
        try:
            torch.save(tensors, os.path.join(scratch, f"s{i}.pt"))
        finally:
            torch.serialization.set_crc32_options(True)

    def capture(fused: bool) -> Callable[[int], None]:
        def run(i: int) -> None:
            arena, _ = fill(fused)
            arena.release()

        return run

    variants: dict[str, Callable[[int], None]] = {
        "copy, then stats": capture(False),
        "fused copy+stats": capture(True),
        "write (graddiff)": write_graddiff(True),
        "write, no reserve": write_graddiff(False),
        "raw pwrite": write_raw,
        "torch.save": lambda i: save(i, True),
        "torch.save, no CRC": lambda i: save(i, False),
    }
    names = list(variants)
    res: dict[str, list[tuple[float, float]]] = {k: [] for k in names}
    try:
        for r in range(a.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                cpu, wall = [], []
                for i in range(a.steps):
                    c0, w0 = time.process_time(), time.perf_counter()
                    variants[name](i)
                    cpu.append(time.process_time() - c0)
                    wall.append(time.perf_counter() - w0)
                res[name].append((statistics.median(cpu), statistics.median(wall)))
            for key in ("w0", "w1"):
                w = writer_state.pop(key, None)
                if w is not None:
                    w.close()  # type: ignore[attr-defined]
            fd = writer_state.pop("fd", None)
            if fd is not None:
                os.close(fd)  # type: ignore[arg-type]
            for f in os.listdir(scratch):
                os.unlink(os.path.join(scratch, f))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(
        f"{a.model}: {len(items)} tensors, {total / 1e6:.1f} MB per step, {a.rounds} rounds x "
        f"{a.steps} steps, {a.threads} torch thread(s), load average {os.getloadavg()[0]:.1f}"
    )
    print("  ms per step: process CPU median (min) | wall median (min)")
    for name in names:
        c = [x[0] * 1e3 for x in res[name]]
        w = [x[1] * 1e3 for x in res[name]]
        print(
            f"  {name:20s} CPU {statistics.median(c):8.2f} ({min(c):7.2f}) | "
            f"wall {statistics.median(w):8.2f} ({min(w):7.2f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

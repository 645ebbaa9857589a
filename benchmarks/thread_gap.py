"""Where statistics recording's extra time goes with 1 and 2 torch threads: per thread, per phase.

Runs untraced training and ``trace(values="stats")`` variants in interleaved rounds in one
process (same model, weights and batches), at each torch thread count of ``--threads``, and
reports per step: wall time, process CPU, the CPU of each thread (main, torch's OpenMP
workers, graddiff's writer and fused-pass helper) read from ``/proc/self/task/*/schedstat``
(nanoseconds), the main thread's voluntary context switches (it blocked: on the GIL, a lock,
I/O) and involuntary ones (preempted), and the wall time the training thread spends inside
the statistics pass (``stats_on_cpu``). Variants:

    untraced     plain training
    stats        graddiff.trace(values="stats"), as shipped
    stats_nowrite  stats with the writer's HDF5 work skipped (its share of the overhead)

``--micro`` instead times the statistics pass of one 9.4 MB float32 tensor (resnet18's
layer4 conv weight) right after a parallel torch op (torch's OpenMP worker then spins on the
other core) and after a 10 ms sleep (the worker asleep): one compiled call on the calling
thread, as graddiff does, against the same work split in two halves with the second on a
helper thread (how graddiff split tensors of 2 MiB or more until 2026-12-01; the halves'
sums are not combined here, only their time is measured).

Usage::

    python benchmarks/thread_gap.py --model resnet18 --threads 1,2 --steps 12 --rounds 4
    python benchmarks/thread_gap.py --micro --rounds 100
    OMP_WAIT_POLICY=passive python benchmarks/thread_gap.py --micro --rounds 100
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_record as br  # noqa: E402

import graddiff  # noqa: E402
from graddiff import writer as gwriter  # noqa: E402
from graddiff.hooks import fused, snapshot  # noqa: E402
from graddiff.hooks.snapshot import FP_BLOCK_WORDS  # noqa: E402
from graddiff.kinds import ALL_KINDS  # noqa: E402


def task_times() -> dict[int, tuple[int, int, int]]:
    """tid -> (CPU ns, voluntary, involuntary context switches) of every thread."""
    out = {}
    base = "/proc/self/task"
    for tid in os.listdir(base):
        try:
            with open(f"{base}/{tid}/schedstat") as fh:
                ns = int(fh.read().split()[0])
            vol = inv = 0
            with open(f"{base}/{tid}/status") as fh:
                for line in fh:
                    if line.startswith("voluntary_ctxt_switches"):
                        vol = int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        inv = int(line.split()[1])
            out[int(tid)] = (ns, vol, inv)
        except (OSError, ValueError, IndexError):
            continue
    return out


def role(tid: int) -> str:
    if tid == threading.main_thread().native_id:
        return "main"
    for t in threading.enumerate():
        if t.native_id == tid:
            if t.name.startswith("graddiff-writer"):
                return "writer"
            if t.name.startswith("graddiff-fused"):
                return "fused"
            return "py:" + t.name
    return "omp"  # torch's OpenMP / interop workers (no Python thread object)


def run(variant: str, wl: br.Workload, steps: int, tmp: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model, opt = wl.fresh()
    wall: list[float] = []
    cpu: list[float] = []
    in_stats = [0.0]
    orig_stats = snapshot.stats_on_cpu

    def timed_stats(x):  # the training thread's time in the pass (writer calls not counted)
        if threading.get_ident() != main_ident:
            return orig_stats(x)
        t = time.perf_counter()
        try:
            return orig_stats(x)
        finally:
            in_stats[0] += time.perf_counter() - t

    main_ident = threading.main_thread().ident
    skip = max(1, steps // 5)
    acc: dict[str, list[float]] = {}
    inv = [0, 0]

    def loop() -> None:
        t_before: dict = {}
        for i in range(steps):
            if i == skip:
                t_before = task_times()
                in_stats[0] = 0.0
            c0, t0 = time.process_time(), time.perf_counter()
            br.train_step(model, opt, wl.batches[i % len(wl.batches)], None, wl.loss_fn)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        after = task_times()
        n = steps - skip
        for tid, (ns, _, ic) in after.items():
            b = t_before.get(tid, (0, 0, 0))
            r = role(tid)
            acc.setdefault(r, []).append((ns - b[0]) / 1e9 / n)
            if r == "main":
                inv[0] = (ic - b[2]) / n
                inv[1] = (after[tid][1] - b[1]) / n

    saved_write = gwriter.TraceWriter.write_step
    if variant == "untraced":
        loop()
    else:
        if variant == "stats_nowrite":
            gwriter.TraceWriter.write_step = lambda self, step, entries, **kw: 0
        snapshot.stats_on_cpu = timed_stats
        try:
            path = os.path.join(tmp, f"{variant}.h5")
            with graddiff.trace(model, path, kinds=list(ALL_KINDS), values="stats"):
                loop()
                t_end = time.perf_counter()
            wall[-1] += time.perf_counter() - t_end  # the last step's write, at exit
        finally:
            snapshot.stats_on_cpu = orig_stats
            gwriter.TraceWriter.write_step = saved_write
    n = steps - skip
    return {
        "wall": statistics.median(wall[skip:]),
        "wall_mean": sum(wall[skip:]) / n,
        "cpu": sum(cpu[skip:]) / n,
        "threads": {k: sum(v) for k, v in acc.items()},
        "inv": inv[0],
        "vol": inv[1],
        "stats_s": in_stats[0] / n,
        "state": br.final_state(model),
    }


def micro(rounds: int) -> None:
    """One 9.4 MB tensor: one call vs two halves (one on a helper thread), OpenMP worker
    spinning or asleep."""
    from concurrent.futures import ThreadPoolExecutor

    torch.set_num_threads(2)
    arr = torch.randn(512 * 512 * 9).numpy()
    half = arr.size // 2
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    pool = ThreadPoolExecutor(1, thread_name_prefix="helper")
    shift = FP_BLOCK_WORDS.bit_length() - 1

    def one() -> None:
        fused.summarise(arr, shift)

    def split() -> None:
        fut = pool.submit(fused.summarise, arr[half:], shift)
        fused.summarise(arr[:half], shift)
        fut.result()

    split(), one()  # compile, start the helper
    res: dict[tuple[bool, str], list[tuple[float, float]]] = {}
    for _ in range(rounds):
        for spinning in (True, False):
            for name, fn in (("one call", one), ("split in two", split)):
                if spinning:
                    for _ in range(3):
                        torch.mm(a, b)  # a parallel region: the OpenMP worker now spins
                else:
                    time.sleep(0.01)  # the worker's spin has expired: it sleeps
                t0, c0 = time.perf_counter(), time.thread_time()
                fn()
                res.setdefault((spinning, name), []).append(
                    (time.perf_counter() - t0, time.thread_time() - c0)
                )
    print(
        f"9.4 MB float32, {rounds} rounds, 2 torch threads, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}, load average {os.getloadavg()[0]:.1f}"
    )
    for (spinning, name), v in sorted(res.items()):
        walls = sorted(w for w, _ in v)
        print(
            f"  OpenMP worker {'spinning' if spinning else 'asleep  '}  {name:12s}: wall median "
            f"{statistics.median(walls) * 1e3:.2f} ms (25th percentile "
            f"{walls[len(walls) // 4] * 1e3:.2f}), calling thread CPU "
            f"{statistics.median(c for _, c in v) * 1e3:.2f} ms"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18", choices=br.MODELS)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--variants", default="untraced,stats,stats_nowrite")
    p.add_argument("--micro", action="store_true", help="the one-tensor split timing instead")
    a = p.parse_args()
    if a.micro:
        micro(a.rounds)
        return 0
    wl = br.Workload(a.model, argparse.Namespace(resnet_size=64, resnet_batch=16))
    variants = a.variants.split(",")
    threads = [int(t) for t in a.threads.split(",")]
    tmp = tempfile.mkdtemp(prefix="graddiff-gap-", dir=br.same_disk_tmp())
    res: dict[tuple[int, str], list[dict]] = {}
    for nt in threads:  # warm-up: oneDNN primitives, the allocator, numba's kernels
        torch.set_num_threads(nt)
        for v in ("untraced", "stats"):
            run(v, wl, 3, tmp)
    for r in range(a.rounds):
        for nt in threads:
            torch.set_num_threads(nt)
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            runs = {v: run(v, wl, a.steps, tmp) for v in order}
            base = runs["untraced"]["state"]
            for v in order:  # bitwise against this round's untraced run; states not kept
                runs[v]["ok"] = br.bitwise_equal(runs[v].pop("state"), base)
            for v in order:
                res.setdefault((nt, v), []).append(runs[v])
    print(
        f"{a.model}: {a.rounds} rounds x {a.steps} steps (first {max(1, a.steps // 5)} not "
        f"counted), load average {os.getloadavg()[0]:.1f}; per step, medians over rounds; "
        f"x: ratio to the same round's untraced run"
    )
    for nt in threads:
        base = res[(nt, "untraced")]
        for v in variants:
            rs = res[(nt, v)]
            wr = [x["wall"] / b["wall"] for x, b in zip(rs, base)]
            cr = [x["cpu"] / b["cpu"] for x, b in zip(rs, base)]
            roles = sorted({k for x in rs for k in x["threads"]})
            per = ", ".join(
                f"{k} {statistics.median(x['threads'].get(k, 0.0) for x in rs) * 1e3:.1f}"
                for k in roles
            )
            ok = all(x["ok"] for x in rs)
            print(
                f"  {nt} thr {v:14s} wall {statistics.median(x['wall'] for x in rs) * 1e3:7.1f} ms"
                f" x{statistics.median(wr):.3f} ({min(wr):.3f}-{max(wr):.3f})"
                f"  CPU {statistics.median(x['cpu'] for x in rs) * 1e3:7.1f} ms"
                f" x{statistics.median(cr):.3f}"
                f"  pass {statistics.median(x['stats_s'] for x in rs) * 1e3:5.1f} ms"
                f"  main switches: waits {statistics.median(x['vol'] for x in rs):5.1f},"
                f" preempted {statistics.median(x['inv'] for x in rs):5.1f}"
                f"  thread CPU ms: {per}  bitwise {'OK' if ok else 'MISMATCH'}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

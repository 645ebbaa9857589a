"""Two versions of graddiff's recorder side by side in one process: CPU time per step.

On a loaded machine only CPU-time ratios from interleaved rounds in one process mean anything;
comparing two versions in two processes mixes the change with the load. This script exports
each git ref's ``graddiff`` package (with ``hooks/`` as ``graddiff.hooks``, as installed) into a
temporary folder under its own name, imports both, and runs untraced training and
``trace(values="stats")`` (or ``--values full``) under each version in interleaved rounds,
with the same model, weights and batches::

    python benchmarks/ab_record.py main HEAD --model deep_tiny --steps 200 --rounds 6
    python benchmarks/ab_record.py main HEAD --model resnet18 --steps 10 --rounds 6
    python benchmarks/ab_record.py main HEAD --model mlp --values full --steps 20 --threads 2

Reports per version: process CPU per step (all threads) and the main thread's, CPU ×
untraced (median and range over rounds), wall × untraced, CPU and wall µs per record, and minor page
faults per step. With ``--values full`` the writer's work after the loop (its last steps, the
close) is included: each run's CPU and wall are taken over the whole ``with trace`` block and
divided by the steps; ``--totals`` does the same in stats mode (the honest figure under
load, where a writer thread that falls behind works in bursts that a median of steps misses).
Models: those of bench_record.py, and ``deep_tiny`` (30 blocks of Linear(16, 16) + ReLU at
batch 8, 257 records per step: the per-record cost dominates).
"""

from __future__ import annotations

import argparse
import importlib
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import bench_record as br  # noqa: E402


def export(ref: str, name: str, into: str) -> None:
    """``ref``'s graddiff package as the importable package ``name`` inside ``into``."""
    archive = os.path.join(into, f"{name}.tar")
    subprocess.run(
        ["git", "-C", REPO, "archive", "-o", archive, ref, "graddiff", "hooks"], check=True
    )
    tmp = os.path.join(into, f"{name}.src")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
    os.rename(os.path.join(tmp, "graddiff"), os.path.join(into, name))
    os.rename(os.path.join(tmp, "hooks"), os.path.join(into, name, "hooks"))


def workload(name: str) -> br.Workload:
    if name != "deep_tiny":
        return br.Workload(name, argparse.Namespace(resnet_size=64, resnet_batch=16))
    wl = br.Workload("mlp_small", argparse.Namespace())
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(784, 16)]
    for _ in range(30):
        layers += [nn.Linear(16, 16), nn.ReLU()]
    wl.model = nn.Sequential(*layers, nn.Linear(16, 10))
    wl.batches = [(x[:8], y[:8]) for x, y in wl.batches]
    wl.name = "deep_tiny"
    return wl


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("refs", nargs=2, help="two git refs (e.g. main HEAD)")
    p.add_argument("--model", default="mlp_small", choices=(*br.MODELS, "deep_tiny"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--values", default="stats", choices=("stats", "full"))
    p.add_argument(
        "--totals",
        action="store_true",
        help="CPU and wall over the whole run (trace entry to exit) per step, not medians of "
        "steps: a writer thread that falls behind under load does its work in a few steps, "
        "which a median of steps leaves out",
    )
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    tmp = tempfile.mkdtemp(prefix="graddiff-ab-", dir=br.same_disk_tmp())
    names = {"gd_a": a.refs[0], "gd_b": a.refs[1]}
    for name, ref in names.items():
        export(ref, name, tmp)
    sys.path.insert(0, tmp)
    mods = {name: importlib.import_module(name) for name in names}
    kinds = importlib.import_module("gd_a.kinds").ALL_KINDS
    wl = workload(a.model)

    def run(version: str) -> tuple[float, float, float, float]:
        torch.manual_seed(0)
        model, opt = wl.fresh()
        cpu: list[float] = []
        main_thread: list[float] = []
        wall: list[float] = []
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt

        def loop() -> None:
            for i in range(a.steps):
                c0, t0, w0 = time.process_time(), time.thread_time(), time.perf_counter()
                br.train_step(model, opt, wl.batches[i % len(wl.batches)], None, wl.loss_fn)
                cpu.append(time.process_time() - c0)
                main_thread.append(time.thread_time() - t0)
                wall.append(time.perf_counter() - w0)

        c_all, w_all = time.process_time(), time.perf_counter()
        if version == "untraced":
            loop()
        else:
            path = os.path.join(tmp, f"{version}.h5")
            with mods[version].trace(model, path, kinds=list(kinds), values=a.values):
                loop()
        c_all, w_all = time.process_time() - c_all, time.perf_counter() - w_all
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / a.steps
        skip = len(cpu) // 10  # warm-up steps
        if a.values == "full" or a.totals:  # the writer's last steps and the close included
            return c_all / a.steps, statistics.median(main_thread[skip:]), faults, w_all / a.steps
        return (
            statistics.median(cpu[skip:]),
            statistics.median(main_thread[skip:]),
            faults,
            statistics.median(wall[skip:]),
        )

    versions = ["untraced", *names]
    res: dict[str, list[tuple[float, float, float, float]]] = {v: [] for v in versions}
    for r in range(a.rounds):
        for v in versions[r % 3 :] + versions[: r % 3]:
            res[v].append(run(v))
    import h5py

    with h5py.File(os.path.join(tmp, "gd_b.h5"), "r") as f:
        records = f["entries"].shape[0] / f["steps"].shape[0]
    base = [x[0] for x in res["untraced"]]
    print(
        f"{a.model}: {records:.0f} records/step, {a.rounds} rounds x {a.steps} steps, "
        f"{a.threads} torch thread(s), values={a.values}, load average {os.getloadavg()[0]:.1f}"
    )
    base_wall = [x[3] for x in res["untraced"]]
    for v in versions:
        ratios = [x[0] / b for x, b in zip(res[v], base)]
        walls = [x[3] / b for x, b in zip(res[v], base_wall)]
        us = [(x[0] - b) / records * 1e6 for x, b in zip(res[v], base)]
        us_wall = [(x[3] - b) / records * 1e6 for x, b in zip(res[v], base_wall)]
        label = v if v == "untraced" else f"{names[v]}"
        print(
            f"  {label:12s} CPU {statistics.median(x[0] for x in res[v]) * 1e3:8.3f} ms/step "
            f"(main thread {statistics.median(x[1] for x in res[v]) * 1e3:8.3f}), "
            f"x untraced {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}), "
            f"wall x {statistics.median(walls):.3f} ({min(walls):.3f}-{max(walls):.3f}), "
            f"CPU us/record {statistics.median(us):6.1f}, "
            f"wall us/record {statistics.median(us_wall):6.1f}, "
            f"faults/step {statistics.median(x[2] for x in res[v]):.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

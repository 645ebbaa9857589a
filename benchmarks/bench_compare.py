"""Benchmark ``graddiff.compare``: time to the verdict and peak memory vs. the traces' length.

Two synthetic traces of a small MLP (8-64-64-4: 6 params, input, 5 activations, loss, 6 grads,
2 buffers; full values every step), written with TraceWriter + entry_from_array, that diverge
near the end. Two scenarios:

* ``identical``: bitwise equal until the divergence (same code, same machine);
* ``noisy``: rounding-level noise in every gradient from step 1 on (a refactored loop), so the
  differ must read full values at every step to rule out a divergence before the real one.

Usage: python benchmarks/bench_compare.py [--steps 500 2000] [--repeat 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import tracemalloc

import numpy as np

import graddiff
from graddiff.entries import entry_from_array
from graddiff.writer import TraceWriter

SHAPES = {
    "0.weight": (64, 8),
    "0.bias": (64,),
    "2.weight": (64, 64),
    "2.bias": (64,),
    "4.weight": (4, 64),
    "4.bias": (4,),
}


def _step_entries(step: int, rng: np.random.Generator, diverge: bool, noise: float) -> list:
    ents, seq = [], 0

    def add(kind, name, arr):
        nonlocal seq
        seq += 1
        ents.append(entry_from_array(kind, name, arr.astype(np.float32), seq=seq))

    for name, shape in SHAPES.items():
        p = rng.standard_normal(shape)
        add("param", name, p * (1.5 if diverge and name == "2.weight" else 1.0))
    add("input", "0", rng.standard_normal((32, 8)))
    for name in ("0", "1", "2", "3", "4"):
        add("activation", name, rng.standard_normal((32, 4 if name == "4" else 64)))
    add("loss", "loss", np.array(rng.random()))
    for name, shape in SHAPES.items():
        g = rng.standard_normal(shape)
        add("grad", name, g * (1 + noise * np.sign(g)) if noise else g)
    add("buffer", "bn.running_mean", rng.standard_normal(64))
    add("buffer", "bn.running_var", rng.random(64))
    return ents


def build(path: str, n_steps: int, diverge_at: int, noise: float) -> str:
    """Write one trace; ``diverge_at`` < 0: never diverges. An existing file is reused."""
    if os.path.exists(path):
        return path
    w = TraceWriter(path, environment={"device": "cpu"}, ballast=False)
    for step in range(n_steps):
        rng = np.random.default_rng(step)  # both traces draw the same numbers
        eps = noise if step >= 1 else 0.0
        w.write_step(step, _step_entries(step, rng, 0 <= diverge_at <= step, eps))
    w.close()
    return path


def measure(a: str, b: str, repeat: int) -> tuple[float, float, float, float, graddiff.Report]:
    """Best time to the verdict (paths in, report out); memory of the two runs' index once
    opened, and the peak the comparison adds on top of it (tracemalloc sees numpy buffers)."""
    times, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        report = graddiff.compare(a, b)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    tracemalloc.start()
    with graddiff.open(a) as ra, graddiff.open(b) as rb:
        index = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        graddiff.compare(ra, rb)
        peak = tracemalloc.get_traced_memory()[1] - index
    tracemalloc.stop()
    return min(times), min(cpu), index / 2**20, peak / 2**20, report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[500, 2000])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--dir", default=None, help="where to keep the traces (reused; default: a temp dir)"
    )
    args = ap.parse_args()
    d = args.dir or tempfile.mkdtemp(prefix="graddiff-bench-")
    os.makedirs(d, exist_ok=True)
    print(
        "| scenario | steps | MiB/trace | verdict (s) | CPU (s) | index (MiB) | compare peak (MiB) | verdict |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for scenario, noise in (("identical", 0.0), ("noisy", 3e-7)):
        for n in args.steps:
            at = n - 10
            a = build(os.path.join(d, f"{scenario}{n}_a.h5"), n, -1, 0.0)
            b = build(os.path.join(d, f"{scenario}{n}_b.h5"), n, at, noise)
            secs, cpu, index, peak, report = measure(a, b, args.repeat)
            size = os.path.getsize(a) / 2**20
            row = [
                scenario,
                n,
                f"{size:.1f}",
                f"{secs:.3f}",
                f"{cpu:.3f}",
                f"{index:.2f}",
                f"{peak:.1f}",
                report.headline(),
            ]
            print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()

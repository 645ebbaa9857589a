"""Benchmark name mapping: ``propose_map`` vs. module count, and ``compare --map`` overhead.

1. ``propose``: two synthetic one-step traces of N transformer-like layers (8 modules and 8
   weights each, statistics only), named ``blocks.{i}.*`` and ``layers.{i}.*``; time of
   ``propose_map`` (the forward-order alignment plus parameter matching).
2. ``compare``: a trace of S steps (full values) compared with a bitwise copy of itself
   (plain ``compare``) and with a renamed copy through a two-rule map (``compare(name_map=)``,
   which writes the mapped copy of B first); interleaved rounds, ratio of medians.

Usage: python benchmarks/bench_map.py [--layers 25 60 125] [--steps 200] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

import graddiff
from graddiff.diff.automap import propose_map
from graddiff.entries import entry_from_array
from graddiff.writer import TraceWriter

MODULES = (("ln", 8), ("q", 8), ("k", 8), ("v", 8), ("o", 8), ("fc1", 32), ("act", 32), ("fc2", 8))


def write(path: str, steps: list[list]) -> str:
    w = TraceWriter(path, {}, {}, ballast=False)
    for i, entries in enumerate(steps):
        w.write_step(i, entries)
    w.close()
    return path


def layered(path: str, prefix: str, n_layers: int) -> str:
    rng = np.random.default_rng(0)
    ents, seq = [], 0
    for i in range(n_layers):
        for name, d in MODULES:
            act = rng.standard_normal((2, d)).astype(np.float32)
            w = rng.standard_normal((d, 8)).astype(np.float32)
            ents.append(
                entry_from_array(
                    "activation", f"{prefix}.{i}.{name}", act, seq=seq, store_values=False
                )
            )
            ents.append(
                entry_from_array(
                    "param", f"{prefix}.{i}.{name}.weight", w, seq=seq + 1, store_values=False
                )
            )
            seq += 2
    return write(path, [ents])


def mlp(path: str, prefix: str, n_steps: int) -> str:
    rng = np.random.default_rng(1)
    steps = []
    for _ in range(n_steps):
        ents = []
        for i, (name, shape) in enumerate(
            (("0.weight", (64, 8)), ("0.bias", (64,)), ("2.weight", (4, 64)))
        ):
            x = rng.standard_normal(shape).astype(np.float32)
            ents.append(entry_from_array("param", f"{prefix}.{name}", x, seq=i))
            ents.append(entry_from_array("grad", f"{prefix}.{name}", x * 0.1, seq=10 + i))
        steps.append(ents)
    return write(path, steps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[25, 60, 125])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="bench-map-")
    try:
        for n in args.layers:
            a = layered(os.path.join(d, f"a{n}.h5"), "blocks", n)
            b = layered(os.path.join(d, f"b{n}.h5"), "layers", n)
            with graddiff.open(a) as ra, graddiff.open(b) as rb:
                times = []
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    p = propose_map(ra, rb)
                    times.append(time.perf_counter() - t)
            print(
                f"propose: {n * len(MODULES)} modules: {statistics.median(times):.2f} s "
                f"({len(p.pairs)} pairs, {len(p.rules())} rules after folding)"
            )
        a = mlp(os.path.join(d, "a.h5"), "net", args.steps)
        same = shutil.copy(a, os.path.join(d, "same.h5"))
        renamed = mlp(os.path.join(d, "renamed.h5"), "model", args.steps)
        rules = ["model -> net"]
        plain, mapped = [], []
        for _ in range(args.repeat):
            t = time.perf_counter()
            graddiff.compare(a, same)
            plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            rep = graddiff.compare(a, renamed, name_map=rules)
            mapped.append(time.perf_counter() - t)
            assert rep.exit_code == 0
        mp, mm = statistics.median(plain), statistics.median(mapped)
        print(
            f"compare over {args.steps} steps: plain {mp:.2f} s, through a map {mm:.2f} s "
            f"(x{mm / mp:.2f})"
        )
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Do two versions of graddiff record the same trace? Rows, not timing.

Records a fixed set of workloads (the test zoo's awkward models, the recorder's training loops,
mixed dtypes, mlp_small and a small resnet18 in stats, full and param/grad-only modes) and
saves, per workload, the ``records`` table, the ``entries`` table (every field: step, record,
seq, shape, flags, fingerprint, statistics, offsets), the ``steps`` table without its wall-clock
``time`` column, and the stored values. ``compare`` reports every difference between two such
dumps. Used to check that a change to the recording path changed nothing that is written::

    git stash; python benchmarks/trace_rows.py dump /tmp/before.npz; git stash pop
    python benchmarks/trace_rows.py dump /tmp/after.npz
    python benchmarks/trace_rows.py compare /tmp/before.npz /tmp/after.npz

Run with one torch thread (the default here): training itself (torch's parallel reductions)
rounds differently with more threads, so the recorded values would differ between runs of
one version. The statistics pass no longer depends on the thread count.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Callable

import h5py
import numpy as np
import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

import graddiff  # noqa: E402
from graddiff.kinds import ALL_KINDS  # noqa: E402


def _zoo() -> dict[str, Callable[[str], None]]:
    import test_zoo
    import zoo_models

    out: dict[str, Callable[[str], None]] = {}
    for name, (factory, kind) in test_zoo.ZOO.items():

        def run(path: str, factory=factory, kind=kind) -> None:
            torch.manual_seed(0)
            model = factory()
            x, y = test_zoo._inputs(kind)
            with graddiff.trace(model, path, kinds=list(ALL_KINDS)):
                test_zoo._train(model, x, y)

        out[f"zoo_{name}"] = run
    for name, loop in zoo_models.LOOPS.items():

        def run(path: str, loop=loop) -> None:
            torch.manual_seed(0)
            model = zoo_models.BNMLP(inplace=True)
            with graddiff.trace(model, path, kinds=list(ALL_KINDS)):
                loop(model, zoo_models.batches(3))

        out[f"loop_{name}"] = run

    def cnn(path: str) -> None:
        torch.manual_seed(0)
        model = zoo_models.SmallCNN()
        data = zoo_models.batches(3, in_shape=(1, 16, 16), classes=10)
        with graddiff.trace(model, path, kinds=list(ALL_KINDS)):
            zoo_models.loop_adamw(model, data)

    out["cnn_adamw"] = cnn
    return out


def _dtypes(path: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    model = model.to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(5, 8).to(torch.bfloat16)
    with graddiff.trace(model, path, kinds=list(ALL_KINDS)):
        for _ in range(2):
            opt.zero_grad()
            model(x).float().pow(2).mean().backward()
            opt.step()


def _bench(name: str, values: str, full_kinds=None, steps: int = 3) -> Callable[[str], None]:
    def run(path: str) -> None:
        sys.path.insert(0, os.path.join(REPO, "benchmarks"))
        import bench_record

        args = argparse.Namespace(resnet_size=32, resnet_batch=4)
        wl = bench_record.Workload(name, args)
        model, opt = wl.fresh()
        opts = {"values": values}
        if full_kinds:
            opts["full_kinds"] = full_kinds
        with graddiff.trace(model, path, kinds=list(ALL_KINDS), **opts):
            for i in range(steps):
                bench_record.train_step(
                    model, opt, wl.batches[i % len(wl.batches)], None, wl.loss_fn
                )

    return run


def workloads() -> dict[str, Callable[[str], None]]:
    out = _zoo()
    out["bf16_mlp"] = _dtypes
    out["mlp_small_stats"] = _bench("mlp_small", "stats")
    out["mlp_small_full"] = _bench("mlp_small", "full")
    out["mlp_small_full_pg"] = _bench("mlp_small", "full", ("param", "grad"))
    out["resnet18_stats"] = _bench("resnet18", "stats", steps=2)
    return out


def _tables(path: str) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        recs = f["records"][()]
        out = {
            "records": np.array(
                [
                    f"{r['kind'].decode()}|{r['name'].decode() if isinstance(r['name'], bytes) else r['name']}"
                    f"|{r['call']}|{r['dtype'].decode()}"
                    for r in recs
                ]
            ),
            "entries": f["entries"][()],
            "steps": f["steps"][()][["step", "start", "stop", "full"]],
            "status": np.array([str(f.attrs["status"])]),
        }
        for key in f["values"]:
            out[f"values/{key}"] = f["values"][key][()]
    return out


def dump(out_path: str, only: str | None = None) -> None:
    torch.set_num_threads(1)
    arrays: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in workloads().items():
            if only and only not in name:
                continue
            path = os.path.join(tmp, f"{name}.h5")
            run(path)
            for key, arr in _tables(path).items():
                arrays[f"{name}::{key}"] = arr
            print(f"{name}: {len(arrays[f'{name}::entries'])} entries", flush=True)
    np.savez(out_path, **arrays)


def compare(a_path: str, b_path: str) -> int:
    a, b = np.load(a_path), np.load(b_path)
    bad = 0
    for key in sorted(set(a.files) | set(b.files)):
        if key not in a.files or key not in b.files:
            print(f"{key}: only in {'first' if key in a.files else 'second'}")
            bad += 1
            continue
        x, y = a[key], b[key]
        if x.dtype != y.dtype or x.shape != y.shape:
            print(f"{key}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}")
            bad += 1
        elif x.dtype.names:
            for field in x.dtype.names:
                xf, yf = x[field], y[field]
                same = np.array_equal(xf, yf, equal_nan=xf.dtype.kind == "f")
                if not same:
                    rows = np.nonzero((xf != yf).reshape(len(xf), -1).any(1))[0]
                    print(f"{key}.{field}: {len(rows)} rows differ, first {rows[:5].tolist()}")
                    bad += 1
        elif not np.array_equal(x, y):
            print(f"{key}: differs")
            bad += 1
    n = len({k.split("::")[0] for k in a.files})
    print(
        f"{n} workloads, {len(a.files)} arrays compared: {'identical' if not bad else f'{bad} differences'}"
    )
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("out")
    d.add_argument("--only", default=None, help="workloads whose name contains this")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = p.parse_args()
    if args.cmd == "dump":
        dump(args.out, args.only)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    raise SystemExit(main())

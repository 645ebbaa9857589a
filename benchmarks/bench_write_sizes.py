"""CPU cost of writing a full-values step into a trace-like HDF5 file, by write size and layout.

Measures what ``graddiff.writer.WRITE_BYTES`` was chosen from: per step, a new contiguous
uint8 dataset filled by ``write_direct`` in pieces of each size (then a flush), interleaved
round-robin (the order rotates), thread CPU time of the writing thread; and, with
``--layouts``, the same bytes appended to one growing chunked dataset (1 MiB chunks) and as a
raw ``os.pwrite``. Run by hand on the disk the traces go to (the default scratch folder is next
to this repository)::

    python benchmarks/bench_write_sizes.py --mb 72.8 --steps 10 --rounds 7
    python benchmarks/bench_write_sizes.py --mb 3 --steps 100 --rounds 7 --pieces-kib 256,1024,2048
    python benchmarks/bench_write_sizes.py --mb 72.8 --layouts
    python benchmarks/bench_write_sizes.py --mb 72.8 --reserve --pieces-kib 1024,2048,4096,8192

``--reserve`` creates each step's dataset as the writer does since 2026-12-01 (allocated at
creation, its file range reserved with ``fallocate`` first: ``graddiff.falloc``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import h5py
import numpy as np
from h5py import h5d, h5s

from graddiff.falloc import Reserver
from graddiff.writer import _U8, _VALUES_DCPL

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pieces(path: str, bufs: list, n: int, steps: int, piece: int, reserve: bool = False) -> float:
    f = h5py.File(path, "w", locking=False)
    reserver = Reserver(f.id.get_vfd_handle()) if reserve else None
    c0 = time.thread_time()
    for i in range(steps):
        b = bufs[i % len(bufs)]
        if reserver is None:
            ds = f.create_dataset(f"{i:08d}", (n,), dtype=np.uint8)
            for k in range(0, n, piece):
                ds.write_direct(b, np.s_[k : k + piece], np.s_[k : k + piece])
        else:  # as graddiff.writer does it
            dsid = h5d.create(
                f.id, f"{i:08d}".encode(), _U8, h5s.create_simple((n,)), dcpl=_VALUES_DCPL
            )
            reserver.reserve(dsid.get_offset(), n)
            fspace = dsid.get_space()
            for k in range(0, n, piece):
                m = min(piece, n - k)
                fspace.select_hyperslab((k,), (m,))
                dsid.write(h5s.create_simple((m,)), fspace, b[k : k + m], _U8)
        f.flush()
    out = (time.thread_time() - c0) / steps
    f.close()
    return out


def _chunked(path: str, bufs: list, n: int, steps: int, chunk: int = 1 << 20) -> float:
    f = h5py.File(path, "w", locking=False)
    ds = f.create_dataset("blob", (0,), dtype=np.uint8, maxshape=(None,), chunks=(chunk,))
    c0 = time.thread_time()
    for i in range(steps):
        n0 = ds.shape[0]
        ds.id.set_extent((n0 + n,))
        space = ds.id.get_space()
        space.select_hyperslab((n0,), (n,))
        ds.id.write(h5s.create_simple((n,)), space, bufs[i % len(bufs)])
        f.flush()
    out = (time.thread_time() - c0) / steps
    f.close()
    return out


def _raw(path: str, bufs: list, n: int, steps: int) -> float:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    c0 = time.thread_time()
    for i in range(steps):
        os.pwrite(fd, bufs[i % len(bufs)], i * n)
    out = (time.thread_time() - c0) / steps
    os.close(fd)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=72.8, help="bytes per step, in MB")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--pieces-kib", default="64,256,1024,2048,4096,8192,16384")
    p.add_argument(
        "--layouts", action="store_true", help="also one chunked dataset and raw os.pwrite"
    )
    p.add_argument(
        "--reserve", action="store_true", help="also every size with the file range reserved"
    )
    args = p.parse_args()
    n = int(args.mb * 1e6)
    bufs = [np.full(n, i, dtype=np.uint8) for i in range(3)]
    sizes = [int(x) << 10 for x in args.pieces_kib.split(",")] + [n]
    variants: dict[str, object] = {}
    for reserve in (False, True) if args.reserve else (False,):
        for size in sizes:
            label = "one write per step" if size == n else f"pieces of {size >> 10} KiB"
            label += ", reserved" if reserve else ""
            variants[label] = lambda path, s=size, r=reserve: _pieces(
                path, bufs, n, args.steps, s, r
            )
    if args.layouts:
        variants["one chunked dataset, 1 MiB chunks"] = lambda path: _chunked(
            path, bufs, n, args.steps
        )
        variants["raw os.pwrite, one file"] = lambda path: _raw(path, bufs, n, args.steps)
    scratch = tempfile.mkdtemp(prefix="graddiff-wsizes-", dir=os.path.dirname(REPO))
    res: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    try:
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                path = os.path.join(scratch, "w.h5")
                res[name].append(variants[name](path))  # type: ignore[operator]
                os.unlink(path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{n / 1e6:.1f} MB per step, {args.steps} steps, {args.rounds} rounds: thread CPU")
    for name, v in res.items():
        med = statistics.median(v)
        print(
            f"  {name:36s} median {1e3 * med:8.2f} ms/step  "
            f"(min {1e3 * min(v):7.2f}, max {1e3 * max(v):7.2f}; {n / 1e9 / med:.2f} GB/s)"
        )


if __name__ == "__main__":
    main()

"""A worker process of ``graddiff ranks``: one rank file's fingerprints, written as .npy files.

Run as ``python -m graddiff.ranks.worker SPEC.json`` by graddiff.ranks.parallel, never by hand.
The spec (JSON) names the steps, the compared record keys, the sharded keys to skip, the block
size, the (rank, path) jobs and the output folder. For each job it writes ``<rank>.fs.npy``,
``<rank>.fp.npy`` (steps x keys fingerprints), ``<rank>.have.npy`` (presence) and
``<rank>.passes.npy`` (forward/backward passes per step), filled block by block (bounded
memory) through shared memory maps: the parent reads them from the page cache (no flush to
disk, measured 5 ms per file). Plain arrays in, plain arrays out: no pickle, and it imports neither torch nor the
caller's main module. A problem is one ``Error:`` line on stderr and exit code 2. Progress is
one line on stdout (the rank being read) per file and per block: the parent stops a worker that
makes none for ``GRADDIFF_WATCHDOG`` seconds.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from ..errors import GraddiffError
from ..reader import RecordKey, open_run
from .consistency import key_ids, pass_records, read_block


def beat(rank: int) -> None:
    """Progress for the parent's stall watch: the rank being read, one line."""
    sys.stdout.write(f"{rank}\n")
    sys.stdout.flush()


def run_job(spec: dict, rank: int, path: str) -> None:
    """Write rank ``rank``'s arrays (see the module docstring) into ``spec['out']``."""
    steps = np.asarray(spec["steps"], np.int64)
    keys = [RecordKey(str(k), str(n), int(c)) for k, n, c in spec["keys"]]
    index = {key: i for i, key in enumerate(keys)}
    skipped = {RecordKey(str(k), str(n), int(c)) for k, n, c in spec["skipped"]}
    per_block = int(spec["per_block"])
    out = spec["out"]
    shape = (len(steps), len(keys))
    stem = os.path.join(out, str(rank))
    beat(rank)
    run = open_run(path)
    arrays = []
    try:
        key_of, pass_ids = key_ids(run, index, skipped), pass_records(run)
        fs = np.lib.format.open_memmap(stem + ".fs.npy", "w+", np.uint64, shape)
        fp = np.lib.format.open_memmap(stem + ".fp.npy", "w+", np.uint64, shape)
        have = np.lib.format.open_memmap(stem + ".have.npy", "w+", np.bool_, shape)
        passes = np.zeros(len(steps), np.int64)
        arrays = [fs, fp, have]
        for lo in range(0, len(steps), per_block):
            block = steps[lo : lo + per_block]
            b_fs, b_fp, b_have, b_passes = read_block(run, block, key_of, len(keys), pass_ids)
            fs[lo : lo + len(block)] = b_fs
            fp[lo : lo + len(block)] = b_fp
            have[lo : lo + len(block)] = b_have
            passes[lo : lo + len(block)] = b_passes
            beat(rank)
        np.save(stem + ".passes.npy", passes, allow_pickle=False)
    finally:
        del arrays
        run.close()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("Error: usage: python -m graddiff.ranks.worker SPEC.json", file=sys.stderr)
        return 2
    path = "?"
    try:
        with open(argv[0], encoding="utf-8") as f:
            spec = json.load(f)
        for rank, path in spec["jobs"]:
            run_job(spec, int(rank), str(path))
    except GraddiffError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # corrupt data that the reader did not anticipate, a full disk
        text = " ".join(str(exc).split())[:300]
        print(
            f"Error: {path}: reading failed in a worker process ({type(exc).__name__}: {text})",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

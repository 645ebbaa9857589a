"""Storage and check cost of distributed traces (docs/distributed.md, "Storage at scale").

Run by hand: ``python benchmarks/bench_distributed.py``. Three measurements:

1. Bytes per record per step of a stats-mode trace: a real traced loop (an MLP,
   ``values="stats"``), file size growth between 100 and 900 steps divided by the entry rows
   (the on-disk row is ``format.ENTRY_DTYPE``; the tables grow by chunks of 4096 rows).
2. The records per step of a 1B-parameter decoder (a Llama config of 1.2 B parameters, built on
   the meta device: no memory is allocated), so the per-step cost of a 64-rank run follows from
   (1) without guessing the record count, with and without ``replicated="one"``.
3. ``graddiff ranks`` time on synthetic stats-mode rank files (written with TraceWriter, as
   many records per step as (2)), per rank x step, read serially and by worker processes
   (``RANKS=2,8,32 STEPS=50`` by default), best of 3 interleaved rounds, with a worker's start
   cost and the serial cost per entry row: the constants behind
   ``graddiff.ranks.parallel.min_rows`` (WORKER_START_S, ROW_COST_S).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np


def stats_bytes_per_row(tmp: str) -> tuple[float, int]:
    import torch
    import torch.nn.functional as F

    import graddiff

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 4),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sizes = {}
    for steps in (100, 900):  # the tables grow in chunks of 4096 rows: measure over many
        path = os.path.join(tmp, f"stats_{steps}.h5")
        with graddiff.trace(model, path, values="stats"):
            for _ in range(steps):
                x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        with graddiff.open(path) as run:
            rows_per_step = len(run.entries(0, 0))
        sizes[steps] = os.path.getsize(path)
    per_step = (sizes[900] - sizes[100]) / 800
    return per_step / rows_per_step, rows_per_step


def llama_1b_records() -> dict[str, int]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    params = list(model.named_parameters())
    return {
        "parameters": int(sum(p.numel() for _, p in params)),
        "param_tensors": len(params),
        "buffers": len(list(model.named_buffers())),
        "modules": len(list(model.named_modules())),
        "param_bytes_fp32": int(sum(p.numel() for _, p in params) * 4),
    }


def write_rank_files(tmp: str, n_ranks: int, n_steps: int, n_records: int) -> str:
    """Synthetic stats-mode rank files of one run (replicated records bitwise equal)."""
    from graddiff.entries import EntryData
    from graddiff.writer import TraceWriter

    rng = np.random.default_rng(0)
    fps = rng.integers(0, 2**63, size=(n_steps, n_records, 2))
    folder = os.path.join(tmp, f"ranks{n_ranks}x{n_steps}")
    os.makedirs(folder)
    for r in range(n_ranks):
        env = {"rank": r, "world_size": n_ranks, "run_id": "bench"}
        w = TraceWriter(
            os.path.join(folder, f"rank_{r}.h5"), env, {"kinds": ["param", "grad"]}, ballast=False
        )
        for s in range(n_steps):
            entries = [
                EntryData(
                    "param" if i % 2 else "grad",
                    f"layer{i // 2}.weight",
                    0,
                    "float32",
                    (1024, 1024),
                    (1.0, 0.0, -1.0, 1.0, 0, 0),
                    (int(fps[s, i, 0]), int(fps[s, i, 1])),
                    seq=i,
                )
                for i in range(n_records)
            ]
            w.write_step(s, entries)
        w.close()
    return os.path.join(folder, "rank_*.h5")


def ranks_check_times(pattern: str, workers: list[int], rounds: int) -> dict[int, float]:
    """Best-of-``rounds`` seconds of ``check_ranks`` per worker count, rounds interleaved."""
    from graddiff.ranks import check_ranks

    best = {w: float("inf") for w in workers}
    for _ in range(rounds):
        for w in workers:
            t0 = time.perf_counter()
            report = check_ranks([pattern], workers=w)
            best[w] = min(best[w], time.perf_counter() - t0)
            assert report.consistent
    return best


def worker_start_seconds() -> float:
    """Best of 3: a worker interpreter's start (python -m graddiff.ranks.worker's imports)."""
    import subprocess

    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import graddiff.ranks.worker"], check=True)
        best = min(best, time.perf_counter() - t0)
    return best


def _auto_choice(pattern: str, choose_workers) -> int:
    from graddiff.ranks import open_ranks

    rs = open_ranks([pattern])
    try:
        return choose_workers(rs.runs, rs.runs[0].steps, None)
    finally:
        rs.close()


def main() -> int:
    from graddiff.format import ENTRY_DTYPE

    with tempfile.TemporaryDirectory() as tmp:
        per_row, rows = stats_bytes_per_row(tmp)
        print(
            f"stats-mode record: {per_row:.0f} bytes per record per step measured (MLP, "
            f"{rows} records per step, file growth over 800 steps); an entry row is "
            f"{ENTRY_DTYPE.itemsize} bytes"
        )
        llama = llama_1b_records()
        print(
            f"1B decoder (Llama config): {llama['parameters'] / 1e9:.2f} B parameters in "
            f"{llama['param_tensors']} tensors, {llama['buffers']} buffers, "
            f"{llama['modules']} modules"
        )
        # per step: param + grad per tensor; buffer_start + buffer per buffer; one activation
        # and one grad_output per module output (upper bound: every module once), input, loss
        recs = 2 * llama["param_tensors"] + 2 * llama["buffers"] + 2 * llama["modules"] + 2
        per_rank = recs * per_row
        print(
            f"  stats mode: {recs} records per step -> {per_rank / 1024:.0f} KiB per rank "
            f"per step, {64 * per_rank / 2**20:.1f} MiB per step for 64 ranks"
        )
        full = 2 * llama["param_bytes_fp32"]
        print(
            f"  full values of params + grads (fp32): {full / 2**30:.1f} GiB per rank per step;"
            f" 64 ranks: {64 * full / 2**30:.0f} GiB per step with replicated='all', "
            f"{(full + 63 * recs * per_row) / 2**30:.1f} GiB with replicated='one'"
        )
        from graddiff.ranks.parallel import (
            MIN_AUTO_WORKERS,
            available_cpus,
            choose_workers,
            min_rows,
        )
        from graddiff.ranks.parallel import usable_cpus as idle_cpus

        n_records = 2 * llama["param_tensors"]
        n_steps = int(os.environ.get("STEPS", 50))
        cpus = available_cpus()
        start = worker_start_seconds()
        print(
            f"graddiff ranks: {n_records} replicated records per step (stats mode), {n_steps} "
            f"steps, {cpus} CPUs (load average {os.getloadavg()[0]:.1f}, {idle_cpus()} idle); "
            f"a worker's start {start:.2f} s; best of 3 interleaved rounds, ms per rank x step:"
        )
        for n_ranks in [int(r) for r in os.environ.get("RANKS", "2,8,32").split(",")]:
            pattern = write_rank_files(tmp, n_ranks, n_steps, n_records)
            counts = sorted({1, min(n_ranks, 2), min(n_ranks, cpus)})
            best = ranks_check_times(pattern, counts, 3)
            cells = n_ranks * n_steps
            parts = ", ".join(
                f"{'serial' if w == 1 else f'{w} workers'} {1e3 * t / cells:.3f}"
                + (f" ({best[1] / t:.2f}x)" if w > 1 else "")
                for w, t in best.items()
            )
            rows = cells * n_records
            auto = _auto_choice(pattern, choose_workers)
            print(
                f"  {n_ranks:3d} ranks ({rows / 1e6:.2f} M entry rows, serial "
                f"{1e6 * best[1] / rows:.2f} us per row): {parts}; automatic: "
                f"{'serial' if auto == 1 else f'{auto} workers'} (parallel from "
                f"{min_rows(MIN_AUTO_WORKERS) / 1e6:.2f} M rows with {MIN_AUTO_WORKERS} idle "
                f"CPUs, {min_rows(16) / 1e6:.2f} M with 16; never with fewer)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

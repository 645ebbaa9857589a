"""Subprocess program for tests/test_ddp.py: one rank of a 2-process DDP run on gloo (CPU).

Usage: ddp_worker.py RANK WORLD_SIZE INIT_FILE OUT_DIR. Traces ``DistributedDataParallel(model)``
into ``OUT_DIR/run_{rank}.h5`` (the ``{rank}`` placeholder is graddiff's), each rank on its own
data. The loss is a plain function of the output (mean of squares) so that the test can
recompute each rank's local gradient from the recorded params and inputs.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import graddiff

STEPS = 3


def main() -> int:
    rank, world, init_file, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
    with graddiff.trace(ddp, os.path.join(out_dir, "run_{rank}.h5"), values="full"):
        for _ in range(STEPS):
            x = torch.randn(5, 6, generator=gen)
            loss = ddp(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank} ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

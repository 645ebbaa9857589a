"""Subprocess program for tests/test_ranks.py and tests/test_merged_compare.py: one rank on gloo.

Usage: dist_worker.py RANK WORLD_SIZE INIT_FILE OUT_DIR SCENARIO[,SCENARIO...]

One process per rank runs every scenario in turn (importing torch once per rank is most of a
test's cost), each scenario tracing into ``OUT_DIR/<scenario>/run_{rank}.h5``:

- ``healthy``: DDP with BatchNorm and Dropout; each rank its own data and dropout seed (intended).
- ``sched``: a learning-rate scheduler stepped on rank ``WORLD_SIZE // 2`` only, from step 0.
- ``noreduce``: parameter ``4.bias`` left out of DDP's all-reduce (stats-only trace).
- ``localbn``: ``broadcast_buffers=False``: BatchNorm running stats stay rank-local.
- ``skip``: rank ``WORLD_SIZE - 1`` skips ``optimizer.step()`` at step 1.
- ``norank``: the path template has no ``{rank}``.
- ``plain``: DDP of a BatchNorm-free MLP on this rank's slice of a global batch of 8; rank 0
  also traces the same model, single process, on the whole batch (``plain/single.h5``).
- ``one``: ``plain`` with ``replicated="one"`` (parameters and grads as values on rank 0 only).
- ``fsdp2``: the ``plain`` training with FSDP2 (``fully_shard`` on both Linear layers and the
  root): traced, then run again untraced; ``fsdp2/transparent_{rank}.txt`` says whether the
  two runs' parameter shards are bitwise equal.
- ``fsdp1``: the same with FSDP1 (``FullyShardedDataParallel(use_orig_params=True)``, one unit
  per Linear).
- ``fsdp1flat``: the same with FSDP1's default (``use_orig_params=False``: FlatParameters),
  traced with ``replicated="one"`` (shards are not replicated: values on every rank);
  rank 0 also traces ``single_bug.h5``: the single-process ``plain`` run with one element of
  ``0.weight`` nudged before step 2.
- ``bnddp``: DDP of an MLP with BatchNorm (no Dropout) on this rank's slice of the global
  batch; rank 0 also traces it single process on the whole batch (``bnddp/single.h5``).
- ``bnsync``: ``bnddp`` with ``SyncBatchNorm`` (CUDA only in torch: needs a GPU per rank).
- ``killed``: no collectives; the last rank kills itself (SIGKILL) during step 2. Run it last.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import graddiff

STEPS = 4
GLOBAL_BATCH = 8


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.25), nn.Linear(8, 3)
    )


def plain_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def bn_plain_model(sync: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if sync else model


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(500 + step)
    return torch.randn(GLOBAL_BATCH, 6, generator=gen), torch.randint(
        0, 3, (GLOBAL_BATCH,), generator=gen
    )


def ddp_loop(scenario: str, rank: int, world: int, out: str) -> None:
    model = bn_model()
    kwargs = {}
    if scenario == "localbn":
        kwargs["broadcast_buffers"] = False
    if scenario == "noreduce":
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, ["4.bias"]
        )
    ddp = nn.parallel.DistributedDataParallel(model, **kwargs)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    torch.manual_seed(1000 + rank)  # each rank its own dropout masks (intended)
    gen = torch.Generator().manual_seed(100 + rank)  # and its own data (intended)
    path = os.path.join(out, "plain.h5" if scenario == "norank" else "run_{rank}.h5")
    values = "stats" if scenario == "noreduce" else "full"
    with graddiff.trace(ddp, path, values=values):
        for step in range(STEPS):
            x, y = torch.randn(4, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            if scenario == "skip" and rank == world - 1 and step == 1:
                continue
            opt.step()
            if scenario == "sched" and rank == world // 2:
                sched.step()


def plain_loop(rank: int, world: int, out: str, replicated: str = "all") -> None:
    model = plain_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    part = GLOBAL_BATCH // world
    path = os.path.join(out, "run_{rank}.h5")
    with graddiff.trace(ddp, path, values="full", replicated=replicated):
        for step in range(STEPS):
            x, y = global_batch(step)
            x, y = x[rank * part : (rank + 1) * part], y[rank * part : (rank + 1) * part]
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
    if rank != 0 or replicated != "all":
        return
    # The same training in one process on the global batch (no process group involved).
    model = plain_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with graddiff.trace(model, os.path.join(out, "single.h5"), values="full"):
        for step in range(STEPS):
            x, y = global_batch(step)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()


def bn_loop(rank: int, world: int, out: str, sync: bool) -> None:
    """DDP with (Sync)BatchNorm on slices of the global batch; rank 0: single-process too."""
    device = torch.device("cuda", rank % torch.cuda.device_count()) if sync else None
    part = GLOBAL_BATCH // world
    model = bn_plain_model(sync).to(device)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    with graddiff.trace(ddp, os.path.join(out, "run_{rank}.h5"), values="full"):
        for step in range(STEPS):
            x, y = global_batch(step)
            x, y = x[rank * part : (rank + 1) * part], y[rank * part : (rank + 1) * part]
            opt.zero_grad()
            F.cross_entropy(ddp(x.to(device)), y.to(device)).backward()
            opt.step()
    if rank != 0:
        return
    model = bn_plain_model().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with graddiff.trace(model, os.path.join(out, "single.h5"), values="full"):
        for step in range(STEPS):
            x, y = global_batch(step)
            opt.zero_grad()
            F.cross_entropy(model(x.to(device)), y.to(device)).backward()
            opt.step()


def fsdp_model(version: int, world: int, orig: bool = True) -> nn.Module:
    """``plain_model`` sharded by FSDP2 (fully_shard) or FSDP1 (Linear units; ``orig``:
    use_orig_params, else FSDP1's default FlatParameters)."""
    model = plain_model()
    if version == 2:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model[2], mesh=mesh)
        return fully_shard(model, mesh=mesh)
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return FullyShardedDataParallel(
        model,
        use_orig_params=orig,
        device_id=torch.device("cpu"),
        auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
    )


def fsdp_train(
    version: int, rank: int, world: int, path: str = "", orig: bool = True, replicated: str = "all"
) -> list[torch.Tensor]:
    """The ``plain`` loop under FSDP; traced into ``path`` when given. Returns the local shards."""
    model = fsdp_model(version, world, orig)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    part = GLOBAL_BATCH // world

    def loop() -> None:
        for step in range(STEPS):
            x, y = global_batch(step)
            x, y = x[rank * part : (rank + 1) * part], y[rank * part : (rank + 1) * part]
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    if path:
        with graddiff.trace(model, path, values="full", replicated=replicated):
            loop()
    else:
        loop()
    local = [getattr(p, "_local_tensor", p) for p in model.parameters()]
    return [t.detach().clone() for t in local]


def fsdp_loop(version: int, rank: int, world: int, out: str, orig: bool = True) -> None:
    # replicated="one" with FlatParameters: the shards are each rank's own and keep their values
    replicated = "all" if orig else "one"
    traced = fsdp_train(version, rank, world, os.path.join(out, "run_{rank}.h5"), orig, replicated)
    untraced = fsdp_train(version, rank, world, orig=orig)
    same = all(torch.equal(a, b) for a, b in zip(traced, untraced))
    with open(os.path.join(out, f"transparent_{rank}.txt"), "w") as fh:
        fh.write("bitwise-equal" if same else "DIFFERENT")


def planted_bug_single(out: str) -> None:
    """The single-process ``plain`` run with one element of 0.weight nudged before step 2."""
    model = plain_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with graddiff.trace(model, os.path.join(out, "single_bug.h5"), values="full"):
        for step in range(STEPS):
            x, y = global_batch(step)
            if step == 2:
                with torch.no_grad():
                    model[0].weight[-1, -1] += 0.01
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()


def killed_loop(rank: int, world: int, out: str) -> None:
    model = plain_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with graddiff.trace(model, os.path.join(out, "run_{rank}.h5"), values="full") as tr:
        for step in range(STEPS):
            x, y = global_batch(step)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if step == 2 and rank == world - 1:
                while tr.steps_recorded < 2:  # steps 0 and 1 on disk, step 2 in flight
                    time.sleep(0.01)
                os.kill(os.getpid(), signal.SIGKILL)
            opt.step()


def main() -> int:
    rank, world, init_file, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    scenarios = sys.argv[5].split(",")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    for scenario in scenarios:
        out = os.path.join(out_dir, scenario)
        os.makedirs(out, exist_ok=True)
        if scenario == "plain":
            plain_loop(rank, world, out)
        elif scenario == "one":
            plain_loop(rank, world, out, replicated="one")
        elif scenario in ("fsdp1", "fsdp2"):
            fsdp_loop(int(scenario[-1]), rank, world, out)
        elif scenario == "fsdp1flat":
            fsdp_loop(1, rank, world, out, orig=False)
            if rank == 0:
                planted_bug_single(out)
        elif scenario in ("bnddp", "bnsync"):
            bn_loop(rank, world, out, sync=scenario == "bnsync")
        elif scenario == "killed":
            killed_loop(rank, world, out)
            print(f"rank {rank} ok", flush=True)
            return 0  # no collective after it: the last rank is gone
        else:
            ddp_loop(scenario, rank, world, out)
        dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank} ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Launch tests/scripts/dist_worker.py as WORLD gloo ranks on CPU and wait for them."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "dist_worker.py")


def run_ranks(argvs: list[list[str]], *, timeout: float, killed_rank: int = -1) -> list[str]:
    """Start one process per rank (``argvs[r]``), wait for all, and return their stdouts. Each
    rank must exit 0 and print ``rank R ok``; ``killed_rank`` may instead die by SIGKILL."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for argv in argvs
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, (out, err)) in enumerate(zip(procs, outs)):
        if rank == killed_rank:
            assert p.returncode == -9, f"rank {rank}: {p.returncode} {err[-2000:]}"
            continue
        assert p.returncode == 0, f"rank {rank}: {err[-3000:]}"
        assert f"rank {rank} ok" in out
    return [out for out, _ in outs]


def launch(out_dir, world: int, scenarios: list[str], *, killed_rank: int = -1) -> str:
    """Run every scenario on ``world`` ranks; returns ``out_dir``. ``killed_rank`` may die by
    SIGKILL (the ``killed`` scenario); every other rank must succeed."""
    init = os.path.join(str(out_dir), "init")  # file:// rendezvous: no port, nothing leaves
    argvs = [
        [SCRIPT, str(r), str(world), init, str(out_dir), ",".join(scenarios)] for r in range(world)
    ]
    run_ranks(argvs, timeout=300, killed_rank=killed_rank)
    return str(out_dir)

"""Launch tests/scripts/dist_worker.py as WORLD gloo ranks on CPU and wait for them."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "dist_worker.py")


def launch(out_dir, world: int, scenarios: list[str], *, killed_rank: int = -1) -> str:
    """Run every scenario on ``world`` ranks; returns ``out_dir``. ``killed_rank`` may die by
    SIGKILL (the ``killed`` scenario); every other rank must succeed."""
    init = os.path.join(str(out_dir), "init")  # file:// rendezvous: no port, nothing leaves
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, SCRIPT, str(r), str(world), init, str(out_dir), ",".join(scenarios)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(world)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300))
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
    return str(out_dir)

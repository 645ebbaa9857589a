"""Subprocess program for tests/test_compile_equivalence.py: one training run three ways.

Trains the same seeded LayerNorm-GELU MLP with AdamW for ``STEPS`` steps, traced each time:
eagerly (``eager.h5``), through ``torch.compile`` with inductor (``compiled.h5``: fused kernels
round differently), and eagerly with every parameter nudged by one ulp (``twin.h5``, the
``--noise`` reference), and compiled with a 10 % larger learning rate (``compiled_lr.h5``, a
real bug in the same setting). Run in its own process so Dynamo state never leaks into the test session.
Usage: ``python compile_vs_eager.py OUT_DIR``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

import graddiff

STEPS = 4


def train(path: str, *, compiled: bool, perturb=None, lr=1e-2) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 4))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    step_model = torch.compile(net, backend="inductor") if compiled else net
    g = torch.Generator().manual_seed(1)
    with graddiff.trace(net, path, values="full", perturb=perturb):
        for _ in range(STEPS):
            x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
            opt.zero_grad()
            F.cross_entropy(step_model(x), y).backward()
            opt.step()


if __name__ == "__main__":
    out = sys.argv[1]
    train(os.path.join(out, "eager.h5"), compiled=False)
    train(os.path.join(out, "compiled.h5"), compiled=True)
    train(os.path.join(out, "twin.h5"), compiled=False, perturb="ulp")
    train(os.path.join(out, "compiled_lr.h5"), compiled=True, lr=1.1e-2)  # a real bug
    print("ok")

"""Subprocess program for tests/test_compile.py: trace a ``torch.compile``d model on CPU.

Trains the same seeded model three times, each time freshly built and compiled, for
``STEPS + AFTER`` steps: (1) untraced, (2) traced for ``STEPS`` steps and then untraced for
``AFTER`` more (the trace has ended: its hooks must be gone and the model must still train),
(3) untraced again (is compile itself reproducible?), (4) one step before the trace (so the
graph is compiled without hooks), then ``trace(model)`` -- the plain module, while the loop
calls the compiled wrapper -- for ``STEPS - 1`` steps, then ``AFTER`` more. Recorder entry
points are wrapped with call counters to see whether any hook fires after the trace. Prints
one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Optional

import torch
from torch import nn

import graddiff
from graddiff.recorder import Recorder

STEPS, AFTER = 3, 2
COUNTED = (
    "on_model_forward",
    "on_module_output",
    "on_grad_output",
    "before_gradient",
    "on_optimizer_step",
)


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def run(path: Optional[str], backend: str, calls: dict, warm: bool = False) -> dict:
    model = build()
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    losses: list[str] = []

    def loop(n: int) -> None:
        for _ in range(n):
            x = torch.randn(16, 8, generator=gen)
            loss = compiled(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()).hex())

    t0 = time.perf_counter()
    if path is None:
        loop(STEPS + AFTER)
        after = None
    else:
        if warm:
            loop(1)  # compiled before the trace exists
        with graddiff.trace(model if warm else compiled, path, values="full"):
            loop(STEPS - 1 if warm else STEPS)
        before = dict(calls)
        loop(AFTER)
        after = {k: calls[k] - before[k] for k in calls}
    return {
        "losses": losses,
        "weights": [p.detach().clone() for p in model.parameters()],
        "calls_after_exit": after,
        "seconds": time.perf_counter() - t0,
    }


def main() -> int:
    path, path_plain, backend = sys.argv[1], sys.argv[2], sys.argv[3]
    calls = dict.fromkeys(COUNTED, 0)
    for name in COUNTED:
        original = getattr(Recorder, name)

        def counted(self, *a, _name=name, _orig=original, **kw):
            calls[_name] += 1
            return _orig(self, *a, **kw)

        setattr(Recorder, name, counted)
    untraced = run(None, backend, calls)
    traced = run(path, backend, calls)
    calls_in_trace = dict(calls)
    again = run(None, backend, calls)
    before = dict(calls)
    calls_again = {k: before[k] - calls_in_trace[k] for k in COUNTED}
    plain = run(path_plain, backend, calls, warm=True)
    calls_plain = {k: calls[k] - before[k] - plain["calls_after_exit"][k] for k in COUNTED}

    def same_weights(a: dict, b: dict) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a["weights"], b["weights"]))

    print(
        json.dumps(
            {
                "untraced": untraced["losses"],
                "traced": traced["losses"],
                "untraced_again": again["losses"],
                "weights_traced_equal": same_weights(untraced, traced),
                "weights_again_equal": same_weights(untraced, again),
                "traced_plain": plain["losses"],
                "weights_plain_equal": same_weights(untraced, plain),
                "calls_plain": calls_plain,
                "calls_plain_after_exit": plain["calls_after_exit"],
                "calls_in_trace": {
                    k: calls_in_trace[k] - traced["calls_after_exit"][k] for k in COUNTED
                },
                "calls_after_exit": traced["calls_after_exit"],
                "calls_untraced_again": calls_again,
                "seconds": [r["seconds"] for r in (untraced, traced, again, plain)],
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

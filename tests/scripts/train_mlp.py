"""Subprocess program for the robustness tests: train a small BatchNorm MLP, maybe traced.

Prints ``done K`` (flushed) after each ``opt.step()`` of step K, then ``loss <hex>`` lines for
the final loss. ``--compare`` first trains the same model untraced and prints its final loss
too, so the parent can check that tracing (and a failing trace) left training bitwise unchanged.
Fault injection (``--no-space-check``, ``--fail-write-at``) patches graddiff.writer in this
process only.
"""

from __future__ import annotations

import argparse
import sys
import time


def build(width: int, seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(32, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, 10),
    )


def train(args: argparse.Namespace, traced: bool) -> float:
    import torch

    import graddiff

    model = build(args.width, args.seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(args.seed + 1)

    def loop() -> torch.Tensor:
        loss = torch.zeros(())
        for step in range(args.steps):
            x = torch.randn(args.batch, 32, generator=gen)
            y = torch.randint(0, 10, (args.batch,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if traced and args.print_done:
                print(f"done {step}", flush=True)
            if args.sleep:
                time.sleep(args.sleep)
        return loss

    if not traced:
        return float(loop().detach())
    with graddiff.trace(model, args.path, values=args.values):
        loss = loop()
    return float(loss.detach())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--values", default="full")
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--print-done", action="store_true")
    p.add_argument("--compare", action="store_true", help="also train untraced, print both losses")
    p.add_argument(
        "--no-space-check", action="store_true", help="disable the writer's free-space checks"
    )
    p.add_argument(
        "--fail-write-at", type=int, default=None, help="write_step raises ENOSPC at this step"
    )
    args = p.parse_args()

    import torch

    import graddiff.writer as gw

    torch.set_num_threads(1)  # 2-core CI machines run tests side by side

    if args.no_space_check:
        gw.TraceWriter._check_space = lambda self, value_bytes: 2**62  # spare: never again
    if args.fail_write_at is not None:
        original = gw.TraceWriter.write_step

        def write_step(self, step, entries, **kw):
            if step >= args.fail_write_at:
                raise OSError(28, "No space left on device")
            return original(self, step, entries, **kw)

        gw.TraceWriter.write_step = write_step

    if args.compare:
        print(f"untraced_loss {train(args, traced=False).hex()}", flush=True)
    print(f"traced_loss {train(args, traced=True).hex()}", flush=True)
    print("exit-ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What counting backward passes per parameter (``/reach``, hooks/reach.py) costs.

Times ``zero_grad`` + forward + ``backward()`` of an MLP of many small layers (so per-parameter
costs dominate) in interleaved rounds in one process: plain, and with graddiff's counting
hook on every parameter (``install_reach_hooks`` feeding ``Recorder.on_accumulate``, as in a
trace). Reports the median time per backward of each and the difference per parameter per
backward, by wall time and by the training thread's CPU time (the target: about 1 us
or less). Ratios from one process only; the machine's load
moves absolute times.

Usage::

    python benchmarks/reach_cost.py --layers 100 --rounds 21 --iters 200
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from graddiff.hooks.handles import HandleBag
from graddiff.hooks.reach import install_reach_hooks
from graddiff.recorder import Recorder


class _Sink:
    """The recorder's counting state and its own handler, without a writer."""

    on_accumulate = Recorder.on_accumulate

    def __init__(self) -> None:
        self.active = True
        self._reach: dict[str, int] = {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(args.layers)])
    params = list(model.named_parameters())
    x = torch.randn(2, 4)

    def timed() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(args.iters):
            model.zero_grad()
            model(x).sum().backward()
        return (
            (time.perf_counter() - t0) / args.iters,
            (time.thread_time() - c0) / args.iters,
        )

    plain, hooked = [], []
    for _ in range(args.rounds):
        plain.append(timed())
        with HandleBag() as bag:
            sink = _Sink()
            install_reach_hooks(params, sink, bag)
            hooked.append(timed())
            assert all(v == args.iters for v in sink._reach.values())
    n = len(params)
    print(f"{n} parameters, {args.rounds} interleaved rounds of {args.iters} backward passes")
    for i, what in enumerate(("wall", "CPU (this thread)")):
        p = statistics.median(r[i] for r in plain)
        h = statistics.median(r[i] for r in hooked)
        print(
            f"{what}: plain {p * 1e6:.1f} us, hooked {h * 1e6:.1f} us per backward "
            f"({h / p:.3f}x): {(h - p) / n * 1e9:.0f} ns per parameter per backward"
        )


if __name__ == "__main__":
    main()

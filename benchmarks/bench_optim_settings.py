"""Per-step cost of recording the optimizer settings (hooks/optim_settings.SettingsWatch).

What the step pre-hook adds per ``optimizer.step()``: ``observe`` (compare each group's
settings with the last ones, read one state step count per group) and ``take`` (the changes
since the last step). Measured on real optimizers after real steps, in interleaved rounds in one
process (the state step counts advanced between calls as an update would, untimed); reported as
microseconds per step (median of the rounds), for a constant setting and
for a learning rate that changes at every step (a scheduler), with 1, 2 and 8 param groups
and with 4 and 200 parameters.

Run by hand: ``python benchmarks/bench_optim_settings.py`` (a few seconds).
"""

from __future__ import annotations

import statistics
import time

import torch

from graddiff.hooks.optim_settings import SettingsWatch

CALLS = 2000
ROUNDS = 7


def _case(n_params: int, n_groups: int, cls=torch.optim.AdamW):
    params = [torch.nn.Parameter(torch.randn(4)) for _ in range(n_params)]
    per = max(1, n_params // n_groups)
    groups = [{"params": params[i : i + per]} for i in range(0, n_params, per)][:n_groups]
    opt = cls(groups, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # state exists, as after the first step
    names = {id(p): (f"p{i}", p) for i, p in enumerate(params)}
    return opt, names


def _advance(opt) -> None:
    """What an update does to the state step counts (Adam: +1 per parameter)."""
    for st in opt.state.values():
        if "step" in st:
            st["step"] += 1


def _time(opt, names, schedule: bool) -> float:
    watch = SettingsWatch(names)
    groups = opt.param_groups
    elapsed = 0.0
    for step in range(CALLS):
        if schedule:
            for g in groups:
                g["lr"] = 1e-3 * (1 + step % 7)
        t0 = time.perf_counter()
        watch.observe(opt, step)
        watch.take()
        elapsed += time.perf_counter() - t0
        _advance(opt)  # the update itself is not timed
    return elapsed / CALLS * 1e6


def main() -> None:
    torch.set_num_threads(1)
    cases = [
        ("AdamW, 4 params, 1 group", _case(4, 1)),
        ("AdamW, 4 params, 2 groups", _case(4, 2)),
        ("AdamW, 200 params, 1 group", _case(200, 1)),
        ("AdamW, 200 params, 2 groups", _case(200, 2)),
        ("AdamW, 200 params, 8 groups", _case(200, 8)),
        ("SGD, 200 params, 2 groups", _case(200, 2, torch.optim.SGD)),
    ]
    results: dict = {}
    for _ in range(ROUNDS):  # interleaved rounds: the machine's noise hits every case alike
        for label, (opt, names) in cases:
            for schedule in (False, True):
                results.setdefault((label, schedule), []).append(_time(opt, names, schedule))
    print(f"{'case':<32} {'constant':>12} {'lr every step':>14}   (us per optimizer step)")
    for label, _ in cases:
        const = statistics.median(results[(label, False)])
        sched = statistics.median(results[(label, True)])
        print(f"{label:<32} {const:>12.1f} {sched:>14.1f}")


if __name__ == "__main__":
    main()

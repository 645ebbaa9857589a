"""Measure `compare --noise` on reduced-precision pairs (docs/tolerance.md, "--noise").

For each model and optimizer: A trains in float32, B the same under bfloat16 autocast, T is
B's perturbed twin (``perturb="bfloat16"``); two real bugs in the same setting (B with twice
the learning rate, B with GELU instead of ReLU). Each twin is recorded from its own bfloat16 run (the buggy one for a bug: the same script,
nudged). Prints, per configuration, the verdicts by
the precision-aware tolerance (item2) and by the twin, and the largest ratio of the A-B difference to
the twin's drift (the verdict's margin: below 10 is within the twin's noise).

    .venv/bin/python scripts/twin_precision.py [--steps 6] [--out DIR]

Runs by hand (a few minutes on 2 CPU cores); not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import graddiff
from graddiff.diff.align import align
from graddiff.diff.compare_records import DIFF, EQUAL, STATS
from graddiff.diff.noiseref import twin_drift
from graddiff.diff.pair import RunPair


class Encoder(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.layer = nn.TransformerEncoderLayer(
            16, 2, 32, dropout=0.0, batch_first=True, activation=act()
        )
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.layer(self.inp(x)).mean(1))


def build(model: str, act) -> nn.Module:
    if model == "mlp":
        return nn.Sequential(nn.Linear(8, 32), act(), nn.Linear(32, 32), act(), nn.Linear(32, 4))
    if model == "bn-mlp":
        return nn.Sequential(
            nn.Linear(8, 32),
            nn.BatchNorm1d(32),
            act(),
            nn.Linear(32, 32),
            nn.BatchNorm1d(32),
            act(),
            nn.Linear(32, 4),
        )
    return Encoder(act)


def train(path, model, opt, steps, *, autocast=False, perturb=None, lr_factor=1.0, act=nn.ReLU):
    torch.manual_seed(0)
    net = build(model, act)
    lr = (0.1 if opt == "sgd" else 0.01) * lr_factor
    o = (torch.optim.SGD if opt == "sgd" else torch.optim.AdamW)(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    with graddiff.trace(net, path, values="full", perturb=perturb):
        for _ in range(steps):
            shape = (16, 8) if model != "encoder" else (16, 6, 8)
            x, y = torch.randn(*shape, generator=g), torch.randint(0, 4, (16,), generator=g)
            o.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = F.cross_entropy(net(x), y)
            loss.backward()
            o.step()
    return str(path)


def raw_rels(p, q):
    """(kind, name, call, step) -> relative difference (no envelope)."""
    with graddiff.open(p) as a, graddiff.open(q) as b:
        al = align(a, b, tuple(a.kinds))
        pair = RunPair(a, b, al, np.intersect1d(a.steps, b.steps))
        out = {}
        try:
            for step in pair.steps.tolist():
                c = pair.cells(step)
                for i in range(len(c)):
                    s, code = al.slots[int(c.slot[i])], int(c.code[i])
                    if code == EQUAL:
                        r = 0.0
                    elif code in (DIFF, STATS):
                        vd = pair.diff(s, step, detail=False) if code == DIFF else None
                        r = float(c.rel_lb[i]) if vd is None else vd.rel_diff
                    else:
                        continue
                    out[(s.kind, s.name, max(s.call, 0), step)] = r
        finally:
            pair.close()
    return out


def margin(a, b, twin, origin) -> tuple[float, tuple]:
    """The largest A-B difference over 10x the twin's drift envelope (floored like compare)."""
    ab = raw_rels(a, b)
    with graddiff.open(origin) as o, graddiff.open(twin) as t:
        drift = twin_drift(o, t, tuple(o.kinds))
    worst = (0.0, ())
    for (kind, name, call, step), r in ab.items():
        d = drift.get((kind, name, call), {}).get(step)
        tol = max(10 * (d or 0.0), 16 * 1.19e-7)
        worst = max(worst, (r / tol, (kind, name, step)))
    return worst


def verdict(r) -> str:
    if r.first is None:
        return "within" if r.verdict != "identical" else "identical"
    return f"DIVERGED step {r.first.step} {r.first.kind} {r.first.name}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    d = args.out or tempfile.mkdtemp(prefix="twin-precision-")
    os.makedirs(d, exist_ok=True)
    print(f"steps {args.steps}, traces in {d}")
    for model in ("mlp", "bn-mlp", "encoder"):
        for opt in ("sgd", "adamw"):

            def f(n, model=model, opt=opt):
                return os.path.join(d, f"{model}-{opt}-{n}.h5")

            a = train(f("a"), model, opt, args.steps)
            b = train(f("b"), model, opt, args.steps, autocast=True)
            t = train(f("twin"), model, opt, args.steps, autocast=True, perturb="bfloat16")
            bugs = {}
            for bug, kw in (("lr x2", {"lr_factor": 2.0}), ("gelu", {"act": nn.GELU})):
                name = bug.replace(" ", "")
                bugs[bug] = (
                    train(f(name), model, opt, args.steps, autocast=True, **kw),
                    train(
                        f(name + "-twin"),
                        model,
                        opt,
                        args.steps,
                        autocast=True,
                        perturb="bfloat16",
                        **kw,
                    ),
                )
            ratio, where = margin(a, b, t, b)
            row = [
                f"{model}/{opt}",
                "item2: " + verdict(graddiff.compare(a, b)),
                "twin: " + verdict(graddiff.compare(a, b, noise=t)),
                f"largest diff/(10x drift) {ratio:.2f} at {where}",
            ] + [
                f"{bug}: item2 {verdict(graddiff.compare(a, bb))}, twin "
                + verdict(graddiff.compare(a, bb, noise=bt))
                for bug, (bb, bt) in bugs.items()
            ]
            print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()

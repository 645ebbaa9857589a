"""The precision bound on a grid of real bugs and genuine pairs (docs/tolerance.md).

For MLP / CNN / tiny transformer x SGD / SGD+momentum / Adam x bfloat16 autocast / bfloat16
parameters / float16 autocast with a GradScaler (the AMP recipe; 4 steps each), prints
compare's verdict for: B with twice the learning rate (``lrx2``: a real bug), float32 vs the
reduced-precision run (``fp32``), the reduced-precision run vs the same with foreach optimizer
kernels (``foreach``), with 2 accumulated micro-batches (``micro``), and float32 vs the
reduced-precision run with micro-batches (``fp32-micro``); the genuine pairs must never be
DIVERGED. ``-v`` also prints the lr x2 headline; ``--cnn-pool`` uses a CNN with BatchNorm
and max-pooling instead (kinks that rounding tips: docs/tolerance.md).

    .venv/bin/python scripts/precision_grid.py [mlp,cnn,enc] [autocast,params,fp16] [-v]

Runs by hand (about 2 minutes on 2 CPU cores); the test suite runs a subset
(tests/test_precision_update.py).
"""

from __future__ import annotations

import itertools
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

import graddiff


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.layer(self.inp(x)).mean(1))


def build(model: str) -> nn.Module:
    if model == "mlp":
        return nn.Sequential(
            nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
        )
    if model == "cnn" and "--cnn-pool" in sys.argv:
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64, 4),
        )
    if model == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 4, 3),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64, 4),
        )
    return Encoder()


SHAPE = {"mlp": (16, 8), "cnn": (16, 1, 8, 8), "enc": (16, 6, 8)}


def train(path, model, opt, prec, lr_factor=1.0, foreach=False, steps=4, micro=1) -> str:
    torch.manual_seed(0)
    net = build(model)
    if prec == "params":
        net = net.to(torch.bfloat16)
    lr = {"sgd": 0.1, "mom": 0.05, "adam": 0.01}[opt] * lr_factor
    if opt == "adam":
        o = torch.optim.Adam(net.parameters(), lr=lr, foreach=foreach)
    else:
        o = torch.optim.SGD(
            net.parameters(), lr=lr, momentum=0.9 if opt == "mom" else 0.0, foreach=foreach
        )
    scaler = torch.amp.GradScaler("cpu", enabled=prec == "fp16")
    dtype = torch.float16 if prec == "fp16" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    with graddiff.trace(net, path, values="full"):
        for _ in range(steps):
            x, y = torch.randn(*SHAPE[model], generator=g), torch.randint(0, 4, (16,), generator=g)
            if prec == "params":
                x = x.to(torch.bfloat16)
            o.zero_grad()
            for xm, ym in zip(x.chunk(micro), y.chunk(micro)):
                with torch.autocast("cpu", dtype=dtype, enabled=prec in ("autocast", "fp16")):
                    loss = F.cross_entropy(net(xm).float(), ym) / micro
                scaler.scale(loss).backward()
            scaler.step(o)
            scaler.update()
    return str(path)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    models = args[0].split(",") if args else ["mlp", "cnn", "enc"]
    precs = args[1].split(",") if len(args) > 1 else ["autocast", "params", "fp16"]
    d = tempfile.mkdtemp(prefix="precision-grid-")
    for m, opt, prec in itertools.product(models, ["sgd", "mom", "adam"], precs):
        k = f"{m}-{opt}-{prec}"
        a = train(f"{d}/{k}-a.h5", m, opt, prec)
        pairs = {
            "lrx2": (a, train(f"{d}/{k}-b.h5", m, opt, prec, lr_factor=2)),
            "fp32": (train(f"{d}/{k}-f.h5", m, opt, "fp32"), a),
            "foreach": (a, train(f"{d}/{k}-r.h5", m, opt, prec, foreach=True)),
        }
        if not (m == "cnn" and "--cnn-pool" in sys.argv):  # BatchNorm: micro-batches differ
            pairs["micro"] = (a, train(f"{d}/{k}-m.h5", m, opt, prec, micro=2))
            pairs["fp32-micro"] = (pairs["fp32"][0], pairs["micro"][1])
        out = []
        for name, (x, y) in pairs.items():
            r = graddiff.compare(x, y)
            where = f"step {r.first.step} {r.first.kind}" if r.first else "-"
            kinks = " kinks" if any(n.startswith("tipped kinks") for n in r.notes) else ""
            out.append(f"{name}: {r.verdict} ({where}; max rel {r.max_rel_diff:.2g}{kinks})")
        print(k, " | ".join(out), flush=True)
        if "-v" in sys.argv:
            print("   ", graddiff.compare(*pairs["lrx2"]).headline())


if __name__ == "__main__":
    main()

"""Question 1: manual updates vs ``opt.step()`` give different accuracies. Why?

    "I update a network's parameters manually via torch.autograd.grad (p.data -= LR * g) and
    automatically via opt.step(); with the same seed, settings and data, accuracy is 86.7 % vs
    88.0 %. Why?"

The two models were created one after the other with ``Model()``: the second one consumed the
random numbers after the first, so the runs start from different weights. graddiff says so at
step 0, on the first layer's weights.

With ``--same-init`` the second model is a ``deepcopy`` of the first. Then the only difference is
float rounding: ``p.data -= LR * g`` rounds ``LR * g`` before subtracting, SGD computes
``p.add_(g, alpha=-LR)`` in one go. graddiff traces it back to that: over a few steps the runs
agree within tolerance; over the default 40 steps BatchNorm + ReLU amplify the rounding past the
tolerance (a gradient at step 15), and the report names the origin, a rounding-level difference
in the weights at step 1 (cause ``rounding``). ``--exact`` shows the first bitwise difference;
graddiff's growth table and the script's last table show how the difference spreads.

    python examples/q1_manual_vs_optimizer.py                 # separate Model() calls
    python examples/q1_manual_vs_optimizer.py --same-init --exact
    python examples/q1_manual_vs_optimizer.py --data mnist --root ~/data
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from common import accuracy, datasets, make_parser, out_dir, pick_device, train_loader, verdict

import graddiff


class Model(nn.Module):
    """The asker's MLP: 784-1440-1440-784-784-10, BatchNorm after every hidden Linear."""

    def __init__(self, width: int = 1440) -> None:
        super().__init__()
        self.fc1 = nn.Sequential(
            nn.Linear(784, width, bias=False), nn.BatchNorm1d(width), nn.ReLU()
        )
        self.fc2 = nn.Sequential(
            nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU()
        )
        self.fc3 = nn.Sequential(nn.Linear(width, 784, bias=False), nn.BatchNorm1d(784), nn.ReLU())
        self.fc4 = nn.Sequential(nn.Linear(784, 784, bias=False), nn.BatchNorm1d(784), nn.ReLU())
        self.fc5 = nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 784)
        return self.fc5(self.fc4(self.fc3(self.fc2(self.fc1(x)))))


def train_manual(model, loader, epochs, lr, device):
    for _epoch in range(epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y)
            grads = torch.autograd.grad(loss, model.parameters())
            for p, g in zip(model.parameters(), grads):
                p.data -= lr * g


def train_optimizer(model, loader, epochs, lr, device):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _epoch in range(epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()


def spread(a_path, b_path) -> None:
    """How the rounding difference spreads: per step, how many parameter tensors differ
    bitwise, and the loss difference (graddiff's growth table shows the sizes)."""
    with graddiff.open(a_path) as a, graddiff.open(b_path) as b:
        names = a.names("param")
        steps = sorted(set(a.steps.tolist()) & set(b.steps.tolist()))
        shown = [s for s in steps if s < 4 or (s & (s - 1)) == 0 or s == steps[-1]]
        print("\n  step  parameters differing bitwise  |loss A - loss B|")
        for s in shown:
            fa = [a.stats("param", n, s)["fingerprint"] for n in names]
            n_diff = sum(x != b.stats("param", n, s)["fingerprint"] for n, x in zip(names, fa))
            dloss = abs(a.stats("loss", "loss", s)["mean"] - b.stats("loss", "loss", s)["mean"])
            print(f"  {s:4d}  {n_diff:12d} of {len(names):<13d} {dloss:.2e}")


def main(argv=None) -> int:
    parser = make_parser(__doc__.split("\n")[0], out="graddiff-runs/q1", epochs=1, width=1440)
    parser.add_argument(
        "--same-init", action="store_true", help="second model = deepcopy(first) instead of Model()"
    )
    parser.add_argument(
        "--exact", action="store_true", help="bitwise comparison (shows the rounding difference)"
    )
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    train, test = datasets(args)
    out = out_dir(args)
    a, b = out / "manual.h5", out / "optimizer.h5"

    torch.manual_seed(args.seed)
    m1 = Model(args.width).to(device)
    m2 = copy.deepcopy(m1) if args.same_init else Model(args.width).to(device)

    # The MLP has 5 M parameters: full values of every tensor would take ~70 MB a step, so
    # only the steps where the difference starts keep them (step 0 for a different init, step 1
    # for rounding in the update); the others keep statistics and bitwise fingerprints, which is
    # all compare needs to find the first divergence and how it grows.
    options = dict(values="auto", full_steps=[0, 1] if args.same_init else [0])
    loader, epochs = train_loader(args, train)
    with graddiff.trace(m1, a, **options):
        train_manual(m1, loader, epochs, args.lr, device)
    loader, epochs = train_loader(args, train)
    with graddiff.trace(m2, b, **options):
        train_optimizer(m2, loader, epochs, args.lr, device)

    verdict(
        a,
        b,
        {
            "manual (autograd.grad):": accuracy(m1, test, device),
            "optimizer (opt.step()):": accuracy(m2, test, device),
        },
        exact=args.exact,
    )
    if args.same_init:
        spread(a, b)
    return 0


if __name__ == "__main__":
    sys.exit(main())

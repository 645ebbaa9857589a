"""Question 2: ``autograd.grad`` works, ``loss.backward()`` fails, the gradients look equal.

    "Manual SGD with grad = torch.autograd.grad(loss, m.parameters()) works, but
    loss.backward() then p -= LR * p.grad makes the model fail, although the gradients look
    equal."

They are equal at the first step. ``backward()`` adds into ``p.grad``; nothing ever resets it,
so from the second step on the update uses the sum of every gradient so far. graddiff finds the
first difference at step 1, in the gradient, with parameters and loss still equal at that step.
``--zero-grad`` adds the missing ``m2.zero_grad()``: then the two runs agree.

Accuracy alone can mislead here: a ``.grad`` that sums every past gradient acts like momentum
without decay, and on the synthetic data the accumulating run does not fail within 5 epochs
(it may even score higher); the asker's MNIST run did fail. Either way the update is not the
intended one, and graddiff shows where that starts.

    python examples/q2_missing_zero_grad.py
    python examples/q2_missing_zero_grad.py --zero-grad
    python examples/q2_missing_zero_grad.py --data mnist --root ~/data
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from common import accuracy, datasets, make_parser, out_dir, pick_device, train_loader, verdict

import graddiff


class CNN(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(1, width, 3, stride=2, padding=1), nn.ReLU())
        self.conv2 = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.conv3 = nn.Sequential(
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv3(self.conv2(self.conv1(x))))


def train_autograd_grad(m1, loader, epochs, lr, device):
    for _epoch in range(epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(m1(x), y)
            grad = torch.autograd.grad(loss, m1.parameters())
            with torch.no_grad():
                for p, g in zip(m1.parameters(), grad):
                    p -= lr * g


def train_backward(m2, loader, epochs, lr, device, zero_grad=False):
    for _epoch in range(epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if zero_grad:
                m2.zero_grad()
            loss = F.cross_entropy(m2(x), y)
            loss.backward()
            with torch.no_grad():
                for p in m2.parameters():
                    p -= lr * p.grad


def main(argv=None) -> int:
    parser = make_parser(__doc__.split("\n")[0], out="graddiff-runs/q2", epochs=5, width=16)
    parser.add_argument("--zero-grad", action="store_true", help="add the missing m2.zero_grad()")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    train, test = datasets(args)
    out = out_dir(args)
    a, b = out / "autograd_grad.h5", out / "backward.h5"

    torch.manual_seed(args.seed)
    m1 = CNN(args.width).to(device)
    m2 = copy.deepcopy(m1)

    # A small CNN: full values of parameters and gradients are cheap, so keep them
    # (`graddiff inspect` can then show the accumulated gradient element by element).
    options = dict(values="full", kinds=["param", "loss", "grad", "autograd_grad", "buffer"])
    loader, epochs = train_loader(args, train)
    with graddiff.trace(m1, a, **options):
        train_autograd_grad(m1, loader, epochs, args.lr, device)
    loader, epochs = train_loader(args, train)
    with graddiff.trace(m2, b, **options):
        train_backward(m2, loader, epochs, args.lr, device, zero_grad=args.zero_grad)

    label = "backward + zero_grad:" if args.zero_grad else "backward, no zero_grad:"
    verdict(
        a,
        b,
        {"autograd.grad:": accuracy(m1, test, device), label: accuracy(m2, test, device)},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Small models and training loops shared by the recorder's tests."""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class BNMLP(nn.Module):
    """The seed MLP's shape in miniature: Sequential(Linear(bias=False), BatchNorm1d, ReLU)."""

    def __init__(self, widths=(20, 32, 32, 16), classes=4, inplace=False):
        super().__init__()
        layers = []
        for i in range(len(widths) - 1):
            layers.append(
                nn.Sequential(
                    nn.Linear(widths[i], widths[i + 1], bias=False),
                    nn.BatchNorm1d(widths[i + 1]),
                    nn.ReLU(inplace=inplace),
                )
            )
        self.fc = nn.ModuleList(layers)
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x):
        for layer in self.fc:
            x = layer(x)
        return self.head(x)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Sequential(
            nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.conv3 = nn.Sequential(
            nn.Conv2d(8, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.Flatten(),
        )
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(self.conv3(self.conv2(self.conv1(x))))


def batches(n_steps, batch=16, in_shape=(20,), classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn((batch, *in_shape), generator=g),
            torch.randint(0, classes, (batch,), generator=g),
        )
        for _ in range(n_steps)
    ]


# -- training loops: (model, data, lr) -> None; each mutates the model in place ----------------


def loop_sgd(model, data, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def loop_adamw(model, data, lr=1e-2):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def loop_autograd_grad(model, data, lr=0.1):
    from torch.autograd import grad  # imported the way users do, before any trace

    params = list(model.parameters())
    for x, y in data:
        grads = grad(F.cross_entropy(model(x), y), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.data -= lr * g


def loop_backward_manual(model, data, lr=0.1):
    for x, y in data:
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
                p.grad = None


def loop_accumulate(model, data, lr=0.1):
    """Two micro-batches per optimizer step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for x, y in data:
        opt.zero_grad()
        for xs, ys in zip(x.chunk(2), y.chunk(2)):
            (F.cross_entropy(model(xs), ys) / 2).backward()
        opt.step()


LOOPS: dict[str, Callable] = {
    "sgd": loop_sgd,
    "adamw": loop_adamw,
    "autograd_grad": loop_autograd_grad,
    "backward_manual": loop_backward_manual,
    "accumulate": loop_accumulate,
}


def state_of(model):
    """Every parameter and buffer, cloned, by name."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fresh_pair(factory, seed=0):
    torch.manual_seed(seed)
    a = factory()
    return a, copy.deepcopy(a)

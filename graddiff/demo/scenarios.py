"""Compact versions of the motivating questions, recorded by ``graddiff demo``.

Each scenario builds its model(s), records two training runs with ``graddiff.trace`` into a
folder and returns the two paths with the runs' test accuracies; comparing them is the
caller's job. The readable stand-alone versions are the scripts in ``examples/``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..tracer import trace
from .data import synthetic_digits

LR = 0.1
BATCH = 300


@dataclass
class Recorded:
    """Two recorded runs of one scenario."""

    key: str
    title: str
    question: str
    a: Path
    b: Path
    accuracy: dict[str, float] = field(default_factory=dict)
    note: str = ""


@dataclass
class Setup:
    """What every scenario needs: data, device, length and model width."""

    out: Path
    steps: int
    device: torch.device
    mlp_width: int = 256
    cnn_width: int = 16
    seed: int = 0
    train_size: int = 12000
    _data: tuple = field(default=(), repr=False)

    def data(self) -> tuple:
        if not self._data:
            n_train = min(self.train_size, self.steps * BATCH)  # a short demo needs fewer
            self._data = (
                synthetic_digits(n_train, seed=self.seed),
                synthetic_digits(2000, seed=self.seed, train=False),
            )
        return self._data

    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``steps`` batches, the same for every run (a seeded shuffle, repeated over epochs)."""
        train = self.data()[0]
        g = torch.Generator().manual_seed(self.seed)
        loader = torch.utils.data.DataLoader(
            train, batch_size=BATCH, shuffle=True, drop_last=True, generator=g
        )
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        while len(out) < self.steps:
            for x, y in loader:
                out.append((x.to(self.device), y.to(self.device)))
                if len(out) == self.steps:
                    break
        return out

    @torch.no_grad()
    def accuracy(self, model: nn.Module) -> float:
        x, y = self.data()[1].tensors
        model.eval()
        correct = (model(x.to(self.device)).argmax(1) == y.to(self.device)).float().mean()
        model.train()
        return float(correct)


def _block(n_in: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_out, bias=False), nn.BatchNorm1d(n_out), nn.ReLU())


class MLP(nn.Module):
    """Question 1's model: fc1..fc4 Linear(bias=False)+BatchNorm1d+ReLU, fc5 Linear(784, 10)."""

    def __init__(self, width: int = 1440) -> None:
        super().__init__()
        self.fc1 = _block(784, width)
        self.fc2 = _block(width, width)
        self.fc3 = _block(width, 784)
        self.fc4 = _block(784, 784)
        self.fc5 = nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc5(self.fc4(self.fc3(self.fc2(self.fc1(x.view(-1, 784))))))


class CNN(nn.Module):
    """Question 2's model: conv1, conv2/conv3 Conv2d+BatchNorm2d+ReLU, fc."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Sequential(nn.Conv2d(1, w, 3, stride=2, padding=1), nn.ReLU())
        self.conv2 = nn.Sequential(
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU()
        )
        self.conv3 = nn.Sequential(
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.fc = nn.Linear(2 * w * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv3(self.conv2(self.conv1(x))))


# The training loops, as the askers wrote them (one step each).


def manual_autograd_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, model.parameters())
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p -= LR * g


def backward_without_zero_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad


def _record(
    model: nn.Module,
    path: Path,
    step: Callable[..., None],
    setup: Setup,
    **options: object,
) -> None:
    with trace(model, path, **options):
        for x, y in setup.batches():
            step(model, x, y)


def q1_manual_vs_optimizer(setup: Setup) -> Recorded:
    """Manual ``autograd.grad`` updates vs ``opt.step()``, two models built by ``Model()``."""
    torch.manual_seed(setup.seed)
    m1 = MLP(setup.mlp_width).to(setup.device)
    m2 = MLP(setup.mlp_width).to(setup.device)  # the asker's second Model(): other weights
    a, b = setup.out / "q1_manual.h5", setup.out / "q1_optimizer.h5"
    _record(m1, a, manual_autograd_grad, setup, full_steps=[0])
    opt = torch.optim.SGD(m2.parameters(), lr=LR)

    def optimizer_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    _record(m2, b, optimizer_step, setup, full_steps=[0])
    return Recorded(
        "q1",
        "manual updates vs opt.step()",
        "I update a network's parameters manually via torch.autograd.grad and automatically "
        "via opt.step(); with the same seed, settings and data, the accuracies differ. Why?",
        a,
        b,
        {"manual (autograd.grad)": setup.accuracy(m1), "opt.step()": setup.accuracy(m2)},
        note=f"the MLP is 784-{setup.mlp_width}-{setup.mlp_width}-784-784-10 (the question's is "
        "784-1440-1440-784-784-10)",
    )


def q2_missing_zero_grad(setup: Setup) -> Recorded:
    """``autograd.grad`` vs ``backward()`` + ``p -= LR * p.grad`` without ``zero_grad()``."""
    torch.manual_seed(setup.seed)
    m1 = CNN(setup.cnn_width).to(setup.device)
    m2 = copy.deepcopy(m1)
    a, b = setup.out / "q2_autograd_grad.h5", setup.out / "q2_backward.h5"
    options = dict(values="full", kinds=["param", "loss", "grad", "autograd_grad", "buffer"])
    _record(m1, a, manual_autograd_grad, setup, **options)
    _record(m2, b, backward_without_zero_grad, setup, **options)
    return Recorded(
        "q2",
        "autograd.grad vs backward() without zero_grad()",
        "Manual SGD with torch.autograd.grad works, but loss.backward() then p -= LR * p.grad "
        "makes the model fail, although the gradients look equal.",
        a,
        b,
        {"autograd.grad": setup.accuracy(m1), "backward, no zero_grad": setup.accuracy(m2)},
        note="accumulating .grad acts like momentum without decay: in a short run B may even "
        "score higher; the asker's model failed after 5 MNIST epochs. The update is wrong from step 1.",
    )


SCENARIOS: dict[str, Callable[[Setup], Recorded]] = {
    "q1": q1_manual_vs_optimizer,
    "q2": q2_missing_zero_grad,
}

"""What the three example scripts share: options, data, device, evaluation, the printed verdict.

The training loops themselves live in each script, written the way the people who asked the
questions wrote them; this file only keeps the plumbing out of their way.

Data: by default an MNIST-shaped synthetic dataset (no network needed, deterministic from
``--seed``, the same one ``graddiff demo`` uses); ``--data mnist --root DIR`` uses the real
MNIST through torchvision (downloaded into DIR when the network allows).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Optional

import torch

import graddiff


def make_parser(description: str, out: str, epochs: int, width: int) -> argparse.ArgumentParser:
    """The options every example has; each script adds its own variants."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--data",
        choices=("synthetic", "mnist"),
        default="synthetic",
        help="synthetic (default): MNIST-shaped, no network; mnist: torchvision MNIST in --root",
    )
    p.add_argument(
        "--root",
        default="data",
        help="MNIST folder, downloaded there if missing (default: %(default)s)",
    )
    p.add_argument(
        "--train-size",
        type=int,
        default=12000,
        help="synthetic training samples (default: %(default)s; test: 2000)",
    )
    p.add_argument("--epochs", type=int, default=epochs, help="default: %(default)s")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="stop each run after N steps, counted over epochs (overrides --epochs)",
    )
    p.add_argument("--batch", type=int, default=300, help="batch size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.1, help="default: %(default)s")
    p.add_argument(
        "--width",
        type=int,
        default=width,
        help="hidden width, smaller = faster (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="model and data seed (default: 0)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument(
        "--out", default=out, help="folder for the two trace files (default: %(default)s)"
    )
    return p


def pick_device(name: Optional[str]) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def datasets(args: argparse.Namespace) -> tuple[Any, Any]:
    """(train, test) datasets of (1x28x28 float image in [0, 1], label)."""
    if args.data == "mnist":
        from torchvision import datasets as tvd
        from torchvision.transforms import ToTensor

        train = tvd.MNIST(args.root, train=True, download=True, transform=ToTensor())
        test = tvd.MNIST(args.root, train=False, download=True, transform=ToTensor())
        return train, test
    from graddiff.demo.data import synthetic_digits

    return (
        synthetic_digits(args.train_size, seed=args.seed, train=True),
        synthetic_digits(2000, seed=args.seed, train=False),
    )


class _Limited:
    """A loader that stops after a total number of batches, counted over epochs."""

    def __init__(self, loader: torch.utils.data.DataLoader, steps: int) -> None:
        self.loader, self.left = loader, steps

    def __iter__(self) -> Any:
        for batch in self.loader:
            if self.left <= 0:
                return
            self.left -= 1
            yield batch


def train_loader(args: argparse.Namespace, train: Any) -> tuple[Any, int]:
    """A fresh shuffled loader and the number of epochs to run.

    Call it once per run: the shuffling generator is seeded the same way each time, so both
    runs see the same batches in the same order.
    """
    loader = torch.utils.data.DataLoader(
        train,
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    if args.steps is None:
        return loader, args.epochs
    return _Limited(loader, args.steps), max(1, math.ceil(args.steps / len(loader)))


@torch.no_grad()
def accuracy(model: torch.nn.Module, test: Any, device: torch.device) -> float:
    """Test accuracy in eval mode (after the trace: evaluation is not part of the recording)."""
    model.eval()
    correct = total = 0
    for x, y in torch.utils.data.DataLoader(test, batch_size=1000):
        out = model(x.to(device))
        out = out[0] if isinstance(out, tuple) else out
        correct += (out.argmax(1) == y.to(device)).sum().item()
        total += len(y)
    model.train()
    return correct / total


def out_dir(args: argparse.Namespace) -> Path:
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def verdict(
    a: Path,
    b: Path,
    results: dict[str, float],
    exact: bool = False,
) -> Any:
    """Compare the two traces, print the report and the final accuracies; return the report."""
    report = graddiff.compare(a, b, exact=exact)
    print(report)
    print()
    for label, acc in results.items():
        print(f"  final test accuracy, {label:<28} {100 * acc:6.2f} %")
    print(f"\n  graddiff compare {a} {b}{' --exact' if exact else ''}")
    return report

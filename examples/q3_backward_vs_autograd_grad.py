"""Question 3: why do gradients differ between ``loss.backward()`` and ``torch.autograd.grad``?

A shared trunk feeds two heads, each with its own loss (which digit, and odd or even).
``backward()`` adds every loss's contribution into ``p.grad``: the trunk's ``.grad`` holds
digit-loss gradient + parity-loss gradient. ``torch.autograd.grad`` returns each call's
gradient on its own; to get the same update you sum them yourself.

Run A calls ``backward()`` on both losses, run B calls ``autograd.grad`` per loss and sums;
both then update ``p -= LR * g``. graddiff pairs run B's summed ``autograd.grad`` outputs with
run A's ``.grad`` and finds no divergence: the sum is what ``.grad`` accumulates. With ``--forget-branch``, run B takes the parity loss's gradient for the parity
head only, forgetting that it also flows into the shared trunk: graddiff points at the trunk's
gradient at step 0, while the heads' gradients still agree.

    python examples/q3_backward_vs_autograd_grad.py
    python examples/q3_backward_vs_autograd_grad.py --forget-branch
"""

from __future__ import annotations

import copy
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from common import accuracy, datasets, make_parser, out_dir, pick_device, train_loader, verdict

import graddiff


class TwoHeads(nn.Module):
    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(784, width, bias=False),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Linear(width, width, bias=False),
            nn.BatchNorm1d(width),
            nn.ReLU(),
        )
        self.digit = nn.Linear(width, 10)  # which digit
        self.parity = nn.Linear(width, 2)  # odd or even: a second loss on the same features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x.flatten(1))
        return self.digit(h), self.parity(h)


def losses(model, x, y):
    digit_logits, parity_logits = model(x)
    return F.cross_entropy(digit_logits, y), F.cross_entropy(parity_logits, y % 2)


def train_backward(model, loader, epochs, lr, device):
    for _epoch in range(epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss_digit, loss_parity = losses(model, x, y)
            loss_digit.backward(retain_graph=True)  # .grad = d loss_digit / dp
            loss_parity.backward()  # .grad += d loss_parity / dp (trunk and parity head)
            with torch.no_grad():
                for p in model.parameters():
                    p -= lr * p.grad
            model.zero_grad()


def train_autograd_grad(model, loader, epochs, lr, device, forget_branch=False):
    params = list(model.parameters())
    for _epoch in range(epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss_digit, loss_parity = losses(model, x, y)
            g_digit = torch.autograd.grad(loss_digit, params, retain_graph=True, allow_unused=True)
            if forget_branch:  # "the parity loss only trains the parity head"
                head = list(model.parity.parameters())
                g_head = dict(zip(map(id, head), torch.autograd.grad(loss_parity, head)))
                g_parity = [g_head.get(id(p)) for p in params]
            else:
                g_parity = torch.autograd.grad(loss_parity, params, allow_unused=True)
            with torch.no_grad():
                for p, gd, gp in zip(params, g_digit, g_parity):
                    # each call returned its own gradient (None where a loss does not reach p)
                    g = gd if gp is None else gp if gd is None else gd + gp
                    p -= lr * g


def per_parameter(a_path, b_path, step=0) -> None:
    """Step ``step``, every parameter: A's ``.grad`` vs the sum of B's autograd.grad outputs."""
    with graddiff.open(a_path) as a, graddiff.open(b_path) as b:
        print(f"\n  step {step}: .grad in A vs summed autograd.grad outputs in B")
        for name in a.names("grad"):
            calls = [k.call for k in b.keys if k.kind == "autograd_grad" and k.name == name]
            gb = sum(b.get("autograd_grad", name, step, c) for c in calls)
            ga = a.get("grad", name, step)
            rel = np.linalg.norm(ga - gb) / max(np.linalg.norm(ga), 1e-30)
            verdict = "equal" if rel == 0 else f"rel diff {rel:.2g}"
            shown = f"{name} ({a.module_class('grad', name)})"
            print(f"    {shown:<30} {len(calls)} autograd.grad call(s) in B   {verdict}")


def main(argv=None) -> int:
    parser = make_parser(__doc__.split("\n")[0], out="graddiff-runs/q3", epochs=2, width=128)
    parser.add_argument(
        "--forget-branch",
        action="store_true",
        help="run B leaves the parity loss's gradient out of the shared trunk",
    )
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    train, test = datasets(args)
    out = out_dir(args)
    a, b = out / "backward.h5", out / "autograd_grad.h5"

    torch.manual_seed(args.seed)
    m1 = TwoHeads(args.width).to(device)
    m2 = copy.deepcopy(m1)

    # Full values at every step: graddiff pairs A's .grad with the sum of B's autograd.grad
    # outputs, and summing needs the values (statistics alone cannot be summed). Activations
    # are left out: batch-sized and not needed here. About 1 MB a step at width 128.
    options = dict(values="full", kinds=["param", "loss", "grad", "autograd_grad"])
    loader, epochs = train_loader(args, train)
    with graddiff.trace(m1, a, **options):
        train_backward(m1, loader, epochs, args.lr, device)
    loader, epochs = train_loader(args, train)
    with graddiff.trace(m2, b, **options):
        train_autograd_grad(m2, loader, epochs, args.lr, device, forget_branch=args.forget_branch)

    label = "autograd.grad, branch forgotten:" if args.forget_branch else "autograd.grad, summed:"
    verdict(
        a,
        b,
        {"backward() per loss:": accuracy(m1, test, device), label: accuracy(m2, test, device)},
    )
    per_parameter(a, b)
    return 0


if __name__ == "__main__":
    sys.exit(main())

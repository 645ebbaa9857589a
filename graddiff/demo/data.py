"""An MNIST-shaped dataset that needs no network: drawn strokes per class, shifted and noisy.

Used by ``graddiff demo`` and, by default, by ``examples/``. Deterministic from a seed; hard
enough that a few hundred SGD steps do not reach 100 % test accuracy, so accuracies can be
compared between runs the way the original questions did.
"""

from __future__ import annotations

import torch

IMAGE_SHAPE = (1, 28, 28)
NUM_CLASSES = 10


def _stroke(p0: torch.Tensor, p1: torch.Tensor, width: float) -> torch.Tensor:
    """A 28x28 image of a soft line segment from p0 to p1 (pixel coordinates)."""
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    pix = torch.stack([yy, xx], dim=-1)  # (28, 28, 2)
    d = p1 - p0
    t = ((pix - p0) @ d / d.dot(d).clamp_min(1e-6)).clamp(0, 1)
    dist2 = ((pix - (p0 + t[..., None] * d)) ** 2).sum(-1)
    return torch.exp(-dist2 / (2 * width**2))


def prototypes(seed: int = 0) -> torch.Tensor:
    """One "digit" per class: three random strokes each, values in [0, 1]. Shape (10, 28, 28)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(NUM_CLASSES, 28, 28)
    for c in range(NUM_CLASSES):
        for _ in range(3):
            p0, p1 = torch.rand(2, 2, generator=g) * 16 + 6
            out[c] = torch.maximum(out[c], _stroke(p0, p1, width=1.6))
    return out


def synthetic_digits(
    n: int, seed: int = 0, train: bool = True, noise: float = 0.4, max_shift: int = 4
) -> torch.utils.data.TensorDataset:
    """``n`` samples ``(image (1, 28, 28) float32 in [0, 1], label int64)``.

    The class prototypes depend only on ``seed``; the samples also on ``train`` (the train and
    test splits are disjoint draws from the same distribution). Each sample is its class's
    prototype, shifted by up to ``max_shift`` pixels, scaled in contrast, plus Gaussian noise.
    """
    protos = prototypes(seed)
    g = torch.Generator().manual_seed(1_000_003 * (seed + 1) + (0 if train else 1))
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    x = protos[y].clone()
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=g)
    for dy, dx in torch.unique(shifts, dim=0).tolist():
        sel = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
        x[sel] = torch.roll(x[sel], shifts=(dy, dx), dims=(1, 2))
    contrast = torch.rand(n, 1, 1, generator=g) * 0.8 + 0.4
    x = (x * contrast + noise * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return torch.utils.data.TensorDataset(x.unsqueeze(1).contiguous(), y)

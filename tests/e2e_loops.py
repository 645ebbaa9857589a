"""Tiny real training runs for the differ's end-to-end tests: one loop, one keyword per bug.

``record(path, **variant)`` trains a small model for a few CPU steps under ``graddiff.trace``
(full values) and returns the path. The default is the correct loop; each keyword changes one
thing the way a user's bug or refactoring would.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import graddiff


def mlp(width: int = 16, act: type = nn.ReLU) -> nn.Module:
    return nn.Sequential(nn.Linear(8, width), act(), nn.Linear(width, 4))


def bn_mlp(width: int = 32, momentum: float = 0.1) -> nn.Module:
    return nn.Sequential(
        nn.Linear(8, width),
        nn.BatchNorm1d(width, momentum=momentum),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.BatchNorm1d(width, momentum=momentum),
        nn.ReLU(),
        nn.Linear(width, 4),
    )


def drop_mlp(width: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Dropout(0.5), nn.Linear(width, 4))


MODELS = {"mlp": mlp, "bn_mlp": bn_mlp, "drop_mlp": drop_mlp}


def record(
    path,
    *,
    model: str = "mlp",
    steps: int = 3,
    batch: int = 16,
    init_seed: int = 0,
    data_seed: Optional[int] = None,
    rng_seed: int = 1,
    loop: str = "sgd",
    lr: float = 0.1,
    weight_decay: float = 0.0,
    zero_grad: bool = True,
    clip: Optional[float] = None,
    schedule: Optional[tuple[int, float]] = None,
    micro: int = 1,
    freeze: Optional[str] = None,
    evaluate: bool = False,
    back_to_train: bool = True,
    act: type = nn.ReLU,
    bn_momentum: float = 0.1,
    values: str = "full",
    full_steps: Optional[list[int]] = None,
) -> str:
    """Train ``model`` for ``steps`` steps under graddiff.trace and return the trace path.

    loop: "sgd" (optimizer.step), "manual" (backward, then p -= lr * p.grad), "autograd"
    (g = torch.autograd.grad(loss, params); p -= lr * g) or "autograd_assign" (the same
    gradients assigned to ``p.grad``, then optimizer.step()). With ``micro`` > 1 every loop
    takes one backward()/autograd.grad() call per micro-batch (autograd loops sum the calls'
    gradients in call order, the way .grad accumulates).
    """
    torch.manual_seed(init_seed)
    kwargs = (
        {"act": act} if model == "mlp" else ({"momentum": bn_momentum} if model == "bn_mlp" else {})
    )
    net = MODELS[model](**kwargs)
    if freeze:
        for name, p in net.named_parameters():
            if name.startswith(freeze):
                p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(steps * batch, 8, generator=g)
    ys = torch.randint(0, 4, (steps * batch,), generator=g)
    if data_seed is not None:
        perm = torch.randperm(len(xs), generator=torch.Generator().manual_seed(data_seed))
        xs, ys = xs[perm], ys[perm]
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, schedule[0], schedule[1]) if schedule else None
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(rng_seed)  # dropout masks
    with graddiff.trace(net, path, values=values, full_steps=full_steps):
        for step in range(steps):
            x, y = xs[step * batch : (step + 1) * batch], ys[step * batch : (step + 1) * batch]
            if loop in ("autograd", "autograd_assign"):
                grads = None
                for xm, ym in zip(x.chunk(micro), y.chunk(micro)):
                    gs = torch.autograd.grad(loss_fn(net(xm), ym) / micro, params)
                    grads = list(gs) if grads is None else [t + g for t, g in zip(grads, gs)]
                if loop == "autograd_assign":
                    for p, gp in zip(params, grads):
                        p.grad = gp
                    if clip is not None:
                        torch.nn.utils.clip_grad_norm_(params, clip)
                    opt.step()
                    if sched is not None:
                        sched.step()
                else:
                    with torch.no_grad():
                        for p, gp in zip(params, grads):
                            p -= lr * gp
            else:
                if zero_grad:
                    opt.zero_grad()
                for xm, ym in zip(x.chunk(micro), y.chunk(micro)):
                    (loss_fn(net(xm), ym) / micro).backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                if loop == "manual":
                    with torch.no_grad():
                        for p in params:
                            p -= lr * p.grad
                else:
                    opt.step()
                if sched is not None:
                    sched.step()
            if evaluate and step == 0:
                net.eval()
                with torch.no_grad():
                    net(xs[:batch])
                if back_to_train:
                    net.train()
    return str(path)

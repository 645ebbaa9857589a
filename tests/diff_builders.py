"""Synthetic traces for the differ's unit tests: a tiny numpy MLP trained by hand, no torch.

``simulate(path, **variant)`` writes a trace with TraceWriter + entry_from_array in the layout the
recorder produces (params at step start, input, activations in call order, loss, grads at the
update, buffers at step end); each keyword reproduces one bug or one equivalent variant.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from graddiff.entries import entry_from_array
from graddiff.format import FLAG_TRAINING
from graddiff.writer import TraceWriter

F32 = np.float32


#: The module classes of simulate()'s MLP, for ``simulate(..., module_classes=MLP_CLASSES)``.
MLP_CLASSES = {
    "(root)": "MLP",
    "fc1": "Linear",
    "act": "ReLU",
    "drop": "Dropout",
    "bn": "BatchNorm1d",
    "fc2": "Linear",
}


def write_run(path, steps, environment=None, options=None, module_classes=None) -> str:
    """Write ``steps`` (a list of entry lists) as a trace."""
    w = TraceWriter(
        str(path),
        environment=environment or {"torch_version": "2.14.1", "device": "cpu"},
        options=options or {},
        ballast=False,
        module_classes=module_classes,
    )
    for i, entries in enumerate(steps):
        w.write_step(i, entries)
    w.close()
    return str(path)


class _Seq:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> int:
        self.n += 1
        return self.n


def simulate(
    path,
    *,
    n_steps: int = 4,
    init_seed: int = 0,
    data_seed: int = 0,
    hidden: int = 8,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    lr_gamma: Optional[tuple[int, float]] = None,
    clip: Optional[float] = None,
    zero_grad: bool = True,
    autograd: bool = False,
    assign_grad: bool = False,
    dropout: float = 0.0,
    dropout_seed: int = 1,
    train_mode: bool = True,
    bn_momentum: float = 0.1,
    act: str = "relu",
    frozen: bool = False,
    micro: int = 1,
    ulp_at: Optional[int] = None,
    nan_at: Optional[int] = None,
    store_values: bool = True,
    environment: Optional[dict] = None,
    batch: int = 16,
    scale_micro: bool = True,
    module_classes: Optional[dict] = None,
) -> str:
    """Train a 4-hidden-2 MLP for ``n_steps`` on a fixed dataset and record it.

    ``autograd``: gradients come from torch.autograd.grad (one autograd_grad record per
    micro-batch) instead of ``.grad``; with ``assign_grad`` their sum is also assigned to
    ``p.grad`` before the update (both kinds recorded).
    """
    rng = np.random.default_rng(init_seed)
    params = {
        "fc1.weight": rng.standard_normal((hidden, 4)).astype(F32) * F32(0.5),
        "fc1.bias": np.zeros(hidden, F32),
        "fc2.weight": rng.standard_normal((2, hidden)).astype(F32) * F32(0.5),
        "fc2.bias": np.zeros(2, F32),
    }
    data = np.random.default_rng(123)
    X = data.standard_normal((batch * n_steps, 4)).astype(F32)
    Y = data.standard_normal((batch * n_steps, 2)).astype(F32)
    order = np.random.default_rng(data_seed).permutation(len(X)) if data_seed else np.arange(len(X))
    drop_rng = np.random.default_rng(dropout_seed)
    grads_acc = {k: np.zeros_like(v) for k, v in params.items()}
    mom = {k: np.zeros_like(v) for k, v in params.items()}
    running_mean = np.zeros(hidden, F32)
    tracked = 0
    steps = []
    for step in range(n_steps):
        seq = _Seq()
        ents = []
        if ulp_at is not None and step == ulp_at:
            p = params["fc1.weight"]
            p.flat[0] = np.nextafter(p.flat[0], F32(np.inf))
        for name, p in params.items():
            ents.append(entry_from_array("param", name, p, seq=seq(), store_values=store_values))
        idx = order[step * batch : (step + 1) * batch]
        step_grads = {k: np.zeros_like(v) for k, v in params.items()}
        flag = FLAG_TRAINING if train_mode else 0
        for m, part in enumerate(np.array_split(idx, micro)):
            x, y = X[part], Y[part]
            ents.append(
                entry_from_array("input", "0", x, call=m, seq=seq(), store_values=store_values)
            )
            h = x @ params["fc1.weight"].T + params["fc1.bias"]
            if nan_at is not None and step >= nan_at:
                h = h.copy()
                h[0, 0] = np.nan
            ents.append(
                entry_from_array(
                    "activation", "fc1", h, call=m, seq=seq(), store_values=store_values, flags=flag
                )
            )
            a = np.maximum(h, F32(0)) if act == "relu" else np.tanh(h).astype(F32)
            ents.append(
                entry_from_array(
                    "activation", "act", a, call=m, seq=seq(), store_values=store_values, flags=flag
                )
            )
            mask = np.ones_like(a)
            if dropout and train_mode:
                mask = (drop_rng.random(a.shape) >= dropout).astype(F32) / F32(1 - dropout)
                a = a * mask
                ents.append(
                    entry_from_array(
                        "activation",
                        "drop",
                        a,
                        call=m,
                        seq=seq(),
                        store_values=store_values,
                        flags=flag,
                    )
                )
            elif dropout:
                ents.append(
                    entry_from_array(
                        "activation",
                        "drop",
                        a,
                        call=m,
                        seq=seq(),
                        store_values=store_values,
                        flags=flag,
                    )
                )
            out = a @ params["fc2.weight"].T + params["fc2.bias"]
            ents.append(
                entry_from_array(
                    "activation",
                    "fc2",
                    out,
                    call=m,
                    seq=seq(),
                    store_values=store_values,
                    flags=flag,
                )
            )
            if train_mode:
                running_mean = (
                    (1 - F32(bn_momentum)) * running_mean + F32(bn_momentum) * h.mean(0)
                ).astype(F32)
                tracked += 1
            n_all = F32(batch * 2 / (1 if scale_micro else micro))
            loss = np.array(((out - y) ** 2).sum() / n_all, F32)
            ents.append(
                entry_from_array("loss", "loss", loss, call=m, seq=seq(), store_values=store_values)
            )
            dout = (F32(2) * (out - y) / n_all).astype(F32)
            g = {"fc2.weight": dout.T @ a, "fc2.bias": dout.sum(0)}
            da = (dout @ params["fc2.weight"]) * mask
            dh = da * (h > 0) if act == "relu" else da * (F32(1) - np.tanh(h) ** 2)
            g["fc1.weight"] = (dh.T @ x).astype(F32)
            g["fc1.bias"] = dh.sum(0).astype(F32)
            if autograd:
                for k in params:
                    if not (frozen and k.startswith("fc1")):
                        ents.append(
                            entry_from_array(
                                "autograd_grad",
                                k,
                                g[k].astype(F32),
                                call=m,
                                seq=seq(),
                                store_values=store_values,
                            )
                        )
            for k in params:
                step_grads[k] = (step_grads[k] + g[k]).astype(F32)
        if zero_grad:
            grads_acc = step_grads
        else:
            grads_acc = {k: (grads_acc[k] + step_grads[k]).astype(F32) for k in params}
        used = {k: v.copy() for k, v in grads_acc.items()}
        if clip is not None:
            total = float(
                np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in used.values()))
            )
            if total > clip:
                used = {k: (v * F32(clip / (total + 1e-6))).astype(F32) for k, v in used.items()}
        if not autograd or assign_grad:
            for k in params:
                if not (frozen and k.startswith("fc1")):
                    ents.append(
                        entry_from_array("grad", k, used[k], seq=seq(), store_values=store_values)
                    )
        rate = lr * (lr_gamma[1] if lr_gamma and step >= lr_gamma[0] else 1.0)
        for k in params:
            if frozen and k.startswith("fc1"):
                continue
            d = used[k] + F32(weight_decay) * params[k]
            if momentum:
                mom[k] = (F32(momentum) * mom[k] + d).astype(F32)
                d = mom[k]
            params[k] = (params[k] - F32(rate) * d).astype(F32)
        ents.append(
            entry_from_array(
                "buffer", "bn.running_mean", running_mean, seq=seq(), store_values=store_values
            )
        )
        ents.append(
            entry_from_array(
                "buffer",
                "bn.num_batches_tracked",
                np.array(tracked, np.int64),
                seq=seq(),
                store_values=store_values,
            )
        )
        steps.append(ents)
    return write_run(path, steps, environment=environment, module_classes=module_classes)

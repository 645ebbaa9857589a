"""Generated family of equivalent pairs: the same computation through different code must
never be called DIVERGED (exit 0; rounding differences stay within the tolerance).

F.cross_entropy vs nn.CrossEntropyLoss, foreach vs for-loop optimizer kernels, one batch vs
4 accumulated micro-batches (loss / 4), and all three at once; two models, two optimizers.
torch.compile vs eager is in tests/test_compile_equivalence.py (in a subprocess: compiling in
the test process leaks Dynamo state, see test_compile.py)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graddiff


def _loop(path, *, model: str, loss: str, opt: str, micro: int, seed: int) -> str:
    torch.manual_seed(seed)
    if model == "mlp":
        net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    else:  # LayerNorm, not BatchNorm: per-sample, so micro-batches stay equivalent
        net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4))
    kw = {"lr": 1e-2, "weight_decay": 0.01}
    o = {
        "adamw_foreach": lambda: torch.optim.AdamW(net.parameters(), foreach=True, **kw),
        "adamw_loop": lambda: torch.optim.AdamW(net.parameters(), foreach=False, **kw),
        "sgd_foreach": lambda: torch.optim.SGD(net.parameters(), momentum=0.9, foreach=True, **kw),
        "sgd_loop": lambda: torch.optim.SGD(net.parameters(), momentum=0.9, foreach=False, **kw),
    }[opt]()
    crit = nn.CrossEntropyLoss() if loss == "module" else (lambda z, y: F.cross_entropy(z, y))
    g = torch.Generator().manual_seed(seed + 1)
    with graddiff.trace(net, path, values="full"):
        for _ in range(4):
            x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
            o.zero_grad()
            for xm, ym in zip(x.chunk(micro), y.chunk(micro)):
                (crit(net(xm), ym) / micro).backward()
            o.step()
    return str(path)


VARIANTS = {  # each: the setting of A, the equivalent setting of B
    "loss": ("functional", "module"),
    "opt": ("loop", "foreach"),
    "micro": (1, 4),
}

CASES = [
    (model, opt, seed, changed)
    for model, opt, seed in itertools.product(("mlp", "ln_mlp"), ("adamw", "sgd"), (0,))
    for changed in (("loss",), ("opt",), ("micro",), ("loss", "opt", "micro"))
]


@pytest.mark.parametrize(("model", "opt", "seed", "changed"), CASES)
def test_equivalent_code_is_never_diverged(tmp_path, model, opt, seed, changed):
    runs = []
    for side in (0, 1):
        pick = {k: VARIANTS[k][side if k in changed else 0] for k in VARIANTS}
        runs.append(
            _loop(
                tmp_path / f"{side}.h5",
                model=model,
                loss=pick["loss"],
                opt=f"{opt}_{pick['opt']}",
                micro=pick["micro"],
                seed=seed,
            )
        )
    r = graddiff.compare(*runs)
    assert r.verdict != "diverged" and r.exit_code == 0, (r.headline(), r.diagnosis[:1])
